//! Float <-> int8 on the vector unit: dynamic per-token quant (optionally
//! behind an RmsNorm), static quantize and dequantize (per tensor or per
//! channel, the int8 KV cache).

use super::{checked, need_out, orig};
use crate::emit::vector::{tiles_fields, vector_kernel, vector_source};
use crate::emit::{r32, DeviceKernels, EmitOptions, Role, TExpr, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};

/// Rows per dynamic-quant tile: 16 f32 scales are one 64-byte GM line, so
/// the scalar scale stores of different blocks never share a line.
const DQ_QUANT_ROWS: u64 = 16;

/// The float -> int8 tail shared by the quantizing kernels: `xf` (f32,
/// already `x / s (+ o)`) -> `q` (int8) through int32 and half, stored at
/// row `r` of `qGm` (see [`to_int8`]).
pub(crate) const TO_INT8: &str = "        LocalTensor<int32_t> xi = iBuf.Get<int32_t>();
        Cast(xi, xf, RoundMode::CAST_RINT, cols);
        PipeBarrier<PIPE_V>();
        Maxs(xi, xi, static_cast<int32_t>(-128), cols);
        PipeBarrier<PIPE_V>();
        Mins(xi, xi, static_cast<int32_t>(127), cols);
        PipeBarrier<PIPE_V>();
        LocalTensor<half> xh = hBuf.Get<half>();
        Cast(xh, xi, RoundMode::CAST_NONE, cols);
        PipeBarrier<PIPE_V>();
        LocalTensor<int8_t> q = outQ.AllocTensor<int8_t>();
        Cast(q, xh, RoundMode::CAST_NONE, cols);
        outQ.EnQue(q);
        q = outQ.DeQue<int8_t>();
        DataCopy(qGm[r * cols], q, cols);
        outQ.FreeTensor(q);
";

/// [`TO_INT8`] storing at row `row` (a C++ expression) of `qGm`.
fn to_int8(row: &str) -> String {
    TO_INT8.replace("qGm[r * cols]", &format!("qGm[{row} * cols]"))
}

const DYNAMIC_QUANT: &str = r#"
using T = {{T}};

// Per-token dynamic quantization{{NORM_WHAT}}, one row at a time, rowsPerTile
// rows per tile: s = max|x| / 127 (scalar f32 division, as the reference),
// q = clamp(rint(x / s), -128, 127) (a zero row: 0 / 0 casts to 0).
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR x, {{NORM_PARAM}}GM_ADDR q, GM_ADDR scale, const {{TILING}}& t)
    {
        cols = t.cols;
        rows = t.rows;
        rowsPerTile = t.rowsPerTile;
{{RANGE}}
        xGm.SetGlobalBuffer((__gm__ T*)x, rows * cols);
        qGm.SetGlobalBuffer((__gm__ int8_t*)q, rows * cols);
        sGm.SetGlobalBuffer((__gm__ float*)scale, rows);
        pipe.InitBuffer(inX, 2, cols * sizeof(T));
        pipe.InitBuffer(outQ, 2, cols * sizeof(int8_t));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
        pipe.InitBuffer(absBuf, cols * sizeof(float));
        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));
        pipe.InitBuffer(hBuf, cols * sizeof(half));
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(redBuf, 32);
{{NORM_INIT}}    }
    __aicore__ inline void Process()
    {
{{NORM_LOAD}}        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t r1 = MinU((tile + 1) * rowsPerTile, rows);
            for (uint32_t r = tile * rowsPerTile; r < r1; r++) Row(r);
        }
    }

private:
{{STORE_ROW}}    __aicore__ inline void Row(uint32_t r)
    {
        LocalTensor<T> x = inX.AllocTensor<T>();
        DataCopy(x, xGm[r * cols], cols);
        inX.EnQue(x);
        x = inX.DeQue<T>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> ab = absBuf.Get<float>();
        LocalTensor<float> red = redBuf.Get<float>();
        ToFloat(xf, x, cols);
        inX.FreeTensor(x);
        PipeBarrier<PIPE_V>();
{{RES_ADD}}{{NORM}}{{DYN_SCALE}}{{TO_INT8}}    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> xBuf, absBuf, iBuf, hBuf, workBuf, redBuf;
    GlobalTensor<T> xGm;
    GlobalTensor<int8_t> qGm;
    GlobalTensor<float> sGm;
{{NORM_MEMBERS}}    uint32_t cols = 0, rows = 0, rowsPerTile = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, {{NORM_PARAM}}GM_ADDR q, GM_ADDR scale, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, {{NORM_ARG}}q, scale, t);
    op.Process();
}
"#;

/// The per-row scale of dynamic quantization, shared by the quantizing
/// kernels: from `xf` (f32 row of `cols`), `s = max|x| / 127` (scalar f32
/// division, as the reference) stored at `sGm[r]`, then `xf = xf / s`;
/// `ab`, `red` (32 B) and `workBuf` ([`reduce_max_work`]) are scratch.
pub(super) const DYN_SCALE: &str = "        Abs(ab, xf, cols);
        PipeBarrier<PIPE_V>();
        ReduceMax(red, ab, workBuf.Get<float>(), cols);
        event_t v2s = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(v2s);
        WaitFlag<HardEvent::V_S>(v2s);
        const float s = red.GetValue(0) / 127.0f;
        sGm.SetValue(r, s);
        Duplicate(ab, s, cols);
        PipeBarrier<PIPE_V>();
        Div(xf, xf, ab, cols);
        PipeBarrier<PIPE_V>();
";

/// Bytes of `workBuf` for [`DYN_SCALE`]'s ReduceMax over `cols` f32: its
/// first pass leaves a (value, index) pair per 256-byte repeat (more than
/// ReduceSum's one value).
pub(super) fn reduce_max_work(cols: u64) -> u64 {
    r32((cols * 4).div_ceil(256) * 2 * 4).max(32)
}

/// Rows of `cols` elements must be whole 32-byte blocks of `t` and of int8.
pub(super) fn need_row_blocks(name: &str, cols: u64, t: DevType) -> Result<()> {
    if !cols.is_multiple_of(32) || !(cols * t.size()).is_multiple_of(32) {
        bail!("{name}: cannot be tiled: rows of {cols} elements must be a multiple of 32 (int8 32-byte blocks)");
    }
    Ok(())
}

/// The RmsNorm in front of the fused variant, with the rms_norm kernel's
/// arithmetic: `x * (1 / sqrt(sum(x^2) / cols + eps)) * w`, kept in f32
/// for the quantization (no round trip through the activation dtype); the
/// float row is also stored (`norm_out`, read by the router).
const NORM: &str = "        Mul(ab, xf, xf, cols);
        PipeBarrier<PIPE_V>();
        ReduceSum(red, ab, workBuf.Get<float>(), cols);
        event_t nv2s = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(nv2s);
        WaitFlag<HardEvent::V_S>(nv2s);
        red.SetValue(0, red.GetValue(0) / static_cast<float>(cols) + eps);
        event_t ns2v = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(ns2v);
        WaitFlag<HardEvent::S_V>(ns2v);
        Rsqrt(red, red, 1);
        SetFlag<HardEvent::V_S>(nv2s);
        WaitFlag<HardEvent::V_S>(nv2s);
        const float rstd = red.GetValue(0);
        Muls(xf, xf, rstd, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, wBuf.Get<float>(), cols);
        PipeBarrier<PIPE_V>();
        StoreRow(nGm, xf, r);
";

/// `add`: `x + residual` in f32 (as `AddRmsNorm`), stored as `sum_out`,
/// then normalized from the f32 sum.
const RES_ADD: &str = "        LocalTensor<T> rl = inX.AllocTensor<T>();
        DataCopy(rl, rGm[r * cols], cols);
        inX.EnQue(rl);
        rl = inX.DeQue<T>();
        ToFloat(ab, rl, cols);
        inX.FreeTensor(rl);
        PipeBarrier<PIPE_V>();
        Add(xf, xf, ab, cols);
        PipeBarrier<PIPE_V>();
        StoreRow(sumGm, xf, r);
";

/// Stores an f32 row in the activation dtype (`sum_out`, `norm_out`).
const STORE_ROW: &str =
    "    __aicore__ inline void StoreRow(GlobalTensor<T>& g, const LocalTensor<float>& src, uint32_t r)
    {
        LocalTensor<T> y = outF.AllocTensor<T>();
        FromFloat(y, src, cols);
        outF.EnQue(y);
        y = outF.DeQue<T>();
        DataCopy(g[r * cols], y, cols);
        outF.FreeTensor(y);
    }
";

const NORM_LOAD: &str = "        if (start < end) {
            LocalTensor<W> wl = wIn.AllocTensor<W>();
            DataCopy(wl, wGm, cols);
            wIn.EnQue(wl);
            wl = wIn.DeQue<W>();
            ToFloat(wBuf.Get<float>(), wl, cols);
            wIn.FreeTensor(wl);
            PipeBarrier<PIPE_V>();
        }
";

/// The norm in front of a fused [`rms_norm_dynamic_quant`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormQuant {
    pub eps: f64,
    /// With the residual add of `AddRmsNorm` (`sum_out` written too).
    pub add: bool,
    /// Device dtype of the norm weight.
    pub w: DevType,
}

/// `DynamicQuant (x[R, K] of dtype x, q_out i8[R, K], scale_out f32[R])`.
pub fn dynamic_quant(name: &str, rows: TExpr, cols: u64, x: DevType, o: &EmitOptions) -> Result<DeviceKernels> {
    dynamic_quant_kernel(name, rows, cols, x, None, o)
}

/// `RmsNormQuant`: the norm (`add`: `AddRmsNorm`) fused with
/// `DynamicQuant` of its f32 result: `(x[R, K], [residual[R, K],] w[K],
/// [sum_out[R, K],] norm_out[R, K], q_out i8[R, K], scale_out f32[R])`,
/// the float rows in dtype `x`, `w` of dtype `norm.w`.
pub fn rms_norm_dynamic_quant(
    name: &str,
    rows: TExpr,
    cols: u64,
    norm: NormQuant,
    x: DevType,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    dynamic_quant_kernel(name, rows, cols, x, Some(norm), o)
}

/// The kernel-parameter list, init code and members of the fused norm.
fn norm_parts(norm: &NormQuant) -> [(&'static str, String); 5] {
    let add = norm.add;
    let on = |s: &str| if add { s.to_string() } else { String::new() };
    let param = format!("{}GM_ADDR w, {}GM_ADDR normOut, ", on("GM_ADDR res, "), on("GM_ADDR sumOut, "));
    let arg = format!("{}w, {}normOut, ", on("res, "), on("sumOut, "));
    let init = format!(
        "        eps = t.eps;
        wGm.SetGlobalBuffer((__gm__ W*)w, cols);
        nGm.SetGlobalBuffer((__gm__ T*)normOut, rows * cols);
        pipe.InitBuffer(wIn, 1, cols * sizeof(W));
        pipe.InitBuffer(wBuf, cols * sizeof(float));
        pipe.InitBuffer(outF, 2, cols * sizeof(T));
{}",
        on("        rGm.SetGlobalBuffer((__gm__ T*)res, rows * cols);\n        sumGm.SetGlobalBuffer((__gm__ T*)sumOut, rows * cols);\n")
    );
    let members = format!(
        "    using W = {};
    TQue<TPosition::VECIN, 1> wIn;
    TQue<TPosition::VECOUT, 2> outF;
    TBuf<TPosition::VECCALC> wBuf;
    GlobalTensor<W> wGm;
    GlobalTensor<T> nGm{};
    float eps = 0.0f;
",
        norm.w.cpp(),
        if add { ", rGm, sumGm" } else { "" }
    );
    [("NORM_PARAM", param), ("NORM_ARG", arg), ("NORM_INIT", init), ("NORM_MEMBERS", members), ("RES_ADD", on(RES_ADD))]
}

fn dynamic_quant_kernel(
    name: &str,
    rows: TExpr,
    cols: u64,
    x: DevType,
    norm: Option<NormQuant>,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    need_row_blocks(name, cols, x)?;
    need_out(name, o, x)?;
    if let Some(n) = norm {
        need_row_blocks(name, cols, n.w)?;
        need_out(name, o, n.w)?;
    }
    let work = reduce_max_work(cols);
    let on = |s: &str| if norm.is_some() { s.to_string() } else { String::new() };
    let mut vars = vec![
        ("T", x.cpp().into()),
        ("WORK", work.to_string()),
        ("TO_INT8", to_int8("r")),
        ("DYN_SCALE", DYN_SCALE.into()),
        ("NORM_WHAT", on(" of rms_norm(x, w)")),
        ("NORM_LOAD", on(NORM_LOAD)),
        ("NORM", on(NORM)),
        ("STORE_ROW", on(STORE_ROW)),
    ];
    match &norm {
        Some(n) => vars.extend(norm_parts(n)),
        None => {
            vars.extend(["NORM_PARAM", "NORM_ARG", "NORM_INIT", "NORM_MEMBERS", "RES_ADD"].map(|k| (k, String::new())))
        }
    }
    let what = match norm {
        None => "Dynamic per-token int8 quantization.",
        Some(NormQuant { add: false, .. }) => "RmsNorm fused with dynamic per-token int8 quantization.",
        Some(NormQuant { add: true, .. }) => "AddRmsNorm fused with dynamic per-token int8 quantization.",
    };
    let src = vector_source(name, what, DYNAMIC_QUANT, &vars);
    let tiles = rows.clone().ceil_div(TExpr::c(DQ_QUANT_ROWS));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("cols", TExpr::c(cols)),
        TilingField::u32("rows", rows),
        TilingField::u32("rowsPerTile", TExpr::c(DQ_QUANT_ROWS)),
    ]);
    if let Some(n) = norm {
        fields.push(TilingField::f32("eps", n.eps));
    }
    let mut ub = 2 * r32(cols * x.size()) + 2 * r32(cols) + 3 * r32(cols * 4) + r32(cols * 2) + work + 32;
    if let Some(n) = norm {
        ub += r32(cols * n.w.size()) + r32(cols * 4) + 2 * r32(cols * x.size());
    }
    let mut dk = vector_kernel(name.to_string(), src, fields, &tiles, ub);
    let mut params = vec![orig("x", x, Role::Input, 0)];
    if let Some(n) = norm {
        if n.add {
            params.push(orig("res", x, Role::Input, 1));
        }
        let w_at = params.len();
        params.push(orig("w", n.w, Role::Input, w_at));
        if n.add {
            params.push(orig("sumOut", x, Role::Output, w_at + 1));
        }
        params.push(orig("normOut", x, Role::Output, params.len()));
    }
    let base = params.len();
    params.push(orig("q", DevType::I8, Role::Output, base));
    params.push(orig("scale", DevType::F32, Role::Output, base + 1));
    dk.params = params;
    checked(DeviceKernels { kernels: vec![dk], temps: vec![], host: None }, o, name)
}

/// Whether the scale and offset of [`quantize`] / [`dequantize`] are one
/// value (`[1]`, static activations) or one per column (`[C]`, the int8 KV
/// cache, C = kv_heads * head_dim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    PerTensor,
    PerChannel,
}

const QUANTIZE: &str = r#"
using T = {{T}};

// {{WHAT}}, one row of cols elements per tile; the f32 scale and offset
// ({{GRAN}}) are loaded once per block.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR x, {{SLOT_PARAM}}GM_ADDR scale, GM_ADDR offset, GM_ADDR q, const {{TILING}}& t)
    {
        cols = t.cols;
        params = t.params;
{{RANGE}}
{{SLOT_INIT}}        xGm.SetGlobalBuffer((__gm__ {{IN}}*)x, t.tiles * cols);
        scGm.SetGlobalBuffer((__gm__ float*)scale, params);
        ofGm.SetGlobalBuffer((__gm__ float*)offset, params);
        qGm.SetGlobalBuffer((__gm__ {{OUT}}*)q, {{Q_ROWS}} * cols);
        pipe.InitBuffer(inX, 2, cols * sizeof({{IN}}));
        pipe.InitBuffer(outQ, 2, cols * sizeof({{OUT}}));
        pipe.InitBuffer(inP, 1, cols * sizeof(float));
        pipe.InitBuffer(scBuf, cols * sizeof(float));
        pipe.InitBuffer(ofBuf, cols * sizeof(float));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
{{EXTRA_BUFS}}    }
    __aicore__ inline void Process()
    {
        if (start >= end) return;
        LoadParam(scGm, scBuf.Get<float>());
        LoadParam(ofGm, ofBuf.Get<float>());
        for (uint32_t r = start; r < end; r++) Row(r);
    }

private:
    // Per channel: a copy of the row of parameters; per tensor: the one
    // value broadcast over a row.
    __aicore__ inline void LoadParam(GlobalTensor<float>& g, const LocalTensor<float>& dst)
    {
        if (params == 1) {
            Duplicate(dst, g.GetValue(0), cols);
        } else {
            LocalTensor<float> p = inP.AllocTensor<float>();
            DataCopy(p, g, cols);
            inP.EnQue(p);
            p = inP.DeQue<float>();
            DataCopy(dst, p, cols);
            inP.FreeTensor(p);
        }
        PipeBarrier<PIPE_V>();
    }
    __aicore__ inline void Row(uint32_t r)
    {
{{ROW_HEAD}}        LocalTensor<{{IN}}> x = inX.AllocTensor<{{IN}}>();
        DataCopy(x, xGm[r * cols], cols);
        inX.EnQue(x);
        x = inX.DeQue<{{IN}}>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> sc = scBuf.Get<float>();
        LocalTensor<float> of = ofBuf.Get<float>();
{{BODY}}    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX;
    TQue<TPosition::VECOUT, 2> outQ;
    TQue<TPosition::VECIN, 1> inP;
    TBuf<TPosition::VECCALC> scBuf, ofBuf, xBuf{{EXTRA_MEMBERS}};
    GlobalTensor<{{IN}}> xGm;
    GlobalTensor<float> scGm, ofGm;
    GlobalTensor<{{OUT}}> qGm;
{{SLOT_MEMBER}}    uint32_t cols = 0, params = 1, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, {{SLOT_PARAM}}GM_ADDR scale, GM_ADDR offset, GM_ADDR q, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, {{SLOT_ARG}}scale, offset, q, t);
    op.Process();
}
"#;

/// `clamp(rint(x / s + o), -128, 127)` (the reference divides, then adds).
const QUANTIZE_BODY: &str = "        ToFloat(xf, x, cols);
        inX.FreeTensor(x);
        PipeBarrier<PIPE_V>();
        Div(xf, xf, sc, cols);
        PipeBarrier<PIPE_V>();
        Add(xf, xf, of, cols);
        PipeBarrier<PIPE_V>();
";

/// `(q - o) * s` in f32; int8 -> half -> f32 is exact.
const DEQUANTIZE_BODY: &str = "        LocalTensor<half> xh = hBuf.Get<half>();
        Cast(xh, x, RoundMode::CAST_NONE, cols);
        inX.FreeTensor(x);
        PipeBarrier<PIPE_V>();
        Cast(xf, xh, RoundMode::CAST_NONE, cols);
        PipeBarrier<PIPE_V>();
        Sub(xf, xf, of, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, sc, cols);
        PipeBarrier<PIPE_V>();
        LocalTensor<T> y = outQ.AllocTensor<T>();
        FromFloat(y, xf, cols);
        outQ.EnQue(y);
        y = outQ.DeQue<T>();
        DataCopy(qGm[r * cols], y, cols);
        outQ.FreeTensor(y);
";

fn scale_tiling(rows: TExpr, cols: u64, g: Granularity) -> (TExpr, Vec<TilingField>) {
    let tiles = rows;
    let mut fields = tiles_fields(&tiles);
    let params = if g == Granularity::PerTensor { 1 } else { cols };
    fields.extend([TilingField::u32("cols", TExpr::c(cols)), TilingField::u32("params", TExpr::c(params))]);
    (tiles, fields)
}

/// `Quantize (x[R, C] of dtype x, scale f32, offset f32, q_out i8[R, C])`
/// with scale and offset `[1]` or `[C]`: the int8 KV-cache write (per
/// channel) and static activation quantization (per tensor).
pub fn quantize(
    name: &str,
    rows: TExpr,
    cols: u64,
    g: Granularity,
    x: DevType,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    need_row_blocks(name, cols, x)?;
    need_out(name, o, x)?;
    let what = "Static int8 quantization q = clamp(rint(x / scale + offset), -128, 127)";
    let body = QUANTIZE_BODY.to_string() + &to_int8("r");
    let src = vector_source(
        name,
        &format!("{what}."),
        QUANTIZE,
        &[
            ("T", x.cpp().into()),
            ("IN", x.cpp().into()),
            ("OUT", "int8_t".into()),
            ("WHAT", what.into()),
            ("GRAN", format!("{g:?}")),
            ("EXTRA_BUFS", "        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));\n        pipe.InitBuffer(hBuf, cols * sizeof(half));\n".into()),
            ("EXTRA_MEMBERS", ", iBuf, hBuf".into()),
            ("BODY", body),
        ]
        .into_iter()
        .chain(no_slots())
        .collect::<Vec<_>>(),
    );
    let (tiles, fields) = scale_tiling(rows, cols, g);
    let ub = 2 * r32(cols * x.size()) + 2 * r32(cols) + 4 * r32(cols * 4) + r32(cols * 4) + r32(cols * 2);
    let mut dk = vector_kernel(name.to_string(), src, fields, &tiles, ub);
    dk.params = vec![
        orig("x", x, Role::Input, 0),
        orig("scale", DevType::F32, Role::Input, 1),
        orig("offset", DevType::F32, Role::Input, 2),
        orig("q", DevType::I8, Role::Output, 3),
    ];
    checked(DeviceKernels { kernels: vec![dk], temps: vec![], host: None }, o, name)
}

/// `Dequantize (q i8[R, C], scale f32, offset f32, y_out[R, C] of dtype y)`,
/// scale and offset `[1]` or `[C]`: the int8 KV-cache read.
pub fn dequantize(
    name: &str,
    rows: TExpr,
    cols: u64,
    g: Granularity,
    y: DevType,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    need_row_blocks(name, cols, y)?;
    need_out(name, o, y)?;
    let what = "Int8 dequantization y = (q - offset) * scale";
    let src = vector_source(
        name,
        &format!("{what}."),
        QUANTIZE,
        &[
            ("T", y.cpp().into()),
            ("IN", "int8_t".into()),
            ("OUT", "T".into()),
            ("WHAT", what.into()),
            ("GRAN", format!("{g:?}")),
            ("EXTRA_BUFS", "        pipe.InitBuffer(hBuf, cols * sizeof(half));\n".into()),
            ("EXTRA_MEMBERS", ", hBuf".into()),
            ("BODY", DEQUANTIZE_BODY.into()),
        ]
        .into_iter()
        .chain(no_slots())
        .collect::<Vec<_>>(),
    );
    let (tiles, fields) = scale_tiling(rows, cols, g);
    let ub = 2 * r32(cols) + 2 * r32(cols * y.size()) + 4 * r32(cols * 4) + r32(cols * 2);
    let mut dk = vector_kernel(name.to_string(), src, fields, &tiles, ub);
    dk.params = vec![
        orig("q", DevType::I8, Role::Input, 0),
        orig("scale", DevType::F32, Role::Input, 1),
        orig("offset", DevType::F32, Role::Input, 2),
        orig("y", y, Role::Output, 3),
    ];
    checked(DeviceKernels { kernels: vec![dk], temps: vec![], host: None }, o, name)
}

/// The [`QUANTIZE`] template's slot-mapping pieces for a kernel that
/// stores row `r` at row `r` of its output.
fn no_slots() -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> =
        ["SLOT_PARAM", "SLOT_ARG", "SLOT_INIT", "SLOT_MEMBER", "ROW_HEAD"].map(|k| (k, String::new())).into();
    v.push(("Q_ROWS", "t.tiles".into()));
    v
}

/// `KvCacheWriteQuant (new[T, C] of dtype x, slots[T] of dtype `slots`,
/// scale f32[C], offset f32[C], cache i8[cache_slots, C])` (C = kv_heads *
/// head_dim, one cache slot a row): each new row quantized per channel
/// (`Quantize`) into its slot of the paged int8 cache, in place. No other
/// slot is touched; a slot outside the cache (the runtime never sends one;
/// the interpreter rejects it) stores nothing.
pub fn kv_cache_write_quant(
    name: &str,
    tokens: TExpr,
    cols: u64,
    cache_slots: TExpr,
    slots: DevType,
    x: DevType,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    need_row_blocks(name, cols, x)?;
    need_out(name, o, x)?;
    if !matches!(slots, DevType::I32 | DevType::I64) {
        bail!("{name}: slot_mapping must be i32 or i64 on the device, found {slots}");
    }
    let what = "Int8 KV-cache write: cache[slot[r]] = clamp(rint(x[r] / scale + offset), -128, 127)";
    let body = QUANTIZE_BODY.to_string() + &to_int8("static_cast<uint32_t>(slot)");
    let s_t = slots.cpp();
    let src = vector_source(
        name,
        &format!("{what}, per channel."),
        QUANTIZE,
        &[
            ("T", x.cpp().into()),
            ("IN", x.cpp().into()),
            ("OUT", "int8_t".into()),
            ("WHAT", what.into()),
            ("GRAN", "PerChannel".into()),
            ("EXTRA_BUFS", "        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));\n        pipe.InitBuffer(hBuf, cols * sizeof(half));\n".into()),
            ("EXTRA_MEMBERS", ", iBuf, hBuf".into()),
            ("BODY", body),
            ("SLOT_PARAM", "GM_ADDR slots, ".into()),
            ("SLOT_ARG", "slots, ".into()),
            (
                "SLOT_INIT",
                format!("        cacheSlots = t.cacheSlots;\n        slotGm.SetGlobalBuffer((__gm__ {s_t}*)slots, t.tiles);\n"),
            ),
            ("SLOT_MEMBER", format!("    GlobalTensor<{s_t}> slotGm;\n    uint32_t cacheSlots = 0;\n")),
            (
                "ROW_HEAD",
                "        const int64_t slot = static_cast<int64_t>(slotGm.GetValue(r));\n        if (slot < 0 || slot >= static_cast<int64_t>(cacheSlots)) return;\n".into(),
            ),
            ("Q_ROWS", "cacheSlots".into()),
        ],
    );
    let (tiles, mut fields) = scale_tiling(tokens, cols, Granularity::PerChannel);
    fields.push(TilingField::u32("cacheSlots", cache_slots));
    let ub = 2 * r32(cols * x.size()) + 2 * r32(cols) + 4 * r32(cols * 4) + r32(cols * 4) + r32(cols * 2);
    let mut dk = vector_kernel(name.to_string(), src, fields, &tiles, ub);
    dk.params = vec![
        orig("x", x, Role::Input, 0),
        orig("slots", slots, Role::Input, 1),
        orig("scale", DevType::F32, Role::Input, 2),
        orig("offset", DevType::F32, Role::Input, 3),
        orig("cache", DevType::I8, Role::InOut, 4),
    ];
    checked(DeviceKernels { kernels: vec![dk], temps: vec![], host: None }, o, name)
}

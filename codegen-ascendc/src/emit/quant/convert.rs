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
/// already `x / s (+ o)`) -> `q` (int8) through int32 and half.
pub(super) const TO_INT8: &str = "        LocalTensor<int32_t> xi = iBuf.Get<int32_t>();
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
    __aicore__ inline void Row(uint32_t r)
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
{{NORM}}{{DYN_SCALE}}{{TO_INT8}}    }

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
/// for the quantization (no round trip through the activation dtype).
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

/// `DynamicQuant (x[R, K] of dtype x, q_out i8[R, K], scale_out f32[R])`.
pub fn dynamic_quant(name: &str, rows: TExpr, cols: u64, x: DevType, o: &EmitOptions) -> Result<DeviceKernels> {
    dynamic_quant_kernel(name, rows, cols, x, None, o)
}

/// The fused `RmsNorm` + `DynamicQuant` (the quantized import's input
/// norms): `(x[R, K], w[K] of dtype w, q_out i8[R, K], scale_out f32[R])`,
/// quantizing `rms_norm(x, w, eps)` without storing it.
pub fn rms_norm_dynamic_quant(
    name: &str,
    rows: TExpr,
    cols: u64,
    eps: f64,
    x: DevType,
    w: DevType,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    dynamic_quant_kernel(name, rows, cols, x, Some((eps, w)), o)
}

fn dynamic_quant_kernel(
    name: &str,
    rows: TExpr,
    cols: u64,
    x: DevType,
    norm: Option<(f64, DevType)>,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    need_row_blocks(name, cols, x)?;
    need_out(name, o, x)?;
    if let Some((_, w)) = norm {
        need_row_blocks(name, cols, w)?;
        need_out(name, o, w)?;
    }
    let work = reduce_max_work(cols);
    let w_t = norm.map(|(_, w)| w).unwrap_or(x);
    let on = |s: &str| if norm.is_some() { s.to_string() } else { String::new() };
    let src = vector_source(
        name,
        if norm.is_some() { "RmsNorm fused with dynamic per-token int8 quantization." } else { "Dynamic per-token int8 quantization." },
        DYNAMIC_QUANT,
        &[
            ("T", x.cpp().into()),
            ("WORK", work.to_string()),
            ("TO_INT8", TO_INT8.into()),
            ("DYN_SCALE", DYN_SCALE.into()),
            ("NORM_WHAT", on(" of rms_norm(x, w)")),
            ("NORM_PARAM", on("GM_ADDR w, ")),
            ("NORM_ARG", on("w, ")),
            (
                "NORM_INIT",
                on("        eps = t.eps;\n        wGm.SetGlobalBuffer((__gm__ W*)w, cols);\n        pipe.InitBuffer(wIn, 1, cols * sizeof(W));\n        pipe.InitBuffer(wBuf, cols * sizeof(float));\n"),
            ),
            ("NORM_LOAD", on(NORM_LOAD)),
            ("NORM", on(NORM)),
            (
                "NORM_MEMBERS",
                on(&format!("    using W = {};\n    TQue<TPosition::VECIN, 1> wIn;\n    TBuf<TPosition::VECCALC> wBuf;\n    GlobalTensor<W> wGm;\n    float eps = 0.0f;\n", w_t.cpp())),
            ),
        ],
    );
    let tiles = rows.clone().ceil_div(TExpr::c(DQ_QUANT_ROWS));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("cols", TExpr::c(cols)),
        TilingField::u32("rows", rows),
        TilingField::u32("rowsPerTile", TExpr::c(DQ_QUANT_ROWS)),
    ]);
    if let Some((eps, _)) = norm {
        fields.push(TilingField::f32("eps", eps));
    }
    let mut ub = 2 * r32(cols * x.size()) + 2 * r32(cols) + 3 * r32(cols * 4) + r32(cols * 2) + work + 32;
    if norm.is_some() {
        ub += r32(cols * w_t.size()) + r32(cols * 4);
    }
    let mut dk = vector_kernel(name.to_string(), src, fields, &tiles, ub);
    let mut params = vec![orig("x", x, Role::Input, 0)];
    if norm.is_some() {
        params.push(orig("w", w_t, Role::Input, 1));
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
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR scale, GM_ADDR offset, GM_ADDR q, const {{TILING}}& t)
    {
        cols = t.cols;
        params = t.params;
{{RANGE}}
        xGm.SetGlobalBuffer((__gm__ {{IN}}*)x, t.tiles * cols);
        scGm.SetGlobalBuffer((__gm__ float*)scale, params);
        ofGm.SetGlobalBuffer((__gm__ float*)offset, params);
        qGm.SetGlobalBuffer((__gm__ {{OUT}}*)q, t.tiles * cols);
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
        LocalTensor<{{IN}}> x = inX.AllocTensor<{{IN}}>();
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
    uint32_t cols = 0, params = 1, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, GM_ADDR scale, GM_ADDR offset, GM_ADDR q, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, scale, offset, q, t);
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
    let body = QUANTIZE_BODY.to_string() + TO_INT8;
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
        ],
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
        ],
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

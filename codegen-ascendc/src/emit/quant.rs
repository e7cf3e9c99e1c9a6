//! Int8 kernels (docs/quantization.md) with the interpreter's exact
//! semantics (`panguc_ir::interp::quant`):
//!
//! - [`quant_matmul`]: int8 x int8 cube GEMM accumulating in int32 (L0C),
//!   written as int32, then a vector dequant epilogue: static W8A8
//!   `f32(acc + quant_bias[n]) * deq_scale[n]` (f32 or msModelSlim's int64
//!   `deq_scale`) or W8A8_DYNAMIC `f32(acc) * w_scale[n] * x_scale[m]`.
//! - [`grouped_quant_matmul`]: the routed-expert form over expert-sorted
//!   rows driven by per-expert counts: a one-block prefix sum turns the
//!   counts into row offsets, the grouped cube GEMM of `moe.rs` (A read as
//!   whole row blocks of each expert, never one row per K step) writes
//!   int32, and the same dequant epilogue picks each row's expert scales.
//! - [`dynamic_quant`]: per-token `s = max|x| / 127`, `q = rint(x / s)`.
//! - [`quantize`] / [`dequantize`]: per-channel (the int8 KV cache) or
//!   per-tensor (static activations) `clamp(rint(x / s + o))` and
//!   `(q - o) * s`.
//!
//! Why the dequant runs on the vector unit and not in the 910B Fixpipe
//! (`VDEQF16`): the Fixpipe dequant writes f16 only and rounds the scale to
//! its own format, so it cannot give the interpreter's f32 result; 310P has
//! no Fixpipe at all. So both chips write the exact int32 accumulators and
//! dequantise in f32 on the vector unit (as the f16 GEMMs' epilogues do).
//!
//! Float -> int8 on the vector unit goes float -> int32 with CAST_RINT
//! (round half to even, the interpreter's rule), a clamp to [-128, 127] in
//! int32, then int32 -> half -> int8 (both exact for that range): a direct
//! float -> half first would round before the integer rounding.
//!
//! These emitters take explicit sizes instead of a program kernel so that
//! the kernel selection (and fused variants such as RmsNorm + quant) can
//! compose them; argument `i` of the spec is `ArgRef::Orig(i)`.

use super::cube::{cube_device_kernel, cube_kernel_for, BaseTile, CubeSpec};
use super::moe::{grouped_cube_fields, grouped_cube_source};
use super::vector::{tiles_fields, vector_kernel, vector_source, PRELUDE};
use super::{
    fill_kernel, head, r32, ArgRef, DeviceKernel, DeviceKernels, EmitOptions, Param, Role, TExpr, TempBuf, TilingField,
};
use crate::target::DevType;
use anyhow::{bail, Result};

/// How the int32 accumulators become floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dequant {
    /// Static W8A8: arguments `quant_bias` i32 `[N]`, `deq_scale` `[N]` of
    /// dtype `deq` (f32, or i64 carrying the f32 bits in its low word).
    Static { deq: DevType },
    /// W8A8_DYNAMIC: arguments `w_scale` f32 `[N]` (`[E, N]` grouped) and
    /// `x_scale` f32 `[M]`.
    PerToken,
}

/// `QuantMatMul` / `QuantMatMulPerToken` `(xq i8[M, K], w i8[N, K], a, b, out[M, N])`
/// with `(a, b)` as [`Dequant`] says.
#[derive(Debug, Clone)]
pub struct QuantMatMulSpec {
    /// Program-kernel name: entry prefix and error context.
    pub name: String,
    pub m: TExpr,
    pub n: u64,
    pub k: u64,
    pub dequant: Dequant,
    /// Output dtype: f32 (the interpreter's) or the activation dtype.
    pub out: DevType,
}

/// `GroupedQuantMatMul (xq i8[R, K], w i8[E, N, K], w_scale f32[E, N],
/// x_scale f32[R], counts[E] (i64 or i32), out[R, N])`.
#[derive(Debug, Clone)]
pub struct GroupedQuantMatMulSpec {
    pub name: String,
    pub rows: TExpr,
    pub experts: u64,
    pub n: u64,
    pub k: u64,
    pub counts: DevType,
    pub out: DevType,
}

/// Int8 GEMM operands: N a multiple of 16 (output fractal rows) and K of
/// 32 (the int8 fractal width), so no K padding reaches the Mmad.
fn need_int8_dims(name: &str, n: u64, k: u64) -> Result<()> {
    if !n.is_multiple_of(16) || !k.is_multiple_of(32) {
        bail!("{name}: cannot be tiled: int8 matmul N = {n} must be a multiple of 16 and K = {k} a multiple of 32");
    }
    Ok(())
}

fn need_out(name: &str, o: &EmitOptions, out: DevType) -> Result<()> {
    if out != DevType::F32 {
        o.target.check_act(out).map_err(|e| anyhow::anyhow!("{name}: output dtype: {e}"))?;
    }
    Ok(())
}

fn orig(name: &str, dtype: DevType, role: Role, i: usize) -> Param {
    Param { name: name.into(), dtype, role, arg: ArgRef::Orig(i) }
}

fn acc_param(role: Role) -> Param {
    Param { name: "acc".into(), dtype: DevType::I32, role, arg: ArgRef::Temp(0) }
}

fn acc_temp(name: &str, rows: &TExpr, n: u64) -> TempBuf {
    TempBuf {
        name: format!("{name}.acc"),
        dtype: DevType::I32,
        shape: vec![rows.clone(), TExpr::c(n)],
        elems: rows.clone().times(TExpr::c(n)),
    }
}

/// Static or per-token int8 matmul: cube kernel (int32 to a workspace) and
/// the dequant epilogue.
pub fn quant_matmul(s: &QuantMatMulSpec, o: &EmitOptions) -> Result<DeviceKernels> {
    need_int8_dims(&s.name, s.n, s.k)?;
    need_out(&s.name, o, s.out)?;
    let cube = cube_kernel_for(
        &s.name,
        o.target,
        CubeSpec {
            entry: format!("{}_cube", s.name),
            what: "int8 x int8 to an int32 workspace",
            t: DevType::I8,
            out: DevType::I32,
            m: s.m.clone(),
            n: s.n,
            k: s.k,
            params: vec![
                orig("a", DevType::I8, Role::Input, 0),
                orig("w", DevType::I8, Role::Input, 1),
                acc_param(Role::Output),
            ],
        },
    )?;
    let (a, b) = match s.dequant {
        Dequant::Static { deq } => {
            need_scale_dtype(&s.name, "deq_scale", deq, true)?;
            (orig("bias", DevType::I32, Role::Input, 2), orig("deq", deq, Role::Input, 3))
        }
        Dequant::PerToken => (orig("ws", DevType::F32, Role::Input, 2), orig("xs", DevType::F32, Role::Input, 3)),
    };
    let epi = dequant_kernel(
        DequantSpec {
            entry: format!("{}_dequant", s.name),
            dequant: s.dequant,
            grouped: None,
            rows: s.m.clone(),
            n: s.n,
            out: s.out,
        },
        vec![acc_param(Role::Input), a, b, orig("y", s.out, Role::Output, 4)],
    )?;
    checked(
        DeviceKernels { kernels: vec![cube, epi], temps: vec![acc_temp(&s.name, &s.m, s.n)], host: None },
        o,
        &s.name,
    )
}

fn need_scale_dtype(name: &str, what: &str, t: DevType, i64_ok: bool) -> Result<()> {
    match t {
        DevType::F32 => Ok(()),
        DevType::I64 if i64_ok => Ok(()),
        other => bail!("{name}: {what} must be f32{} on the device, not {other}", if i64_ok { " or i64" } else { "" }),
    }
}

/// Grouped W8A8_DYNAMIC expert GEMM: counts -> offsets, grouped int8 cube
/// GEMM, per-token dequant with each row's expert scales.
pub fn grouped_quant_matmul(s: &GroupedQuantMatMulSpec, o: &EmitOptions) -> Result<DeviceKernels> {
    need_int8_dims(&s.name, s.n, s.k)?;
    need_out(&s.name, o, s.out)?;
    if !matches!(s.counts, DevType::I64 | DevType::I32) {
        bail!("{}: expert counts must be i64 or i32 on the device, not {}", s.name, s.counts);
    }
    let offsets = offsets_kernel(&s.name, s.experts, s.rows.clone(), s.counts)?;
    let base = BaseTile::for_type(DevType::I8);
    let entry = format!("{}_cube", s.name);
    let src = grouped_cube_source(&entry, "routed experts, int8", DevType::I8, false);
    let fields = grouped_cube_fields(&base, s.experts, s.rows.clone(), s.rows.clone(), s.n, s.k);
    let tiles = TExpr::c(s.experts * s.n.div_ceil(base.n));
    let off = |role| Param { name: "offsets".into(), dtype: DevType::I64, role, arg: ArgRef::Temp(1) };
    let cube = cube_device_kernel(
        entry,
        src,
        fields,
        &tiles,
        vec![
            orig("a", DevType::I8, Role::Input, 0),
            off(Role::Input),
            orig("w", DevType::I8, Role::Input, 1),
            acc_param(Role::Output),
        ],
        base.mem(DevType::I8, o.target),
    );
    let epi = dequant_kernel(
        DequantSpec {
            entry: format!("{}_dequant", s.name),
            dequant: Dequant::PerToken,
            grouped: Some(s.experts),
            rows: s.rows.clone(),
            n: s.n,
            out: s.out,
        },
        vec![
            acc_param(Role::Input),
            orig("ws", DevType::F32, Role::Input, 2),
            orig("xs", DevType::F32, Role::Input, 3),
            off(Role::Input),
            orig("y", s.out, Role::Output, 5),
        ],
    )?;
    let mut offsets = offsets;
    offsets.params = vec![orig("counts", s.counts, Role::Input, 4), off(Role::Output)];
    let off_temp = TempBuf {
        name: format!("{}.offsets", s.name),
        dtype: DevType::I64,
        shape: vec![TExpr::c(s.experts + 1)],
        elems: TExpr::c(s.experts + 1),
    };
    let dks = DeviceKernels {
        kernels: vec![offsets, cube, epi],
        temps: vec![acc_temp(&s.name, &s.rows, s.n), off_temp],
        host: None,
    };
    checked(dks, o, &s.name)
}

const OFFSETS: &str = r#"
using C = {{C}};

// offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e]: where expert e's
// rows start in the expert-sorted rows. One block; each prefix is clamped
// to the row count, so corrupt counts cannot send the GEMM out of bounds
// (the interpreter rejects counts that do not partition the rows).
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR counts, GM_ADDR offsets, const {{TILING}}& t)
    {
        experts = t.experts;
        rows = t.rows;
        cGm.SetGlobalBuffer((__gm__ C*)counts, experts);
        oGm.SetGlobalBuffer((__gm__ int64_t*)offsets, experts + 1);
    }
    __aicore__ inline void Process()
    {
        if (GetBlockIdx() != 0) return;
        int64_t acc = 0;
        oGm.SetValue(0, 0);
        for (uint32_t e = 0; e < experts; e++) {
            const int64_t c = static_cast<int64_t>(cGm.GetValue(e));
            acc += c > 0 ? c : 0;
            if (acc > static_cast<int64_t>(rows)) acc = rows;
            oGm.SetValue(e + 1, acc);
        }
    }

private:
    GlobalTensor<C> cGm;
    GlobalTensor<int64_t> oGm;
    uint32_t experts = 0, rows = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR counts, GM_ADDR offsets, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(counts, offsets, t);
    op.Process();
}
"#;

fn offsets_kernel(name: &str, experts: u64, rows: TExpr, counts: DevType) -> Result<DeviceKernel> {
    let entry = format!("{name}_offsets");
    // One block: no work range, so not `vector_source` (whose template
    // must take `{{RANGE}}`).
    let src = head(&entry, "Expert counts to row offsets (prefix sum).")
        + PRELUDE
        + &fill_kernel(OFFSETS, &entry, &[("C", counts.cpp().into())]);
    let tiles = TExpr::c(1);
    let mut fields = tiles_fields(&tiles);
    fields.extend([TilingField::u32("experts", TExpr::c(experts)), TilingField::u32("rows", rows)]);
    Ok(vector_kernel(entry, src, fields, &tiles, 0))
}

/// The dequant epilogue of the int8 GEMMs.
struct DequantSpec {
    entry: String,
    dequant: Dequant,
    /// `Some(experts)`: per-expert `w_scale[E, N]` chosen through `offsets`.
    grouped: Option<u64>,
    rows: TExpr,
    n: u64,
    out: DevType,
}

/// Rows of one epilogue tile: the column scales are loaded once per tile.
const DQ_ROWS: u64 = 16;
/// Column chunk of one epilogue tile.
const DQ_COLS: u64 = 1024;

const DEQUANT: &str = r#"
using O = {{O}};
using D = {{D}};

// Dequant epilogue of an int8 GEMM: {{WHAT}}. One tile = up to rowsPerTile
// rows x one column chunk; the column vectors are loaded once per tile (and
// again only when a grouped tile crosses into the next expert's rows).
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR acc, GM_ADDR colA, GM_ADDR colB, {{OFF_PARAM}}GM_ADDR y, const {{TILING}}& t)
    {
        n = t.n;
        nTile = t.nTile;
        rows = t.rows;
        rowsPerTile = t.rowsPerTile;
        chunks = (n + nTile - 1) / nTile;
{{RANGE}}
        accGm.SetGlobalBuffer((__gm__ int32_t*)acc, rows * n);
        yGm.SetGlobalBuffer((__gm__ O*)y, rows * n);
{{INIT}}        pipe.InitBuffer(inAcc, 2, nTile * sizeof(int32_t));
        pipe.InitBuffer(outY, 2, nTile * sizeof(O));
        pipe.InitBuffer(inCol, 1, nTile * sizeof(D));
        pipe.InitBuffer(scBuf, nTile * sizeof(float));
        pipe.InitBuffer(xBuf, nTile * sizeof(float));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t r0 = (tile / chunks) * rowsPerTile;
            const uint32_t r1 = MinU(r0 + rowsPerTile, rows);
            const uint32_t c0 = (tile % chunks) * nTile;
            const uint32_t len = MinU(nTile, n - c0);
            int64_t loaded = -1;
            for (uint32_t r = r0; r < r1; r++) {
                const int64_t e = {{EXPERT_OF}};
                if (e != loaded) {
                    LoadCols(static_cast<uint32_t>(e), c0, len);
                    loaded = e;
                }
                Row(r, c0, len);
            }
        }
    }

private:
    // The column scales (and static bias) of expert e, columns c0..c0+len.
    __aicore__ inline void LoadCols(uint32_t e, uint32_t c0, uint32_t len)
    {
        LocalTensor<float> sc = scBuf.Get<float>();
        LocalTensor<D> raw = inCol.AllocTensor<D>();
        DataCopy(raw, scaleGm[e * n + c0], len);
        inCol.EnQue(raw);
        raw = inCol.DeQue<D>();
{{DECODE}}        inCol.FreeTensor(raw);
{{LOAD_BIAS}}    }
    __aicore__ inline void Row(uint32_t r, uint32_t c0, uint32_t len)
    {
        LocalTensor<int32_t> a = inAcc.AllocTensor<int32_t>();
        DataCopy(a, accGm[r * n + c0], len);
        inAcc.EnQue(a);
        a = inAcc.DeQue<int32_t>();
        LocalTensor<float> x = xBuf.Get<float>();
        LocalTensor<float> sc = scBuf.Get<float>();
{{ADD_BIAS}}        Cast(x, a, RoundMode::CAST_NONE, len);
        inAcc.FreeTensor(a);
        PipeBarrier<PIPE_V>();
        Mul(x, x, sc, len);
        PipeBarrier<PIPE_V>();
{{ROW_SCALE}}        LocalTensor<O> y = outY.AllocTensor<O>();
        FromFloat(y, x, len);
        outY.EnQue(y);
        y = outY.DeQue<O>();
        DataCopy(yGm[r * n + c0], y, len);
        outY.FreeTensor(y);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inAcc;
    TQue<TPosition::VECOUT, 2> outY;
    TQue<TPosition::VECIN, 1> inCol;
    TBuf<TPosition::VECCALC> scBuf, xBuf{{BIAS_BUF}};
    GlobalTensor<int32_t> accGm;
    GlobalTensor<D> scaleGm;
    GlobalTensor<O> yGm;
{{MEMBERS}}    uint32_t n = 0, nTile = 0, rows = 0, rowsPerTile = 0, chunks = 1, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR acc, GM_ADDR colA, GM_ADDR colB, {{OFF_PARAM}}GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(acc, colA, colB, {{OFF_ARG}}y, t);
    op.Process();
}
"#;

/// f32 scales: a UB copy into the scale buffer.
const DECODE_F32: &str = "        DataCopy(sc, raw, len);
        PipeBarrier<PIPE_V>();
";
/// msModelSlim's int64 `deq_scale`: the f32 bits are the low (first,
/// little-endian) word of each int64; picked by the scalar unit once per
/// tile (the vector unit has no stride-2 element move in our API subset).
const DECODE_I64: &str = "        event_t m2s = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::MTE2_S));
        SetFlag<HardEvent::MTE2_S>(m2s);
        WaitFlag<HardEvent::MTE2_S>(m2s);
        LocalTensor<uint32_t> words = raw.ReinterpretCast<uint32_t>();
        LocalTensor<uint32_t> bits = sc.ReinterpretCast<uint32_t>();
        for (uint32_t i = 0; i < len; i++) bits.SetValue(i, words.GetValue(2 * i));
        event_t s2v = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(s2v);
        WaitFlag<HardEvent::S_V>(s2v);
";

fn dequant_kernel(s: DequantSpec, params: Vec<Param>) -> Result<DeviceKernel> {
    let DequantSpec { entry, dequant, grouped, rows, n, out } = s;
    let n_tile = DQ_COLS.min(n);
    let (d, what) = match dequant {
        Dequant::Static { deq } => (deq, "y = f32(acc + quant_bias[n]) * deq_scale[n]"),
        Dequant::PerToken if grouped.is_some() => (DevType::F32, "y = f32(acc) * w_scale[e(r), n] * x_scale[r]"),
        Dequant::PerToken => (DevType::F32, "y = f32(acc) * w_scale[n] * x_scale[r]"),
    };
    let experts = grouped.unwrap_or(1);
    let stat = matches!(dequant, Dequant::Static { .. });
    let mut init = String::new();
    let mut members = String::new();
    if stat {
        init += "        biasGm.SetGlobalBuffer((__gm__ int32_t*)colA, n);\n        scaleGm.SetGlobalBuffer((__gm__ D*)colB, n);\n        pipe.InitBuffer(inBias, 1, nTile * sizeof(int32_t));\n        pipe.InitBuffer(biasBuf, nTile * sizeof(int32_t));\n";
        members += "    TQue<TPosition::VECIN, 1> inBias;\n    GlobalTensor<int32_t> biasGm;\n";
    } else {
        init += "        scaleGm.SetGlobalBuffer((__gm__ D*)colA, t.experts * n);\n        xsGm.SetGlobalBuffer((__gm__ float*)colB, rows);\n";
        members += "    GlobalTensor<float> xsGm;\n";
    }
    if grouped.is_some() {
        init +=
            "        offGm.SetGlobalBuffer((__gm__ int64_t*)offsets, t.experts + 1);\n        experts = t.experts;\n";
        members += "    GlobalTensor<int64_t> offGm;\n    uint32_t experts = 0;\n    int64_t cursor = 0;\n";
    }
    // Rows of a block come in increasing order: the expert cursor only
    // moves forward (rows past the last offset keep the last expert).
    let expert_of = if grouped.is_some() { "ExpertOf(r)" } else { "0" };
    let mut template = DEQUANT.to_string();
    if grouped.is_some() {
        template = template.replace(
            "    TPipe pipe;\n",
            "    __aicore__ inline int64_t ExpertOf(uint32_t r)
    {
        if (cursor > 0 && static_cast<int64_t>(r) < offGm.GetValue(cursor)) cursor = 0;
        while (cursor + 1 < static_cast<int64_t>(experts) && static_cast<int64_t>(r) >= offGm.GetValue(cursor + 1)) cursor++;
        return cursor;
    }

    TPipe pipe;\n",
        );
    }
    let load_bias = if stat {
        "        LocalTensor<int32_t> b = inBias.AllocTensor<int32_t>();
        DataCopy(b, biasGm[c0], len);
        inBias.EnQue(b);
        b = inBias.DeQue<int32_t>();
        DataCopy(biasBuf.Get<int32_t>(), b, len);
        inBias.FreeTensor(b);
        PipeBarrier<PIPE_V>();
"
    } else {
        ""
    };
    let add_bias =
        if stat { "        Add(a, a, biasBuf.Get<int32_t>(), len);\n        PipeBarrier<PIPE_V>();\n" } else { "" };
    let row_scale =
        if stat { "" } else { "        Muls(x, x, xsGm.GetValue(r), len);\n        PipeBarrier<PIPE_V>();\n" };
    let src = vector_source(
        &entry,
        &format!("Int8 GEMM dequant epilogue: {what}."),
        &template,
        &[
            ("O", out.cpp().into()),
            ("D", d.cpp().into()),
            ("WHAT", what.into()),
            ("OFF_PARAM", if grouped.is_some() { "GM_ADDR offsets, " } else { "" }.into()),
            ("OFF_ARG", if grouped.is_some() { "offsets, " } else { "" }.into()),
            ("INIT", init),
            ("MEMBERS", members),
            ("EXPERT_OF", expert_of.into()),
            ("DECODE", if d == DevType::I64 { DECODE_I64 } else { DECODE_F32 }.into()),
            ("LOAD_BIAS", load_bias.into()),
            ("ADD_BIAS", add_bias.into()),
            ("ROW_SCALE", row_scale.into()),
            ("BIAS_BUF", if stat { ", biasBuf" } else { "" }.into()),
        ],
    );
    let tiles = rows.clone().ceil_div(TExpr::c(DQ_ROWS)).times(TExpr::c(n.div_ceil(n_tile)));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("n", TExpr::c(n)),
        TilingField::u32("nTile", TExpr::c(n_tile)),
        TilingField::u32("rows", rows),
        TilingField::u32("rowsPerTile", TExpr::c(DQ_ROWS)),
        TilingField::u32("experts", TExpr::c(experts)),
    ]);
    let mut ub = 2 * r32(n_tile * 4) + 2 * r32(n_tile * out.size()) + r32(n_tile * d.size()) + 2 * r32(n_tile * 4);
    if stat {
        ub += 2 * r32(n_tile * 4);
    }
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = params;
    Ok(dk)
}

/// Rows per dynamic-quant tile: 16 f32 scales are one 64-byte GM line, so
/// the scalar scale stores of different blocks never share a line.
const DQ_QUANT_ROWS: u64 = 16;

/// The float -> int8 tail shared by the quantizing kernels: `xf` (f32,
/// already `x / s (+ o)`) -> `q` (int8) through int32 and half.
const TO_INT8: &str = "        LocalTensor<int32_t> xi = iBuf.Get<int32_t>();
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
{{NORM}}        Abs(ab, xf, cols);
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
{{TO_INT8}}    }

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

/// Rows of `cols` elements must be whole 32-byte blocks of `t` and of int8.
fn need_row_blocks(name: &str, cols: u64, t: DevType) -> Result<()> {
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
    // ReduceMax's first pass leaves a (value, index) pair per 256-byte
    // repeat (more than ReduceSum's one value).
    let work = r32((cols * 4).div_ceil(256) * 2 * 4).max(32);
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

/// Every kernel must fit the chip's on-chip memories (what `emit_kernel`
/// checks for the kernels it dispatches).
fn checked(dks: DeviceKernels, o: &EmitOptions, name: &str) -> Result<DeviceKernels> {
    for dk in &dks.kernels {
        dk.mem.check(o.target, &format!("kernel `{name}` ({})", dk.entry))?;
    }
    Ok(dks)
}

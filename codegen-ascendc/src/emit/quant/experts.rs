//! The fused W8A8_DYNAMIC expert kernels (`MoeGateUpQuant`,
//! `QuantGateUpQuant`, `MoeDownQuant`; semantics in `KernelKind`), built
//! from the int8 GEMMs of `gemm.rs`:
//!
//! - routed gate/up: a gather copies each sorted row's int8 token row once
//!   into one contiguous block per expert (`moe_init_routing`'s expanded
//!   rows), so the grouped cube GEMMs of the gate and of the up projection
//!   fetch A as row blocks, never one row per K step; both write int32, and
//!   one vector kernel dequantizes both, applies `silu(g) * u` and quantizes
//!   the row per token, so neither the float activations nor `g`, `u`
//!   reach memory as floats;
//! - shared gate/up: the same with the dense int8 cube GEMM and no routing;
//! - routed down: the grouped int8 cube GEMM over the sorted quantized rows
//!   and the grouped dequant epilogue, times the routing weight.
//!
//! Every step has the interpreter's f32 arithmetic in its order (exact int32
//! sums, `f32(acc) * w_scale * x_scale`, `g * sigmoid(g) * u`, the
//! `dynamic_quant` rule), so the simulation matches it bit for bit.

use super::convert::{need_row_blocks, reduce_max_work, DYN_SCALE, TO_INT8};
use super::gemm::{grouped_dequant_kernel, grouped_int8_cube, GroupedDims, DECODE_I64, EXPERT_OF};
use super::wire::need_dt;
use super::{acc_param, acc_temp, need_int8_dims, need_out};
use crate::emit::cube::{cube_kernel_for, CubeSpec};
use crate::emit::vector::{gather_kernel, tiles_fields, vector_kernel, vector_source};
use crate::emit::{r32, ArgRef, Ctx, DeviceKernel, DeviceKernels, Param, Role, TExpr, TempBuf, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};

/// Rows per gate/up epilogue tile (as `DynamicQuant`: 16 f32 scales are
/// one 64-byte GM line, so blocks never share a line of scale stores).
const ROWS_PER_TILE: u64 = 16;

/// A device-kernel parameter bound to temp `j`.
pub(super) fn temp(name: &str, dtype: DevType, role: Role, j: usize) -> Param {
    Param::new(name, dtype, role, ArgRef::Temp(j))
}

/// Static shape of argument `arg`, which must have rank `want.len()`;
/// `want` names the dims for the error.
pub(super) fn shape(ctx: &Ctx, arg: usize, what: &str, want: &[&str]) -> Result<Vec<u64>> {
    if ctx.rank(arg) != want.len() {
        bail!("{}: {what} (argument {arg}) must be [{}]", ctx.k.name, want.join(", "));
    }
    want.iter().enumerate().map(|(d, w)| ctx.cdim(arg, d, &format!("{what} {w}"))).collect()
}

/// `(gate, up)` weights and scales: `w` int8 `[.., I, H]` and `scale` f32
/// `[.., I]` (with `lead` the expert dim or none), both projections alike.
/// Returns `(experts, I, H)`.
fn gate_up_weights(ctx: &Ctx, w: [usize; 2], scale: [usize; 2], routed: bool) -> Result<(u64, u64, u64)> {
    let name = &ctx.k.name;
    let dims: &[&str] = if routed { &["E", "I", "H"] } else { &["I", "H"] };
    let s = shape(ctx, w[0], "w_gate", dims)?;
    if ctx.k.args[w[1]].shape != ctx.k.args[w[0]].shape {
        bail!("{name}: w_up (argument {}) must have the shape of w_gate", w[1]);
    }
    let (e, i, h) = if routed { (s[0], s[1], s[2]) } else { (1, s[0], s[1]) };
    for (arg, what) in [(w[0], "w_gate"), (w[1], "w_up")] {
        need_dt(ctx, arg, what, DevType::I8)?;
    }
    for (arg, what) in [(scale[0], "gate_scale"), (scale[1], "up_scale")] {
        need_dt(ctx, arg, what, DevType::F32)?;
        let got = shape(ctx, arg, what, &dims[..dims.len() - 1])?;
        if got != s[..s.len() - 1] {
            bail!("{name}: {what} (argument {arg}) must be {:?}, found {got:?}", &s[..s.len() - 1]);
        }
    }
    need_int8_dims(name, i, h)?;
    // q_out rows are whole 32-byte int8 blocks.
    need_row_blocks(name, i, DevType::I8)?;
    Ok((e, i, h))
}

/// `xq i8[T, H]` and `x_scale f32[T]` (arguments 0 and 1).
fn quantized_tokens(ctx: &Ctx, h: u64) -> Result<TExpr> {
    need_dt(ctx, 0, "xq", DevType::I8)?;
    need_dt(ctx, 1, "x_scale", DevType::F32)?;
    if ctx.rank(0) != 2 || ctx.cdim(0, 1, "xq H")? != h {
        bail!("{}: xq (argument 0) must be [T, {h}]", ctx.k.name);
    }
    if ctx.rank(1) != 1 || ctx.k.args[1].shape[0] != ctx.k.args[0].shape[0] {
        bail!("{}: x_scale (argument 1) must have one element per xq row", ctx.k.name);
    }
    ctx.dim(0, 0)
}

/// `q_out i8[R, I]` and `scale_out f32[R]` (the last two arguments), `R`
/// the dim `rows` of argument `rows_arg`.
fn quantized_out(ctx: &Ctx, i: u64, rows_arg: usize) -> Result<TExpr> {
    let (q, s) = (ctx.k.args.len() - 2, ctx.k.args.len() - 1);
    need_dt(ctx, q, "q_out", DevType::I8)?;
    need_dt(ctx, s, "scale_out", DevType::F32)?;
    let r = &ctx.k.args[rows_arg].shape[0];
    if ctx.rank(q) != 2 || ctx.k.args[q].shape[0] != *r || ctx.cdim(q, 1, "q_out I")? != i {
        bail!("{}: q_out (argument {q}) must be [{r}, {i}]", ctx.k.name);
    }
    if ctx.rank(s) != 1 || ctx.k.args[s].shape[0] != *r {
        bail!("{}: scale_out (argument {s}) must be [{r}]", ctx.k.name);
    }
    ctx.dim(q, 0)
}

/// `offsets i64[E+1]` at argument `arg`.
pub(super) fn offsets(ctx: &Ctx, arg: usize, e: u64) -> Result<()> {
    need_dt(ctx, arg, "offsets", DevType::I64)?;
    if shape(ctx, arg, "offsets", &["E + 1"])?[0] != e + 1 {
        bail!("{}: offsets (argument {arg}) must have experts + 1 = {} entries", ctx.k.name, e + 1);
    }
    Ok(())
}

/// `MoeGateUpQuant (xq i8[T, H], x_scale f32[T], offsets i64[E+1], rows
/// i64[S], w_gate i8[E, I, H], gate_scale[E, I], w_up i8[E, I, H],
/// up_scale[E, I], q_out i8[S, I], scale_out f32[S])`: gather, grouped
/// gate and up GEMMs, fused epilogue.
pub(crate) fn moe_gate_up_quant(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let (e, i, h) = gate_up_weights(ctx, [4, 6], [5, 7], true)?;
    let tokens = quantized_tokens(ctx, h)?;
    offsets(ctx, 2, e)?;
    need_dt(ctx, 3, "rows", DevType::I64)?;
    if ctx.rank(3) != 1 {
        bail!("{name}: rows (argument 3) must be [S]");
    }
    let slots = quantized_out(ctx, i, 3)?;
    // Temps: 0 the gathered rows, 1 and 2 the gate and up accumulators.
    let mut gather = gather_kernel(format!("{name}_gather"), tokens, h, DevType::I8, &slots);
    gather.params = vec![
        ctx.param("table", 0, Role::Input),
        ctx.param("idx", 3, Role::Input),
        temp("out", DevType::I8, Role::Output, 0),
    ];
    let xs = TempBuf {
        name: format!("{name}.xs"),
        dtype: DevType::I8,
        shape: vec![slots.clone(), TExpr::c(h)],
        elems: slots.clone().times(TExpr::c(h)),
    };
    let dims = GroupedDims { experts: e, rows: slots.clone(), n: i, k: h };
    let cube = |proj: &str, w: usize, acc: usize| {
        grouped_int8_cube(
            &format!("{name}_{proj}"),
            dims.clone(),
            [
                temp("a", DevType::I8, Role::Input, 0),
                ctx.param("offsets", 2, Role::Input),
                ctx.param("w", w, Role::Input),
                temp("acc", DevType::I32, Role::Output, acc),
            ],
            ctx.o,
        )
    };
    let (gate, up) = (cube("gate", 4, 1), cube("up", 6, 2));
    let epi = dynamic_gate_up_epilogue(ctx, true, e, i, slots.clone())?;
    let temps = vec![xs, acc_temp(&format!("{name}.gate"), &slots, i), acc_temp(&format!("{name}.up"), &slots, i)];
    Ok(DeviceKernels { kernels: vec![gather, gate, up, epi], temps, host: None })
}

/// `QuantGateUpQuant (xq i8[T, H], x_scale f32[T], w_gate i8[I, H],
/// gate_scale[I], w_up i8[I, H], up_scale[I], q_out i8[T, I], scale_out
/// f32[T])`: dense gate and up GEMMs, fused epilogue.
pub(crate) fn quant_gate_up_quant(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let (_, i, h) = gate_up_weights(ctx, [2, 4], [3, 5], false)?;
    let tokens = quantized_tokens(ctx, h)?;
    quantized_out(ctx, i, 0)?;
    let mut kernels = Vec::new();
    for (proj, w, acc) in [("gate", 2, 0), ("up", 4, 1)] {
        kernels.push(dense_int8_cube(ctx, proj, ctx.param("a", 0, Role::Input), w, acc, (tokens.clone(), i, h))?);
    }
    kernels.push(dynamic_gate_up_epilogue(ctx, false, 1, i, tokens.clone())?);
    let temps = vec![acc_temp(&format!("{name}.gate"), &tokens, i), acc_temp(&format!("{name}.up"), &tokens, i)];
    Ok(DeviceKernels { kernels, temps, host: None })
}

/// One dense gate/up projection's int8 cube GEMM, `{name}_{proj}`: the
/// int8 rows `a` (`[m, k]`) times weight argument `w` (`[n, k]`) into the
/// int32 workspace temp `acc`.
pub(super) fn dense_int8_cube(
    ctx: &Ctx,
    proj: &str,
    a: Param,
    w: usize,
    acc: usize,
    (m, n, k): (TExpr, u64, u64),
) -> Result<DeviceKernel> {
    let name = &ctx.k.name;
    cube_kernel_for(
        name,
        ctx.o,
        CubeSpec {
            entry: format!("{name}_{proj}"),
            what: "int8 x int8 to an int32 workspace",
            t: DevType::I8,
            out: DevType::I32,
            m,
            n,
            k,
            params: vec![a, ctx.param("w", w, Role::Input), temp("acc", DevType::I32, Role::Output, acc)],
        },
    )
}

/// Argument indices of a routed down projection (`MoeDownQuant`,
/// `MoeDownStatic`); `aq` is argument 0 and `ys` argument 6 in both.
pub(super) struct DownArgs {
    pub offsets: usize,
    pub row_weight: usize,
    pub w: usize,
}

/// The routed down projection over `aq i8[S, I]` and `w i8[E, H, I]`:
/// checks the operands both forms share, then the grouped int8 cube GEMM
/// into an int32 accumulator and the grouped dequant epilogue (`dequant`,
/// reading the accumulator and then `epilogue`) times the row weight.
pub(super) fn grouped_down(
    ctx: &Ctx,
    at: DownArgs,
    [e, h, i]: [u64; 3],
    dequant: super::Dequant,
    epilogue: Vec<Param>,
) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    need_dt(ctx, at.w, "w_down", DevType::I8)?;
    need_int8_dims(name, h, i)?;
    need_dt(ctx, 0, "aq", DevType::I8)?;
    if ctx.rank(0) != 2 || ctx.cdim(0, 1, "aq I")? != i {
        bail!("{name}: aq (argument 0) must be [S, {i}]");
    }
    per_row(ctx, at.row_weight, "row_weight")?;
    offsets(ctx, at.offsets, e)?;
    let rows = &ctx.k.args[0].shape[0];
    let out = ctx.dt[6];
    need_out(name, ctx.o, out)?;
    if ctx.rank(6) != 2 || ctx.k.args[6].shape[0] != *rows || ctx.cdim(6, 1, "ys H")? != h {
        bail!("{name}: ys (argument 6) must be [{rows}, {h}]");
    }
    let slots = ctx.dim(0, 0)?;
    let dims = GroupedDims { experts: e, rows: slots.clone(), n: h, k: i };
    let cube = grouped_int8_cube(
        &format!("{name}_cube"),
        dims.clone(),
        [
            ctx.param("a", 0, Role::Input),
            ctx.param("offsets", at.offsets, Role::Input),
            ctx.param("w", at.w, Role::Input),
            acc_param(Role::Output),
        ],
        ctx.o,
    );
    let params = std::iter::once(acc_param(Role::Input)).chain(epilogue).collect();
    let epi = grouped_dequant_kernel(&format!("{name}_dequant"), dims, dequant, out, true, params)?;
    Ok(DeviceKernels { kernels: vec![cube, epi], temps: vec![acc_temp(name, &slots, h)], host: None })
}

/// Argument `arg` (`what`) must be f32 with one element per `aq` row.
pub(super) fn per_row(ctx: &Ctx, arg: usize, what: &str) -> Result<()> {
    need_dt(ctx, arg, what, DevType::F32)?;
    if ctx.rank(arg) != 1 || ctx.k.args[arg].shape[0] != ctx.k.args[0].shape[0] {
        bail!("{}: {what} (argument {arg}) must have one element per aq row", ctx.k.name);
    }
    Ok(())
}

/// `MoeDownQuant (aq i8[S, I], a_scale f32[S], offsets i64[E+1],
/// row_weight f32[S], w_down i8[E, H, I], down_scale[E, H], ys[S, H])`:
/// grouped GEMM, then the grouped dequant times the row weight.
pub(crate) fn moe_down_quant(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let s = shape(ctx, 4, "w_down", &["E", "H", "I"])?;
    let (e, h, i) = (s[0], s[1], s[2]);
    need_dt(ctx, 5, "down_scale", DevType::F32)?;
    if shape(ctx, 5, "down_scale", &["E", "H"])? != [e, h] {
        bail!("{name}: down_scale (argument 5) must be [{e}, {h}]");
    }
    per_row(ctx, 1, "a_scale")?;
    let epilogue = vec![
        ctx.param("ws", 5, Role::Input),
        ctx.param("xs", 1, Role::Input),
        ctx.param("offsets", 2, Role::Input),
        ctx.param("rowW", 3, Role::Input),
        ctx.param("y", 6, Role::Output),
    ];
    grouped_down(ctx, DownArgs { offsets: 2, row_weight: 3, w: 4 }, [e, h, i], super::Dequant::PerToken, epilogue)
}

const GATE_UP: &str = r#"
using O = {{OUT_T}};

// Fused tail of the {{WHAT}} gate/up projections, rowsPerTile rows per
// tile, each row whole: {{DEQ_DOC}}, a = (g * sigmoid(g)) * u (the
// reference's silu(g) * u), then {{TAIL_DOC}}.
// The column vectors are loaded once per tile, and again only when the
// tile's rows cross into the next expert.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR accG, GM_ADDR accU, GM_ADDR gScale, GM_ADDR uScale, {{IN_PARAM}}{{ROUTE_PARAM}}{{OUT_PARAM}}, const {{TILING}}& t)
    {
        cols = t.cols;
        rows = t.rows;
        rowsPerTile = t.rowsPerTile;
        experts = t.experts;
        xRows = t.xRows;
{{RANGE}}
        gGm.SetGlobalBuffer((__gm__ int32_t*)accG, rows * cols);
        uGm.SetGlobalBuffer((__gm__ int32_t*)accU, rows * cols);
        gsGm.SetGlobalBuffer((__gm__ float*)gScale, {{SCALE_ELEMS}});
        usGm.SetGlobalBuffer((__gm__ float*)uScale, {{SCALE_ELEMS}});
{{IN_INIT}}{{ROUTE_INIT}}{{OUT_INIT}}        pipe.InitBuffer(inAcc, 2, 2 * cols * sizeof(int32_t));
        pipe.InitBuffer(inCol, 1, {{COL_BYTES}});
        pipe.InitBuffer(outQ, 2, cols * sizeof(O));
        pipe.InitBuffer(gsBuf, cols * sizeof(float));
        pipe.InitBuffer(usBuf, cols * sizeof(float));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
        pipe.InitBuffer(uBuf, cols * sizeof(float));
        pipe.InitBuffer(absBuf, cols * sizeof(float));
        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));
        pipe.InitBuffer(hBuf, cols * sizeof(half));
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(redBuf, 32);
{{BIAS_BUFS}}    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t r1 = MinU((tile + 1) * rowsPerTile, rows);
            int64_t loaded = -1;
            for (uint32_t r = tile * rowsPerTile; r < r1; r++) {
                const int64_t e = {{EXPERT_OF_ROW}};
                if (e != loaded) {
                    {{LOAD_SCALE}}(gsGm, gsBuf.Get<float>(), e);
                    {{LOAD_SCALE}}(usGm, usBuf.Get<float>(), e);
{{LOAD_BIAS}}                    loaded = e;
                }
                Row(r, e);
            }
        }
    }

private:
{{EXPERT_OF}}    // The token row whose per-token values row r uses.
    __aicore__ inline uint32_t TokenOf(uint32_t r)
    {
{{TOKEN_OF}}    }
    // Expert e's row of a column vector (f32 scales, int32 biases).
    template <typename C>
    __aicore__ inline void LoadCols(GlobalTensor<C>& g, const LocalTensor<C>& dst, int64_t e)
    {
        LocalTensor<C> raw = inCol.AllocTensor<C>();
        DataCopy(raw, g[static_cast<uint64_t>(e) * cols], cols);
        inCol.EnQue(raw);
        raw = inCol.DeQue<C>();
        DataCopy(dst, raw, cols);
        inCol.FreeTensor(raw);
        PipeBarrier<PIPE_V>();
    }
{{SCALE_METHOD}}    __aicore__ inline void Row(uint32_t r, int64_t e)
    {
        LocalTensor<int32_t> a = inAcc.AllocTensor<int32_t>();
        DataCopy(a, gGm[r * cols], cols);
        DataCopy(a[cols], uGm[r * cols], cols);
        inAcc.EnQue(a);
        a = inAcc.DeQue<int32_t>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> uf = uBuf.Get<float>();
        LocalTensor<float> ab = absBuf.Get<float>();
        LocalTensor<float> red = redBuf.Get<float>();
{{ADD_BIAS}}        Cast(xf, a, RoundMode::CAST_NONE, cols);
        Cast(uf, a[cols], RoundMode::CAST_NONE, cols);
        inAcc.FreeTensor(a);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, gsBuf.Get<float>(), cols);
        Mul(uf, uf, usBuf.Get<float>(), cols);
        PipeBarrier<PIPE_V>();
{{ROW_SCALE}}        Sigmoid(ab, xf, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, ab, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, uf, cols);
        PipeBarrier<PIPE_V>();
{{TAIL}}    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inAcc;
    TQue<TPosition::VECIN, 1> inCol;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> gsBuf, usBuf, xBuf, uBuf, absBuf, iBuf, hBuf, workBuf, redBuf;
    GlobalTensor<int32_t> gGm, uGm;
    GlobalTensor<float> gsGm, usGm;
{{MEMBERS}}{{ROUTE_MEMBERS}}    uint32_t cols = 0, rows = 0, rowsPerTile = 0, experts = 1, xRows = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR accG, GM_ADDR accU, GM_ADDR gScale, GM_ADDR uScale, {{IN_PARAM}}{{ROUTE_PARAM}}{{OUT_PARAM}}, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(accG, accU, gScale, uScale, {{IN_ARG}}{{ROUTE_ARG}}{{OUT_ARG}}, t);
    op.Process();
}
"#;

/// Expert e's row of msModelSlim's int64 `deq_scale` (f32 bits in the low
/// word of each int64) decoded into the f32 column vector `sc`; the f32
/// form loads with `LoadCols`.
fn load_i64_scale() -> String {
    format!(
        "    __aicore__ inline void LoadI64Scale(GlobalTensor<float>& g, const LocalTensor<float>& sc, int64_t e)
    {{
        const uint32_t len = cols;
        LocalTensor<float> raw = inCol.AllocTensor<float>();
        DataCopy(raw, g[static_cast<uint64_t>(e) * 2 * len], 2 * len);
        inCol.EnQue(raw);
        raw = inCol.DeQue<float>();
{DECODE_I64}        inCol.FreeTensor(raw);
    }}
"
    )
}

/// Template variables of [`GATE_UP`] for the device dtype of the gate and
/// up column scales: f32, or i64 (a static checkpoint's int64 deq_scale).
fn scale_vars(scales: DevType) -> Vec<(&'static str, String)> {
    let i64 = scales == DevType::I64;
    vec![
        ("SCALE_ELEMS", if i64 { "2 * experts * cols" } else { "experts * cols" }.into()),
        ("COL_BYTES", if i64 { "2 * cols * sizeof(float)" } else { "cols * sizeof(float)" }.into()),
        ("LOAD_SCALE", if i64 { "LoadI64Scale" } else { "LoadCols" }.into()),
        ("SCALE_METHOD", if i64 { load_i64_scale() } else { String::new() }),
    ]
}

/// What the gate/up epilogue does after the dequant of its int32 sums
/// (and with which per-row or per-column inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GateUpTail {
    /// W8A8_DYNAMIC: `f32(acc) * scale[n] * x_scale[tok]`, then the dynamic
    /// per-row int8 quantization of `a`: `(.., x_scale, [route,] q, scale_out)`.
    Dynamic,
    /// Static W8A8: `f32(acc + quant_bias[n]) * deq_scale[n]`, then `a`
    /// quantized with the down projection's per-expert scale and offset:
    /// `(.., gate_qbias, up_qbias, [route,] down_scale, down_offset, q)`.
    StaticQuant,
    /// Static W8A8 as above, `a` stored as floats of dtype `out`:
    /// `(.., gate_qbias, up_qbias, [route,] act)`.
    StaticFloat { out: DevType },
}

/// Static quantization of f32 row `src` into `xf` (may be the same
/// tensor) with the scalar `scale` and `offset` (C++ expressions): the
/// reference's `x / scale + offset` in f32, `ab` scratch; [`TO_INT8`]
/// finishes it.
pub(super) fn static_quant(src: &str, scale: &str, offset: &str) -> String {
    format!(
        "        Duplicate(ab, {scale}, cols);
        PipeBarrier<PIPE_V>();
        Div(xf, {src}, ab, cols);
        PipeBarrier<PIPE_V>();
        Adds(xf, xf, {offset}, cols);
        PipeBarrier<PIPE_V>();
"
    )
}

/// `a` stored in the output dtype.
const STORE_ACT: &str = "        LocalTensor<O> y = outQ.AllocTensor<O>();
        FromFloat(y, xf, cols);
        outQ.EnQue(y);
        y = outQ.DeQue<O>();
        DataCopy(qGm[r * cols], y, cols);
        outQ.FreeTensor(y);
";

/// Template variables of [`GATE_UP`] for `tail`.
fn tail_vars(tail: GateUpTail) -> Vec<(&'static str, String)> {
    let stat = tail != GateUpTail::Dynamic;
    let bias = |s: &str| if stat { s.to_string() } else { String::new() };
    let (out_t, out_param, out_arg, out_init, members, tail_code, tail_doc) = match tail {
        GateUpTail::Dynamic => (
            "int8_t".to_string(),
            "GM_ADDR q, GM_ADDR scale",
            "q, scale",
            "        qGm.SetGlobalBuffer((__gm__ int8_t*)q, rows * cols);\n        sGm.SetGlobalBuffer((__gm__ float*)scale, rows);\n",
            "    GlobalTensor<float> xsGm, sGm;\n    GlobalTensor<O> qGm;\n",
            format!("{DYN_SCALE}{TO_INT8}"),
            "the dynamic per-row int8 quantization of a (s = max|a| / 127, q = clamp(rint(a / s)))",
        ),
        GateUpTail::StaticQuant => (
            "int8_t".to_string(),
            "GM_ADDR downScale, GM_ADDR downOffset, GM_ADDR q",
            "downScale, downOffset, q",
            "        dsGm.SetGlobalBuffer((__gm__ float*)downScale, experts);\n        doGm.SetGlobalBuffer((__gm__ float*)downOffset, experts);\n        qGm.SetGlobalBuffer((__gm__ int8_t*)q, rows * cols);\n",
            "    TBuf<TPosition::VECCALC> gbBuf, ubBuf;\n    GlobalTensor<int32_t> gbGm, ubGm;\n    GlobalTensor<float> dsGm, doGm;\n    GlobalTensor<O> qGm;\n",
            format!("{}{TO_INT8}", static_quant("xf", "dsGm.GetValue(e)", "doGm.GetValue(e)")),
            "the down projection's static quantization q = clamp(rint(a / scale[e] + offset[e]))",
        ),
        GateUpTail::StaticFloat { out } => (
            out.cpp().to_string(),
            "GM_ADDR act",
            "act",
            "        qGm.SetGlobalBuffer((__gm__ O*)act, rows * cols);\n",
            "    TBuf<TPosition::VECCALC> gbBuf, ubBuf;\n    GlobalTensor<int32_t> gbGm, ubGm;\n    GlobalTensor<O> qGm;\n",
            STORE_ACT.to_string(),
            "a stored",
        ),
    };
    vec![
        ("OUT_T", out_t),
        ("WHAT", if stat { "static W8A8" } else { "W8A8_DYNAMIC" }.into()),
        (
            "DEQ_DOC",
            if stat {
                "g = f32(accG[r] + gBias[e]) * gDeq[e], u likewise"
            } else {
                "g = f32(accG[r]) * gScale[e] * xScale[tok], u likewise"
            }
            .into(),
        ),
        ("TAIL_DOC", tail_doc.into()),
        ("IN_PARAM", if stat { "GM_ADDR gBias, GM_ADDR uBias, " } else { "GM_ADDR xScale, " }.into()),
        ("IN_ARG", if stat { "gBias, uBias, " } else { "xScale, " }.into()),
        (
            "IN_INIT",
            if stat {
                "        gbGm.SetGlobalBuffer((__gm__ int32_t*)gBias, experts * cols);\n        ubGm.SetGlobalBuffer((__gm__ int32_t*)uBias, experts * cols);\n"
            } else {
                "        xsGm.SetGlobalBuffer((__gm__ float*)xScale, xRows);\n"
            }
            .into(),
        ),
        ("OUT_PARAM", out_param.into()),
        ("OUT_ARG", out_arg.into()),
        ("OUT_INIT", out_init.into()),
        ("MEMBERS", members.into()),
        (
            "BIAS_BUFS",
            bias("        pipe.InitBuffer(gbBuf, cols * sizeof(int32_t));\n        pipe.InitBuffer(ubBuf, cols * sizeof(int32_t));\n"),
        ),
        (
            "LOAD_BIAS",
            bias("                    LoadCols(gbGm, gbBuf.Get<int32_t>(), e);\n                    LoadCols(ubGm, ubBuf.Get<int32_t>(), e);\n"),
        ),
        (
            "ADD_BIAS",
            bias("        Add(a, a, gbBuf.Get<int32_t>(), cols);\n        Add(a[cols], a[cols], ubBuf.Get<int32_t>(), cols);\n        PipeBarrier<PIPE_V>();\n"),
        ),
        (
            "ROW_SCALE",
            if stat {
                String::new()
            } else {
                "        const float xs = xsGm.GetValue(TokenOf(r));\n        Muls(xf, xf, xs, cols);\n        Muls(uf, uf, xs, cols);\n        PipeBarrier<PIPE_V>();\n".into()
            },
        ),
        ("TAIL", tail_code),
    ]
}

/// The template pieces of a kernel over expert-sorted rows (`routed`:
/// `offsets` and `sortedRows` parameters, `ExpertOf(r)`, and `TokenOf(r)`
/// reading the token row) or over token rows (expert 0, row r).
pub(super) fn routing_vars(routed: bool) -> Vec<(&'static str, String)> {
    let on = |s: &str| if routed { s.to_string() } else { String::new() };
    vec![
        ("ROUTE_PARAM", on("GM_ADDR offsets, GM_ADDR sortedRows, ")),
        ("ROUTE_ARG", on("offsets, sortedRows, ")),
        (
            "ROUTE_INIT",
            on("        offGm.SetGlobalBuffer((__gm__ int64_t*)offsets, experts + 1);\n        rowsGm.SetGlobalBuffer((__gm__ int64_t*)sortedRows, rows);\n"),
        ),
        ("ROUTE_MEMBERS", on("    GlobalTensor<int64_t> offGm, rowsGm;\n    int64_t cursor = 0;\n")),
        ("EXPERT_OF", on(EXPERT_OF)),
        ("EXPERT_OF_ROW", if routed { "ExpertOf(r)" } else { "0" }.into()),
        (
            "TOKEN_OF",
            if routed {
                // The routing only writes valid token rows; clamping keeps
                // memory safe anyway.
                "        const int64_t tok = rowsGm.GetValue(r);\n        return tok < 0 || tok >= static_cast<int64_t>(xRows) ? 0 : static_cast<uint32_t>(tok);\n"
            } else {
                "        return r;\n"
            }
            .into(),
        ),
    ]
}

/// Shape of a gate/up epilogue: `rows` rows of `cols` over `experts`
/// column vectors; `routed` reads `(offsets, sortedRows)` after its inputs.
pub(super) struct GateUpDims {
    pub routed: bool,
    pub experts: u64,
    pub cols: u64,
    pub rows: TExpr,
    /// Rows of the per-token input (`xRows`, the clamp of a routed row's token).
    pub x_rows: TExpr,
    /// Device dtype of the gate and up column scales: f32, or i64 for a
    /// static checkpoint's int64 `deq_scale`.
    pub scales: DevType,
}

/// The gate/up epilogue `{name}_epilogue`: parameters `(accG, accU,
/// gScale, uScale, <tail inputs>, [offsets, sortedRows,] <tail outputs>)`
/// as [`GateUpTail`] says, given by the caller.
pub(super) fn gate_up_epilogue(name: &str, d: GateUpDims, tail: GateUpTail, params: Vec<Param>) -> DeviceKernel {
    let routed = d.routed;
    let entry = format!("{name}_epilogue");
    let work = reduce_max_work(d.cols);
    let what = match tail {
        GateUpTail::Dynamic => "W8A8_DYNAMIC expert gate/up: dequant, silu(g) * u, dynamic per-row int8 quant.",
        GateUpTail::StaticQuant => "Static W8A8 expert gate/up: dequant, silu(g) * u, static int8 quant.",
        GateUpTail::StaticFloat { .. } => "Static W8A8 expert gate/up: dequant, silu(g) * u.",
    };
    let mut vars = routing_vars(routed);
    vars.push(("WORK", work.to_string()));
    vars.extend(tail_vars(tail));
    vars.extend(scale_vars(d.scales));
    let src = vector_source(&entry, what, GATE_UP, &vars);
    let tiles = d.rows.clone().ceil_div(TExpr::c(ROWS_PER_TILE));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("cols", TExpr::c(d.cols)),
        TilingField::u32("rows", d.rows),
        TilingField::u32("rowsPerTile", TExpr::c(ROWS_PER_TILE)),
        TilingField::u32("experts", TExpr::c(d.experts)),
        TilingField::u32("xRows", d.x_rows),
    ]);
    let f = r32(d.cols * 4);
    let out_size = match tail {
        GateUpTail::StaticFloat { out } => out.size(),
        _ => 1,
    };
    let mut ub = 2 * r32(2 * d.cols * 4) + f + 2 * r32(d.cols * out_size) + 6 * f + r32(d.cols * 2) + work + 32;
    if tail != GateUpTail::Dynamic {
        ub += 2 * f;
    }
    if d.scales == DevType::I64 {
        ub += f;
    }
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = params;
    dk
}

/// The dynamic gate/up epilogue over temps 1, 2 (routed) or 0, 1
/// (shared): `(accG, accU, gate_scale, up_scale, x_scale, [offsets,
/// rows,] q_out, scale_out)`.
fn dynamic_gate_up_epilogue(ctx: &Ctx, routed: bool, experts: u64, cols: u64, rows: TExpr) -> Result<DeviceKernel> {
    let (g, u) = if routed { (1, 2) } else { (0, 1) };
    let (gs, us) = if routed { (5, 7) } else { (3, 5) };
    let mut params = vec![
        temp("accG", DevType::I32, Role::Input, g),
        temp("accU", DevType::I32, Role::Input, u),
        ctx.param("gScale", gs, Role::Input),
        ctx.param("uScale", us, Role::Input),
        ctx.param("xScale", 1, Role::Input),
    ];
    if routed {
        params.push(ctx.param("offsets", 2, Role::Input));
        params.push(ctx.param("sortedRows", 3, Role::Input));
    }
    let n = ctx.k.args.len();
    params.push(ctx.param("q", n - 2, Role::Output));
    params.push(ctx.param("scale", n - 1, Role::Output));
    let d = GateUpDims { routed, experts, cols, rows, x_rows: ctx.dim(0, 0)?, scales: DevType::F32 };
    Ok(gate_up_epilogue(&ctx.k.name, d, GateUpTail::Dynamic, params))
}

//! The fused static W8A8 kinds (`StaticQuantMatMul`, `MoeGateUpStatic`,
//! `QuantGateUpStatic`, `MoeDownStatic`; semantics in `KernelKind`), built
//! from the same pieces as the W8A8_DYNAMIC ones:
//!
//! - `static_quant_matmul`: the per-tensor `quantize` kernel, then the
//!   int8 GEMM with the static dequant epilogue (`gemm.rs`);
//! - the gate/up kinds: one vector kernel reads each (sorted) row's token
//!   row once and quantizes it with the gate's and the up projection's
//!   input scale and offset (each expert's own, for the routed kind), the
//!   int8 cube GEMMs of `experts.rs` write int32, and its gate/up epilogue
//!   adds `quant_bias`, scales by `deq_scale`, applies `silu(g) * u` and
//!   either quantizes `a` with the down projection's per-expert scale and
//!   offset (routed) or stores it (shared);
//! - `moe_down_static`: the grouped int8 GEMM and the grouped static
//!   dequant epilogue times the routing weight.
//!
//! Every step is the reference's f32 arithmetic in its order (`x / scale +
//! offset`, exact int32 sums plus `quant_bias`, `* deq_scale`), so the
//! simulation matches the interpreter bit for bit.

use super::convert::{need_row_blocks, TO_INT8};
use super::experts::{
    dense_int8_cube, gate_up_epilogue, grouped_down, offsets, routing_vars, shape, static_quant, temp, DownArgs,
    GateUpDims, GateUpTail,
};
use super::gemm::{grouped_int8_cube, GroupedDims};
use super::wire::need_dt;
use super::{acc_temp, need_int8_dims, need_out, Dequant, QuantMatMulSpec};
use crate::emit::vector::{tiles_fields, vector_kernel, vector_source};
use crate::emit::{r32, Ctx, DeviceKernel, DeviceKernels, Param, Role, TExpr, TempBuf, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};

/// `StaticQuantMatMul (x[M, K], in_scale[1], in_offset[1], w i8[N, K],
/// quant_bias i32[N], deq_scale[N], out[M, N])`.
pub(crate) fn static_quant_matmul(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.k.args.len() != 7 {
        bail!("{name}: static_quant_matmul takes 7 arguments, found {}", ctx.k.args.len());
    }
    if ctx.rank(0) != 2 || ctx.rank(3) != 2 || ctx.rank(6) != 2 {
        bail!("{name}: the AscendC int8 matmul takes x [M, K], w [N, K] and out [M, N] (no batch dims)");
    }
    per_tensor(ctx, &[(1, "in_scale"), (2, "in_offset")])?;
    need_dt(ctx, 3, "w", DevType::I8)?;
    let (n, k) = (ctx.cdim(3, 0, "N")?, ctx.cdim(3, 1, "w K")?);
    if ctx.cdim(0, 1, "K")? != k || ctx.cdim(6, 1, "out N")? != n {
        bail!("{name}: w is [{n}, {k}], so x must be [M, {k}] and out [M, {n}]");
    }
    let deq = static_columns(ctx, 4, 5, &[n])?;
    need_row_blocks(name, k, ctx.dt[0])?;
    let spec = QuantMatMulSpec {
        name: name.clone(),
        m: ctx.dim(0, 0)?,
        n,
        k,
        dequant: Dequant::Static { deq },
        out: ctx.dt[6],
    };
    super::gemm::static_quant_matmul(&spec, ctx.dt[0], ctx.o)
}

/// Arguments that must be one f32 element each (per-tensor scale, offset).
fn per_tensor(ctx: &Ctx, args: &[(usize, &str)]) -> Result<()> {
    for &(arg, what) in args {
        need_dt(ctx, arg, what, DevType::F32)?;
        let mut n = 1;
        for d in 0..ctx.rank(arg) {
            n *= ctx.cdim(arg, d, what)?;
        }
        if n != 1 {
            bail!("{}: {what} (argument {arg}) must be per tensor (one element), found {n}", ctx.k.name);
        }
    }
    Ok(())
}

/// An f32 argument of one value per expert (`[E]`, or msModelSlim's
/// stacked per-tensor `[E, 1]`).
fn per_expert(ctx: &Ctx, arg: usize, what: &str, e: u64) -> Result<()> {
    need_dt(ctx, arg, what, DevType::F32)?;
    let mut n = 1;
    for d in 0..ctx.rank(arg) {
        n *= ctx.cdim(arg, d, what)?;
    }
    if n != e {
        bail!("{}: {what} (argument {arg}) must hold one value per expert ({e}), found {n}", ctx.k.name);
    }
    Ok(())
}

/// `quant_bias i32` and `deq_scale` (f32 or msModelSlim's i64) of shape
/// `dims`; returns the deq_scale's device dtype.
fn static_columns(ctx: &Ctx, qbias: usize, deq: usize, dims: &[u64]) -> Result<DevType> {
    let name = &ctx.k.name;
    need_dt(ctx, qbias, "quant_bias", DevType::I32)?;
    if !matches!(ctx.dt[deq], DevType::F32 | DevType::I64) {
        bail!("{name}: deq_scale (argument {deq}) must be f32 or i64 on the device, found {}", ctx.dt[deq]);
    }
    // Read flat, row `e` of expert `e` (the CPU kernel's `e * N + n`), so
    // any shape with these elements in that order fits (`[E, N]`, `[E, N, 1]`).
    let want: u64 = dims.iter().product();
    for (arg, what) in [(qbias, "quant_bias"), (deq, "deq_scale")] {
        let mut n = 1;
        for d in 0..ctx.rank(arg) {
            n *= ctx.cdim(arg, d, what)?;
        }
        if n != want || ctx.cdim(arg, 0, what)? != dims[0] {
            bail!("{name}: {what} (argument {arg}) must be {dims:?} ({want} elements), found {n} elements");
        }
    }
    Ok(ctx.dt[deq])
}

/// Argument numbers of one gate or up projection's `(scale, offset, w,
/// quant_bias, deq_scale)`.
type Proj = [usize; 5];

/// Checks both projections' arguments (weights `[E, I, H]` routed or
/// `[I, H]` shared, deq scales f32 or int64 alike); returns `(E, I, H)`
/// and the deq scales' device dtype.
fn static_gate_up(ctx: &Ctx, gate: Proj, up: Proj, routed: bool) -> Result<((u64, u64, u64), DevType)> {
    let name = &ctx.k.name;
    let dims: &[&str] = if routed { &["E", "I", "H"] } else { &["I", "H"] };
    let s = shape(ctx, gate[2], "w_gate", dims)?;
    let (e, i, h) = if routed { (s[0], s[1], s[2]) } else { (1, s[0], s[1]) };
    for (p, what) in [(gate, "gate"), (up, "up")] {
        need_dt(ctx, p[2], &format!("w_{what}"), DevType::I8)?;
        if ctx.k.args[p[2]].shape != ctx.k.args[gate[2]].shape {
            bail!("{name}: w_{what} (argument {}) must have the shape of w_gate", p[2]);
        }
        if routed {
            for (arg, w) in [(p[0], "scale"), (p[1], "offset")] {
                per_expert(ctx, arg, &format!("{what}_{w}"), e)?;
            }
        } else {
            per_tensor(ctx, &[(p[0], "input scale"), (p[1], "input offset")])?;
        }
        let cols = &s[..s.len() - 1];
        if static_columns(ctx, p[3], p[4], cols)? != static_columns(ctx, gate[3], gate[4], cols)? {
            bail!("{name}: the {what} deq_scale (argument {}) must have the gate's device dtype", p[4]);
        }
    }
    need_int8_dims(name, i, h)?;
    need_row_blocks(name, h, ctx.dt[0])?;
    need_row_blocks(name, i, DevType::I8)?;
    Ok(((e, i, h), ctx.dt[gate[4]]))
}

/// `MoeGateUpStatic (x[T, H], offsets i64[E+1], rows i64[S], gate: scale[E],
/// offset[E], w i8[E, I, H], quant_bias i32[E, I], deq[E, I], up: the same,
/// down_scale[E], down_offset[E], q_out i8[S, I])`: quantize the sorted
/// rows, grouped gate and up GEMMs, fused epilogue.
pub(crate) fn moe_gate_up_static(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.k.args.len() != 16 {
        bail!("{name}: moe_gate_up_static takes 16 arguments, found {}", ctx.k.args.len());
    }
    let (gate, up) = ([3, 4, 5, 6, 7], [8, 9, 10, 11, 12]);
    let ((e, i, h), scales) = static_gate_up(ctx, gate, up, true)?;
    tokens(ctx, h)?;
    offsets(ctx, 1, e)?;
    need_dt(ctx, 2, "rows", DevType::I64)?;
    if ctx.rank(2) != 1 {
        bail!("{name}: rows (argument 2) must be [S]");
    }
    for (arg, what) in [(13, "down_scale"), (14, "down_offset")] {
        per_expert(ctx, arg, what, e)?;
    }
    need_dt(ctx, 15, "q_out", DevType::I8)?;
    let r = &ctx.k.args[2].shape[0];
    if ctx.rank(15) != 2 || ctx.k.args[15].shape[0] != *r || ctx.cdim(15, 1, "q_out I")? != i {
        bail!("{name}: q_out (argument 15) must be [{r}, {i}]");
    }
    let slots = ctx.dim(2, 0)?;
    // Temps: 0 and 1 the gate's and the up projection's int8 rows, 2 and 3
    // their accumulators.
    let rows_d = RowsDims { routed: true, experts: e, cols: h, rows: slots.clone(), x_rows: ctx.dim(0, 0)? };
    let quant = static_rows_kernel(ctx, rows_d, gate, up);
    let dims = GroupedDims { experts: e, rows: slots.clone(), n: i, k: h };
    let cube = |proj: &str, a: usize, w: usize, acc: usize| {
        grouped_int8_cube(
            &format!("{name}_{proj}"),
            dims.clone(),
            [
                temp("a", DevType::I8, Role::Input, a),
                ctx.param("offsets", 1, Role::Input),
                ctx.param("w", w, Role::Input),
                temp("acc", DevType::I32, Role::Output, acc),
            ],
            ctx.o,
        )
    };
    let (gk, uk) = (cube("gate", 0, 5, 2), cube("up", 1, 10, 3));
    let params = vec![
        temp("accG", DevType::I32, Role::Input, 2),
        temp("accU", DevType::I32, Role::Input, 3),
        ctx.param("gScale", 7, Role::Input),
        ctx.param("uScale", 12, Role::Input),
        ctx.param("gBias", 6, Role::Input),
        ctx.param("uBias", 11, Role::Input),
        ctx.param("offsets", 1, Role::Input),
        ctx.param("sortedRows", 2, Role::Input),
        ctx.param("downScale", 13, Role::Input),
        ctx.param("downOffset", 14, Role::Input),
        ctx.param("q", 15, Role::Output),
    ];
    let d = GateUpDims { routed: true, experts: e, cols: i, rows: slots.clone(), x_rows: ctx.dim(0, 0)?, scales };
    let epi = gate_up_epilogue(name, d, GateUpTail::StaticQuant, params);
    let temps = vec![
        int8_rows(&format!("{name}.xg"), &slots, h),
        int8_rows(&format!("{name}.xu"), &slots, h),
        acc_temp(&format!("{name}.gate"), &slots, i),
        acc_temp(&format!("{name}.up"), &slots, i),
    ];
    Ok(DeviceKernels { kernels: vec![quant, gk, uk, epi], temps, host: None })
}

/// `QuantGateUpStatic (x[T, H], gate: scale[1], offset[1], w i8[I, H],
/// quant_bias i32[I], deq[I], up: the same, act_out[T, I])`.
pub(crate) fn quant_gate_up_static(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.k.args.len() != 12 {
        bail!("{name}: quant_gate_up_static takes 12 arguments, found {}", ctx.k.args.len());
    }
    let (gate, up) = ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]);
    let ((_, i, h), scales) = static_gate_up(ctx, gate, up, false)?;
    let t = tokens(ctx, h)?;
    let out = ctx.dt[11];
    need_out(name, ctx.o, out)?;
    if ctx.rank(11) != 2 || ctx.k.args[11].shape[0] != ctx.k.args[0].shape[0] || ctx.cdim(11, 1, "act I")? != i {
        bail!("{name}: act_out (argument 11) must be [T, {i}]");
    }
    need_row_blocks(name, i, out)?;
    let quant = static_rows_kernel(
        ctx,
        RowsDims { routed: false, experts: 1, cols: h, rows: t.clone(), x_rows: t.clone() },
        gate,
        up,
    );
    let mut kernels = vec![quant];
    for (proj, a, w, acc) in [("gate", 0, 3, 2), ("up", 1, 8, 3)] {
        let rows = temp("a", DevType::I8, Role::Input, a);
        kernels.push(dense_int8_cube(ctx, proj, rows, w, acc, (t.clone(), i, h))?);
    }
    let params = vec![
        temp("accG", DevType::I32, Role::Input, 2),
        temp("accU", DevType::I32, Role::Input, 3),
        ctx.param("gScale", 5, Role::Input),
        ctx.param("uScale", 10, Role::Input),
        ctx.param("gBias", 4, Role::Input),
        ctx.param("uBias", 9, Role::Input),
        ctx.param("act", 11, Role::Output),
    ];
    let d = GateUpDims { routed: false, experts: 1, cols: i, rows: t.clone(), x_rows: t.clone(), scales };
    kernels.push(gate_up_epilogue(name, d, GateUpTail::StaticFloat { out }, params));
    let temps = vec![
        int8_rows(&format!("{name}.xg"), &t, h),
        int8_rows(&format!("{name}.xu"), &t, h),
        acc_temp(&format!("{name}.gate"), &t, i),
        acc_temp(&format!("{name}.up"), &t, i),
    ];
    Ok(DeviceKernels { kernels, temps, host: None })
}

/// `MoeDownStatic (aq i8[S, I], offsets i64[E+1], row_weight f32[S],
/// w_down i8[E, H, I], quant_bias i32[E, H], deq_scale[E, H], ys[S, H])`.
pub(crate) fn moe_down_static(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.k.args.len() != 7 {
        bail!("{name}: moe_down_static takes 7 arguments, found {}", ctx.k.args.len());
    }
    let s = shape(ctx, 3, "w_down", &["E", "H", "I"])?;
    let (e, h, i) = (s[0], s[1], s[2]);
    let deq = static_columns(ctx, 4, 5, &[e, h])?;
    let epilogue = vec![
        ctx.param("bias", 4, Role::Input),
        ctx.param("deq", 5, Role::Input),
        ctx.param("offsets", 1, Role::Input),
        ctx.param("rowW", 2, Role::Input),
        ctx.param("y", 6, Role::Output),
    ];
    grouped_down(ctx, DownArgs { offsets: 1, row_weight: 2, w: 3 }, [e, h, i], Dequant::Static { deq }, epilogue)
}

/// `x [T, H]` (argument 0) in a float device dtype; returns T.
fn tokens(ctx: &Ctx, h: u64) -> Result<TExpr> {
    if ctx.rank(0) != 2 || ctx.cdim(0, 1, "x H")? != h {
        bail!("{}: x (argument 0) must be [T, {h}]", ctx.k.name);
    }
    need_out(&ctx.k.name, ctx.o, ctx.dt[0])?;
    ctx.dim(0, 0)
}

fn int8_rows(name: &str, rows: &TExpr, cols: u64) -> TempBuf {
    TempBuf {
        name: name.into(),
        dtype: DevType::I8,
        shape: vec![rows.clone(), TExpr::c(cols)],
        elems: rows.clone().times(TExpr::c(cols)),
    }
}

const STATIC_ROWS: &str = r#"
using T = {{T}};

// Static int8 quantization of the {{WHAT}} rows for the gate and the up
// projection: row r reads token row TokenOf(r) once and writes
// qg[r] = clamp(rint(x / gScale[e] + gOffset[e]), -128, 127) and qu[r]
// likewise, e = the row's expert (0 for the shared expert). One row per tile.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR gScale, GM_ADDR gOffset, GM_ADDR uScale, GM_ADDR uOffset, {{ROUTE_PARAM}}GM_ADDR qg, GM_ADDR qu, const {{TILING}}& t)
    {
        cols = t.cols;
        rows = t.rows;
        experts = t.experts;
        xRows = t.xRows;
{{RANGE}}
        xGm.SetGlobalBuffer((__gm__ T*)x, xRows * cols);
        gsGm.SetGlobalBuffer((__gm__ float*)gScale, experts);
        goGm.SetGlobalBuffer((__gm__ float*)gOffset, experts);
        usGm.SetGlobalBuffer((__gm__ float*)uScale, experts);
        uoGm.SetGlobalBuffer((__gm__ float*)uOffset, experts);
        qgGm.SetGlobalBuffer((__gm__ int8_t*)qg, rows * cols);
        quGm.SetGlobalBuffer((__gm__ int8_t*)qu, rows * cols);
{{ROUTE_INIT}}        pipe.InitBuffer(inX, 2, cols * sizeof(T));
        pipe.InitBuffer(outQ, 2, cols * sizeof(int8_t));
        pipe.InitBuffer(srcBuf, cols * sizeof(float));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
        pipe.InitBuffer(absBuf, cols * sizeof(float));
        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));
        pipe.InitBuffer(hBuf, cols * sizeof(half));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t r = start; r < end; r++) Row(r);
    }

private:
{{EXPERT_OF}}    __aicore__ inline uint32_t TokenOf(uint32_t r)
    {
{{TOKEN_OF}}    }
    __aicore__ inline void Quantize(GlobalTensor<int8_t>& qGm, float scale, float offset, uint32_t r)
    {
        LocalTensor<float> src = srcBuf.Get<float>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> ab = absBuf.Get<float>();
{{QUANT}}{{TO_INT8}}    }
    __aicore__ inline void Row(uint32_t r)
    {
        const int64_t e = {{EXPERT_OF_ROW}};
        LocalTensor<T> x = inX.AllocTensor<T>();
        DataCopy(x, xGm[TokenOf(r) * cols], cols);
        inX.EnQue(x);
        x = inX.DeQue<T>();
        ToFloat(srcBuf.Get<float>(), x, cols);
        inX.FreeTensor(x);
        PipeBarrier<PIPE_V>();
        Quantize(qgGm, gsGm.GetValue(e), goGm.GetValue(e), r);
        Quantize(quGm, usGm.GetValue(e), uoGm.GetValue(e), r);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> srcBuf, xBuf, absBuf, iBuf, hBuf;
    GlobalTensor<T> xGm;
    GlobalTensor<float> gsGm, goGm, usGm, uoGm;
    GlobalTensor<int8_t> qgGm, quGm;
{{ROUTE_MEMBERS}}    uint32_t cols = 0, rows = 0, experts = 1, xRows = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, GM_ADDR gScale, GM_ADDR gOffset, GM_ADDR uScale, GM_ADDR uOffset, {{ROUTE_PARAM}}GM_ADDR qg, GM_ADDR qu, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, gScale, gOffset, uScale, uOffset, {{ROUTE_ARG}}qg, qu, t);
    op.Process();
}
"#;

/// Sizes of the input-quantization kernel: `rows` (sorted) rows of `cols`
/// read from `x_rows` token rows.
struct RowsDims {
    routed: bool,
    experts: u64,
    cols: u64,
    rows: TExpr,
    x_rows: TExpr,
}

/// `{name}_quant`: `(x, gate_scale, gate_offset, up_scale, up_offset,
/// [offsets, rows,] qg -> temp 0, qu -> temp 1)`.
fn static_rows_kernel(ctx: &Ctx, d: RowsDims, gate: Proj, up: Proj) -> DeviceKernel {
    let name = &ctx.k.name;
    let entry = format!("{name}_quant");
    let routed = d.routed;
    let x = ctx.dt[0];
    let mut vars = routing_vars(routed);
    vars.extend([
        ("T", x.cpp().into()),
        ("WHAT", if routed { "expert-sorted" } else { "token" }.into()),
        ("QUANT", static_quant("src", "scale", "offset")),
        ("TO_INT8", TO_INT8.into()),
    ]);
    let src = vector_source(
        &entry,
        "Static W8A8 gate/up input quantization (per-tensor scale and offset of each projection).",
        STATIC_ROWS,
        &vars,
    );
    let tiles = d.rows.clone();
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("cols", TExpr::c(d.cols)),
        TilingField::u32("rows", d.rows),
        TilingField::u32("experts", TExpr::c(d.experts)),
        TilingField::u32("xRows", d.x_rows),
    ]);
    let f = r32(d.cols * 4);
    let ub = 2 * r32(d.cols * x.size()) + 2 * r32(d.cols) + 4 * f + r32(d.cols * 2);
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    let mut params: Vec<Param> = vec![
        ctx.param("x", 0, Role::Input),
        ctx.param("gScale", gate[0], Role::Input),
        ctx.param("gOffset", gate[1], Role::Input),
        ctx.param("uScale", up[0], Role::Input),
        ctx.param("uOffset", up[1], Role::Input),
    ];
    if routed {
        params.push(ctx.param("offsets", 1, Role::Input));
        params.push(ctx.param("sortedRows", 2, Role::Input));
    }
    params.push(temp("qg", DevType::I8, Role::Output, 0));
    params.push(temp("qu", DevType::I8, Role::Output, 1));
    dk.params = params;
    dk
}

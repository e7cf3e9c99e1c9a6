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
use super::gemm::{grouped_dequant_kernel, grouped_int8_cube, GroupedDims, EXPERT_OF};
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
fn temp(name: &str, dtype: DevType, role: Role, j: usize) -> Param {
    Param { name: name.into(), dtype, role, arg: ArgRef::Temp(j) }
}

/// Static shape of argument `arg`, which must have rank `want.len()`;
/// `want` names the dims for the error.
fn shape(ctx: &Ctx, arg: usize, what: &str, want: &[&str]) -> Result<Vec<u64>> {
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
fn offsets(ctx: &Ctx, arg: usize, e: u64) -> Result<()> {
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
    let epi = gate_up_epilogue(ctx, true, e, i, slots.clone())?;
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
        kernels.push(cube_kernel_for(
            name,
            ctx.target(),
            CubeSpec {
                entry: format!("{name}_{proj}"),
                what: "int8 x int8 to an int32 workspace",
                t: DevType::I8,
                out: DevType::I32,
                m: tokens.clone(),
                n: i,
                k: h,
                params: vec![
                    ctx.param("a", 0, Role::Input),
                    ctx.param("w", w, Role::Input),
                    temp("acc", DevType::I32, Role::Output, acc),
                ],
            },
        )?);
    }
    kernels.push(gate_up_epilogue(ctx, false, 1, i, tokens.clone())?);
    let temps = vec![acc_temp(&format!("{name}.gate"), &tokens, i), acc_temp(&format!("{name}.up"), &tokens, i)];
    Ok(DeviceKernels { kernels, temps, host: None })
}

/// `MoeDownQuant (aq i8[S, I], a_scale f32[S], offsets i64[E+1],
/// row_weight f32[S], w_down i8[E, H, I], down_scale[E, H], ys[S, H])`:
/// grouped GEMM, then the grouped dequant times the row weight.
pub(crate) fn moe_down_quant(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let s = shape(ctx, 4, "w_down", &["E", "H", "I"])?;
    let (e, h, i) = (s[0], s[1], s[2]);
    need_dt(ctx, 4, "w_down", DevType::I8)?;
    need_dt(ctx, 5, "down_scale", DevType::F32)?;
    if shape(ctx, 5, "down_scale", &["E", "H"])? != [e, h] {
        bail!("{name}: down_scale (argument 5) must be [{e}, {h}]");
    }
    need_int8_dims(name, h, i)?;
    need_dt(ctx, 0, "aq", DevType::I8)?;
    if ctx.rank(0) != 2 || ctx.cdim(0, 1, "aq I")? != i {
        bail!("{name}: aq (argument 0) must be [S, {i}]");
    }
    let rows = &ctx.k.args[0].shape[0];
    for (arg, what) in [(1, "a_scale"), (3, "row_weight")] {
        need_dt(ctx, arg, what, DevType::F32)?;
        if ctx.rank(arg) != 1 || ctx.k.args[arg].shape[0] != *rows {
            bail!("{name}: {what} (argument {arg}) must have one element per aq row");
        }
    }
    offsets(ctx, 2, e)?;
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
            ctx.param("offsets", 2, Role::Input),
            ctx.param("w", 4, Role::Input),
            acc_param(Role::Output),
        ],
        ctx.o,
    );
    let epi = grouped_dequant_kernel(
        &format!("{name}_dequant"),
        dims,
        out,
        true,
        vec![
            acc_param(Role::Input),
            ctx.param("ws", 5, Role::Input),
            ctx.param("xs", 1, Role::Input),
            ctx.param("offsets", 2, Role::Input),
            ctx.param("rowW", 3, Role::Input),
            ctx.param("y", 6, Role::Output),
        ],
    )?;
    Ok(DeviceKernels { kernels: vec![cube, epi], temps: vec![acc_temp(name, &slots, h)], host: None })
}

const GATE_UP_QUANT: &str = r#"
// Fused tail of the W8A8_DYNAMIC {{WHAT}} gate/up projections, rowsPerTile
// rows per tile, each row whole: g = f32(accG[r]) * gScale[{{E}}] * xScale[{{TOK}}],
// u likewise, a = (g * sigmoid(g)) * u (the reference's silu(g) * u), then
// the dynamic per-row quantization of a (s = max|a| / 127, q = clamp(rint(a / s))).
// The column scales are loaded once per tile, and again only when the
// tile's rows cross into the next expert.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR accG, GM_ADDR accU, GM_ADDR gScale, GM_ADDR uScale, GM_ADDR xScale, {{ROUTE_PARAM}}GM_ADDR q, GM_ADDR scale, const {{TILING}}& t)
    {
        cols = t.cols;
        rows = t.rows;
        rowsPerTile = t.rowsPerTile;
        experts = t.experts;
        xRows = t.xRows;
{{RANGE}}
        gGm.SetGlobalBuffer((__gm__ int32_t*)accG, rows * cols);
        uGm.SetGlobalBuffer((__gm__ int32_t*)accU, rows * cols);
        gsGm.SetGlobalBuffer((__gm__ float*)gScale, experts * cols);
        usGm.SetGlobalBuffer((__gm__ float*)uScale, experts * cols);
        xsGm.SetGlobalBuffer((__gm__ float*)xScale, xRows);
        qGm.SetGlobalBuffer((__gm__ int8_t*)q, rows * cols);
        sGm.SetGlobalBuffer((__gm__ float*)scale, rows);
{{ROUTE_INIT}}        pipe.InitBuffer(inAcc, 2, 2 * cols * sizeof(int32_t));
        pipe.InitBuffer(inCol, 1, cols * sizeof(float));
        pipe.InitBuffer(outQ, 2, cols * sizeof(int8_t));
        pipe.InitBuffer(gsBuf, cols * sizeof(float));
        pipe.InitBuffer(usBuf, cols * sizeof(float));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
        pipe.InitBuffer(uBuf, cols * sizeof(float));
        pipe.InitBuffer(absBuf, cols * sizeof(float));
        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));
        pipe.InitBuffer(hBuf, cols * sizeof(half));
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(redBuf, 32);
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t r1 = MinU((tile + 1) * rowsPerTile, rows);
            int64_t loaded = -1;
            for (uint32_t r = tile * rowsPerTile; r < r1; r++) {
                const int64_t e = {{EXPERT_OF_ROW}};
                if (e != loaded) {
                    LoadCols(gsGm, gsBuf.Get<float>(), e);
                    LoadCols(usGm, usBuf.Get<float>(), e);
                    loaded = e;
                }
                Row(r);
            }
        }
    }

private:
{{EXPERT_OF}}    // The token row whose x_scale row r uses.
    __aicore__ inline uint32_t TokenOf(uint32_t r)
    {
{{TOKEN_OF}}    }
    __aicore__ inline void LoadCols(GlobalTensor<float>& g, const LocalTensor<float>& dst, int64_t e)
    {
        LocalTensor<float> raw = inCol.AllocTensor<float>();
        DataCopy(raw, g[static_cast<uint64_t>(e) * cols], cols);
        inCol.EnQue(raw);
        raw = inCol.DeQue<float>();
        DataCopy(dst, raw, cols);
        inCol.FreeTensor(raw);
        PipeBarrier<PIPE_V>();
    }
    __aicore__ inline void Row(uint32_t r)
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
        Cast(xf, a, RoundMode::CAST_NONE, cols);
        Cast(uf, a[cols], RoundMode::CAST_NONE, cols);
        inAcc.FreeTensor(a);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, gsBuf.Get<float>(), cols);
        Mul(uf, uf, usBuf.Get<float>(), cols);
        PipeBarrier<PIPE_V>();
        const float xs = xsGm.GetValue(TokenOf(r));
        Muls(xf, xf, xs, cols);
        Muls(uf, uf, xs, cols);
        PipeBarrier<PIPE_V>();
        Sigmoid(ab, xf, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, ab, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, uf, cols);
        PipeBarrier<PIPE_V>();
{{DYN_SCALE}}{{TO_INT8}}    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inAcc;
    TQue<TPosition::VECIN, 1> inCol;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> gsBuf, usBuf, xBuf, uBuf, absBuf, iBuf, hBuf, workBuf, redBuf;
    GlobalTensor<int32_t> gGm, uGm;
    GlobalTensor<float> gsGm, usGm, xsGm, sGm;
    GlobalTensor<int8_t> qGm;
{{ROUTE_MEMBERS}}    uint32_t cols = 0, rows = 0, rowsPerTile = 0, experts = 1, xRows = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR accG, GM_ADDR accU, GM_ADDR gScale, GM_ADDR uScale, GM_ADDR xScale, {{ROUTE_PARAM}}GM_ADDR q, GM_ADDR scale, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(accG, accU, gScale, uScale, xScale, {{ROUTE_ARG}}q, scale, t);
    op.Process();
}
"#;

/// The gate/up epilogue over temps 1, 2 (routed) or 0, 1 (shared):
/// `(accG, accU, gate_scale, up_scale, x_scale, [offsets, rows,] q_out,
/// scale_out)`.
fn gate_up_epilogue(ctx: &Ctx, routed: bool, experts: u64, cols: u64, rows: TExpr) -> Result<DeviceKernel> {
    let name = &ctx.k.name;
    let entry = format!("{name}_epilogue");
    let on = |s: &str| if routed { s.to_string() } else { String::new() };
    let work = reduce_max_work(cols);
    let src = vector_source(
        &entry,
        "W8A8_DYNAMIC expert gate/up: dequant, silu(g) * u, dynamic per-row int8 quant.",
        GATE_UP_QUANT,
        &[
            ("WHAT", if routed { "routed-expert" } else { "shared-expert" }.into()),
            ("E", if routed { "e(r)" } else { "0" }.into()),
            ("TOK", if routed { "rows[r]" } else { "r" }.into()),
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
            ("WORK", work.to_string()),
            ("DYN_SCALE", DYN_SCALE.into()),
            ("TO_INT8", TO_INT8.into()),
        ],
    );
    let tiles = rows.clone().ceil_div(TExpr::c(ROWS_PER_TILE));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("cols", TExpr::c(cols)),
        TilingField::u32("rows", rows),
        TilingField::u32("rowsPerTile", TExpr::c(ROWS_PER_TILE)),
        TilingField::u32("experts", TExpr::c(experts)),
        TilingField::u32("xRows", ctx.dim(0, 0)?),
    ]);
    let f = r32(cols * 4);
    let ub = 2 * r32(2 * cols * 4) + f + 2 * r32(cols) + 6 * f + r32(cols * 2) + work + 32;
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
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
    dk.params = params;
    Ok(dk)
}

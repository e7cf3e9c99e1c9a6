//! Grouped-matmul MoE kernels: per-expert GEMMs (`MoeGateUp`, `MoeDown`)
//! and the combine (`MoeCombine`); the dispatch (`MoeRoute`) is in
//! `route.rs`.
//!
//! - `MoeGateUp`/`MoeDown` are a grouped cube GEMM (one block tile = one
//!   (expert, 128-column) pair; the expert's rows come from `offsets` in GM
//!   at run time) writing f32 to a GM workspace, then a vector epilogue
//!   (SwiGLU for gate/up, `* row_weight[r]` for down). `MoeGateUp` gathers
//!   its A rows through `rows[]` while copying them into L1 (one ND->NZ copy
//!   per row), so no gathered copy of the activations is materialised.
//! - `MoeGroupedGateUp` (the batched MoE) is the same cube GEMM over rows
//!   that a `Gather` launch copied once into one contiguous block per
//!   expert (`moe_init_routing`'s expanded rows), so A is fetched as row
//!   blocks, never one row per copy per K step.
//! - `MoeCombine` sums each token's G expert outputs in group order, then
//!   `residual + (routed + shared)`.

use super::cube::{
    copy_b, cube_buffers, cube_device_kernel, cube_stages, epilogue_kernel, need_fractal_dims, w_layout, BaseTile,
    EpilogueSpec, CUBE_CONSTS,
};
use super::vector::{need_aligned, tiles_fields, vector_kernel, vector_source};
use super::{fill_kernel, head, r32, ArgRef, Ctx, DeviceKernels, Env, Param, Role, TExpr, TempBuf, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};
use panguc_ir::kernel::Epilogue;

/// Coefficient `G` of a `G * tokens` dimension.
fn per_token(ctx: &Ctx, arg: usize, dim: usize) -> Result<u64> {
    let e = ctx.dim(arg, dim)?;
    let at = |t| e.eval(&Env::new(t, 0, 1));
    let (a0, a1) = (at(0)?, at(1)?);
    if a0 != 0 || a1 == 0 || at(5)? != 5 * a1 {
        bail!("{}: argument {arg} dim {dim} must be a multiple of tokens", ctx.k.name);
    }
    Ok(a1)
}

const GROUPED: &str = r#"
using T = {{T}};
{{CUBE_CONSTS}}

// Grouped GEMM: for each expert e, C[r, :] = A[{{AROW}}, :] * W[e]^T for the
// sorted rows r in offsets[e]..offsets[e+1] (known only on the device). One
// (expert, baseN column block) per tile; the expert's rows in baseM steps,
// K accumulated in L0C in baseK steps; {{ACC_NAME}} out.
// W[e]: {{W_LAYOUT}}.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR a, GM_ADDR offsets, {{ROWS_PARAM}}GM_ADDR w, GM_ADDR c, const {{TILING}}& t)
    {
        tl = t;
        nTiles = (t.n + t.baseN - 1) / t.baseN;
        start = static_cast<uint32_t>(GetBlockIdx()) * t.tilesPerCore;
        end = MinU(start + t.tilesPerCore, t.tiles);
        aGm.SetGlobalBuffer((__gm__ T*)a, t.aRows * t.k);
        offGm.SetGlobalBuffer((__gm__ int64_t*)offsets, t.experts + 1);
{{ROWS_INIT}}        wGm.SetGlobalBuffer((__gm__ T*)w, t.experts * t.n * t.k);
        cGm.SetGlobalBuffer((__gm__ {{ACC}}*)c, t.slots * t.n);
{{CUBE_BUFFERS}}
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t e = tile / nTiles;
            n0 = (tile % nTiles) * tl.baseN;
            nLen = MinU(tl.baseN, tl.n - n0);
            wBase = {{W_BASE}};
            // A block's tiles run expert by expert: read an expert's row
            // range from GM (scalar accesses, slow) once, not per tile.
            if (static_cast<int64_t>(e) != rangeOf) {
                rowBegin = static_cast<uint32_t>(offGm.GetValue(e));
                rowEnd = static_cast<uint32_t>(offGm.GetValue(e + 1));
                rangeOf = e;
            }
            for (m0 = rowBegin; m0 < rowEnd; m0 += tl.baseM) {
                mLen = MinU(tl.baseM, rowEnd - m0);
                LocalTensor<{{ACC}}> c1 = qCO1.AllocTensor<{{ACC}}>();
                for (uint32_t k0 = 0; k0 < tl.k; k0 += tl.baseK) {
                    const uint32_t kLen = MinU(tl.baseK, tl.k - k0);
                    CopyIn(k0, kLen);
                    Split(kLen);
                    Compute(c1, kLen, k0 == 0);
                }
                qCO1.EnQue(c1);
                CopyOut();
            }
        }
    }

private:
    __aicore__ inline void CopyIn(uint32_t k0, uint32_t kLen)
    {
        LocalTensor<T> a1 = qA1.AllocTensor<T>();
        LocalTensor<T> b1 = qB1.AllocTensor<T>();
        Nd2NzParams p;
        p.ndNum = 1;
        p.dValue = kLen;
        p.srcNdMatrixStride = 0;
        p.srcDValue = tl.k;
        p.dstNzC0Stride = CeilCube(mLen);
        p.dstNzNStride = 1;
        p.dstNzMatrixStride = 0;
{{COPY_A}}{{COPY_B}}        qA1.EnQue(a1);
        qB1.EnQue(b1);
    }
{{CUBE_STAGES}}
    GlobalTensor<T> aGm, wGm;
    GlobalTensor<int64_t> offGm{{ROWS_MEMBER}};
    GlobalTensor<{{ACC}}> cGm;
    {{TILING}} tl;
    uint32_t start = 0, end = 0, nTiles = 1, wBase = 0, m0 = 0, n0 = 0, mLen = 0, nLen = 0;
    int64_t rangeOf = -1;
    uint32_t rowBegin = 0, rowEnd = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR a, GM_ADDR offsets, {{ROWS_PARAM}}GM_ADDR w, GM_ADDR c, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(a, offsets, {{ROWS_ARG}}w, c, t);
    op.Process();
}
"#;

/// A's rows gathered through `rows[]`: one ND->NZ copy per row, each into
/// its row of the NZ fractal column (element (i, c) of the tile lands at
/// `(c / C0) * ceil16(mLen) * C0 + i * C0 + c % C0`).
const COPY_A_GATHER: &str = "        p.nValue = 1;
        for (uint32_t i = 0; i < mLen; i++) {
            const uint64_t row = static_cast<uint64_t>(rowsGm.GetValue(m0 + i));
            DataCopy(a1[i * C0], aGm[row * tl.k + k0], p);
        }
";
const COPY_A_DENSE: &str = "        p.nValue = mLen;
        DataCopy(a1, aGm[m0 * tl.k + k0], p);
";

/// Source of the grouped cube GEMM `(a, offsets, [rows,] w, c)`: f16/bf16
/// with f32 accumulation and output, or int8 with int32 (the grouped int8
/// GEMM of `quant.rs`). `gather`: A rows read through `rows[]`; `nz`: the
/// expert weights stored pre-tiled ([`crate::weights::tile_nz`]).
pub(crate) fn grouped_cube_source(entry: &str, what: &str, t: DevType, gather: bool, nz: bool) -> String {
    let (acc, acc_name) = if t == DevType::I8 { ("int32_t", "int32") } else { ("float", "f32") };
    let on = |c: bool, s: &str| if c { s.to_string() } else { String::new() };
    head(entry, &format!("Grouped cube GEMM ({what}): C = A * W[e]^T per expert, {acc_name} out."))
        + &fill_kernel(
            GROUPED,
            entry,
            &[
                ("T", t.cpp().into()),
                ("ACC", acc.into()),
                ("ACC_NAME", acc_name.into()),
                ("CUBE_CONSTS", CUBE_CONSTS.into()),
                ("CUBE_BUFFERS", cube_buffers(acc)),
                ("CUBE_STAGES", cube_stages("QuantMode_t::NoQuant", acc)),
                ("AROW", if gather { "rows[r]" } else { "r" }.into()),
                ("ROWS_PARAM", on(gather, "GM_ADDR rows, ")),
                ("ROWS_ARG", on(gather, "rows, ")),
                ("ROWS_INIT", on(gather, "        rowsGm.SetGlobalBuffer((__gm__ int64_t*)rows, t.slots);\n")),
                ("ROWS_MEMBER", on(gather, ", rowsGm")),
                ("COPY_A", if gather { COPY_A_GATHER } else { COPY_A_DENSE }.into()),
                ("COPY_B", copy_b(nz, "wBase + ")),
                ("W_LAYOUT", w_layout(nz).into()),
                // One expert's matrix: [n, k] row-major, or its tiles.
                (
                    "W_BASE",
                    if nz { "e * CeilCube(tl.n) * ((tl.k + C0 - 1) / C0 * C0)" } else { "e * tl.n * tl.k" }.into(),
                ),
            ],
        )
}

/// Tiling fields of [`grouped_cube_source`]: one tile per (expert, baseN
/// column block).
pub(crate) fn grouped_cube_fields(
    base: &BaseTile,
    experts: u64,
    slots: TExpr,
    a_rows: TExpr,
    n: u64,
    k: u64,
) -> Vec<TilingField> {
    let tiles = TExpr::c(experts * n.div_ceil(base.n));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("experts", TExpr::c(experts)),
        TilingField::u32("slots", slots),
        TilingField::u32("aRows", a_rows),
        TilingField::u32("n", TExpr::c(n)),
        TilingField::u32("k", TExpr::c(k)),
    ]);
    fields.extend(base.fields());
    fields
}

/// The three grouped expert GEMMs. Each takes `(A, offsets[E+1], [aux,]
/// w[E, N, K], out)`: the expert weight and the output are the last two.
#[derive(Clone, Copy, PartialEq)]
enum Grouped {
    /// `MoeGateUp`: A rows through `rows` (aux), one copy per row per K step.
    GateUpIndexed,
    /// `MoeGroupedGateUp`: A rows already gathered once, contiguous per
    /// expert; one ND->NZ copy per (row block, K step).
    GateUpSorted,
    /// `MoeDown`: A rows in sorted order, output scaled by the row weight (aux).
    Down,
}

/// Grouped cube kernel + its vector epilogue.
fn grouped(ctx: &Ctx, kind: Grouped) -> Result<DeviceKernels> {
    let (gather, down) = (kind == Grouped::GateUpIndexed, kind == Grouped::Down);
    let what = if down { "down" } else { "gate/up" };
    let (wi, oi) = (ctx.k.args.len() - 2, ctx.k.args.len() - 1);
    let (e, n_w, k) = (ctx.cdim(wi, 0, "experts")?, ctx.cdim(wi, 1, "weight rows")?, ctx.cdim(wi, 2, "K")?);
    let n_out = ctx.cdim(oi, 1, "output width")?;
    if !down && n_w != 2 * n_out || down && n_w != n_out {
        bail!("{}: {what} weight rows {n_w} do not match the output width {n_out}", ctx.k.name);
    }
    if ctx.cdim(1, 0, "experts + 1")? != e + 1 {
        bail!("{}: offsets must have experts + 1 entries", ctx.k.name);
    }
    let t = ctx.dt[0];
    if ctx.dt[wi] != t {
        bail!("{}: expert weight dtype {} differs from the activation dtype {t}", ctx.k.name, ctx.dt[wi]);
    }
    if ctx.dt[1] != DevType::I64 || (gather && ctx.dt[2] != DevType::I64) {
        bail!("{}: offsets and rows must be i64", ctx.k.name);
    }
    if down && ctx.dt[2] != DevType::F32 {
        bail!("{}: row weights must be f32 on the device", ctx.k.name);
    }
    need_fractal_dims(ctx, "expert matmul", n_w, k)?;
    let target = ctx.target();
    let base = BaseTile::for_type(t);
    let slots = ctx.dim(oi, 0)?;
    let a_rows = ctx.dim(0, 0)?;
    let entry = ctx.entry("_cube");
    let mut w = ctx.param("w", wi, Role::Input);
    w.nz = ctx.o.nz_weight(&w, base, t, n_w, k);
    let src = grouped_cube_source(&entry, &format!("MoE {what}"), t, gather, w.nz.is_some());
    let fields = grouped_cube_fields(&base, e, slots.clone(), a_rows, n_w, k);
    let tiles = TExpr::c(e * n_w.div_ceil(base.n));
    let c_param = |role| Param::new("c", DevType::F32, role, ArgRef::Temp(0));
    let mut params = vec![ctx.param("a", 0, Role::Input), ctx.param("offsets", 1, Role::Input)];
    if gather {
        params.push(ctx.param("rows", 2, Role::Input));
    }
    params.push(w);
    params.push(c_param(Role::Output));
    let cube = cube_device_kernel(entry, src, fields, &tiles, params, base.mem(t, target));
    let temp = TempBuf {
        name: format!("{}.c", ctx.k.name),
        dtype: DevType::F32,
        shape: vec![slots.clone(), TExpr::c(n_w)],
        elems: slots.clone().times(TExpr::c(n_w)),
    };
    let mut eparams = vec![c_param(Role::Input)];
    if down {
        eparams.push(ctx.param("rowW", 2, Role::Input));
    }
    eparams.push(ctx.param("y", oi, Role::Output));
    let epi = epilogue_kernel(
        ctx,
        EpilogueSpec {
            entry: ctx.entry("_epilogue"),
            ep: if down { Epilogue::None } else { Epilogue::SwiGlu },
            row_scale: down,
            t: ctx.dt[oi],
            bias_t: None,
            rows: slots,
            n: n_out,
            params: eparams,
        },
    )?;
    Ok(DeviceKernels { kernels: vec![cube, epi], temps: vec![temp], host: None })
}

/// `MoeGateUp (x[T, H], offsets[E+1], rows[T*G], w_gate_up[E, 2I, H], act_out[T*G, I])`;
/// on the device the weight is row-major `[E, 2I, H]`, gate rows first.
pub(crate) fn gate_up(ctx: &Ctx) -> Result<DeviceKernels> {
    grouped(ctx, Grouped::GateUpIndexed)
}

/// `MoeGroupedGateUp (xs[T*G, H], offsets[E+1], w_gate_up[E, 2I, H], act_out[T*G, I])`:
/// the batched MoE's gate/up GEMM over rows that a `Gather` launch already
/// copied once into one contiguous block per expert, so each (row block,
/// K step) is one ND->NZ copy instead of one copy per row.
pub(crate) fn gate_up_sorted(ctx: &Ctx) -> Result<DeviceKernels> {
    grouped(ctx, Grouped::GateUpSorted)
}

/// `MoeDown (act[T*G, I], offsets[E+1], row_weight[T*G], w_down[E, H, I], ys_out[T*G, H])`;
/// on the device the weight is row-major `[E, H, I]`.
pub(crate) fn down(ctx: &Ctx) -> Result<DeviceKernels> {
    grouped(ctx, Grouped::Down)
}

const COMBINE: &str = r#"
using T = {{T}};

// One token per tile: routed = sum over g (in group order) of ys[slotRow[t*G+g]],
// then {{WHAT}}; f32 accumulation.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR ys, GM_ADDR slotRow, {{EXTRA_PARAM}}GM_ADDR out, const {{TILING}}& t)
    {
        h = t.hidden;
        groups = t.groups;
{{RANGE}}
        ysGm.SetGlobalBuffer((__gm__ T*)ys, t.tiles * groups * h);
        srGm.SetGlobalBuffer((__gm__ int64_t*)slotRow, t.tiles * groups);
        outGm.SetGlobalBuffer((__gm__ T*)out, t.tiles * h);
{{EXTRA_INIT}}        pipe.InitBuffer(inQ, 2, h * sizeof(T));
        pipe.InitBuffer(outQ, 2, h * sizeof(T));
        pipe.InitBuffer(accBuf, h * sizeof(float));
        pipe.InitBuffer(tmpBuf, h * sizeof(float));
    }
    __aicore__ inline void Process()
    {
        LocalTensor<float> acc = accBuf.Get<float>();
        LocalTensor<float> tmp = tmpBuf.Get<float>();
        for (uint32_t tok = start; tok < end; tok++) {
            for (uint32_t g = 0; g < groups; g++) {
                const uint64_t r = static_cast<uint64_t>(srGm.GetValue(tok * groups + g));
                Load(ysGm, r * h);
                LocalTensor<T> x = inQ.DeQue<T>();
                if (g == 0) {
                    ToFloat(acc, x, h);
                } else {
                    ToFloat(tmp, x, h);
                    PipeBarrier<PIPE_V>();
                    Add(acc, acc, tmp, h);
                }
                inQ.FreeTensor(x);
                PipeBarrier<PIPE_V>();
            }
{{EXTRA_COMPUTE}}            LocalTensor<T> y = outQ.AllocTensor<T>();
            FromFloat(y, acc, h);
            outQ.EnQue(y);
            y = outQ.DeQue<T>();
            DataCopy(outGm[tok * h], y, h);
            outQ.FreeTensor(y);
        }
    }

private:
    __aicore__ inline void Load(const GlobalTensor<T>& g, uint64_t off)
    {
        LocalTensor<T> x = inQ.AllocTensor<T>();
        DataCopy(x, g[off], h);
        inQ.EnQue(x);
    }
    // acc = lhs ? tmp + acc : acc + tmp, with tmp = row `tok` of g in f32.
    __aicore__ inline void AddRow(const GlobalTensor<T>& g, uint32_t tok, bool lhs)
    {
        LocalTensor<float> acc = accBuf.Get<float>();
        LocalTensor<float> tmp = tmpBuf.Get<float>();
        Load(g, static_cast<uint64_t>(tok) * h);
        LocalTensor<T> x = inQ.DeQue<T>();
        ToFloat(tmp, x, h);
        inQ.FreeTensor(x);
        PipeBarrier<PIPE_V>();
        if (lhs) {
            Add(acc, tmp, acc, h);
        } else {
            Add(acc, acc, tmp, h);
        }
        PipeBarrier<PIPE_V>();
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inQ;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> accBuf, tmpBuf;
    GlobalTensor<T> ysGm, outGm{{EXTRA_MEMBERS}};
    GlobalTensor<int64_t> srGm;
    uint32_t h = 0, groups = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR ys, GM_ADDR slotRow, {{EXTRA_PARAM}}GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(ys, slotRow, {{EXTRA_ARG}}out, t);
    op.Process();
}
"#;

/// `MoeCombine (ys[T*G, H], slot_row[T*G] i64, [shared[T, H], residual[T, H]], out[T, H])`.
pub(crate) fn combine(ctx: &Ctx, shared_residual: bool) -> Result<DeviceKernels> {
    let out = ctx.k.args.len() - 1;
    if out != if shared_residual { 4 } else { 2 } {
        bail!("{}: MoeCombine takes {} arguments", ctx.k.name, if shared_residual { 5 } else { 3 });
    }
    let h = ctx.cdim(out, 1, "hidden size")?;
    let g = per_token(ctx, 0, 0)?;
    let t = ctx.dt[out];
    if ctx.dt[0] != t || ctx.dt[1] != DevType::I64 || (shared_residual && (ctx.dt[2] != t || ctx.dt[3] != t)) {
        bail!("{}: ys, shared, residual and out must share one dtype; slot_row is i64", ctx.k.name);
    }
    need_aligned(ctx, "a hidden row", h, t)?;
    let tiles = ctx.dim(out, 0)?;
    let entry = ctx.entry("");
    let on = |s: &str| if shared_residual { s.to_string() } else { String::new() };
    let src = vector_source(&entry, "MoE combine: per-token sum of the expert rows in group order.", COMBINE,
            &[
                ("T", t.cpp().into()),
                ("WHAT", if shared_residual { "out = residual + (routed + shared)" } else { "out = routed" }.into()),
                ("EXTRA_PARAM", on("GM_ADDR shared, GM_ADDR residual, ")),
                ("EXTRA_ARG", on("shared, residual, ")),
                (
                    "EXTRA_INIT",
                    on("        shGm.SetGlobalBuffer((__gm__ T*)shared, t.tiles * h);\n        resGm.SetGlobalBuffer((__gm__ T*)residual, t.tiles * h);\n"),
                ),
                ("EXTRA_COMPUTE", on("            AddRow(shGm, tok, false);\n            AddRow(resGm, tok, true);\n")),
                ("EXTRA_MEMBERS", on(", shGm, resGm")),
            ],
        );
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("hidden", TExpr::c(h)));
    fields.push(TilingField::u32("groups", TExpr::c(g)));
    let ub = 4 * r32(h * t.size()) + 2 * r32(h * 4);
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = vec![ctx.param("ys", 0, Role::Input), ctx.param("slotRow", 1, Role::Input)];
    if shared_residual {
        dk.params.push(ctx.param("shared", 2, Role::Input));
        dk.params.push(ctx.param("residual", 3, Role::Input));
    }
    dk.params.push(ctx.param("out", out, Role::Output));
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

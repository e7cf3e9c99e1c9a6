//! Fused W8A8_DYNAMIC kernels. The expert kernels (`MoeGateUpQuant`,
//! `QuantGateUpQuant`, `MoeDownQuant`): the two int8 expert GEMMs with the dequant + SwiGLU +
//! per-token quant between them fused into the first one, so the int32
//! sums and the float activation never reach memory. The arithmetic is the
//! reference's (`panguc_ir::interp::quant`, `SwiGlu`): exact int8 dot
//! products ([`quant::dot_i8`]), `f32(acc) * w_scale * x_scale` in that
//! order, `silu(g) * u`, then `dynamic_quant` of the row
//! ([`quant::quantize_row`]).
//!
//! The expert weights are packed in dot-product panels (as the dense int8
//! matmul's, [`PanelDots`]). The activation row is quantized as a whole,
//! so its columns cannot be split over tiles: a tile is a block of up to
//! [`BLOCK_ROWS`] sorted rows of one expert (rows of one expert are
//! contiguous after the route sort) against every column of the expert,
//! one panel at a time, so each panel is read once per block and reused
//! from cache by its rows. Tile `t` runs the block starting at sorted row
//! `t` when a block starts there (every `BLOCK_ROWS` rows from its
//! expert's first), and nothing otherwise. Each row's sums are exact and
//! its epilogue is the row-at-a-time one, so a row's result does not
//! depend on the rows sharing its block.
//!
//! `DynQuantMatMul`: the per-token quantization of a projection's input
//! done by the int8 matmul itself (the o projection after attention), with
//! its bias and the residual add after it in the epilogue.
//! Static W8A8's fused kernels are in `quant_static`.

use super::quant::{dot_i8, load_scale, load_scale_vec, quantize_row};
use super::quant_gemm::PanelDots;
use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, bail, Result};
use inkwell::types::BasicType;
use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue, VectorValue};
use inkwell::AddressSpace;
use panguc_ir::kernel::{ArgSpec, Kernel, Layout, QUANT_MATMUL_COLS};
use panguc_ir::{DType, Dim};

/// Sorted rows per tile: the rows that reuse a weight panel from cache.
/// The gate/up kernels keep the block's float activations (`BLOCK_ROWS x
/// I` f32) and input rows on the stack.
pub(crate) const BLOCK_ROWS: usize = 16;
/// Output columns per weight panel.
const NR: usize = QUANT_MATMUL_COLS;

pub(super) fn st(d: &Dim, what: &str) -> Result<usize> {
    d.as_const().ok_or_else(|| anyhow!("{what} must be static, found {d}"))
}

pub(super) fn need_i8(a: &ArgSpec, what: &str) -> Result<()> {
    if a.dtype != DType::I8 {
        bail!("{what} is stored as {}, expected i8", a.dtype);
    }
    Ok(())
}

/// Expert weights must be packed in the dense int8 matmul's dot panels.
pub(super) fn need_dot_panels(a: &ArgSpec, what: &str) -> Result<()> {
    match a.layout {
        Layout::DotPanels { nr, kg: 4 } if nr as usize == NR => Ok(()),
        other => bail!("{what} is packed as {other:?}: the expert kernels take {NR} x 4 dot panels"),
    }
}

/// `len` elements of type `ty` on the stack.
pub(super) fn stack_array<'c>(cg: &Cg<'c>, ty: impl BasicType<'c>, len: usize, name: &str) -> PointerValue<'c> {
    let p = cg.alloca(ty.array_type(len as u32), name);
    cg.b.build_pointer_cast(p, ty.ptr_type(AddressSpace::default()), "").ok_()
}

/// The sorted rows `lo..hi` a tile's rows belong to: its expert's (routed,
/// from `MoeRoute`'s offsets) or every row (one expert).
#[derive(Clone, Copy)]
pub(super) enum RowSpan<'c> {
    Routed { offsets: PointerValue<'c>, experts: usize },
    All { rows: IntValue<'c> },
}

/// Run `body(expert, rows)` when a block of rows starts at tile `t`'s
/// sorted row: blocks of [`BLOCK_ROWS`] from the first row of the span,
/// the last one partial, never crossing into another expert's rows.
pub(super) fn row_block<'c>(
    cg: &mut Cg<'c>,
    t: IntValue<'c>,
    span: RowSpan<'c>,
    body: impl FnOnce(&mut Cg<'c>, IntValue<'c>, IntValue<'c>) -> Result<()>,
) -> Result<()> {
    let (e, lo, hi) = match span {
        RowSpan::Routed { offsets, experts } => {
            let e = expert_of(cg, offsets, experts, t)?;
            (e, cg.load_i(offsets, e), cg.load_i(offsets, cg.add(e, cg.i64c(1))))
        }
        RowSpan::All { rows } => (cg.i64c(0), cg.i64c(0), rows),
    };
    let block = cg.i64c(BLOCK_ROWS as i64);
    let starts = cg.eq(cg.rem(cg.sub(t, lo), block), cg.i64c(0));
    cg.if_then(starts, |cg| {
        let rows = cg.min(block, cg.sub(hi, t));
        body(cg, e, rows)
    })
}

/// Panel `p` of expert `e`'s weight (`panels` panels per expert).
fn expert_panel<'c>(
    cg: &Cg<'c>,
    dots: &PanelDots<'c>,
    w: PointerValue<'c>,
    (e, panels): (IntValue<'c>, usize),
    p: IntValue<'c>,
) -> PointerValue<'c> {
    let idx = cg.add(cg.mul(e, cg.i64c(panels as i64)), p);
    cg.gep(w, cg.mul(idx, cg.i64c(dots.panel_bytes() as i64)))
}

/// For each panel of `n` output columns: the exact sums of the block's
/// `rows` rows of each `(weight, input rows)` pair (input rows `K` bytes
/// apart) with the weight's panel of expert `e`, into that pair's sums
/// tile and column sums (`bufs`); then `epilogue(first column, column
/// count)` of the panel.
#[allow(clippy::too_many_arguments)]
pub(super) fn panel_sweep<'c, const W: usize>(
    cg: &mut Cg<'c>,
    dots: &PanelDots<'c>,
    bufs: &[(PointerValue<'c>, PointerValue<'c>); W],
    weights: [(PointerValue<'c>, PointerValue<'c>); W],
    e: IntValue<'c>,
    n: usize,
    rows: IntValue<'c>,
    mut epilogue: impl FnMut(&mut Cg<'c>, IntValue<'c>, IntValue<'c>) -> Result<()>,
) -> Result<()> {
    let panels = n.div_ceil(NR);
    cg.for_range(cg.i64c(0), cg.i64c(panels as i64), 1, |cg, p| {
        for ((w, x), (tile, csum)) in weights.iter().zip(bufs) {
            let panel = expert_panel(cg, dots, *w, (e, panels), p);
            dots.column_sums(cg, panel, *csum)?;
            dots.sums(cg, (*x, cg.i64c(dots.k() as i64)), rows, panel, *tile)?;
        }
        let j0 = cg.mul(p, cg.i64c(NR as i64));
        let cols = cg.min(cg.i64c(NR as i64), cg.sub(cg.i64c(n as i64), j0));
        epilogue(cg, j0, cols)
    })
}

/// Row `r`'s exact sums of a tile into the `<16 x i32>` stack slot
/// `lanes`, as an i32 pointer for column-by-column epilogues.
pub(super) fn row_lanes<'c>(
    cg: &Cg<'c>,
    dots: &PanelDots<'c>,
    bufs: (PointerValue<'c>, PointerValue<'c>),
    r: IntValue<'c>,
    lanes: PointerValue<'c>,
) -> PointerValue<'c> {
    cg.store_v(lanes, dots.row(cg, bufs, r));
    cg.b.build_pointer_cast(lanes, cg.i32t().ptr_type(AddressSpace::default()), "").ok_()
}

/// A row's columns `j..j + width` of a panel: the exact sums (`<16 x
/// i32>`, or one i32 when `width` is 1) of each weight, and `j`'s offset
/// in the panel.
pub(super) struct Columns<'c> {
    pub sums: Vec<BasicValueEnum<'c>>,
    pub offset: IntValue<'c>,
    pub width: u32,
}

/// Run `f` on a row's columns of a panel from its sums vectors: all 16 at
/// once for a whole panel, else lane by lane for the `cols` columns. Per
/// lane, vector float operations are the scalar ones, so either way each
/// output gets the same bits.
pub(super) fn panel_columns<'c>(
    cg: &mut Cg<'c>,
    sums: &[VectorValue<'c>],
    cols: IntValue<'c>,
    f: impl Fn(&mut Cg<'c>, Columns<'c>) -> Result<()>,
) -> Result<()> {
    let whole = cg.eq(cols, cg.i64c(NR as i64));
    cg.if_else(
        whole,
        |cg| {
            let sums = sums.iter().map(|v| (*v).into()).collect();
            f(cg, Columns { sums, offset: cg.i64c(0), width: NR as u32 })
        },
        |cg| {
            cg.for_range(cg.i64c(0), cols, 1, |cg, l| {
                let sums = sums.iter().map(|v| cg.b.build_extract_element(*v, l, "").ok_()).collect();
                f(cg, Columns { sums, offset: l, width: 1 })
            })
        },
    )
}

/// `width` consecutive per-channel scales from element `c` as f32: a
/// vector, or a scalar when `width` is 1.
fn scales_at<'c>(
    cg: &Cg<'c>,
    (p, dtype): (PointerValue<'c>, DType),
    c: IntValue<'c>,
    width: u32,
) -> BasicValueEnum<'c> {
    if width == 1 {
        return load_scale(cg, p, c, dtype).into();
    }
    load_scale_vec(cg, p, c, dtype, width).into()
}

/// Store `width` float values (a vector unless `width` is 1) at element `i`.
fn store_at<'c>(
    cg: &Cg<'c>,
    (p, dtype): (PointerValue<'c>, DType),
    i: IntValue<'c>,
    v: BasicValueEnum<'c>,
    width: u32,
) {
    if width == 1 {
        cg.store_f(p, i, dtype, v.into_float_value());
    } else {
        cg.store_vec(p, i, dtype, v.into_vector_value());
    }
}

/// `x` broadcast to `width` lanes (itself when `width` is 1).
fn splat_to<'c>(cg: &Cg<'c>, x: FloatValue<'c>, width: u32) -> BasicValueEnum<'c> {
    if width == 1 {
        return x.into();
    }
    cg.splat(x, width).into()
}

/// [`dequant`] of `width` columns at once from weight row / channel `c`.
fn dequant_cols<'c>(
    cg: &Cg<'c>,
    acc: BasicValueEnum<'c>,
    c: IntValue<'c>,
    scale: (PointerValue<'c>, DType),
    x_scale: FloatValue<'c>,
    width: u32,
) -> BasicValueEnum<'c> {
    let f: BasicValueEnum = match acc {
        BasicValueEnum::VectorValue(v) => cg.b.build_signed_int_to_float(v, cg.vec_f32(width), "").ok_().into(),
        other => cg.b.build_signed_int_to_float(other.into_int_value(), cg.f32t(), "").ok_().into(),
    };
    let ws = scales_at(cg, scale, c, width);
    cg.fmul(cg.fmul(f, ws), splat_to(cg, x_scale, width))
}

/// The expert of sorted row `r`: how many experts' blocks end at or before
/// it (`offsets[e + 1] <= r`), given `offsets[E+1]` of `MoeRoute`.
pub(super) fn expert_of<'c>(
    cg: &mut Cg<'c>,
    offsets: PointerValue<'c>,
    experts: usize,
    r: IntValue<'c>,
) -> Result<IntValue<'c>> {
    let e = cg.alloca(cg.i64t(), "expert");
    cg.store_v(e, cg.i64c(0));
    // The last expert's block ends at S > r: only E - 1 ends can be passed.
    cg.for_range(cg.i64c(1), cg.i64c(experts as i64), 1, |cg, j| {
        let passed = cg.le(cg.load_i(offsets, j), r);
        let cur = cg.load_v(e).into_int_value();
        cg.store_v(e, cg.select_i(passed, cg.add(cur, cg.i64c(1)), cur));
        Ok(())
    })?;
    Ok(cg.load_v(e).into_int_value())
}

/// `f32(xq . w[row c]) * scale[c] * x_scale`, the per-token dequant of one
/// int8 dot product of `k` elements.
#[allow(clippy::too_many_arguments)]
fn dequant_dot<'c>(
    cg: &mut Cg<'c>,
    x: PointerValue<'c>,
    w: PointerValue<'c>,
    c: IntValue<'c>,
    k: usize,
    scale: (PointerValue<'c>, DType),
    x_scale: FloatValue<'c>,
) -> Result<FloatValue<'c>> {
    let wrow = cg.gep(w, cg.mul(c, cg.i64c(k as i64)));
    let vnni = cg.vnni;
    let acc = dot_i8(cg, x, wrow, k, vnni)?;
    Ok(dequant(cg, acc, c, scale, x_scale))
}

/// `f32(acc) * scale[c] * x_scale`: the per-token dequant of an exact sum.
fn dequant<'c>(
    cg: &Cg<'c>,
    acc: IntValue<'c>,
    c: IntValue<'c>,
    scale: (PointerValue<'c>, DType),
    x_scale: FloatValue<'c>,
) -> FloatValue<'c> {
    dequant_cols(cg, acc.into(), c, scale, x_scale, 1).into_float_value()
}

/// Where the gate/up kernels find things: argument indices of the weights
/// (gate weight, gate scale, up weight, up scale follow), and of the
/// routing operands when routed.
struct GateUpArgs {
    w_gate: usize,
    /// `(offsets, rows)` of a routed kernel.
    routing: Option<(usize, usize)>,
}

/// `MoeGateUpQuant` (`routed`) and `QuantGateUpQuant`: see `KernelKind`.
pub(crate) fn gate_up_quant(cg: &mut Cg, k: &Kernel, routed: bool) -> Result<()> {
    let at =
        if routed { GateUpArgs { w_gate: 4, routing: Some((2, 3)) } } else { GateUpArgs { w_gate: 2, routing: None } };
    let (x, wg) = (&k.args[0], &k.args[at.w_gate]);
    let (q_out, s_out) = (&k.args[at.w_gate + 4], &k.args[at.w_gate + 5]);
    need_i8(x, "the quantized activation")?;
    need_i8(wg, "the gate weight")?;
    need_i8(&k.args[at.w_gate + 2], "the up weight")?;
    need_i8(q_out, "the quantized output")?;
    need_dot_panels(wg, "the gate weight")?;
    need_dot_panels(&k.args[at.w_gate + 2], "the up weight")?;
    let r = wg.shape.len();
    let (i, h) = (st(&wg.shape[r - 2], "expert intermediate size")?, st(&wg.shape[r - 1], "hidden size")?);
    let experts = if routed { st(&wg.shape[0], "expert count")? } else { 1 };
    let dots = PanelDots::declare(cg, &k.name, h)?;
    cg.begin_kernel(&k.name);
    let (xp, xsp) = (cg.arg(0, x.dtype), cg.arg(1, k.args[1].dtype));
    let w: Vec<(PointerValue, DType)> =
        (at.w_gate..at.w_gate + 4).map(|j| (cg.arg(j, k.args[j].dtype), k.args[j].dtype)).collect();
    let (gw, gs, uw, us) = (w[0], w[1], w[2], w[3]);
    let (qp, sp) = (cg.arg(at.w_gate + 4, q_out.dtype), cg.arg(at.w_gate + 5, s_out.dtype));
    let span = match at.routing {
        Some((o, _)) => RowSpan::Routed { offsets: cg.arg(o, DType::I64), experts },
        None => RowSpan::All { rows: cg.dim(&x.shape[0])? },
    };
    let token_rows = at.routing.map(|(_, rows)| cg.arg(rows, DType::I64));
    // The block's float activations (I is static), token scales, and (routed)
    // its gathered input rows.
    let act = stack_array(cg, cg.f32t(), BLOCK_ROWS * i, "act");
    let x_scales = stack_array(cg, cg.f32t(), BLOCK_ROWS, "x_scales");
    let x_rows = stack_array(cg, cg.ctx.i8_type(), BLOCK_ROWS * h, "x_rows");
    let bufs = [dots.buffers(cg, BLOCK_ROWS), dots.buffers(cg, BLOCK_ROWS)];
    let (ic, hc) = (cg.i64c(i as i64), cg.i64c(h as i64));
    cg.for_tiles(|cg, t| {
        row_block(cg, t, span, |cg, e, rows| {
            // The block's input rows, `h` bytes apart, and their scales.
            let x_block = match token_rows {
                Some(token_rows) => {
                    cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                        let token = cg.load_i(token_rows, cg.add(t, r));
                        let src = cg.gep(xp, cg.mul(token, hc));
                        cg.b.build_memcpy(cg.gep(x_rows, cg.mul(r, hc)), 1, src, 1, hc)
                            .map_err(|e| anyhow!("copying an input row: {e}"))?;
                        cg.store_f(x_scales, r, DType::F32, cg.load_f(xsp, token, k.args[1].dtype));
                        Ok(())
                    })?;
                    x_rows
                }
                None => {
                    cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                        cg.store_f(x_scales, r, DType::F32, cg.load_f(xsp, cg.add(t, r), k.args[1].dtype));
                        Ok(())
                    })?;
                    cg.gep(xp, cg.mul(t, hc))
                }
            };
            let weights = [(gw.0, x_block), (uw.0, x_block)];
            panel_sweep(cg, &dots, &bufs, weights, e, i, rows, |cg, j0, cols| {
                cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                    let sums = [dots.row(cg, bufs[0], r), dots.row(cg, bufs[1], r)];
                    let x_scale = cg.load_f(x_scales, r, DType::F32);
                    let arow = cg.add(cg.mul(r, ic), j0);
                    panel_columns(cg, &sums, cols, |cg, at| {
                        // Weight row / scale element of the first column.
                        let c = cg.add(cg.mul(e, ic), cg.add(j0, at.offset));
                        let g = dequant_cols(cg, at.sums[0], c, gs, x_scale, at.width);
                        let u = dequant_cols(cg, at.sums[1], c, us, x_scale, at.width);
                        let a = cg.fmul(cg.fmul(g, cg.sigmoid(g)), u);
                        store_at(cg, (act, DType::F32), cg.add(arow, at.offset), a, at.width);
                        Ok(())
                    })
                })
            })?;
            cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                let row = cg.add(t, r);
                let (a_row, q_row) = (cg.gep(act, cg.mul(r, ic)), cg.gep(qp, cg.mul(row, ic)));
                quantize_row(cg, (a_row, DType::F32), (q_row, q_out.dtype), (sp, s_out.dtype), row, cg.i64c(0), ic)
            })
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// The routed down projection's rows (`MoeDownQuant`, `MoeDownStatic`):
/// sorted row `r` of the int8 activation `a` (`[S, I]`) against each of
/// its expert's `h` weight rows (dot panels), times the row's routing
/// weight, into `y` (`[S, H]`).
pub(super) struct DownRows<'c> {
    pub offsets: PointerValue<'c>,
    pub experts: usize,
    pub h: usize,
    pub a: PointerValue<'c>,
    pub routing_weight: (PointerValue<'c>, DType),
    pub y: (PointerValue<'c>, DType),
}

/// One block of sorted rows per tile (see the module docs): `per_row`
/// loads what a row's dequant needs (once per row and panel, not per
/// column), `dequant(row's values, sums, first weight row c, width)` turns
/// the exact sums of `width` weight rows from `c` into floats; each result
/// is scaled by the routing weight (the finalize's `weight * y`,
/// commutative, so exact).
pub(super) fn weighted_down_rows<'c, R: Copy>(
    cg: &mut Cg<'c>,
    dots: &PanelDots<'c>,
    rows: DownRows<'c>,
    per_row: impl Fn(&mut Cg<'c>, IntValue<'c>) -> R,
    dequant: impl Fn(&mut Cg<'c>, R, BasicValueEnum<'c>, IntValue<'c>, u32) -> BasicValueEnum<'c>,
    w: PointerValue<'c>,
) -> Result<()> {
    let (hc, ic) = (cg.i64c(rows.h as i64), cg.i64c(dots.k() as i64));
    let bufs = [dots.buffers(cg, BLOCK_ROWS)];
    let span = RowSpan::Routed { offsets: rows.offsets, experts: rows.experts };
    cg.for_tiles(|cg, t| {
        row_block(cg, t, span, |cg, e, n| {
            let a_block = cg.gep(rows.a, cg.mul(t, ic));
            panel_sweep(cg, dots, &bufs, [(w, a_block)], e, rows.h, n, |cg, j0, cols| {
                cg.for_range(cg.i64c(0), n, 1, |cg, r| {
                    let row = cg.add(t, r);
                    let sums = [dots.row(cg, bufs[0], r)];
                    let row_w = cg.load_f(rows.routing_weight.0, row, rows.routing_weight.1);
                    let pr = per_row(cg, row);
                    let obase = cg.add(cg.mul(row, hc), j0);
                    panel_columns(cg, &sums, cols, |cg, at| {
                        let c = cg.add(cg.mul(e, hc), cg.add(j0, at.offset));
                        let y = dequant(cg, pr, at.sums[0], c, at.width);
                        let v = cg.fmul(y, splat_to(cg, row_w, at.width));
                        store_at(cg, rows.y, cg.add(obase, at.offset), v, at.width);
                        Ok(())
                    })
                })
            })
        })
    })
}

/// `MoeDownQuant`: see `KernelKind`.
pub(crate) fn down_quant(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (a, wd, ys) = (&k.args[0], &k.args[4], &k.args[6]);
    need_i8(a, "the quantized activation")?;
    need_i8(wd, "the down weight")?;
    need_dot_panels(wd, "the down weight")?;
    let (experts, h, i) = (
        st(&wd.shape[0], "expert count")?,
        st(&wd.shape[1], "hidden size")?,
        st(&wd.shape[2], "expert intermediate size")?,
    );
    let dots = PanelDots::declare(cg, &k.name, i)?;
    cg.begin_kernel(&k.name);
    let (ap, asp, offsets) = (cg.arg(0, a.dtype), cg.arg(1, k.args[1].dtype), cg.arg(2, DType::I64));
    let rows = DownRows {
        offsets,
        experts,
        h,
        a: ap,
        routing_weight: (cg.arg(3, k.args[3].dtype), k.args[3].dtype),
        y: (cg.arg(6, ys.dtype), ys.dtype),
    };
    let (wp, ws) = (cg.arg(4, wd.dtype), (cg.arg(5, k.args[5].dtype), k.args[5].dtype));
    weighted_down_rows(
        cg,
        &dots,
        rows,
        |cg, r| cg.load_f(asp, r, k.args[1].dtype),
        |cg, a_scale, acc, c, width| dequant_cols(cg, acc, c, ws, a_scale, width),
        wp,
    )?;
    cg.finish_kernel();
    Ok(())
}

/// `DynQuantMatMul`: see `KernelKind`. A tile quantizes each row into a
/// stack copy (K static) before its block of columns; the optional bias
/// and residual follow the weight scale, in that order.
pub(crate) fn dyn_quant_matmul(cg: &mut Cg, k: &Kernel, bias: bool, residual: bool) -> Result<()> {
    let bias_at = bias.then_some(3);
    let res_at = residual.then_some(3 + usize::from(bias));
    let out_at = 3 + usize::from(bias) + usize::from(residual);
    if k.args.len() != out_at + 1 {
        bail!(
            "dyn_quant_matmul (bias {bias}, residual {residual}) takes {} arguments, found {}",
            out_at + 1,
            k.args.len()
        );
    }
    let (x, w, ws, out) = (&k.args[0], &k.args[1], &k.args[2], &k.args[out_at]);
    need_i8(w, "the int8 weight")?;
    if x.shape.len() != 2 || w.shape.len() != 2 {
        bail!("dyn_quant_matmul takes a [M, K] activation and an [N, K] weight");
    }
    let (kc, nc) = (st(&x.shape[1], "int8 matmul K")?, st(&w.shape[0], "int8 matmul N")?);
    cg.begin_kernel(&k.name);
    let m = cg.dim(&x.shape[0])?;
    let (xp, wp, op) = (cg.arg(0, x.dtype), cg.arg(1, w.dtype), cg.arg(out_at, out.dtype));
    let wsp = (cg.arg(2, ws.dtype), ws.dtype);
    let bias_p = bias_at.map(|i| (cg.arg(i, k.args[i].dtype), k.args[i].dtype));
    let res_p = res_at.map(|i| (cg.arg(i, k.args[i].dtype), k.args[i].dtype));
    let row_ty = cg.ctx.i8_type().array_type(kc as u32);
    let xq = cg.alloca(row_ty, "xq");
    let xq = cg.b.build_pointer_cast(xq, cg.ctx.i8_type().ptr_type(AddressSpace::default()), "").ok_();
    let x_scale = cg.alloca(cg.f32t(), "x_scale");
    let cols = QUANT_MATMUL_COLS as i64;
    let (kv, n) = (cg.i64c(kc as i64), cg.i64c(nc as i64));
    cg.for_tiles(|cg, t| {
        let j0 = cg.mul(t, cg.i64c(cols));
        let j1 = cg.min(cg.add(j0, cg.i64c(cols)), n);
        cg.for_range(cg.i64c(0), m, 1, |cg, row| {
            let x_row = cg.gep(xp, cg.mul(row, kv));
            quantize_row(cg, (x_row, x.dtype), (xq, DType::I8), (x_scale, DType::F32), cg.i64c(0), cg.i64c(0), kv)?;
            let xs = cg.load_v(x_scale).into_float_value();
            let obase = cg.mul(row, n);
            cg.for_range(j0, j1, 1, |cg, j| {
                let mut y = dequant_dot(cg, xq, wp, j, kc, wsp, xs)?;
                // The reference's adds in its order: `(y + bias) + residual`.
                if let Some((p, d)) = bias_p {
                    y = cg.fadd(y.into(), cg.load_f(p, j, d).into()).into_float_value();
                }
                let at = cg.add(obase, j);
                if let Some((p, d)) = res_p {
                    y = cg.fadd(y.into(), cg.load_f(p, at, d).into()).into_float_value();
                }
                cg.store_f(op, at, out.dtype, y);
                Ok(())
            })
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

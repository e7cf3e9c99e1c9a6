//! Fused static W8A8 kernels (per-tensor activation scale and offset,
//! `quant_bias` + `deq_scale` epilogue; docs/quantization.md), with the
//! reference's arithmetic (`panguc_ir::interp::quant`): `quantize` as
//! `x / scale + offset` in f32, exact int8 dot products
//! ([`quant::dot_i8`]), `f32(acc + quant_bias) * deq_scale`.
//!
//! - `StaticQuantMatMul`: a projection that quantizes its own input, so
//!   the int8 row never reaches memory;
//! - `MoeGateUpStatic` / `MoeDownStatic`: the routed experts over the rows
//!   `MoeRoute` sorted by expert (the dense form computes every expert on
//!   every token): each expert quantizes its rows with its own input scale
//!   and offset, and the float gate/up activation never leaves the kernel.
//!   As the W8A8_DYNAMIC expert kernels (`quant_moe`), a tile is a block
//!   of sorted rows of one expert against every column of its expert,
//!   the weights in dot panels;
//! - `QuantGateUpStatic`: the shared expert's gate, up and SwiGLU, over
//!   blocks of rows the same way.

use super::quant::{dot_i8, load_i32, load_i32_vec, load_scale, load_scale_vec, quantize_row_static, quantize_value};
use super::quant_gemm::PanelDots;
use super::quant_moe::{
    need_dot_panels, need_i8, panel_sweep, row_block, row_lanes, st, stack_array, weighted_down_rows, DownRows,
    RowSpan, BLOCK_ROWS,
};
use crate::cg::{Cg, Ok_};
use anyhow::{bail, Result};
use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue};
use panguc_ir::kernel::{ArgSpec, Kernel, QUANT_MATMUL_COLS};
use panguc_ir::DType;

/// A pointer argument with its dtype.
type Arg<'c> = (PointerValue<'c>, DType);

fn arg<'c>(cg: &Cg<'c>, k: &Kernel, i: usize) -> Arg<'c> {
    (cg.arg(i, k.args[i].dtype), k.args[i].dtype)
}

/// An i8 row of `len` (static) bytes on the stack.
fn stack_row<'c>(cg: &mut Cg<'c>, len: usize, name: &str) -> PointerValue<'c> {
    stack_array(cg, cg.ctx.i8_type(), len, name)
}

/// `f32(xq . w[row c] + quant_bias[c]) * deq_scale[c]`: the static dequant
/// of one int8 dot product of `k` elements.
fn static_dot<'c>(
    cg: &mut Cg<'c>,
    (x, w): (PointerValue<'c>, PointerValue<'c>),
    c: IntValue<'c>,
    k: usize,
    qbias: Arg<'c>,
    deq: Arg<'c>,
) -> Result<FloatValue<'c>> {
    let wrow = cg.gep(w, cg.mul(c, cg.i64c(k as i64)));
    let vnni = cg.vnni;
    let acc = dot_i8(cg, x, wrow, k, vnni)?;
    Ok(static_dequant(cg, acc, c, qbias, deq))
}

/// `f32(acc + quant_bias[c]) * deq_scale[c]`: the static dequant of an
/// exact sum.
fn static_dequant<'c>(cg: &Cg<'c>, acc: IntValue<'c>, c: IntValue<'c>, qbias: Arg<'c>, deq: Arg<'c>) -> FloatValue<'c> {
    let with_bias = cg.b.build_int_add(acc, load_i32(cg, qbias.0, c), "").ok_();
    let f = cg.b.build_signed_int_to_float(with_bias, cg.f32t(), "").ok_();
    cg.fmul(f.into(), load_scale(cg, deq.0, c, deq.1).into()).into_float_value()
}

/// [`static_dequant`] of `width` columns from channel `c`: the sums as a
/// `<width x i32>` vector, or one i32 when `width` is 1.
fn static_dequant_cols<'c>(
    cg: &Cg<'c>,
    acc: BasicValueEnum<'c>,
    c: IntValue<'c>,
    qbias: Arg<'c>,
    deq: Arg<'c>,
    width: u32,
) -> BasicValueEnum<'c> {
    let BasicValueEnum::VectorValue(acc) = acc else {
        return static_dequant(cg, acc.into_int_value(), c, qbias, deq).into();
    };
    let with_bias = cg.b.build_int_add(acc, load_i32_vec(cg, qbias.0, c, width), "").ok_();
    let f = cg.b.build_signed_int_to_float(with_bias, cg.vec_f32(width), "").ok_();
    cg.fmul(f.into(), load_scale_vec(cg, deq.0, c, deq.1, width).into())
}

fn one_element(a: &ArgSpec) -> bool {
    a.shape.iter().map(|d| d.as_const()).product::<Option<usize>>() == Some(1)
}

/// `StaticQuantMatMul`: see `KernelKind`. As `DynQuantMatMul`, a tile
/// quantizes each row into a stack copy (K static), here with the
/// per-tensor scale and offset, before its block of columns.
pub(crate) fn static_quant_matmul(cg: &mut Cg, k: &Kernel) -> Result<()> {
    if k.args.len() != 7 {
        bail!("static_quant_matmul takes 7 arguments, found {}", k.args.len());
    }
    let (x, w, out) = (&k.args[0], &k.args[3], &k.args[6]);
    need_i8(w, "the int8 weight")?;
    if x.shape.len() != 2 || w.shape.len() != 2 {
        bail!("static_quant_matmul takes a [M, K] activation and an [N, K] weight");
    }
    if !one_element(&k.args[1]) || !one_element(&k.args[2]) {
        bail!("static_quant_matmul takes a per-tensor (one element) input scale and offset");
    }
    let (kc, nc) = (st(&x.shape[1], "int8 matmul K")?, st(&w.shape[0], "int8 matmul N")?);
    cg.begin_kernel(&k.name);
    let m = cg.dim(&x.shape[0])?;
    let (xp, wp, op) = (cg.arg(0, x.dtype), cg.arg(3, w.dtype), cg.arg(6, out.dtype));
    let (qb, deq) = (arg(cg, k, 4), arg(cg, k, 5));
    let (sp, offp) = (arg(cg, k, 1), arg(cg, k, 2));
    let s = cg.load_f(sp.0, cg.i64c(0), sp.1);
    let o = cg.load_f(offp.0, cg.i64c(0), offp.1);
    let xq = stack_row(cg, kc, "xq");
    let cols = QUANT_MATMUL_COLS as i64;
    let (kv, n) = (cg.i64c(kc as i64), cg.i64c(nc as i64));
    cg.for_tiles(|cg, t| {
        let j0 = cg.mul(t, cg.i64c(cols));
        let j1 = cg.min(cg.add(j0, cg.i64c(cols)), n);
        cg.for_range(cg.i64c(0), m, 1, |cg, row| {
            quantize_row_static(cg, (xp, x.dtype), cg.mul(row, kv), kv, s, o, xq)?;
            let obase = cg.mul(row, n);
            cg.for_range(j0, j1, 1, |cg, j| {
                let y = static_dot(cg, (xq, wp), j, kc, qb, deq)?;
                cg.store_f(op, cg.add(obase, j), out.dtype, y);
                Ok(())
            })
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// `MoeGateUpStatic`: see `KernelKind`.
pub(crate) fn moe_gate_up(cg: &mut Cg, k: &Kernel) -> Result<()> {
    if k.args.len() != 16 {
        bail!("moe_gate_up_static takes 16 arguments, found {}", k.args.len());
    }
    let (wg, q_out) = (&k.args[5], &k.args[15]);
    need_i8(wg, "the gate weight")?;
    need_i8(&k.args[10], "the up weight")?;
    need_i8(q_out, "the quantized output")?;
    if wg.shape.len() != 3 || k.args[10].shape != wg.shape {
        bail!("moe_gate_up_static takes gate and up weights of one [E, I, H] shape");
    }
    need_dot_panels(wg, "the gate weight")?;
    need_dot_panels(&k.args[10], "the up weight")?;
    let experts = st(&wg.shape[0], "expert count")?;
    let (i, h) = (st(&wg.shape[1], "expert intermediate size")?, st(&wg.shape[2], "hidden size")?);
    let dots = PanelDots::declare(cg, &k.name, h)?;
    cg.begin_kernel(&k.name);
    let (offsets, rows) = (cg.arg(1, DType::I64), cg.arg(2, DType::I64));
    // Scale, offset, weight, quant bias, deq scale of the gate and the up
    // projection; then the down projection's input scale and offset.
    let proj = StaticGateUp {
        x: arg(cg, k, 0),
        gate: [3, 4, 5, 6, 7].map(|j| arg(cg, k, j)),
        up: [8, 9, 10, 11, 12].map(|j| arg(cg, k, j)),
        i,
        h,
    };
    let (ds, dof) = (arg(cg, k, 13), arg(cg, k, 14));
    let qp = cg.arg(15, q_out.dtype);
    let ic = cg.i64c(i as i64);
    let span = RowSpan::Routed { offsets, experts };
    static_gate_up_blocks(cg, &dots, &proj, span, Some(rows), |cg, e, row, j, a| {
        // The down projection's `quantize` of the activation.
        let (dsv, dov) = (cg.load_f(ds.0, e, ds.1), cg.load_f(dof.0, e, dof.1));
        let y = cg.fadd(cg.fdiv(a.into(), dsv.into()), dov.into());
        cg.store_i(qp, cg.add(cg.mul(row, ic), j), quantize_value(cg, y.into_float_value()));
    })?;
    cg.finish_kernel();
    Ok(())
}

/// The static gate and up projections of a gate/up kernel: the input rows
/// (`[.., H]`), then per projection its input scale, input offset, int8
/// weight (dot panels, `[E, I, H]` or `[I, H]`), quant bias and deq scale.
struct StaticGateUp<'c> {
    x: Arg<'c>,
    gate: [Arg<'c>; 5],
    up: [Arg<'c>; 5],
    i: usize,
    h: usize,
}

/// One block of rows per tile (see `quant_moe`): each row quantized with
/// the expert's gate and up input scale and offset (per tensor: expert 0),
/// from token `token_rows[row]` (routed) or row `row`; then per column
/// `silu(gate) * up`, handed to `store(expert, row, column, activation)`.
fn static_gate_up_blocks<'c>(
    cg: &mut Cg<'c>,
    dots: &PanelDots<'c>,
    p: &StaticGateUp<'c>,
    span: RowSpan<'c>,
    token_rows: Option<PointerValue<'c>>,
    store: impl Fn(&mut Cg<'c>, IntValue<'c>, IntValue<'c>, IntValue<'c>, FloatValue<'c>),
) -> Result<()> {
    let (i, h) = (p.i, p.h);
    let (xg, xu) = (stack_row(cg, BLOCK_ROWS * h, "xg"), stack_row(cg, BLOCK_ROWS * h, "xu"));
    let bufs = [dots.buffers(cg, BLOCK_ROWS), dots.buffers(cg, BLOCK_ROWS)];
    let lanes = [(); 2].map(|_| cg.alloca(cg.i32t().vec_type(QUANT_MATMUL_COLS as u32), "lanes"));
    let (ic, hc) = (cg.i64c(i as i64), cg.i64c(h as i64));
    cg.for_tiles(|cg, t| {
        row_block(cg, t, span, |cg, e, rows| {
            let (gs, go) = (cg.load_f(p.gate[0].0, e, p.gate[0].1), cg.load_f(p.gate[1].0, e, p.gate[1].1));
            let (us, uo) = (cg.load_f(p.up[0].0, e, p.up[0].1), cg.load_f(p.up[1].0, e, p.up[1].1));
            cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                let row = cg.add(t, r);
                let token = token_rows.map_or(row, |tr| cg.load_i(tr, row));
                let (xbase, at) = (cg.mul(token, hc), cg.mul(r, hc));
                quantize_row_static(cg, p.x, xbase, hc, gs, go, cg.gep(xg, at))?;
                quantize_row_static(cg, p.x, xbase, hc, us, uo, cg.gep(xu, at))
            })?;
            let weights = [(p.gate[2].0, xg), (p.up[2].0, xu)];
            panel_sweep(cg, dots, &bufs, weights, e, i, rows, |cg, j0, cols| {
                cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                    let gl = row_lanes(cg, dots, bufs[0], r, lanes[0]);
                    let ul = row_lanes(cg, dots, bufs[1], r, lanes[1]);
                    let row = cg.add(t, r);
                    cg.for_range(cg.i64c(0), cols, 1, |cg, l| {
                        let j = cg.add(j0, l);
                        // Weight row / channel of column j.
                        let c = cg.add(cg.mul(e, ic), j);
                        let g = static_dequant(cg, cg.load_i(gl, l), c, p.gate[3], p.gate[4]);
                        let u = static_dequant(cg, cg.load_i(ul, l), c, p.up[3], p.up[4]);
                        let silu = cg.fmul(g.into(), cg.sigmoid(g.into()));
                        let a = cg.fmul(silu, u.into()).into_float_value();
                        store(cg, e, row, j, a);
                        Ok(())
                    })
                })
            })
        })
    })
}

/// `MoeDownStatic`: see `KernelKind`.
pub(crate) fn moe_down(cg: &mut Cg, k: &Kernel) -> Result<()> {
    if k.args.len() != 7 {
        bail!("moe_down_static takes 7 arguments, found {}", k.args.len());
    }
    let (a, wd) = (&k.args[0], &k.args[3]);
    need_i8(a, "the quantized activation")?;
    need_i8(wd, "the down weight")?;
    if wd.shape.len() != 3 {
        bail!("moe_down_static takes an [E, H, I] down weight");
    }
    need_dot_panels(wd, "the down weight")?;
    let (experts, h, i) = (
        st(&wd.shape[0], "expert count")?,
        st(&wd.shape[1], "hidden size")?,
        st(&wd.shape[2], "expert intermediate size")?,
    );
    let dots = PanelDots::declare(cg, &k.name, i)?;
    cg.begin_kernel(&k.name);
    let rows = DownRows {
        offsets: cg.arg(1, DType::I64),
        experts,
        h,
        a: cg.arg(0, a.dtype),
        routing_weight: arg(cg, k, 2),
        y: arg(cg, k, 6),
    };
    let (wp, qb, deq) = (cg.arg(3, wd.dtype), arg(cg, k, 4), arg(cg, k, 5));
    weighted_down_rows(
        cg,
        &dots,
        rows,
        |_, _| (),
        |cg, (), acc, c, width| static_dequant_cols(cg, acc, c, qb, deq, width),
        wp,
    )?;
    cg.finish_kernel();
    Ok(())
}

/// `QuantGateUpStatic`: see `KernelKind`.
pub(crate) fn shared_gate_up(cg: &mut Cg, k: &Kernel) -> Result<()> {
    if k.args.len() != 12 {
        bail!("quant_gate_up_static takes 12 arguments, found {}", k.args.len());
    }
    let (x, wg, act) = (&k.args[0], &k.args[3], &k.args[11]);
    need_i8(wg, "the gate weight")?;
    need_i8(&k.args[8], "the up weight")?;
    if x.shape.len() != 2 || wg.shape.len() != 2 || k.args[8].shape != wg.shape {
        bail!("quant_gate_up_static takes a [T, H] activation and gate and up weights of one [I, H] shape");
    }
    if ![1, 2, 6, 7].iter().all(|j| one_element(&k.args[*j])) {
        bail!("quant_gate_up_static takes per-tensor (one element) input scales and offsets");
    }
    need_dot_panels(wg, "the gate weight")?;
    need_dot_panels(&k.args[8], "the up weight")?;
    let (i, h) = (st(&wg.shape[0], "shared expert intermediate size")?, st(&wg.shape[1], "hidden size")?);
    let dots = PanelDots::declare(cg, &k.name, h)?;
    cg.begin_kernel(&k.name);
    // Scale, offset, weight, quant bias, deq scale of the gate and the up projection.
    let proj = StaticGateUp {
        x: arg(cg, k, 0),
        gate: [1, 2, 3, 4, 5].map(|j| arg(cg, k, j)),
        up: [6, 7, 8, 9, 10].map(|j| arg(cg, k, j)),
        i,
        h,
    };
    let ap = cg.arg(11, act.dtype);
    let ic = cg.i64c(i as i64);
    let span = RowSpan::All { rows: cg.dim(&x.shape[0])? };
    static_gate_up_blocks(cg, &dots, &proj, span, None, |cg, _, row, j, a| {
        cg.store_f(ap, cg.add(cg.mul(row, ic), j), act.dtype, a);
    })?;
    cg.finish_kernel();
    Ok(())
}

//! Fused W8A8_DYNAMIC kernels. The expert kernels (`MoeGateUpQuant`,
//! `QuantGateUpQuant`, `MoeDownQuant`): the two int8 expert GEMMs with the dequant + SwiGLU +
//! per-token quant between them fused into the first one, so the int32
//! sums and the float activation never reach memory. The arithmetic is the
//! reference's (`panguc_ir::interp::quant`, `SwiGlu`): exact int8 dot
//! products ([`quant::dot_i8`]), `f32(acc) * w_scale * x_scale` in that
//! order, `silu(g) * u`, then `dynamic_quant` of the row
//! ([`quant::quantize_row`]).
//!
//! A tile is one (sorted) row against every column of its expert: the
//! activation row is quantized as a whole, so its columns cannot be split
//! over tiles. Rows of one expert are contiguous and run in order on a
//! thread, so an expert's weights are read from cache after the first row.
//!
//! `DynQuantMatMul`: the per-token quantization of a projection's input
//! done by the int8 matmul itself (the o projection after attention), with
//! its bias and the residual add after it in the epilogue.
//! Static W8A8's fused kernels are in `quant_static`.

use super::quant::{dot_i8, load_scale, quantize_row};
use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, bail, Result};
use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::AddressSpace;
use panguc_ir::kernel::{ArgSpec, Kernel, QUANT_MATMUL_COLS};
use panguc_ir::{DType, Dim};

pub(super) fn st(d: &Dim, what: &str) -> Result<usize> {
    d.as_const().ok_or_else(|| anyhow!("{what} must be static, found {d}"))
}

pub(super) fn need_i8(a: &ArgSpec, what: &str) -> Result<()> {
    if a.dtype != DType::I8 {
        bail!("{what} is stored as {}, expected i8", a.dtype);
    }
    Ok(())
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
    let f = cg.b.build_signed_int_to_float(acc, cg.f32t(), "").ok_();
    let ws = load_scale(cg, scale.0, c, scale.1);
    Ok(cg.fmul(cg.fmul(f.into(), ws.into()), x_scale.into()).into_float_value())
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
    let r = wg.shape.len();
    let (i, h) = (st(&wg.shape[r - 2], "expert intermediate size")?, st(&wg.shape[r - 1], "hidden size")?);
    let experts = if routed { st(&wg.shape[0], "expert count")? } else { 1 };
    cg.begin_kernel(&k.name);
    let (xp, xsp) = (cg.arg(0, x.dtype), cg.arg(1, k.args[1].dtype));
    let w: Vec<(PointerValue, DType)> =
        (at.w_gate..at.w_gate + 4).map(|j| (cg.arg(j, k.args[j].dtype), k.args[j].dtype)).collect();
    let (gw, gs, uw, us) = (w[0], w[1], w[2], w[3]);
    let (qp, sp) = (cg.arg(at.w_gate + 4, q_out.dtype), cg.arg(at.w_gate + 5, s_out.dtype));
    let routing = at.routing.map(|(o, rows)| (cg.arg(o, DType::I64), cg.arg(rows, DType::I64)));
    // One activation row in f32, on the stack (I is static).
    let row_ty = cg.f32t().array_type(i as u32);
    let act = cg.alloca(row_ty, "act");
    let act = cg.b.build_pointer_cast(act, cg.f32t().ptr_type(AddressSpace::default()), "").ok_();
    let ic = cg.i64c(i as i64);
    cg.for_tiles(|cg, t| {
        // Token row read, and first weight row of the expert.
        let (token, wrow0) = match routing {
            Some((offsets, rows)) => {
                let e = expert_of(cg, offsets, experts, t)?;
                (cg.load_i(rows, t), cg.mul(e, ic))
            }
            None => (t, cg.i64c(0)),
        };
        let xrow = cg.gep(xp, cg.mul(token, cg.i64c(h as i64)));
        let x_scale = cg.load_f(xsp, token, k.args[1].dtype);
        cg.for_range(cg.i64c(0), ic, 1, |cg, n| {
            let c = cg.add(wrow0, n);
            let g = dequant_dot(cg, xrow, gw.0, c, h, gs, x_scale)?;
            let u = dequant_dot(cg, xrow, uw.0, c, h, us, x_scale)?;
            let silu = cg.fmul(g.into(), cg.sigmoid(g.into()));
            let a = cg.fmul(silu, u.into()).into_float_value();
            cg.store_f(act, n, DType::F32, a);
            Ok(())
        })?;
        let q_row = cg.gep(qp, cg.mul(t, ic));
        quantize_row(cg, (act, DType::F32), (q_row, q_out.dtype), (sp, s_out.dtype), t, cg.i64c(0), ic)
    })?;
    cg.finish_kernel();
    Ok(())
}

/// The routed down projection's rows (`MoeDownQuant`, `MoeDownStatic`):
/// sorted row `r` of the int8 activation `a` (`[S, I]`) against each of
/// its expert's `h` weight rows, times the row's routing weight, into `y`
/// (`[S, H]`). The weight rows of expert `e` start at row `e * h`.
pub(super) struct DownRows<'c> {
    pub offsets: PointerValue<'c>,
    pub experts: usize,
    pub h: usize,
    pub i: usize,
    pub a: PointerValue<'c>,
    pub routing_weight: (PointerValue<'c>, DType),
    pub y: (PointerValue<'c>, DType),
}

/// One tile per sorted row: `per_row` loads what the row's dequant needs
/// (once per row, not per column), `dot` is the dequantized dot product of
/// the activation row with weight row `c`; each result is scaled by the
/// routing weight (the finalize's `weight * y`, commutative, so exact).
pub(super) fn weighted_down_rows<'c, R>(
    cg: &mut Cg<'c>,
    rows: DownRows<'c>,
    per_row: impl FnOnce(&mut Cg<'c>, IntValue<'c>) -> R,
    dot: impl FnOnce(&mut Cg<'c>, R, PointerValue<'c>, IntValue<'c>) -> Result<FloatValue<'c>>,
) -> Result<()> {
    let hc = cg.i64c(rows.h as i64);
    cg.for_tiles(|cg, r| {
        let e = expert_of(cg, rows.offsets, rows.experts, r)?;
        let arow = cg.gep(rows.a, cg.mul(r, cg.i64c(rows.i as i64)));
        let row_w = cg.load_f(rows.routing_weight.0, r, rows.routing_weight.1);
        let row = per_row(cg, r);
        let (wrow0, obase) = (cg.mul(e, hc), cg.mul(r, hc));
        cg.for_range(cg.i64c(0), hc, 1, |cg, n| {
            let y = dot(cg, row, arow, cg.add(wrow0, n))?;
            let v = cg.fmul(y.into(), row_w.into()).into_float_value();
            cg.store_f(rows.y.0, cg.add(obase, n), rows.y.1, v);
            Ok(())
        })
    })
}

/// `MoeDownQuant`: see `KernelKind`.
pub(crate) fn down_quant(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (a, wd, ys) = (&k.args[0], &k.args[4], &k.args[6]);
    need_i8(a, "the quantized activation")?;
    need_i8(wd, "the down weight")?;
    let (experts, h, i) = (
        st(&wd.shape[0], "expert count")?,
        st(&wd.shape[1], "hidden size")?,
        st(&wd.shape[2], "expert intermediate size")?,
    );
    cg.begin_kernel(&k.name);
    let (ap, asp, offsets) = (cg.arg(0, a.dtype), cg.arg(1, k.args[1].dtype), cg.arg(2, DType::I64));
    let rows = DownRows {
        offsets,
        experts,
        h,
        i,
        a: ap,
        routing_weight: (cg.arg(3, k.args[3].dtype), k.args[3].dtype),
        y: (cg.arg(6, ys.dtype), ys.dtype),
    };
    let (wp, ws) = (cg.arg(4, wd.dtype), (cg.arg(5, k.args[5].dtype), k.args[5].dtype));
    weighted_down_rows(
        cg,
        rows,
        |cg, r| cg.load_f(asp, r, k.args[1].dtype),
        |cg, a_scale, arow, c| dequant_dot(cg, arow, wp, c, i, ws, a_scale),
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

//! Reductions along an axis (sum/mean/max, argmax, softmax) and the MoE
//! routing kernels. Each element's fold runs in the reference's order, so
//! these kernels match the interpreter bit for bit.

use crate::cg::{Cg, Ok_};
use anyhow::Result;
use inkwell::values::IntValue;
use inkwell::FloatPredicate;
use panguc_ir::kernel::Kernel;
use panguc_ir::op::ReduceOp;
use panguc_ir::DType;

/// (outer, len, inner) extents of `shape` split at `axis`.
fn around<'c>(cg: &Cg<'c>, dims: &[IntValue<'c>], axis: usize) -> (IntValue<'c>, IntValue<'c>, IntValue<'c>) {
    (cg.product(&dims[..axis]), dims[axis], cg.product(&dims[axis + 1..]))
}

pub(crate) fn reduce(cg: &mut Cg, k: &Kernel, op: ReduceOp, axis: usize) -> Result<()> {
    let inp = &k.args[0];
    cg.begin_kernel(&k.name);
    let id = cg.dims(&inp.shape)?;
    let (_, len, inner) = around(cg, &id, axis);
    let (ip, op_) = (cg.arg(0, inp.dtype), cg.arg(1, DType::F32));
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => f32::NEG_INFINITY,
    };
    cg.for_tiles(|cg, o| {
        // The output row doubles as the accumulator: l outer, i inner keeps
        // each element's fold in order and the inner loop vectorisable.
        let obase = cg.mul(o, inner);
        cg.for_range(cg.i64c(0), inner, 1, |cg, i| {
            cg.store_f(op_, cg.add(obase, i), DType::F32, cg.f32c(init));
            Ok(())
        })?;
        cg.for_range(cg.i64c(0), len, 1, |cg, l| {
            let ibase = cg.mul(cg.add(cg.mul(o, len), l), inner);
            cg.for_range(cg.i64c(0), inner, 1, |cg, i| {
                let at = cg.add(obase, i);
                let acc = cg.load_f(op_, at, DType::F32);
                let x = cg.load_f(ip, cg.add(ibase, i), inp.dtype);
                let v = match op {
                    ReduceOp::Max => cg.fmax(acc.into(), x.into()),
                    _ => cg.fadd(acc.into(), x.into()),
                };
                cg.store_f(op_, at, DType::F32, v.into_float_value());
                Ok(())
            })
        })?;
        if op == ReduceOp::Mean {
            let n = cg.b.build_signed_int_to_float(len, cg.f32t(), "").ok_();
            cg.for_range(cg.i64c(0), inner, 1, |cg, i| {
                let at = cg.add(obase, i);
                let v = cg.fdiv(cg.load_f(op_, at, DType::F32).into(), n.into());
                cg.store_f(op_, at, DType::F32, v.into_float_value());
                Ok(())
            })?;
        }
        Ok(())
    })?;
    cg.finish_kernel();
    Ok(())
}

pub(crate) fn argmax<'c>(cg: &mut Cg<'c>, k: &Kernel, axis: usize) -> Result<()> {
    let inp = &k.args[0];
    cg.begin_kernel(&k.name);
    let id = cg.dims(&inp.shape)?;
    let (_, len, inner) = around(cg, &id, axis);
    let (ip, op) = (cg.arg(0, inp.dtype), cg.arg(1, DType::I64));
    cg.for_tiles(|cg, o| {
        cg.for_range(cg.i64c(0), inner, 1, |cg, i| {
            let at = |cg: &Cg<'c>, l: IntValue<'c>| cg.add(cg.mul(cg.add(cg.mul(o, len), l), inner), i);
            let best = cg.alloca(cg.i64t(), "best");
            cg.store_v(best, cg.i64c(0));
            cg.for_range(cg.i64c(1), len, 1, |cg, l| {
                let bl = cg.load_v(best).into_int_value();
                let (x, bx) = (cg.load_f(ip, at(cg, l), inp.dtype), cg.load_f(ip, at(cg, bl), inp.dtype));
                // Strictly greater: ties keep the lowest index.
                let gt = cg.fcmp(FloatPredicate::OGT, x, bx);
                cg.store_v(best, cg.select_i(gt, l, bl));
                Ok(())
            })?;
            let b = cg.load_v(best).into_int_value();
            cg.store_i(op, cg.add(cg.mul(o, inner), i), b);
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Softmax of `n` values at `p[base + l*stride]` written to `q[..]`, exactly
/// as the reference: max, exp(x - max) (0 when the max is -inf), sum, and a
/// division (0 when the sum is not positive).
fn softmax_row<'c>(
    cg: &mut Cg<'c>,
    src: (inkwell::values::PointerValue<'c>, DType),
    dst: inkwell::values::PointerValue<'c>,
    base: IntValue<'c>,
    stride: IntValue<'c>,
    n: IntValue<'c>,
) -> Result<()> {
    let at = |cg: &Cg<'c>, l| cg.add(base, cg.mul(l, stride));
    let m = cg.alloca(cg.f32t(), "m");
    cg.store_v(m, cg.f32c(f32::NEG_INFINITY));
    cg.for_range(cg.i64c(0), n, 1, |cg, l| {
        let x = cg.load_f(src.0, at(cg, l), src.1);
        let v = cg.fmax(cg.load_v(m), x.into());
        cg.store_v(m, v);
        Ok(())
    })?;
    let mv = cg.load_v(m).into_float_value();
    let neg_inf = cg.fcmp(FloatPredicate::OEQ, mv, cg.f32c(f32::NEG_INFINITY));
    let sum = cg.alloca(cg.f32t(), "sum");
    cg.store_v(sum, cg.f32c(0.0));
    cg.for_range(cg.i64c(0), n, 1, |cg, l| {
        let x = cg.load_f(src.0, at(cg, l), src.1);
        let e = cg.exp(cg.fsub(x.into(), mv.into())).into_float_value();
        let e = cg.select_f(neg_inf, cg.f32c(0.0), e);
        cg.store_f(dst, at(cg, l), DType::F32, e);
        let s = cg.fadd(cg.load_v(sum), e.into());
        cg.store_v(sum, s);
        Ok(())
    })?;
    let sv = cg.load_v(sum).into_float_value();
    let pos = cg.fcmp(FloatPredicate::OGT, sv, cg.f32c(0.0));
    cg.for_range(cg.i64c(0), n, 1, |cg, l| {
        let e = cg.load_f(dst, at(cg, l), DType::F32);
        let q = cg.fdiv(e.into(), sv.into()).into_float_value();
        cg.store_f(dst, at(cg, l), DType::F32, cg.select_f(pos, q, cg.f32c(0.0)));
        Ok(())
    })
}

pub(crate) fn softmax(cg: &mut Cg, k: &Kernel, axis: usize) -> Result<()> {
    let inp = &k.args[0];
    cg.begin_kernel(&k.name);
    let id = cg.dims(&inp.shape)?;
    let (_, len, inner) = around(cg, &id, axis);
    let (ip, op) = (cg.arg(0, inp.dtype), cg.arg(1, DType::F32));
    cg.for_tiles(|cg, o| {
        cg.for_range(cg.i64c(0), inner, 1, |cg, i| {
            let base = cg.add(cg.mul(cg.mul(o, len), inner), i);
            softmax_row(cg, (ip, inp.dtype), op, base, inner, len)
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Softmax over all experts, top-1 per contiguous group, scaled by the
/// expert's router scale; probabilities live in a stack row.
pub(crate) fn moe_gating(cg: &mut Cg, k: &Kernel, groups: usize) -> Result<()> {
    let (logits, scale) = (&k.args[0], &k.args[1]);
    let e = logits.shape[1].as_const().ok_or_else(|| anyhow::anyhow!("symbolic expert count"))?;
    let per = e / groups;
    cg.begin_kernel(&k.name);
    let (lp, sp) = (cg.arg(0, logits.dtype), cg.arg(1, scale.dtype));
    let (wp, ip) = (cg.arg(2, DType::F32), cg.arg(3, DType::I64));
    let row_ty = cg.f32t().array_type(e as u32);
    let row = cg.alloca(row_ty, "probs");
    let row = cg.b.build_pointer_cast(row, cg.f32t().ptr_type(inkwell::AddressSpace::default()), "").ok_();
    let ec = cg.i64c(e as i64);
    cg.for_tiles(|cg, t| {
        let base = cg.mul(t, ec);
        // Copy the logits row to the stack, then softmax it in place.
        cg.for_range(cg.i64c(0), ec, 1, |cg, j| {
            let x = cg.load_f(lp, cg.add(base, j), logits.dtype);
            cg.store_f(row, j, DType::F32, x);
            Ok(())
        })?;
        softmax_row(cg, (row, DType::F32), row, cg.i64c(0), cg.i64c(1), ec)?;
        for g in 0..groups {
            let g0 = cg.i64c((g * per) as i64);
            let best = cg.alloca(cg.i64t(), "best");
            cg.store_v(best, cg.i64c(0));
            cg.for_range(cg.i64c(1), cg.i64c(per as i64), 1, |cg, j| {
                let bj = cg.load_v(best).into_int_value();
                let x = cg.load_f(row, cg.add(g0, j), DType::F32);
                let bx = cg.load_f(row, cg.add(g0, bj), DType::F32);
                let gt = cg.fcmp(FloatPredicate::OGT, x, bx);
                cg.store_v(best, cg.select_i(gt, j, bj));
                Ok(())
            })?;
            let ex = cg.add(g0, cg.load_v(best).into_int_value());
            let w = cg.fmul(cg.load_f(row, ex, DType::F32).into(), cg.load_f(sp, ex, scale.dtype).into());
            let slot = cg.add(cg.mul(t, cg.i64c(groups as i64)), cg.i64c(g as i64));
            cg.store_f(wp, slot, DType::F32, w.into_float_value());
            cg.store_i(ip, slot, ex);
        }
        Ok(())
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Stable counting sort of the (token, group) slots by expert.
pub(crate) fn moe_route<'c>(cg: &mut Cg<'c>, k: &Kernel) -> Result<()> {
    let w = &k.args[0];
    let e = k.args[2].shape[0].as_const().ok_or_else(|| anyhow::anyhow!("symbolic expert count"))? - 1;
    let groups = w.shape[1].as_const().ok_or_else(|| anyhow::anyhow!("symbolic group count"))?;
    cg.begin_kernel(&k.name);
    let slots = cg.dim(&k.args[3].shape[0])?;
    let (wp, idp) = (cg.arg(0, w.dtype), cg.arg(1, DType::I64));
    let (offp, rowp, rwp, srp) =
        (cg.arg(2, DType::I64), cg.arg(3, DType::I64), cg.arg(4, DType::F32), cg.arg(5, DType::I64));
    let cur_ty = cg.i64t().array_type(e as u32);
    let cursor = cg.alloca(cur_ty, "cursor");
    let cursor = cg.b.build_pointer_cast(cursor, cg.i64t().ptr_type(inkwell::AddressSpace::default()), "").ok_();
    let (ec, one) = (cg.i64c(e as i64), cg.i64c(1));
    let expert = |cg: &Cg<'c>, s: IntValue<'c>| {
        // Gating always yields valid ids; clamping keeps memory safe anyway.
        let x = cg.load_i(idp, s);
        cg.min(cg.max(x, cg.i64c(0)), cg.i64c(e as i64 - 1))
    };
    cg.for_range(cg.i64c(0), cg.add(ec, one), 1, |cg, j| {
        cg.store_i(offp, j, cg.i64c(0));
        Ok(())
    })?;
    cg.for_range(cg.i64c(0), slots, 1, |cg, s| {
        let at = cg.add(expert(cg, s), one);
        cg.store_i(offp, at, cg.add(cg.load_i(offp, at), one));
        Ok(())
    })?;
    cg.for_range(cg.i64c(0), ec, 1, |cg, j| {
        let next = cg.add(j, one);
        cg.store_i(offp, next, cg.add(cg.load_i(offp, next), cg.load_i(offp, j)));
        cg.store_i(cursor, j, cg.load_i(offp, j));
        Ok(())
    })?;
    cg.for_range(cg.i64c(0), slots, 1, |cg, s| {
        let ex = expert(cg, s);
        let r = cg.load_i(cursor, ex);
        cg.store_i(cursor, ex, cg.add(r, one));
        cg.store_i(rowp, r, cg.div(s, cg.i64c(groups as i64)));
        cg.store_f(rwp, r, DType::F32, cg.load_f(wp, s, w.dtype));
        cg.store_i(srp, s, r);
        Ok(())
    })?;
    cg.finish_kernel();
    Ok(())
}

/// `out[t] = sum_g ys[slot_row[t*G+g]]` (then `residual + (. + shared)`).
pub(crate) fn moe_combine(cg: &mut Cg, k: &Kernel, shared_residual: bool) -> Result<()> {
    let out = k.args.last().expect("out");
    let ys = &k.args[0];
    let t_dim = &out.shape[0];
    let groups_dim = ys.shape[0].clone();
    cg.begin_kernel(&k.name);
    let h = cg.dim(&out.shape[1])?;
    let (tokens, slots) = (cg.dim(t_dim)?, cg.dim(&groups_dim)?);
    let groups = cg.div(slots, cg.max(tokens, cg.i64c(1)));
    let (yp, sp) = (cg.arg(0, DType::F32), cg.arg(1, DType::I64));
    let n = k.args.len();
    let op = cg.arg(n - 1, out.dtype);
    let extra = shared_residual.then(|| (cg.arg(2, k.args[2].dtype), cg.arg(3, k.args[3].dtype)));
    cg.for_tiles(|cg, t| {
        let obase = cg.mul(t, h);
        cg.for_range(cg.i64c(0), h, 1, |cg, c| {
            cg.store_f(op, cg.add(obase, c), DType::F32, cg.f32c(0.0));
            Ok(())
        })?;
        cg.for_range(cg.i64c(0), groups, 1, |cg, g| {
            let r = cg.load_i(sp, cg.add(cg.mul(t, groups), g));
            let ybase = cg.mul(r, h);
            cg.for_range(cg.i64c(0), h, 1, |cg, c| {
                let at = cg.add(obase, c);
                let v =
                    cg.fadd(cg.load_f(op, at, DType::F32).into(), cg.load_f(yp, cg.add(ybase, c), DType::F32).into());
                cg.store_f(op, at, DType::F32, v.into_float_value());
                Ok(())
            })
        })?;
        if let Some((shp, rp)) = extra {
            let (sd, rd) = (k.args[2].dtype, k.args[3].dtype);
            cg.for_range(cg.i64c(0), h, 1, |cg, c| {
                let at = cg.add(obase, c);
                let moe = cg.fadd(cg.load_f(op, at, DType::F32).into(), cg.load_f(shp, at, sd).into());
                let v = cg.fadd(cg.load_f(rp, at, rd).into(), moe);
                cg.store_f(op, at, DType::F32, v.into_float_value());
                Ok(())
            })?;
        }
        Ok(())
    })?;
    cg.finish_kernel();
    Ok(())
}

//! Data movement and index-built tensors: gather, transpose, slice,
//! copy-into (concat/stack parts, KV-cache append), repeat-interleave,
//! one-hot, causal mask and the RoPE tables.

use crate::cg::{Cg, Ok_};
use anyhow::Result;
use inkwell::values::{IntValue, PointerValue};
use panguc_ir::kernel::Kernel;
use panguc_ir::op::RopeKind;
use panguc_ir::DType;

/// Copy `n` elements, converting between storage dtypes when they differ.
pub(crate) fn copy<'c>(
    cg: &mut Cg<'c>,
    src: (PointerValue<'c>, IntValue<'c>, DType),
    dst: (PointerValue<'c>, IntValue<'c>, DType),
    n: IntValue<'c>,
) -> Result<()> {
    cg.for_range(cg.i64c(0), n, 1, |cg, j| {
        let (s, d) = (cg.add(src.1, j), cg.add(dst.1, j));
        if src.2 == dst.2 {
            // Same representation: move the raw element.
            let v = cg.b.build_load(cg.gep(src.0, s), "").ok_();
            cg.b.build_store(cg.gep(dst.0, d), v).ok_();
        } else if src.2.is_float() && dst.2.is_float() {
            let v = cg.load_f(src.0, s, src.2);
            cg.store_f(dst.0, d, dst.2, v);
        } else {
            anyhow::bail!("copy between {} and {} storage", src.2, dst.2);
        }
        Ok(())
    })
}

/// Product of dims `lo..hi` of a shape.
fn span<'c>(cg: &Cg<'c>, dims: &[IntValue<'c>], lo: usize, hi: usize) -> IntValue<'c> {
    cg.product(&dims[lo..hi])
}

pub(crate) fn gather(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (table, out) = (&k.args[0], &k.args[2]);
    cg.begin_kernel(&k.name);
    let td = cg.dims(&table.shape)?;
    let rows = td[0];
    let width = span(cg, &td, 1, td.len());
    let (tp, ip, op) = (cg.arg(0, table.dtype), cg.arg(1, DType::I64), cg.arg(2, out.dtype));
    cg.for_tiles(|cg, t| {
        let row = cg.load_i(ip, t);
        let ok = cg.b.build_and(cg.le(cg.i64c(0), row), cg.lt(row, rows), "").ok_();
        let dst = cg.mul(t, width);
        // Out-of-range ids are rejected by the runtime before a call; the
        // kernel still stays inside the table.
        cg.if_else(
            ok,
            |cg| copy(cg, (tp, cg.mul(row, width), table.dtype), (op, dst, out.dtype), width),
            |cg| {
                cg.for_range(cg.i64c(0), width, 1, |cg, j| {
                    let z = cg.f32c(0.0);
                    cg.store_f(op, cg.add(dst, j), out.dtype, z);
                    Ok(())
                })
            },
        )
    })?;
    cg.finish_kernel();
    Ok(())
}

pub(crate) fn transpose(cg: &mut Cg, k: &Kernel, perm: &[usize]) -> Result<()> {
    let (inp, out) = (&k.args[0], &k.args[1]);
    cg.begin_kernel(&k.name);
    let id = cg.dims(&inp.shape)?;
    let istr = cg.strides(&id);
    let od = cg.dims(&out.shape)?;
    let r = od.len();
    let (ip, op) = (cg.arg(0, inp.dtype), cg.arg(1, out.dtype));
    let inner = od[r - 1];
    let step = istr[perm[r - 1]];
    cg.for_tiles(|cg, t| {
        let idx = cg.unravel(t, &od[..r - 1]);
        let base = idx.iter().enumerate().fold(cg.i64c(0), |acc, (d, i)| cg.add(acc, cg.mul(*i, istr[perm[d]])));
        let obase = cg.mul(t, inner);
        cg.for_range(cg.i64c(0), inner, 1, |cg, j| {
            let s = cg.add(base, cg.mul(j, step));
            copy(cg, (ip, s, inp.dtype), (op, cg.add(obase, j), out.dtype), cg.i64c(1))
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// `out[o, l, :] = in[o, map(l), :]` over an (outer, len, inner) split at
/// `axis`; the tile is `o * out_len + l`.
fn rows_copy(
    cg: &mut Cg,
    k: &Kernel,
    axis: usize,
    map: impl for<'c> Fn(&Cg<'c>, IntValue<'c>) -> IntValue<'c>,
) -> Result<()> {
    let (inp, out) = (&k.args[0], &k.args[1]);
    cg.begin_kernel(&k.name);
    let id = cg.dims(&inp.shape)?;
    let od = cg.dims(&out.shape)?;
    let inner = span(cg, &od, axis + 1, od.len());
    let (ilen, olen) = (id[axis], od[axis]);
    let (ip, op) = (cg.arg(0, inp.dtype), cg.arg(1, out.dtype));
    cg.for_tiles(|cg, t| {
        let (o, l) = (cg.div(t, olen), cg.rem(t, olen));
        let src_row = cg.add(cg.mul(o, ilen), map(cg, l));
        copy(cg, (ip, cg.mul(src_row, inner), inp.dtype), (op, cg.mul(t, inner), out.dtype), inner)
    })?;
    cg.finish_kernel();
    Ok(())
}

pub(crate) fn slice(cg: &mut Cg, k: &Kernel, axis: usize, start: usize) -> Result<()> {
    rows_copy(cg, k, axis, move |cg, l| cg.add(l, cg.i64c(start as i64)))
}

pub(crate) fn repeat_interleave(cg: &mut Cg, k: &Kernel, axis: usize, repeats: usize) -> Result<()> {
    rows_copy(cg, k, axis, move |cg, l| cg.div(l, cg.i64c(repeats as i64)))
}

/// Writes `in` into `out[.., offset:offset+len, ..]`; tile `o * in_len + l`.
pub(crate) fn copy_into(cg: &mut Cg, k: &Kernel, axis: usize, offset: &panguc_ir::Dim) -> Result<()> {
    let (inp, out) = (&k.args[0], &k.args[1]);
    cg.begin_kernel(&k.name);
    let id = cg.dims(&inp.shape)?;
    let od = cg.dims(&out.shape)?;
    let inner = span(cg, &id, axis + 1, id.len());
    let (ilen, olen) = (id[axis], od[axis]);
    let off = cg.dim(offset)?;
    let (ip, op) = (cg.arg(0, inp.dtype), cg.arg(1, out.dtype));
    cg.for_tiles(|cg, t| {
        let (o, l) = (cg.div(t, ilen), cg.rem(t, ilen));
        let dst_row = cg.add(cg.mul(o, olen), cg.add(l, off));
        copy(cg, (ip, cg.mul(t, inner), inp.dtype), (op, cg.mul(dst_row, inner), out.dtype), inner)
    })?;
    cg.finish_kernel();
    Ok(())
}

pub(crate) fn one_hot(cg: &mut Cg, k: &Kernel, depth: usize) -> Result<()> {
    cg.begin_kernel(&k.name);
    let (ip, op) = (cg.arg(0, DType::I64), cg.arg(1, k.args[1].dtype));
    let depth = cg.i64c(depth as i64);
    let dt = k.args[1].dtype;
    cg.for_tiles(|cg, t| {
        let x = cg.load_i(ip, t);
        let base = cg.mul(t, depth);
        cg.for_range(cg.i64c(0), depth, 1, |cg, j| {
            let v = cg.select_f(cg.eq(j, x), cg.f32c(1.0), cg.f32c(0.0));
            cg.store_f(op, cg.add(base, j), dt, v);
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

pub(crate) fn causal_mask(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let out = &k.args[1];
    cg.begin_kernel(&k.name);
    let keys = cg.dim(&out.shape[1])?;
    let (pp, op) = (cg.arg(0, DType::I64), cg.arg(1, out.dtype));
    cg.for_tiles(|cg, t| {
        let p = cg.load_i(pp, t);
        let base = cg.mul(t, keys);
        cg.for_range(cg.i64c(0), keys, 1, |cg, j| {
            let v = cg.select_f(cg.le(j, p), cg.f32c(0.0), cg.f32c(f32::NEG_INFINITY));
            cg.store_f(op, cg.add(base, j), out.dtype, v);
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// The NeoX table in f64 exactly as the reference computes it, then f32.
pub(crate) fn rope_table(cg: &mut Cg, k: &Kernel, kind: RopeKind, theta: f64, head_dim: usize) -> Result<()> {
    let out = &k.args[1];
    cg.begin_kernel(&k.name);
    let (pp, op) = (cg.arg(0, DType::I64), cg.arg(1, out.dtype));
    let f64t = cg.ctx.f64_type();
    let half = head_dim / 2;
    cg.for_tiles(|cg, t| {
        let p = cg.b.build_signed_int_to_float(cg.load_i(pp, t), f64t, "").ok_();
        let base = cg.mul(t, cg.i64c(head_dim as i64));
        cg.for_range(cg.i64c(0), cg.i64c(half as i64), 1, |cg, i| {
            let fi = cg.b.build_signed_int_to_float(i, f64t, "").ok_();
            let two_i = cg.b.build_float_mul(f64t.const_float(2.0), fi, "").ok_();
            let e = cg.b.build_float_div(two_i, f64t.const_float(head_dim as f64), "").ok_();
            let pw = cg.intrinsic("llvm.pow", &[f64t.const_float(theta).into(), e.into()]).into_float_value();
            let inv = cg.b.build_float_div(f64t.const_float(1.0), pw, "").ok_();
            let angle = cg.b.build_float_mul(p, inv, "").ok_();
            let name = match kind {
                RopeKind::Cos => "llvm.cos",
                RopeKind::Sin => "llvm.sin",
            };
            let v = cg.intrinsic(name, &[angle.into()]).into_float_value();
            let v = cg.b.build_float_trunc(v, cg.f32t(), "").ok_();
            cg.store_f(op, cg.add(base, i), out.dtype, v);
            cg.store_f(op, cg.add(base, cg.add(i, cg.i64c(half as i64))), out.dtype, v);
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// `(new[T, Hkv, D], slots[T] i64, cache[NB, BS, Hkv, D])`: row `t` of
/// `new` stored at slot `slots[t]` of the paged cache, in place (the
/// runtime validates the slots before a step).
pub(crate) fn kv_cache_write(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (new, cache) = (&k.args[0], &k.args[2]);
    let row: usize = new.shape[1..]
        .iter()
        .map(|d| d.as_const().ok_or_else(|| anyhow::anyhow!("kv_cache_write row dims must be static, found {d}")))
        .product::<Result<usize>>()?;
    cg.begin_kernel(&k.name);
    let (np, sp, cp) = (cg.arg(0, new.dtype), cg.arg(1, DType::I64), cg.arg(2, cache.dtype));
    let rc = cg.i64c(row as i64);
    cg.for_tiles(|cg, t| {
        let slot = cg.load_i(sp, t);
        copy(cg, (np, cg.mul(t, rc), new.dtype), (cp, cg.mul(slot, rc), cache.dtype), rc)
    })?;
    cg.finish_kernel();
    Ok(())
}

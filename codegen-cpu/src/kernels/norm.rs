//! Row kernels: RMSNorm (with the residual add fused), RoPE, and the QKV
//! split + RoPE + KV-cache store (appended to a contiguous cache, or
//! written at each token's slot of a paged one). All follow the reference's operation
//! order exactly.

use crate::cg::{Cg, Ok_};
use crate::kernels::quant::quantize_value;
use anyhow::Result;
use inkwell::values::{FloatValue, IntValue, PointerValue};
use panguc_ir::kernel::Kernel;
use panguc_ir::DType;

/// `out[i] = x[i] * (1 / sqrt(mean(x^2) + eps)) * w[i]` over one row of `h`.
fn rms_row<'c>(
    cg: &mut Cg<'c>,
    x: (PointerValue<'c>, DType),
    w: (PointerValue<'c>, DType),
    out: (PointerValue<'c>, DType),
    base: IntValue<'c>,
    h: IntValue<'c>,
    eps: f64,
) -> Result<()> {
    let acc = cg.alloca(cg.f32t(), "ss");
    cg.store_v(acc, cg.f32c(0.0));
    cg.for_range(cg.i64c(0), h, 1, |cg, i| {
        let v = cg.load_f(x.0, cg.add(base, i), x.1);
        let s = cg.fadd(cg.load_v(acc), cg.fmul(v.into(), v.into()));
        cg.store_v(acc, s);
        Ok(())
    })?;
    let hf = cg.b.build_signed_int_to_float(h, cg.f32t(), "").ok_();
    let ms = cg.fdiv(cg.load_v(acc), hf.into());
    let denom = cg.sqrt(cg.fadd(ms, cg.f32c(eps as f32).into()));
    let r = cg.fdiv(cg.f32c(1.0).into(), denom);
    cg.for_range(cg.i64c(0), h, 1, |cg, i| {
        let v = cg.load_f(x.0, cg.add(base, i), x.1);
        let g = cg.load_f(w.0, i, w.1);
        let y = cg.fmul(cg.fmul(v.into(), r), g.into());
        cg.store_f(out.0, cg.add(base, i), out.1, y.into_float_value());
        Ok(())
    })
}

pub(crate) fn rms_norm(cg: &mut Cg, k: &Kernel, eps: f64) -> Result<()> {
    let (x, w, out) = (&k.args[0], &k.args[1], &k.args[2]);
    cg.begin_kernel(&k.name);
    let h = cg.dim(x.shape.last().expect("rank >= 1"))?;
    let (xp, wp, op) = (cg.arg(0, x.dtype), cg.arg(1, w.dtype), cg.arg(2, out.dtype));
    cg.for_tiles(|cg, t| {
        let base = cg.mul(t, h);
        rms_row(cg, (xp, x.dtype), (wp, w.dtype), (op, out.dtype), base, h, eps)
    })?;
    cg.finish_kernel();
    Ok(())
}

pub(crate) fn add_rms_norm(cg: &mut Cg, k: &Kernel, eps: f64) -> Result<()> {
    let (x, res, w, sum, out) = (&k.args[0], &k.args[1], &k.args[2], &k.args[3], &k.args[4]);
    cg.begin_kernel(&k.name);
    let h = cg.dim(x.shape.last().expect("rank >= 1"))?;
    let (xp, rp, wp) = (cg.arg(0, x.dtype), cg.arg(1, res.dtype), cg.arg(2, w.dtype));
    let (sp, op) = (cg.arg(3, sum.dtype), cg.arg(4, out.dtype));
    cg.for_tiles(|cg, t| {
        let base = cg.mul(t, h);
        cg.for_range(cg.i64c(0), h, 1, |cg, i| {
            let at = cg.add(base, i);
            let v = cg.fadd(cg.load_f(xp, at, x.dtype).into(), cg.load_f(rp, at, res.dtype).into());
            cg.store_f(sp, at, sum.dtype, v.into_float_value());
            Ok(())
        })?;
        rms_row(cg, (sp, sum.dtype), (wp, w.dtype), (op, out.dtype), base, h, eps)
    })?;
    cg.finish_kernel();
    Ok(())
}

/// NeoX RoPE of one head: `x*cos + rotate_half(x)*sin`.
#[allow(clippy::too_many_arguments)]
fn rope_head<'c>(
    cg: &mut Cg<'c>,
    x: (PointerValue<'c>, IntValue<'c>, DType),
    cos: (PointerValue<'c>, DType),
    sin: (PointerValue<'c>, DType),
    trow: IntValue<'c>,
    out: (PointerValue<'c>, IntValue<'c>, DType),
    d: usize,
) -> Result<()> {
    let store = |cg: &Cg<'c>, i, y| cg.store_f(out.0, cg.add(out.1, i), out.2, y);
    rope_head_into(cg, x, cos, sin, trow, d, &store)
}

/// [`rope_head`] handing element `i` of the roped head to `store`.
fn rope_head_into<'c>(
    cg: &mut Cg<'c>,
    x: (PointerValue<'c>, IntValue<'c>, DType),
    cos: (PointerValue<'c>, DType),
    sin: (PointerValue<'c>, DType),
    trow: IntValue<'c>,
    d: usize,
    store: &dyn Fn(&Cg<'c>, IntValue<'c>, FloatValue<'c>),
) -> Result<()> {
    let half = cg.i64c(d as i64 / 2);
    let ld = |cg: &Cg<'c>, i| cg.load_f(x.0, cg.add(x.1, i), x.2);
    let body = |cg: &mut Cg<'c>, i: IntValue<'c>, rot: FloatValue<'c>| {
        let c = cg.load_f(cos.0, cg.add(trow, i), cos.1);
        let s = cg.load_f(sin.0, cg.add(trow, i), sin.1);
        let y = cg.fadd(cg.fmul(ld(cg, i).into(), c.into()), cg.fmul(rot.into(), s.into()));
        store(cg, i, y.into_float_value());
    };
    cg.for_range(cg.i64c(0), half, 1, |cg, i| {
        let rot = cg.fneg(ld(cg, cg.add(i, half)).into()).into_float_value();
        body(cg, i, rot);
        Ok(())
    })?;
    cg.for_range(half, cg.i64c(d as i64), 1, |cg, i| {
        let rot = ld(cg, cg.sub(i, half));
        body(cg, i, rot);
        Ok(())
    })
}

fn static_dim(d: &panguc_ir::Dim, what: &str) -> Result<usize> {
    d.as_const().ok_or_else(|| anyhow::anyhow!("{what} must be static, found {d}"))
}

pub(crate) fn rope(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (x, cos, sin, out) = (&k.args[0], &k.args[1], &k.args[2], &k.args[3]);
    let heads = static_dim(&x.shape[1], "rope heads")?;
    let d = static_dim(&x.shape[2], "rope head_dim")?;
    cg.begin_kernel(&k.name);
    let (xp, cp, sp, op) = (cg.arg(0, x.dtype), cg.arg(1, cos.dtype), cg.arg(2, sin.dtype), cg.arg(3, out.dtype));
    let dc = cg.i64c(d as i64);
    cg.for_tiles(|cg, t| {
        let ti = cg.div(t, cg.i64c(heads as i64));
        let base = cg.mul(t, dc);
        rope_head(cg, (xp, base, x.dtype), (cp, cos.dtype), (sp, sin.dtype), cg.mul(ti, dc), (op, base, out.dtype), d)
    })?;
    cg.finish_kernel();
    Ok(())
}

/// One token per tile: q heads roped into `q_out`, k heads roped and v
/// heads copied into the caches at row `past + t`.
pub(crate) fn qkv_rope_append(cg: &mut Cg, k: &Kernel, q_heads: usize, kv_heads: usize) -> Result<()> {
    cg.begin_kernel(&k.name);
    let tokens = cg.dim(&k.args[0].shape[0])?;
    let kv_len = cg.dim(&k.args[4].shape[0])?;
    let past = cg.sub(kv_len, tokens);
    qkv_rope_rows(cg, k, q_heads, kv_heads, 3, None, &|cg, t| cg.add(past, t))?;
    cg.finish_kernel();
    Ok(())
}

/// The paged counterpart: k and v of token `t` go to slot `slots[t]` of
/// the paged caches `[num_blocks, block_size, kv_heads, head_dim]` (the
/// runtime validates the slots before a step).
pub(crate) fn qkv_rope_cache_write(cg: &mut Cg, k: &Kernel, q_heads: usize, kv_heads: usize) -> Result<()> {
    cg.begin_kernel(&k.name);
    let slots = cg.arg(3, DType::I64);
    qkv_rope_rows(cg, k, q_heads, kv_heads, 4, None, &|cg, t| cg.load_i(slots, t))?;
    cg.finish_kernel();
    Ok(())
}

/// The paged form into int8 (C8) caches: arguments 4..8 are the per-channel
/// k scale, k offset, v scale and v offset `[Hkv, D]`; the roped k row and
/// the v row are quantized as `kv_cache_write_quant` does on their way in.
pub(crate) fn qkv_rope_cache_write_quant(cg: &mut Cg, k: &Kernel, q_heads: usize, kv_heads: usize) -> Result<()> {
    let caches = k.args.get(9..).unwrap_or_default();
    if caches.len() != 2 || caches.iter().any(|c| c.dtype != DType::I8) {
        anyhow::bail!("{}: the int8 QKV cache write needs two int8 caches as its last arguments", k.name);
    }
    cg.begin_kernel(&k.name);
    let slots = cg.arg(3, DType::I64);
    qkv_rope_rows(cg, k, q_heads, kv_heads, 8, Some(4), &|cg, t| cg.load_i(slots, t))?;
    cg.finish_kernel();
    Ok(())
}

/// Body shared by the QKV + RoPE + cache-store kernels: arguments `y, cos,
/// sin` first and `q_out, k_cache, v_cache` from `q_arg` on; token `t`'s k
/// and v rows go to cache row `cache_row(t)`. With `quant` (the argument
/// index of k scale, k offset, v scale, v offset) the caches are int8 and
/// each element is quantized per channel on the way in.
fn qkv_rope_rows<'c>(
    cg: &mut Cg<'c>,
    k: &Kernel,
    q_heads: usize,
    kv_heads: usize,
    q_arg: usize,
    quant: Option<usize>,
    cache_row: &dyn Fn(&Cg<'c>, IntValue<'c>) -> IntValue<'c>,
) -> Result<()> {
    let (y, cos, sin, q) = (&k.args[0], &k.args[1], &k.args[2], &k.args[q_arg]);
    let d = static_dim(&cos.shape[1], "rope head_dim")?;
    let width = static_dim(&y.shape[1], "qkv width")?;
    let (yp, cp, sp) = (cg.arg(0, y.dtype), cg.arg(1, cos.dtype), cg.arg(2, sin.dtype));
    let cache_dtype = if quant.is_some() { DType::I8 } else { DType::F32 };
    let (qp, kp, vp) = (cg.arg(q_arg, q.dtype), cg.arg(q_arg + 1, cache_dtype), cg.arg(q_arg + 2, cache_dtype));
    // (scale, offset) pointers and dtypes of k, then of v.
    let params = quant.map(|a| [0, 1, 2, 3].map(|j| (cg.arg(a + j, k.args[a + j].dtype), k.args[a + j].dtype)));
    let dc = cg.i64c(d as i64);
    cg.for_tiles(|cg, t| {
        let yrow = cg.mul(t, cg.i64c(width as i64));
        let trow = cg.mul(t, dc);
        let cache_row = cg.mul(cache_row(cg, t), cg.i64c((kv_heads * d) as i64));
        for h in 0..q_heads {
            let src = cg.add(yrow, cg.i64c((h * d) as i64));
            let dst = cg.mul(cg.add(cg.mul(t, cg.i64c(q_heads as i64)), cg.i64c(h as i64)), dc);
            rope_head(cg, (yp, src, y.dtype), (cp, cos.dtype), (sp, sin.dtype), trow, (qp, dst, q.dtype), d)?;
        }
        for h in 0..kv_heads {
            let src = cg.add(yrow, cg.i64c(((q_heads + h) * d) as i64));
            let dst = cg.add(cache_row, cg.i64c((h * d) as i64));
            let vsrc = cg.add(yrow, cg.i64c(((q_heads + kv_heads + h) * d) as i64));
            let Some([ks, ko, vs, vo]) = params else {
                rope_head(cg, (yp, src, y.dtype), (cp, cos.dtype), (sp, sin.dtype), trow, (kp, dst, DType::F32), d)?;
                super::movement::copy(cg, (yp, vsrc, y.dtype), (vp, dst, DType::F32), dc)?;
                continue;
            };
            // Element `i` of the head is channel `h*d + i` of the scales.
            let chan = cg.i64c((h * d) as i64);
            let store_k = |cg: &Cg<'c>, i, x| store_quantized(cg, (kp, dst), ks, ko, cg.add(chan, i), i, x);
            rope_head_into(cg, (yp, src, y.dtype), (cp, cos.dtype), (sp, sin.dtype), trow, d, &store_k)?;
            cg.for_range(cg.i64c(0), dc, 1, |cg, i| {
                let x = cg.load_f(yp, cg.add(vsrc, i), y.dtype);
                store_quantized(cg, (vp, dst), vs, vo, cg.add(chan, i), i, x);
                Ok(())
            })?;
        }
        Ok(())
    })
}

/// Element `i` of a cache row at `cache.1`: `x` quantized with channel
/// `c` of the per-channel scale and offset (`quantize` semantics:
/// `x / scale + offset`, rounded half to even, clamped to int8).
fn store_quantized<'c>(
    cg: &Cg<'c>,
    cache: (PointerValue<'c>, IntValue<'c>),
    scale: (PointerValue<'c>, DType),
    offset: (PointerValue<'c>, DType),
    c: IntValue<'c>,
    i: IntValue<'c>,
    x: FloatValue<'c>,
) {
    let s = cg.load_f(scale.0, c, scale.1);
    let o = cg.load_f(offset.0, c, offset.1);
    let v = cg.fadd(cg.fdiv(x.into(), s.into()), o.into());
    cg.store_i(cache.0, cg.add(cache.1, i), quantize_value(cg, v.into_float_value()));
}

/// RMSNorm (with the residual add when `add`) and the per-token int8
/// quantization of the normalized row, one row per tile: the norm exactly
/// as [`rms_norm`] / [`add_rms_norm`], then the stored row quantized as
/// `dynamic_quant` does (`crate::kernels::quant::quantize_row`).
pub(crate) fn rms_norm_quant(cg: &mut Cg, k: &Kernel, eps: f64, add: bool) -> Result<()> {
    let n = k.args.len();
    let (x, w) = (&k.args[0], &k.args[if add { 2 } else { 1 }]);
    let (out, q, s) = (&k.args[n - 3], &k.args[n - 2], &k.args[n - 1]);
    cg.begin_kernel(&k.name);
    let h = cg.dim(x.shape.last().expect("rank >= 1"))?;
    let (xp, wp) = (cg.arg(0, x.dtype), cg.arg(if add { 2 } else { 1 }, w.dtype));
    let (op, qp, sp) = (cg.arg(n - 3, out.dtype), cg.arg(n - 2, q.dtype), cg.arg(n - 1, s.dtype));
    let residual =
        add.then(|| (cg.arg(1, k.args[1].dtype), k.args[1].dtype, cg.arg(3, k.args[3].dtype), k.args[3].dtype));
    cg.for_tiles(|cg, t| {
        let base = cg.mul(t, h);
        let src = match residual {
            Some((rp, rd, sump, sumd)) => {
                cg.for_range(cg.i64c(0), h, 1, |cg, i| {
                    let at = cg.add(base, i);
                    let v = cg.fadd(cg.load_f(xp, at, x.dtype).into(), cg.load_f(rp, at, rd).into());
                    cg.store_f(sump, at, sumd, v.into_float_value());
                    Ok(())
                })?;
                (sump, sumd)
            }
            None => (xp, x.dtype),
        };
        rms_row(cg, src, (wp, w.dtype), (op, out.dtype), base, h, eps)?;
        crate::kernels::quant::quantize_row(cg, (op, out.dtype), (qp, q.dtype), (sp, s.dtype), t, base, h)
    })?;
    cg.finish_kernel();
    Ok(())
}

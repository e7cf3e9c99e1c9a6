//! Kernel selection for the int8 kernel kinds: a program kernel's
//! arguments, shapes and device dtypes checked against what the explicit-size
//! emitters of this module expect, then handed to them. A mismatch (batch
//! dims, a dtype the emitter has no variant for) is an error naming the
//! kernel and the argument, never a silently different kernel.

use super::{Dequant, EpilogueAdds, Granularity, NormQuant, QuantMatMulSpec};
use crate::emit::paged::{paged_attention_int8, PagedDims};
use crate::emit::{Ctx, DeviceKernels};
use crate::target::DevType;
use anyhow::{bail, Result};

/// Argument `arg` must have device dtype `want`.
pub(super) fn need_dt(ctx: &Ctx, arg: usize, what: &str, want: DevType) -> Result<()> {
    if ctx.dt[arg] != want {
        bail!("{}: {what} (argument {arg}) must be {want} on the device, found {}", ctx.k.name, ctx.dt[arg]);
    }
    Ok(())
}

/// `(rows, cols)` of argument `arg` seen as `[.., cols]`: every leading dim
/// is a row, the last must be static (it sizes the UB row buffers).
fn rows_cols(ctx: &Ctx, arg: usize) -> Result<(crate::emit::TExpr, u64)> {
    let r = ctx.rank(arg);
    if r == 0 {
        bail!("{}: argument {arg} must have at least one dimension", ctx.k.name);
    }
    Ok((ctx.dims(arg, 0, r - 1)?, ctx.cdim(arg, r - 1, "row length")?))
}

/// `DynamicQuant (x[.., K], q_out i8[.., K], scale_out f32[..])`.
pub(crate) fn dynamic_quant(ctx: &Ctx) -> Result<DeviceKernels> {
    let (rows, cols) = rows_cols(ctx, 0)?;
    need_dt(ctx, 1, "q_out", DevType::I8)?;
    need_dt(ctx, 2, "scale_out", DevType::F32)?;
    super::dynamic_quant(&ctx.k.name, rows, cols, ctx.dt[0], ctx.o)
}

/// `RmsNormQuant (x, [residual,] w, [sum_out,] norm_out, q_out i8, scale_out f32)`:
/// the float rows share x's device dtype, `w` is `[K]`.
pub(crate) fn rms_norm_quant(ctx: &Ctx, eps: f64, add: bool) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let n = ctx.k.args.len();
    let want = if add { 7 } else { 5 };
    if n != want {
        bail!("{name}: rms_norm_quant (add {add}) takes {want} arguments, found {n}");
    }
    let (rows, cols) = rows_cols(ctx, 0)?;
    let w = if add { 2 } else { 1 };
    let mut rows_like = vec![(n - 3, "norm_out")];
    if add {
        rows_like.extend([(1, "residual"), (3, "sum_out")]);
    }
    for (arg, what) in rows_like {
        same_shape(ctx, arg, 0)?;
        need_dt(ctx, arg, what, ctx.dt[0])?;
    }
    same_shape(ctx, n - 2, 0)?;
    need_dt(ctx, n - 2, "q_out", DevType::I8)?;
    need_dt(ctx, n - 1, "scale_out", DevType::F32)?;
    if ctx.rank(w) != 1 || ctx.cdim(w, 0, "norm weight")? != cols {
        bail!("{name}: the norm weight (argument {w}) must be [{cols}]");
    }
    let norm = NormQuant { eps, add, w: ctx.dt[w] };
    super::rms_norm_dynamic_quant(name, rows, cols, norm, ctx.dt[0], ctx.o)
}

/// Rows, row length and granularity of a `Quantize`/`Dequantize` whose
/// output is argument `out`: scale and offset (arguments 1 and 2, f32 on the
/// device) hold one element (per tensor; a row is the last dim) or equal
/// the output's trailing dims (per channel; a row is those dims, e.g. the
/// `[Hkv, D]` parameters of a `[T, Hkv, D]` KV row).
fn scale_layout(ctx: &Ctx, out: usize) -> Result<(crate::emit::TExpr, u64, Granularity)> {
    let name = &ctx.k.name;
    let mut layout = None;
    for (arg, what) in [(1, "scale"), (2, "offset")] {
        need_dt(ctx, arg, what, DevType::F32)?;
        let pshape = &ctx.k.args[arg].shape;
        let oshape = &ctx.k.args[out].shape;
        let mut n = 1u64;
        for d in 0..pshape.len() {
            n *= ctx.cdim(arg, d, what)?;
        }
        let this = if n == 1 {
            let (rows, cols) = rows_cols(ctx, out)?;
            (rows, cols, Granularity::PerTensor)
        } else if pshape.len() <= oshape.len() && oshape[oshape.len() - pshape.len()..] == pshape[..] {
            let split = oshape.len() - pshape.len();
            (ctx.dims(out, 0, split)?, n, Granularity::PerChannel)
        } else {
            bail!("{name}: {what} (argument {arg}) must have one element or the output's trailing dims");
        };
        if layout.as_ref().is_some_and(|l: &(crate::emit::TExpr, u64, Granularity)| l.2 != this.2 || l.1 != this.1) {
            bail!("{name}: scale and offset must have the same shape");
        }
        layout = Some(this);
    }
    Ok(layout.expect("two arguments checked"))
}

/// `Quantize (x, scale, offset, out i8)`: rows of `out`.
pub(crate) fn quantize(ctx: &Ctx) -> Result<DeviceKernels> {
    same_shape(ctx, 0, 3)?;
    need_dt(ctx, 3, "out", DevType::I8)?;
    let (rows, cols, g) = scale_layout(ctx, 3)?;
    super::quantize(&ctx.k.name, rows, cols, g, ctx.dt[0], ctx.o)
}

/// `Dequantize (q i8, scale, offset, out)`: rows of `out`.
pub(crate) fn dequantize(ctx: &Ctx) -> Result<DeviceKernels> {
    same_shape(ctx, 0, 3)?;
    need_dt(ctx, 0, "q", DevType::I8)?;
    let (rows, cols, g) = scale_layout(ctx, 3)?;
    super::dequantize(&ctx.k.name, rows, cols, g, ctx.dt[3], ctx.o)
}

/// The row kernels read the input with the output's row layout, so a
/// broadcast input (which the IR allows) has no kernel here.
fn same_shape(ctx: &Ctx, a: usize, b: usize) -> Result<()> {
    if ctx.k.args[a].shape != ctx.k.args[b].shape {
        bail!(
            "{}: argument {a} must have the shape of argument {b} (broadcast inputs have no AscendC kernel)",
            ctx.k.name
        );
    }
    Ok(())
}

/// `QuantMatMul (xq i8[M, K], w i8[N, K], a[N], b, [bias[N],] out[M, N])`;
/// the emitter has no batch dims.
pub(crate) fn quant_matmul(ctx: &Ctx, per_token: bool, bias: bool) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let out = 4 + usize::from(bias);
    if ctx.k.args.len() != out + 1 {
        bail!("{name}: quant_matmul (bias {bias}) takes {} arguments, found {}", out + 1, ctx.k.args.len());
    }
    if ctx.rank(0) != 2 || ctx.rank(1) != 2 || ctx.rank(out) != 2 {
        bail!("{name}: the AscendC int8 matmul takes xq [M, K], w [N, K] and out [M, N] (no batch dims)");
    }
    need_dt(ctx, 0, "xq", DevType::I8)?;
    need_dt(ctx, 1, "w", DevType::I8)?;
    let k = ctx.cdim(0, 1, "K")?;
    let (n, w_k) = int8_weight(ctx)?;
    if w_k != k {
        bail!("{name}: w has K = {w_k} but xq has K = {k}");
    }
    let dequant = if per_token {
        need_dt(ctx, 2, "w_scale", DevType::F32)?;
        need_dt(ctx, 3, "x_scale", DevType::F32)?;
        Dequant::PerToken
    } else {
        need_dt(ctx, 2, "quant_bias", DevType::I32)?;
        if !matches!(ctx.dt[3], DevType::F32 | DevType::I64) {
            bail!("{name}: deq_scale (argument 3) must be f32 or i64 on the device, found {}", ctx.dt[3]);
        }
        Dequant::Static { deq: ctx.dt[3] }
    };
    let adds = EpilogueAdds { bias: if bias { Some(float_bias(ctx, 4, n)?) } else { None }, residual: None };
    let spec = QuantMatMulSpec { name: name.clone(), m: ctx.dim(0, 0)?, n, k, dequant, out: ctx.dt[out] };
    super::quant_matmul_with(&spec, adds, ctx.o)
}

/// `(N, K)` of the int8 weight `w [N, K]` (argument 1).
fn int8_weight(ctx: &Ctx) -> Result<(u64, u64)> {
    Ok((ctx.cdim(1, 0, "N")?, ctx.cdim(1, 1, "w K")?))
}

fn is_float(t: DevType) -> bool {
    matches!(t, DevType::F32 | DevType::F16 | DevType::BF16)
}

/// The fused float bias `[N]` at argument `arg`: its device dtype.
fn float_bias(ctx: &Ctx, arg: usize, n: u64) -> Result<DevType> {
    if ctx.rank(arg) != 1 || ctx.cdim(arg, 0, "bias")? != n {
        bail!("{}: the bias (argument {arg}) must be [{n}]", ctx.k.name);
    }
    if !is_float(ctx.dt[arg]) {
        bail!("{}: the bias (argument {arg}) must be a float on the device, found {}", ctx.k.name, ctx.dt[arg]);
    }
    Ok(ctx.dt[arg])
}

/// `DynQuantMatMul (x[M, K], w i8[N, K], w_scale f32[N], [bias[N],]
/// [residual[M, N],] out[M, N])`.
pub(crate) fn dyn_quant_matmul(ctx: &Ctx, bias: bool, residual: bool) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    let out = 3 + usize::from(bias) + usize::from(residual);
    if ctx.k.args.len() != out + 1 {
        bail!(
            "{name}: dyn_quant_matmul (bias {bias}, residual {residual}) takes {} arguments, found {}",
            out + 1,
            ctx.k.args.len()
        );
    }
    if ctx.rank(0) != 2 || ctx.rank(1) != 2 || ctx.rank(out) != 2 {
        bail!("{name}: the AscendC int8 matmul takes x [M, K], w [N, K] and out [M, N] (no batch dims)");
    }
    need_dt(ctx, 1, "w", DevType::I8)?;
    need_dt(ctx, 2, "w_scale", DevType::F32)?;
    let k = ctx.cdim(0, 1, "K")?;
    let (n, w_k) = int8_weight(ctx)?;
    if w_k != k || ctx.cdim(out, 1, "out N")? != n {
        bail!("{name}: w is [{n}, {w_k}], so x must be [M, {w_k}] and out [M, {n}]");
    }
    let mut adds = EpilogueAdds::default();
    if bias {
        adds.bias = Some(float_bias(ctx, 3, n)?);
    }
    if residual {
        let r = out - 1;
        same_shape(ctx, r, out)?;
        if !is_float(ctx.dt[r]) {
            bail!("{name}: the residual (argument {r}) must be a float on the device, found {}", ctx.dt[r]);
        }
        adds.residual = Some(ctx.dt[r]);
    }
    let spec =
        QuantMatMulSpec { name: name.clone(), m: ctx.dim(0, 0)?, n, k, dequant: Dequant::PerToken, out: ctx.dt[out] };
    super::dyn_quant_matmul(&spec, ctx.dt[0], adds, ctx.o)
}

/// `KvCacheWriteQuant (new[T, Hkv, D], slots[T], scale[Hkv, D],
/// offset[Hkv, D], cache i8[num_blocks, block_size, Hkv, D])`.
pub(crate) fn kv_cache_write_quant(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.k.args.len() != 5 || ctx.rank(4) != 4 || ctx.rank(0) != 3 {
        bail!("{name}: kv_cache_write_quant takes new [T, Hkv, D], slots, scale, offset and an int8 cache [num_blocks, block_size, Hkv, D]");
    }
    let (hkv, d) = (ctx.cdim(4, 2, "kv heads")?, ctx.cdim(4, 3, "head_dim")?);
    if ctx.cdim(0, 1, "new kv heads")? != hkv || ctx.cdim(0, 2, "new head_dim")? != d {
        bail!("{name}: the new rows must be [T, {hkv}, {d}] like the cache's");
    }
    need_dt(ctx, 4, "cache", DevType::I8)?;
    for (i, what) in [(2, "scale"), (3, "offset")] {
        need_dt(ctx, i, what, DevType::F32)?;
        if ctx.k.args[i].shape[..] != ctx.k.args[4].shape[2..] {
            bail!("{name}: {what} (argument {i}) must be per channel, [{hkv}, {d}]");
        }
    }
    let cache_slots = ctx.dim(4, 0)?.times(crate::emit::TExpr::c(ctx.cdim(4, 1, "block size")?));
    super::kv_cache_write_quant(name, ctx.dim(0, 0)?, hkv * d, cache_slots, ctx.dt[1], ctx.dt[0], ctx.o)
}

/// `PagedAttentionInt8 (q, k_cache i8, v_cache i8, block_table,
/// query_start_loc, context_lens, k_scale, k_offset, v_scale, v_offset, out)`.
pub(crate) fn paged_attention_int8_kernel(ctx: &Ctx, scale: f64) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.rank(0) != 3 || ctx.rank(1) != 4 || ctx.rank(2) != 4 {
        bail!("{name}: q must be [T, Hq, D] and the int8 caches [num_blocks, block_size, kv_heads, head_dim]");
    }
    let (hq, d) = (ctx.cdim(0, 1, "query heads")?, ctx.cdim(0, 2, "head_dim")?);
    let (block_size, hkv) = (ctx.cdim(1, 1, "block size")?, ctx.cdim(1, 2, "kv heads")?);
    if ctx.cdim(1, 3, "cache head_dim")? != d || ctx.k.args[1].shape != ctx.k.args[2].shape {
        bail!("{name}: both caches must be [num_blocks, block_size, kv_heads, {d}]");
    }
    need_dt(ctx, 1, "k_cache", DevType::I8)?;
    need_dt(ctx, 2, "v_cache", DevType::I8)?;
    let act = ctx.dt[0];
    need_dt(ctx, 10, "out", act)?;
    let meta = ctx.dt[3];
    for (i, what) in [(4, "query_start_loc"), (5, "context_lens")] {
        need_dt(ctx, i, what, meta)?;
    }
    for (i, what) in [(6, "k_scale"), (7, "k_offset"), (8, "v_scale"), (9, "v_offset")] {
        need_dt(ctx, i, what, DevType::F32)?;
        let mut n = 1u64;
        for dim in 0..ctx.rank(i) {
            n *= ctx.cdim(i, dim, what)?;
        }
        if n != hkv * d {
            bail!("{name}: {what} (argument {i}) must have kv_heads * head_dim = {} elements, found {n}", hkv * d);
        }
    }
    let dims = PagedDims::of(ctx, hq, hkv, d, block_size)?;
    paged_attention_int8(name, &dims, act, meta, scale, ctx.o)
}

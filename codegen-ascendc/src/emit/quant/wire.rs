//! Kernel selection for the int8 kernel kinds: a program kernel's
//! arguments, shapes and device dtypes checked against what the explicit-size
//! emitters of this module expect, then handed to them. A mismatch (batch
//! dims, a dtype the emitter has no variant for) is an error naming the
//! kernel and the argument, never a silently different kernel.

use super::{Dequant, Granularity, QuantMatMulSpec};
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

/// `QuantMatMul (xq i8[M, K], w i8[N, K], a[N], b, out[M, N])`; the
/// emitter has no batch dims and no fused float bias.
pub(crate) fn quant_matmul(ctx: &Ctx, per_token: bool, bias: bool) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if bias {
        bail!("{name}: kernel kind `quant_matmul` with a fused float bias has no AscendC implementation yet");
    }
    if ctx.rank(0) != 2 || ctx.rank(1) != 2 || ctx.rank(4) != 2 {
        bail!("{name}: the AscendC int8 matmul takes xq [M, K], w [N, K] and out [M, N] (no batch dims)");
    }
    need_dt(ctx, 0, "xq", DevType::I8)?;
    need_dt(ctx, 1, "w", DevType::I8)?;
    let k = ctx.cdim(0, 1, "K")?;
    let n = ctx.cdim(1, 0, "N")?;
    if ctx.cdim(1, 1, "w K")? != k {
        bail!("{name}: w has K = {} but xq has K = {k}", ctx.cdim(1, 1, "w K")?);
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
    let spec = QuantMatMulSpec { name: name.clone(), m: ctx.dim(0, 0)?, n, k, dequant, out: ctx.dt[4] };
    super::quant_matmul(&spec, ctx.o)
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

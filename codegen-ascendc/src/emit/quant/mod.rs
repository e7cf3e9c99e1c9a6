//! Int8 kernels (docs/quantization.md) with the interpreter's exact
//! semantics (`panguc_ir::interp::quant`):
//!
//! - [`quant_matmul`]: int8 x int8 cube GEMM accumulating in int32 (L0C),
//!   written as int32, then a vector dequant epilogue: static W8A8
//!   `f32(acc + quant_bias[n]) * deq_scale[n]` (f32 or msModelSlim's int64
//!   `deq_scale`) or W8A8_DYNAMIC `f32(acc) * w_scale[n] * x_scale[m]`.
//! - [`grouped_quant_matmul`]: the routed-expert form over expert-sorted
//!   rows driven by per-expert counts: a one-block prefix sum turns the
//!   counts into row offsets, the grouped cube GEMM of `moe.rs` (A read as
//!   whole row blocks of each expert, never one row per K step) writes
//!   int32, and the same dequant epilogue picks each row's expert scales.
//! - [`dynamic_quant`]: per-token `s = max|x| / 127`, `q = rint(x / s)`.
//! - [`quantize`] / [`dequantize`]: per-channel (the int8 KV cache) or
//!   per-tensor (static activations) `clamp(rint(x / s + o))` and
//!   `(q - o) * s`.
//!
//! Why the dequant runs on the vector unit and not in the 910B Fixpipe
//! (`VDEQF16`): the Fixpipe dequant writes f16 only and rounds the scale to
//! its own format, so it cannot give the interpreter's f32 result; 310P has
//! no Fixpipe at all. So both chips write the exact int32 accumulators and
//! dequantise in f32 on the vector unit (as the f16 GEMMs' epilogues do).
//!
//! Float -> int8 on the vector unit goes float -> int32 with CAST_RINT
//! (round half to even, the interpreter's rule), a clamp to [-128, 127] in
//! int32, then int32 -> half -> int8 (both exact for that range): a direct
//! float -> half first would round before the integer rounding.
//!
//! `gemm.rs` holds the GEMMs and their dequant epilogue, `convert.rs` the
//! float <-> int8 vector kernels. These emitters take explicit sizes instead of a program kernel so that
//! the kernel selection (and fused variants such as RmsNorm + quant) can
//! compose them; argument `i` of the spec is `ArgRef::Orig(i)`.
//! `wire.rs` is that selection for the kinds that map one to one (see
//! `emit_kernel`); `experts.rs` composes the fused W8A8_DYNAMIC expert
//! kinds from the GEMMs and the quantization tail, `statics.rs` the fused
//! static W8A8 kinds from the same pieces.

mod convert;
pub(crate) mod experts;
mod gemm;
pub(crate) mod statics;
pub(crate) mod wire;

pub(crate) use convert::TO_INT8;
pub use convert::{
    dequantize, dynamic_quant, kv_cache_write_quant, quantize, rms_norm_dynamic_quant, Granularity, NormQuant,
};
pub use gemm::{
    dyn_quant_matmul, grouped_quant_matmul, quant_matmul, quant_matmul_with, static_quant_matmul, EpilogueAdds,
};

use super::{ArgRef, DeviceKernels, EmitOptions, Param, Role, TExpr, TempBuf};
use crate::target::DevType;
use anyhow::{bail, Result};

/// How the int32 accumulators become floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dequant {
    /// Static W8A8: arguments `quant_bias` i32 `[N]`, `deq_scale` `[N]` of
    /// dtype `deq` (f32, or i64 carrying the f32 bits in its low word).
    Static { deq: DevType },
    /// W8A8_DYNAMIC: arguments `w_scale` f32 `[N]` (`[E, N]` grouped) and
    /// `x_scale` f32 `[M]`.
    PerToken,
}

/// `QuantMatMul` / `QuantMatMulPerToken` `(xq i8[M, K], w i8[N, K], a, b, out[M, N])`
/// with `(a, b)` as [`Dequant`] says.
#[derive(Debug, Clone)]
pub struct QuantMatMulSpec {
    /// Program-kernel name: entry prefix and error context.
    pub name: String,
    pub m: TExpr,
    pub n: u64,
    pub k: u64,
    pub dequant: Dequant,
    /// Output dtype: f32 (the interpreter's) or the activation dtype.
    pub out: DevType,
}

/// `GroupedQuantMatMul (xq i8[R, K], w i8[E, N, K], w_scale f32[E, N],
/// x_scale f32[R], counts[E] (i64 or i32), out[R, N])`.
#[derive(Debug, Clone)]
pub struct GroupedQuantMatMulSpec {
    pub name: String,
    pub rows: TExpr,
    pub experts: u64,
    pub n: u64,
    pub k: u64,
    pub counts: DevType,
    pub out: DevType,
}

/// Int8 GEMM operands: N a multiple of 16 (output fractal rows) and K of
/// 32 (the int8 fractal width), so no K padding reaches the Mmad.
pub(super) fn need_int8_dims(name: &str, n: u64, k: u64) -> Result<()> {
    if !n.is_multiple_of(16) || !k.is_multiple_of(32) {
        bail!("{name}: cannot be tiled: int8 matmul N = {n} must be a multiple of 16 and K = {k} a multiple of 32");
    }
    Ok(())
}

pub(super) fn need_out(name: &str, o: &EmitOptions, out: DevType) -> Result<()> {
    if out != DevType::F32 {
        o.target.check_act(out).map_err(|e| anyhow::anyhow!("{name}: output dtype: {e}"))?;
    }
    Ok(())
}

pub(super) fn orig(name: &str, dtype: DevType, role: Role, i: usize) -> Param {
    Param::new(name, dtype, role, ArgRef::Orig(i))
}

pub(super) fn acc_param(role: Role) -> Param {
    Param::new("acc", DevType::I32, role, ArgRef::Temp(0))
}

pub(super) fn acc_temp(name: &str, rows: &TExpr, n: u64) -> TempBuf {
    TempBuf {
        name: format!("{name}.acc"),
        dtype: DevType::I32,
        shape: vec![rows.clone(), TExpr::c(n)],
        elems: rows.clone().times(TExpr::c(n)),
    }
}

/// Every kernel must fit the chip's on-chip memories (what `emit_kernel`
/// checks for the kernels it dispatches).
pub(super) fn checked(dks: DeviceKernels, o: &EmitOptions, name: &str) -> Result<DeviceKernels> {
    for dk in &dks.kernels {
        dk.mem.check(o.target, &format!("kernel `{name}` ({})", dk.entry))?;
    }
    Ok(dks)
}

//! One emitter per kernel kind; each writes an exported function with the
//! common kernel ABI (see `cg`), specialised to the kernel's dtypes and
//! shapes (static dims are constants, symbolic dims read `syms`).

mod attention;
mod elementwise;
mod gemm;
mod movement;
mod norm;
mod quant;
mod quant_gemm;
mod quant_moe;
mod quant_static;
mod reduce;

use crate::cg::Cg;

use anyhow::{Context, Result};
use panguc_ir::kernel::{Kernel, KernelKind};
pub(crate) use quant_moe::BLOCK_ROWS as EXPERT_BLOCK_ROWS;

pub(crate) fn emit(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let r = match &k.kind {
        KernelKind::Elementwise { op } => elementwise::emit(cg, k, op),
        KernelKind::Gather => movement::gather(cg, k),
        KernelKind::MatMul { transpose_b, bias } => gemm::matmul(cg, k, *transpose_b, *bias),
        KernelKind::Gemm { epilogue } => gemm::gemm(cg, k, *epilogue),
        KernelKind::Reduce { op, axis } => reduce::reduce(cg, k, *op, *axis),
        KernelKind::ArgMax { axis } => reduce::argmax(cg, k, *axis),
        KernelKind::Softmax { axis } => reduce::softmax(cg, k, *axis),
        KernelKind::Transpose { perm } => movement::transpose(cg, k, perm),
        KernelKind::Slice { axis, start } => movement::slice(cg, k, *axis, *start),
        KernelKind::CopyInto { axis, offset } => movement::copy_into(cg, k, *axis, offset),
        KernelKind::RepeatInterleave { axis, repeats } => movement::repeat_interleave(cg, k, *axis, *repeats),
        KernelKind::RopeTable { kind, theta, head_dim } => movement::rope_table(cg, k, *kind, *theta, *head_dim),
        KernelKind::CausalMask => movement::causal_mask(cg, k),
        KernelKind::OneHot { depth } => movement::one_hot(cg, k, *depth),
        KernelKind::RmsNorm { eps } => norm::rms_norm(cg, k, *eps),
        KernelKind::AddRmsNorm { eps } => norm::add_rms_norm(cg, k, *eps),
        KernelKind::Rope => norm::rope(cg, k),
        KernelKind::QkvRopeAppend { q_heads, kv_heads } => norm::qkv_rope_append(cg, k, *q_heads, *kv_heads),
        KernelKind::Attention { scale } => attention::attention(cg, k, *scale),
        KernelKind::QkvRopeCacheWrite { q_heads, kv_heads } => norm::qkv_rope_cache_write(cg, k, *q_heads, *kv_heads),
        KernelKind::QkvRopeCacheWriteQuant { q_heads, kv_heads } => {
            norm::qkv_rope_cache_write_quant(cg, k, *q_heads, *kv_heads)
        }
        KernelKind::KvCacheWrite => movement::kv_cache_write(cg, k),
        KernelKind::PagedAttention { scale } => attention::paged_attention(cg, k, *scale, false),
        KernelKind::PagedAttentionInt8 { scale } => attention::paged_attention(cg, k, *scale, true),
        KernelKind::KvCacheWriteQuant => quant::kv_cache_write_quant(cg, k),
        KernelKind::MoeGating { groups } => reduce::moe_gating(cg, k, *groups),
        KernelKind::MoeRoute => reduce::moe_route(cg, k),
        KernelKind::MoeGateUp => gemm::grouped(cg, k, gemm::GroupedGemm::GateUpIndexed),
        KernelKind::MoeGroupedGateUp => gemm::grouped(cg, k, gemm::GroupedGemm::GateUpSorted),
        KernelKind::MoeDown => gemm::grouped(cg, k, gemm::GroupedGemm::Down),
        KernelKind::MoeCombine { shared_residual } => reduce::moe_combine(cg, k, *shared_residual),
        KernelKind::Quantize => quant::quantize(cg, k, false),
        KernelKind::Dequantize => quant::quantize(cg, k, true),
        KernelKind::DynamicQuant => quant::dynamic_quant(cg, k),
        KernelKind::RmsNormQuant { eps, add } => norm::rms_norm_quant(cg, k, *eps, *add),
        KernelKind::QuantMatMul { per_token, bias } => quant::quant_matmul(cg, k, *per_token, *bias),
        KernelKind::MoeGateUpQuant => quant_moe::gate_up_quant(cg, k, true),
        KernelKind::QuantGateUpQuant => quant_moe::gate_up_quant(cg, k, false),
        KernelKind::MoeDownQuant => quant_moe::down_quant(cg, k),
        KernelKind::DynQuantMatMul { bias, residual } => quant_moe::dyn_quant_matmul(cg, k, *bias, *residual),
        KernelKind::StaticQuantMatMul => quant_static::static_quant_matmul(cg, k),
        KernelKind::MoeGateUpStatic => quant_static::moe_gate_up(cg, k),
        KernelKind::MoeDownStatic => quant_static::moe_down(cg, k),
        KernelKind::QuantGateUpStatic => quant_static::shared_gate_up(cg, k),
        // Host-executed by the runtime through its `Collective`.
        KernelKind::Collective { .. } => Ok(()),
    };
    r.with_context(|| format!("generating kernel {} ({})", k.name, k.kind.mnemonic()))
}

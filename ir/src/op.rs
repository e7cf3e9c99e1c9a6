//! The op set of the graph IR.
//!
//! Primitive ops are what the importer emits; fused ops are only ever
//! introduced by named rewrite rules in `panguc-lowering`. Both kinds are
//! defined here because the reference interpreter gives each its meaning.

use crate::DType;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Exp,
    Sqrt,
    Rsqrt,
    Reciprocal,
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RopeKind {
    Cos,
    Sin,
}

/// Collective communication ops between devices (expert/tensor parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CollectiveKind {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
}

/// One IR operation with its attributes. Operands are positional (see each
/// variant's doc); results are listed on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // ---- primitive ops ----
    /// `(table[R, ...], indices[...int]) -> [indices..., table[1..]]`: row gather.
    Gather,
    /// `(a[..., M, K], b[..., K, N])`, or `b[..., N, K]` when `transpose_b`;
    /// batch dims broadcast. Accumulates in f32; `b` may be a weight dtype.
    MatMul {
        transpose_b: bool,
    },
    Unary(UnaryOp),
    /// Elementwise with numpy broadcasting; operands share a dtype.
    Binary(BinaryOp),
    /// A rank-0 constant.
    Scalar {
        value: f64,
        dtype: DType,
    },
    Reduce {
        op: ReduceOp,
        axis: usize,
        keepdim: bool,
    },
    /// Index of the first maximum along `axis` (lowest index on ties), i64.
    ArgMax {
        axis: usize,
        keepdim: bool,
    },
    /// Softmax along `axis`, computed in f32.
    Softmax {
        axis: usize,
    },
    Reshape {
        shape: Vec<crate::Dim>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// `x[..., start:end, ...]` along `axis` (constant bounds).
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// n-ary concatenation along `axis`.
    Concat {
        axis: usize,
    },
    /// n-ary stack along a new axis `axis`.
    Stack {
        axis: usize,
    },
    /// Each slice along `axis` repeated `repeats` times in place
    /// (`[a, b] -> [a, a, b, b]`); used for grouped-query attention.
    RepeatInterleave {
        axis: usize,
        repeats: usize,
    },
    Cast {
        dtype: DType,
    },
    /// `(positions[T] int) -> f32[T, head_dim]`: NeoX RoPE cos or sin table,
    /// the `head_dim/2` angles `pos / theta^(2i/head_dim)` repeated twice.
    /// Each row has its own position, so a ragged batch step feeds its
    /// `positions: i32[tokens]` input straight in.
    RopeTable {
        kind: RopeKind,
        theta: f64,
        head_dim: usize,
    },
    /// `(positions[T] i64, keys[K, ...]) -> f32[T, K]`: 0 where key index
    /// `j <= positions[i]`, -inf elsewhere.
    CausalMask,
    /// `() -> i64[len]`: `0, step, 2*step, ...`.
    Iota {
        len: usize,
        step: i64,
    },
    /// `(indices[...] int) -> f32[..., depth]`.
    OneHot {
        depth: usize,
    },
    /// `(cache[num_blocks, block_size, kv_heads, head_dim], new[tokens, kv_heads, head_dim],
    ///   slot_mapping i32[tokens]) -> cache'`: the cache with row `t` of `new`
    /// stored at slot `slot_mapping[t]` (block `slot / block_size`, offset
    /// `slot % block_size`); every other slot unchanged. Functional in the
    /// IR; a kernel writes the rows in place. A slot outside the cache or
    /// written twice in one step is an error. One op per cache (K or V).
    KvCacheWrite,
    /// `(q[tokens, heads, D], k_cache[num_blocks, block_size, kv_heads, D], v_cache[same],
    ///   block_table i32[seqs, max_blocks], query_start_loc i32[seqs+1],
    ///   context_lens i32[seqs]) -> [tokens, heads, D]`: attention of a ragged
    /// batch over a paged cache. Rows `query_start_loc[s]..query_start_loc[s+1]`
    /// belong to sequence `s`, whose `context_lens[s]` cached tokens (this
    /// step's included) live in blocks `block_table[s, 0..]`, token `p` at
    /// block `block_table[s, p / block_size]`, offset `p % block_size`. Row
    /// `i` of sequence `s` sits at position `context_lens[s] - q_len + i` and
    /// sees keys `0..=position` (causal), so decode rows see the whole
    /// context and prefill chunks attend causally to their own sequence.
    /// Query head `h` reads KV head `h / (heads / kv_heads)`; softmax(q k^T *
    /// scale) v with the softmax in f32.
    PagedAttention {
        scale: f64,
    },
    // ---- int8 quantization (docs/quantization.md; meaning in `interp::quant`) ----
    /// `(x float, scale float, offset float) -> i8[broadcast]`:
    /// `clamp(round_half_even(x / scale + offset), -128, 127)`, numpy
    /// broadcasting: per tensor (`[1]`, static W8A8 activations), per
    /// channel (the int8 KV cache), per expert (`[E, 1, 1]`).
    Quantize,
    /// `(q i8, scale float, offset float) -> f32[broadcast]`: `(q - offset) * scale`.
    Dequantize,
    /// `(x f32[..., K]) -> (q i8[..., K], scale f32[...])`: per-token
    /// dynamic quantization, `scale = max_k |x| / 127`,
    /// `q = clamp(round_half_even(x / scale), -128, 127)` (zeros for a zero row).
    DynamicQuant,
    /// `(xq i8[..., M, K], w i8[..., N, K], quant_bias i32[..., N], deq_scale f32|i64[..., N])
    ///   -> f32[..., M, N]`: static W8A8, `f32(xq w^T + quant_bias) * deq_scale`;
    /// an i64 `deq_scale` carries the f32 bits in its low 32 bits. Batch dims
    /// as in `QuantMatMulPerToken`.
    QuantMatMul,
    /// `(xq i8[..., M, K], w i8[..., N, K], w_scale float[..., N], x_scale f32[..., M]) -> f32[..., M, N]`:
    /// W8A8_DYNAMIC, `f32(xq w^T) * w_scale[n] * x_scale[m]`. An operand
    /// without batch dims is shared by every batch entry (one activation
    /// against stacked expert weights).
    QuantMatMulPerToken,
    /// Call of another function of the module. Weight parameters of the
    /// callee are bound to checkpoint tensors `weight_prefix + name`.
    Call {
        func: String,
        weight_prefix: String,
    },

    // ---- fused ops (introduced by rewrite rules only) ----
    /// `(x[..., H], w[H]) -> x / sqrt(mean(x^2) + eps) * w`.
    RmsNorm {
        eps: f64,
    },
    /// `(x, residual, w) -> (x + residual, rms_norm(x + residual, w))`.
    AddRmsNorm {
        eps: f64,
    },
    /// `(a, b, bias) -> matmul(a, b) + bias`.
    MatMulBias {
        transpose_b: bool,
    },
    /// `(x) -> n results`, cutting `axis` into pieces of `sizes`.
    Split {
        axis: usize,
        sizes: Vec<usize>,
    },
    /// `(x[T, heads, D], cos[T, D], sin[T, D]) -> x*cos + rotate_half(x)*sin`.
    Rope,
    /// `(gate, up) -> silu(gate) * up`.
    SwiGlu,
    /// `(x[T, H], w[2I, H]) -> silu(x w[:I]^T) * (x w[I:]^T)`: merged gate/up
    /// projection with a SwiGLU epilogue.
    GateUpSwiGlu,
    /// `(q[T, Hq, D], k[K, Hkv, D], v[K, Hkv, D], positions[T]) -> [T, Hq, D]`:
    /// causal softmax(q k^T * scale) v with query head h reading KV head
    /// `h / (Hq / Hkv)`; softmax in f32. Serves prefill and decode.
    FlashAttention {
        scale: f64,
    },
    /// `(logits[T, E], router_scale[E]) -> (weights f32[T, G], experts i64[T, G])`:
    /// softmax over all E experts, top-1 per contiguous group of E/G,
    /// weight scaled by `router_scale[expert]`, no renormalisation.
    MoeGatingGroupTopK {
        groups: usize,
    },
    /// `(x[T, H], weights[T, G], experts[T, G], w_gate_up[E, 2I, H], w_down[E, H, I]) -> [T, H]`:
    /// `sum_g weights[t,g] * down_e(swiglu(gate_up_e(x[t])))` with
    /// `e = experts[t, g]`; only the selected experts are computed.
    GroupedMatmulMoe,
    /// A collective over the `group` of ranks (see issue: partitioning).
    Collective {
        kind: CollectiveKind,
        group: Vec<usize>,
        axis: usize,
    },

    /// `(x[tokens, H], expert_ids int[tokens, k]) -> (expanded_x[tokens*k, H],
    ///   expanded_row_idx i32[tokens*k], expert_counts i32[experts])`: the
    /// (row, expert) pairs `p = t*k + j` stably sorted by expert id;
    /// `expanded_x[r]` is row `t` of the pair sorted to place `r`,
    /// `expanded_row_idx[p]` the place pair `p` was sorted to, and
    /// `expert_counts[e]` how many pairs chose expert `e` (so the rows of
    /// expert `e` are the contiguous block after the counts of experts < e).
    MoeInitRouting {
        experts: usize,
    },
    /// `(x[R, K], w[E, N, K], counts int[E]) -> [R, N]`: one matmul per
    /// expert over its contiguous block of rows, `y[r] = x[r] w[e]^T` for
    /// the rows of expert `e` (blocks in expert order, sizes `counts`, which
    /// must sum to R). Experts with no rows are never read.
    GroupedMatmul,
    /// `(expanded_y[tokens*k, H], weights f32[tokens, k], expanded_row_idx int[tokens*k],
    ///   skip_0[tokens, H], ...) -> [tokens, H]`: the weighted combine
    /// `sum_j weights[t, j] * expanded_y[expanded_row_idx[t*k + j]]`, then
    /// each optional skip term (shared expert output, residual) added in
    /// operand order.
    MoeFinalizeRouting,
    /// `(xq i8[R, K], w i8[E, N, K], w_scale float[E, N], x_scale f32[R], counts int[E]) -> f32[R, N]`:
    /// `GroupedMatmul` in W8A8_DYNAMIC form: row `r` of expert `e`'s block
    /// gives `f32(xq[r] . w[e, n]) * w_scale[e, n] * x_scale[r]`.
    GroupedQuantMatMul,

    // ---- fused ops of the lowering fusion plan (rules in panguc-lowering) ----
    /// `(x[T, H], w[(Hq+2*Hkv)*D, H], bias[(Hq+2*Hkv)*D], cos[T, D], sin[T, D],
    ///   k_cache[P, Hkv, D], v_cache[P, Hkv, D]) -> (q[T, Hq, D], k_all[P+T, Hkv, D], v_all[P+T, Hkv, D])`:
    /// the merged QKV projection `y = x w^T + bias` split into q, k, v heads,
    /// RoPE applied to q and k, and k, v appended to the caches. A kernel
    /// writes the new rows into the cache buffer in place (it reads no cache).
    QkvRope {
        q_heads: usize,
        kv_heads: usize,
    },
    /// `(x[T, H], w[(Hq+2*Hkv)*D, H], bias, cos[T, D], sin[T, D],
    ///   k_cache[num_blocks, block_size, Hkv, D], v_cache[same], slot_mapping i32[T])
    ///   -> (q[T, Hq, D], k_cache', v_cache')`: the paged-cache counterpart of
    /// `QkvRope`: the same projection, split and RoPE, then the new k and v
    /// rows stored at their slots exactly as `KvCacheWrite` stores them. A
    /// kernel writes the rows in place (it reads no cache).
    QkvRopeCacheWrite {
        q_heads: usize,
        kv_heads: usize,
    },
    /// `(x[T, H], w_router[E, H], router_scale[E]) -> (weights f32[T, G], experts i64[T, G])`:
    /// the router projection `x w_router^T` feeding `MoeGatingGroupTopK`.
    MoeRouterTopK {
        groups: usize,
    },
    /// `(x[T, H], weights[T, G], experts[T, G], w_gate_up[E, 2I, H], w_down[E, H, I],
    ///   shared_gate_up[2Is, H], shared_down[H, Is], residual[T, H]) -> [T, H]`:
    /// `residual + (grouped_matmul_moe(x, ...) + shared_down(gate_up_swiglu(x, shared_gate_up)))`,
    /// the whole MoE block (routed experts, shared expert, residual) in one kernel.
    MoeFfn,
    /// The same operands and result as `MoeFfn`, computed over the whole
    /// batch as the named batched ops: `moe_init_routing` (sort the
    /// (row, expert) pairs by expert, gather each pair's row once into a
    /// contiguous block per expert, count rows per expert), `grouped_matmul`
    /// with the gate rows and with the up rows of `w_gate_up`, SwiGLU,
    /// `grouped_matmul` with `w_down`, then `moe_finalize_routing` with the
    /// shared expert and the residual as skip terms. Introduced by
    /// `moe-grouped-ffn`; the cost model picks it over `MoeFfn` when many
    /// rows share experts.
    MoeGroupedFfn,
    /// `(x0, x1, ...) -> [broadcast of all operands]`: an elementwise
    /// expression over its operands in postfix form, e.g. `"$0 $1 mul neg"`.
    /// Tokens: `$i` (operand i), unary `neg exp sqrt rsqrt reciprocal sigmoid`,
    /// binary `add sub mul div max` (numpy broadcasting). Operands share one
    /// float dtype.
    FusedElementwise {
        expr: String,
    },
}

impl Op {
    /// The op's mnemonic in the canonical text format.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Gather => "gather",
            Op::MatMul { .. } => "matmul",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Exp => "exp",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Reciprocal => "reciprocal",
                UnaryOp::Sigmoid => "sigmoid",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "max",
            },
            Op::Scalar { .. } => "scalar",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "reduce_sum",
                ReduceOp::Mean => "reduce_mean",
                ReduceOp::Max => "reduce_max",
            },
            Op::ArgMax { .. } => "argmax",
            Op::Softmax { .. } => "softmax",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Stack { .. } => "stack",
            Op::RepeatInterleave { .. } => "repeat_interleave",
            Op::Cast { .. } => "cast",
            Op::RopeTable { .. } => "rope_table",
            Op::CausalMask => "causal_mask",
            Op::Iota { .. } => "iota",
            Op::OneHot { .. } => "one_hot",
            Op::KvCacheWrite => "kv_cache_write",
            Op::PagedAttention { .. } => "paged_attention",
            Op::Call { .. } => "call",
            Op::RmsNorm { .. } => "rms_norm",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::MatMulBias { .. } => "matmul_bias",
            Op::Split { .. } => "split",
            Op::Rope => "rope",
            Op::SwiGlu => "swiglu",
            Op::GateUpSwiGlu => "gate_up_swiglu",
            Op::FlashAttention { .. } => "flash_attention",
            Op::MoeGatingGroupTopK { .. } => "moe_gating_group_topk",
            Op::GroupedMatmulMoe => "grouped_matmul_moe",
            Op::MoeInitRouting { .. } => "moe_init_routing",
            Op::GroupedMatmul => "grouped_matmul",
            Op::MoeFinalizeRouting => "moe_finalize_routing",
            Op::Quantize => "quantize",
            Op::Dequantize => "dequantize",
            Op::DynamicQuant => "dynamic_quant",
            Op::QuantMatMul => "quant_matmul",
            Op::QuantMatMulPerToken => "quant_matmul_per_token",
            Op::GroupedQuantMatMul => "grouped_quant_matmul",
            Op::Collective { kind, .. } => match kind {
                CollectiveKind::AllReduce => "all_reduce",
                CollectiveKind::AllGather => "all_gather",
                CollectiveKind::ReduceScatter => "reduce_scatter",
                CollectiveKind::AllToAll => "all_to_all",
            },
            Op::QkvRope { .. } => "qkv_rope",
            Op::QkvRopeCacheWrite { .. } => "qkv_rope_cache_write",
            Op::MoeRouterTopK { .. } => "moe_router_topk",
            Op::MoeFfn => "moe_ffn",
            Op::MoeGroupedFfn => "moe_grouped_ffn",
            Op::FusedElementwise { .. } => "fused_elementwise",
        }
    }

    /// True for ops that only rewrite rules may introduce.
    pub fn is_fused(&self) -> bool {
        matches!(
            self,
            Op::RmsNorm { .. }
                | Op::AddRmsNorm { .. }
                | Op::MatMulBias { .. }
                | Op::Split { .. }
                | Op::Rope
                | Op::SwiGlu
                | Op::GateUpSwiGlu
                | Op::FlashAttention { .. }
                | Op::MoeGatingGroupTopK { .. }
                | Op::GroupedMatmulMoe
                | Op::MoeInitRouting { .. }
                | Op::GroupedMatmul
                | Op::MoeFinalizeRouting
                | Op::GroupedQuantMatMul
                | Op::QkvRope { .. }
                | Op::QkvRopeCacheWrite { .. }
                | Op::MoeRouterTopK { .. }
                | Op::MoeFfn
                | Op::MoeGroupedFfn
                | Op::FusedElementwise { .. }
        )
    }

    /// Attributes as (key, value) pairs in canonical order, for printing.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        use Attr::*;
        match self {
            Op::MatMul { transpose_b } | Op::MatMulBias { transpose_b } => {
                vec![("transpose_b", Bool(*transpose_b))]
            }
            Op::Scalar { value, dtype } => vec![("value", Float(*value)), ("dtype", Type(*dtype))],
            Op::Reduce { axis, keepdim, .. } | Op::ArgMax { axis, keepdim } => {
                vec![("axis", Int(*axis as i64)), ("keepdim", Bool(*keepdim))]
            }
            Op::Softmax { axis } | Op::Concat { axis } | Op::Stack { axis } => vec![("axis", Int(*axis as i64))],
            Op::Reshape { shape } => vec![("shape", Dims(shape.clone()))],
            Op::Transpose { perm } => vec![("perm", Ints(perm.iter().map(|&p| p as i64).collect()))],
            Op::Slice { axis, start, end } => {
                vec![("axis", Int(*axis as i64)), ("start", Int(*start as i64)), ("end", Int(*end as i64))]
            }
            Op::RepeatInterleave { axis, repeats } => {
                vec![("axis", Int(*axis as i64)), ("repeats", Int(*repeats as i64))]
            }
            Op::Cast { dtype } => vec![("dtype", Type(*dtype))],
            Op::RopeTable { kind, theta, head_dim } => vec![
                (
                    "kind",
                    Str(match kind {
                        RopeKind::Cos => "cos".into(),
                        RopeKind::Sin => "sin".into(),
                    }),
                ),
                ("theta", Float(*theta)),
                ("head_dim", Int(*head_dim as i64)),
            ],
            Op::Iota { len, step } => vec![("len", Int(*len as i64)), ("step", Int(*step))],
            Op::OneHot { depth } => vec![("depth", Int(*depth as i64))],
            Op::Call { func, weight_prefix } => {
                vec![("func", Str(func.clone())), ("weights", Str(weight_prefix.clone()))]
            }
            Op::RmsNorm { eps } | Op::AddRmsNorm { eps } => vec![("eps", Float(*eps))],
            Op::Split { axis, sizes } => {
                vec![("axis", Int(*axis as i64)), ("sizes", Ints(sizes.iter().map(|&s| s as i64).collect()))]
            }
            Op::FlashAttention { scale } | Op::PagedAttention { scale } => vec![("scale", Float(*scale))],
            Op::MoeInitRouting { experts } => vec![("experts", Int(*experts as i64))],
            Op::MoeGatingGroupTopK { groups } => vec![("groups", Int(*groups as i64))],
            Op::Collective { group, axis, .. } => {
                vec![("group", Ints(group.iter().map(|&g| g as i64).collect())), ("axis", Int(*axis as i64))]
            }
            Op::QkvRope { q_heads, kv_heads } | Op::QkvRopeCacheWrite { q_heads, kv_heads } => {
                vec![("q_heads", Int(*q_heads as i64)), ("kv_heads", Int(*kv_heads as i64))]
            }
            Op::MoeRouterTopK { groups } => vec![("groups", Int(*groups as i64))],
            Op::FusedElementwise { expr } => vec![("expr", Str(expr.clone()))],
            Op::MoeFfn | Op::MoeGroupedFfn => vec![],
            Op::Gather
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::CausalMask
            | Op::Rope
            | Op::SwiGlu
            | Op::GateUpSwiGlu
            | Op::GroupedMatmulMoe
            | Op::KvCacheWrite
            | Op::GroupedMatmul
            | Op::MoeFinalizeRouting
            | Op::Quantize
            | Op::Dequantize
            | Op::DynamicQuant
            | Op::QuantMatMul
            | Op::QuantMatMulPerToken
            | Op::GroupedQuantMatMul => vec![],
        }
    }

    /// Rebuild an op from its mnemonic and attributes (the parser's half).
    pub fn from_parts(mnemonic: &str, attrs: &AttrMap) -> Result<Op, String> {
        let op = match mnemonic {
            "gather" => Op::Gather,
            "matmul" => Op::MatMul { transpose_b: attrs.bool("transpose_b")? },
            "matmul_bias" => Op::MatMulBias { transpose_b: attrs.bool("transpose_b")? },
            "neg" => Op::Unary(UnaryOp::Neg),
            "exp" => Op::Unary(UnaryOp::Exp),
            "sqrt" => Op::Unary(UnaryOp::Sqrt),
            "rsqrt" => Op::Unary(UnaryOp::Rsqrt),
            "reciprocal" => Op::Unary(UnaryOp::Reciprocal),
            "sigmoid" => Op::Unary(UnaryOp::Sigmoid),
            "add" => Op::Binary(BinaryOp::Add),
            "sub" => Op::Binary(BinaryOp::Sub),
            "mul" => Op::Binary(BinaryOp::Mul),
            "div" => Op::Binary(BinaryOp::Div),
            "max" => Op::Binary(BinaryOp::Max),
            "scalar" => Op::Scalar { value: attrs.float("value")?, dtype: attrs.dtype("dtype")? },
            "reduce_sum" | "reduce_mean" | "reduce_max" => Op::Reduce {
                op: match mnemonic {
                    "reduce_sum" => ReduceOp::Sum,
                    "reduce_mean" => ReduceOp::Mean,
                    _ => ReduceOp::Max,
                },
                axis: attrs.usize("axis")?,
                keepdim: attrs.bool("keepdim")?,
            },
            "argmax" => Op::ArgMax { axis: attrs.usize("axis")?, keepdim: attrs.bool("keepdim")? },
            "softmax" => Op::Softmax { axis: attrs.usize("axis")? },
            "reshape" => Op::Reshape { shape: attrs.dims("shape")? },
            "transpose" => Op::Transpose { perm: attrs.usizes("perm")? },
            "slice" => Op::Slice { axis: attrs.usize("axis")?, start: attrs.usize("start")?, end: attrs.usize("end")? },
            "concat" => Op::Concat { axis: attrs.usize("axis")? },
            "stack" => Op::Stack { axis: attrs.usize("axis")? },
            "repeat_interleave" => {
                Op::RepeatInterleave { axis: attrs.usize("axis")?, repeats: attrs.usize("repeats")? }
            }
            "cast" => Op::Cast { dtype: attrs.dtype("dtype")? },
            "rope_table" => Op::RopeTable {
                kind: match attrs.str("kind")? {
                    "cos" => RopeKind::Cos,
                    "sin" => RopeKind::Sin,
                    other => return Err(format!("rope_table kind must be \"cos\" or \"sin\", found {other:?}")),
                },
                theta: attrs.float("theta")?,
                head_dim: attrs.usize("head_dim")?,
            },
            "causal_mask" => Op::CausalMask,
            "iota" => Op::Iota { len: attrs.usize("len")?, step: attrs.int("step")? },
            "one_hot" => Op::OneHot { depth: attrs.usize("depth")? },
            "call" => {
                Op::Call { func: attrs.str("func")?.to_string(), weight_prefix: attrs.str("weights")?.to_string() }
            }
            "rms_norm" => Op::RmsNorm { eps: attrs.float("eps")? },
            "add_rms_norm" => Op::AddRmsNorm { eps: attrs.float("eps")? },
            "split" => Op::Split { axis: attrs.usize("axis")?, sizes: attrs.usizes("sizes")? },
            "rope" => Op::Rope,
            "swiglu" => Op::SwiGlu,
            "gate_up_swiglu" => Op::GateUpSwiGlu,
            "flash_attention" => Op::FlashAttention { scale: attrs.float("scale")? },
            "kv_cache_write" => Op::KvCacheWrite,
            "paged_attention" => Op::PagedAttention { scale: attrs.float("scale")? },
            "moe_init_routing" => Op::MoeInitRouting { experts: attrs.usize("experts")? },
            "grouped_matmul" => Op::GroupedMatmul,
            "moe_finalize_routing" => Op::MoeFinalizeRouting,
            "quantize" => Op::Quantize,
            "dequantize" => Op::Dequantize,
            "dynamic_quant" => Op::DynamicQuant,
            "quant_matmul" => Op::QuantMatMul,
            "quant_matmul_per_token" => Op::QuantMatMulPerToken,
            "grouped_quant_matmul" => Op::GroupedQuantMatMul,
            "moe_gating_group_topk" => Op::MoeGatingGroupTopK { groups: attrs.usize("groups")? },
            "grouped_matmul_moe" => Op::GroupedMatmulMoe,
            "all_reduce" | "all_gather" | "reduce_scatter" | "all_to_all" => Op::Collective {
                kind: match mnemonic {
                    "all_reduce" => CollectiveKind::AllReduce,
                    "all_gather" => CollectiveKind::AllGather,
                    "reduce_scatter" => CollectiveKind::ReduceScatter,
                    _ => CollectiveKind::AllToAll,
                },
                group: attrs.usizes("group")?,
                axis: attrs.usize("axis")?,
            },
            "qkv_rope" => Op::QkvRope { q_heads: attrs.usize("q_heads")?, kv_heads: attrs.usize("kv_heads")? },
            "qkv_rope_cache_write" => {
                Op::QkvRopeCacheWrite { q_heads: attrs.usize("q_heads")?, kv_heads: attrs.usize("kv_heads")? }
            }
            "moe_router_topk" => Op::MoeRouterTopK { groups: attrs.usize("groups")? },
            "moe_ffn" => Op::MoeFfn,
            "moe_grouped_ffn" => Op::MoeGroupedFfn,
            "fused_elementwise" => Op::FusedElementwise { expr: attrs.str("expr")?.to_string() },
            other => return Err(format!("unknown op `{other}`")),
        };
        let expected: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
        if let Some(extra) = attrs.0.iter().map(|(k, _)| k.as_str()).find(|k| !expected.contains(k)) {
            return Err(format!("op `{mnemonic}` has no attribute `{extra}`"));
        }
        Ok(op)
    }
}

/// An attribute value in the text format.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Type(DType),
    Ints(Vec<i64>),
    Dims(Vec<crate::Dim>),
}

/// Parsed attributes, in source order.
#[derive(Debug, Clone, Default)]
pub struct AttrMap(pub Vec<(String, Attr)>);

impl AttrMap {
    fn get(&self, key: &str) -> Result<&Attr, String> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v).ok_or_else(|| format!("missing attribute `{key}`"))
    }

    fn bool(&self, key: &str) -> Result<bool, String> {
        match self.get(key)? {
            Attr::Bool(b) => Ok(*b),
            other => Err(format!("attribute `{key}` must be a bool, found {other:?}")),
        }
    }

    fn int(&self, key: &str) -> Result<i64, String> {
        match self.get(key)? {
            Attr::Int(i) => Ok(*i),
            other => Err(format!("attribute `{key}` must be an integer, found {other:?}")),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, String> {
        usize::try_from(self.int(key)?).map_err(|_| format!("attribute `{key}` must be non-negative"))
    }

    fn float(&self, key: &str) -> Result<f64, String> {
        match self.get(key)? {
            Attr::Float(f) => Ok(*f),
            Attr::Int(i) => Ok(*i as f64),
            other => Err(format!("attribute `{key}` must be a number, found {other:?}")),
        }
    }

    fn str(&self, key: &str) -> Result<&str, String> {
        match self.get(key)? {
            Attr::Str(s) => Ok(s),
            other => Err(format!("attribute `{key}` must be a string, found {other:?}")),
        }
    }

    fn dtype(&self, key: &str) -> Result<DType, String> {
        match self.get(key)? {
            Attr::Type(t) => Ok(*t),
            other => Err(format!("attribute `{key}` must be a dtype, found {other:?}")),
        }
    }

    fn usizes(&self, key: &str) -> Result<Vec<usize>, String> {
        match self.get(key)? {
            Attr::Ints(v) => v
                .iter()
                .map(|&i| usize::try_from(i).map_err(|_| format!("attribute `{key}` must be non-negative")))
                .collect(),
            Attr::Dims(v) => {
                v.iter().map(|d| d.as_const().ok_or_else(|| format!("attribute `{key}` must be constant"))).collect()
            }
            other => Err(format!("attribute `{key}` must be an integer list, found {other:?}")),
        }
    }

    fn dims(&self, key: &str) -> Result<Vec<crate::Dim>, String> {
        match self.get(key)? {
            Attr::Dims(v) => Ok(v.clone()),
            Attr::Ints(v) => Ok(v.iter().map(|&i| crate::Dim::c(i.max(0) as usize)).collect()),
            other => Err(format!("attribute `{key}` must be a shape, found {other:?}")),
        }
    }
}

/// One token of a `FusedElementwise` expression (postfix order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EwToken {
    /// Push operand `i`.
    Operand(usize),
    Unary(UnaryOp),
    Binary(BinaryOp),
}

/// Parse and check a `FusedElementwise` expression over `operands` operands:
/// every token known, every operand index in range and used, and the stack
/// ending with exactly one value.
pub fn parse_elementwise(expr: &str, operands: usize) -> Result<Vec<EwToken>, String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut used = vec![false; operands];
    for tok in expr.split_whitespace() {
        let t = if let Some(i) = tok.strip_prefix('$') {
            let i: usize = i.parse().map_err(|_| format!("bad operand `{tok}` in elementwise expression"))?;
            if i >= operands {
                return Err(format!("operand `{tok}` out of range: the op has {operands} operands"));
            }
            used[i] = true;
            EwToken::Operand(i)
        } else {
            match Op::from_parts(tok, &AttrMap::default()) {
                Ok(Op::Unary(u)) => EwToken::Unary(u),
                Ok(Op::Binary(b)) => EwToken::Binary(b),
                _ => return Err(format!("`{tok}` is not an elementwise op")),
            }
        };
        let (pops, pushes) = match t {
            EwToken::Operand(_) => (0, 1),
            EwToken::Unary(_) => (1, 1),
            EwToken::Binary(_) => (2, 1),
        };
        if depth < pops {
            return Err(format!("elementwise expression `{expr}` pops an empty stack at `{tok}`"));
        }
        depth = depth - pops + pushes;
        out.push(t);
    }
    if depth != 1 {
        return Err(format!("elementwise expression `{expr}` leaves {depth} values, expected 1"));
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(format!("elementwise expression `{expr}` never uses operand ${i}"));
    }
    Ok(out)
}

//! Metadata of one step over a ragged batch with a paged KV cache.
//!
//! A step processes the new tokens of several sequences flattened into one
//! `[tokens, hidden]` tensor: decode sequences contribute one row, prefill
//! chunks many. Everything token-wise (GEMMs, norms, the MoE) runs over all
//! rows at once; attention, RoPE positions and the KV write need to know
//! which rows belong to which sequence and where each sequence's cache lives.
//! This struct carries exactly that, in the layout the IR's typed batch
//! inputs take (all `i32`, as on Ascend and in vLLM):
//!
//! | field | shape | meaning |
//! |---|---|---|
//! | `query_start_loc` | `[seqs + 1]` | row offsets of each sequence's new tokens (cumulative lengths) |
//! | `context_lens` | `[seqs]` | tokens in the sequence's cache after this step's write (past + new) |
//! | `positions` | `[tokens]` | absolute position of every new token |
//! | `block_table` | `[seqs, max_blocks]` | cache blocks of each sequence, padded with 0 |
//! | `slot_mapping` | `[tokens]` | `block * block_size + offset` where each new token's K/V is written |
//!
//! The KV cache of a layer is `[num_blocks, block_size, kv_heads, head_dim]`.
//! One sequence is simply the batch of one.
//!
//! In the IR these are the typed inputs [`declare_step_inputs`] adds (shape
//! symbols `tokens`, `seqs`, `max_blocks`, `num_blocks`; see
//! [`crate::shape`]), in the order [`StepMetadata::tensors`] supplies them.
//! `positions` feed `rope_table`, `slot_mapping` the `kv_cache_write` ops and
//! `block_table` / `query_start_loc` / `context_lens` the `paged_attention`
//! ops; nothing else in a step depends on which rows belong to which
//! sequence.

use crate::graph::Function;
use crate::shape::{Dim, TensorType};
use crate::tensor::Tensor;
use crate::{DType, ValueId};
use anyhow::{bail, ensure, Result};
use std::ops::Range;

/// The step-metadata parameters of a batched function (see
/// [`declare_step_inputs`]).
#[derive(Debug, Clone, Copy)]
pub struct StepInputs {
    pub positions: ValueId,
    pub query_start_loc: ValueId,
    pub context_lens: ValueId,
    pub block_table: ValueId,
    pub slot_mapping: ValueId,
}

/// Add the step's metadata inputs to `f`, all `i32`: `positions[tokens]`,
/// `query_start_loc[seqs+1]`, `context_lens[seqs]`,
/// `block_table[seqs, max_blocks]`, `slot_mapping[tokens]`.
pub fn declare_step_inputs(f: &mut Function) -> StepInputs {
    let i32s = |shape: Vec<Dim>| TensorType::new(DType::I32, shape);
    let (t, s) = (Dim::tokens(), Dim::seqs());
    StepInputs {
        positions: f.add_input("positions", i32s(vec![t.clone()])),
        query_start_loc: f.add_input("query_start_loc", i32s(vec![s.add(&Dim::c(1))])),
        context_lens: f.add_input("context_lens", i32s(vec![s.clone()])),
        block_table: f.add_input("block_table", i32s(vec![s, Dim::max_blocks()])),
        slot_mapping: f.add_input("slot_mapping", i32s(vec![t])),
    }
}

/// Type of one layer's paged K or V cache:
/// `[num_blocks, block_size, kv_heads, head_dim]`.
pub fn paged_cache_type(dtype: DType, block_size: usize, kv_heads: usize, head_dim: usize) -> TensorType {
    TensorType::new(dtype, vec![Dim::num_blocks(), Dim::c(block_size), Dim::c(kv_heads), Dim::c(head_dim)])
}

/// One sequence's share of a step: `new_tokens` tokens at positions
/// `past .. past + new_tokens`, its cache in `blocks` (in order).
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub past: usize,
    pub new_tokens: usize,
    pub blocks: &'a [u32],
}

/// Per-step metadata of a ragged batch (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMetadata {
    pub block_size: usize,
    pub max_blocks: usize,
    pub query_start_loc: Vec<i32>,
    pub context_lens: Vec<i32>,
    pub positions: Vec<i32>,
    /// Row-major `[seqs, max_blocks]`.
    pub block_table: Vec<i32>,
    pub slot_mapping: Vec<i32>,
}

impl StepMetadata {
    /// The shape symbols of this step in a batched program whose caches
    /// have `num_blocks` blocks.
    pub fn bindings(&self, num_blocks: usize) -> crate::shape::Bindings {
        use crate::shape::{SYM_MAX_BLOCKS, SYM_NUM_BLOCKS, SYM_SEQS, SYM_TOKENS};
        crate::shape::Bindings::from([
            (SYM_TOKENS.to_string(), self.tokens()),
            (SYM_SEQS.to_string(), self.seqs()),
            (SYM_MAX_BLOCKS.to_string(), self.max_blocks),
            (SYM_NUM_BLOCKS.to_string(), num_blocks),
        ])
    }

    /// Build the metadata of a step from each sequence's chunk. Fails when a
    /// chunk is empty or its blocks cannot hold `past + new_tokens` tokens.
    pub fn build(block_size: usize, chunks: &[SeqChunk]) -> Result<Self> {
        ensure!(block_size > 0, "the KV block size must be positive");
        ensure!(!chunks.is_empty(), "a step needs at least one sequence");
        let max_blocks = chunks.iter().map(|c| c.blocks.len()).max().unwrap_or(0);
        let mut m = StepMetadata {
            block_size,
            max_blocks,
            query_start_loc: vec![0],
            context_lens: vec![],
            positions: vec![],
            block_table: vec![],
            slot_mapping: vec![],
        };
        for (s, c) in chunks.iter().enumerate() {
            ensure!(c.new_tokens > 0, "sequence {s} of the step has no new tokens");
            let ctx = c.past + c.new_tokens;
            let capacity = c.blocks.len() * block_size;
            ensure!(
                ctx <= capacity,
                "sequence {s} needs {ctx} cache slots but its {} blocks hold {capacity}",
                c.blocks.len()
            );
            for p in c.past..ctx {
                m.positions.push(to_i32(p)?);
                let slot = c.blocks[p / block_size] as usize * block_size + p % block_size;
                m.slot_mapping.push(to_i32(slot)?);
            }
            m.context_lens.push(to_i32(ctx)?);
            m.query_start_loc.push(to_i32(m.positions.len())?);
            m.block_table.extend(c.blocks.iter().map(|&b| b as i32));
            m.block_table.extend(std::iter::repeat_n(0, max_blocks - c.blocks.len()));
        }
        Ok(m)
    }

    /// The metadata as interpreter tensors, in [`declare_step_inputs`] order
    /// (integers are held as i64 by the interpreter whatever the IR dtype).
    pub fn tensors(&self) -> Vec<Tensor> {
        let t = |v: &[i32], shape: Vec<usize>| Tensor::i64(shape, v.iter().map(|&x| x as i64).collect());
        vec![
            t(&self.positions, vec![self.tokens()]),
            t(&self.query_start_loc, vec![self.seqs() + 1]),
            t(&self.context_lens, vec![self.seqs()]),
            t(&self.block_table, vec![self.seqs(), self.max_blocks]),
            t(&self.slot_mapping, vec![self.tokens()]),
        ]
    }

    /// Number of sequences in the step.
    pub fn seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Total number of new tokens (rows) in the step.
    pub fn tokens(&self) -> usize {
        self.positions.len()
    }

    /// The rows of sequence `s` in the step's `[tokens, ...]` tensors.
    pub fn rows(&self, s: usize) -> Range<usize> {
        self.query_start_loc[s] as usize..self.query_start_loc[s + 1] as usize
    }

    /// The first `blocks` entries of sequence `s`'s block-table row.
    pub fn blocks(&self, s: usize) -> &[i32] {
        &self.block_table[s * self.max_blocks..(s + 1) * self.max_blocks]
    }

    /// Check internal consistency against a cache of `num_blocks` blocks:
    /// lengths agree, offsets increase, every slot and block index in range,
    /// each sequence's new tokens are the last ones of its context.
    pub fn validate(&self, num_blocks: usize) -> Result<()> {
        let seqs = self.seqs();
        check_sequences(
            &self.query_start_loc,
            &self.context_lens,
            &self.block_table,
            self.max_blocks,
            self.block_size,
            num_blocks,
            self.tokens(),
        )?;
        ensure!(self.slot_mapping.len() == self.tokens(), "slot_mapping must have one entry per token");
        for s in 0..seqs {
            let (ctx, q) = (self.context_lens[s] as usize, self.rows(s).len());
            for (i, r) in self.rows(s).enumerate() {
                ensure!(self.positions[r] as usize == ctx - q + i, "sequence {s}: positions must follow its past");
            }
        }
        for (t, &slot) in self.slot_mapping.iter().enumerate() {
            ensure!(
                slot >= 0 && (slot as usize) < num_blocks * self.block_size,
                "token {t}: slot {slot} is outside the cache"
            );
        }
        Ok(())
    }
}

/// Check the sequence layout the paged ops read (query offsets, context
/// lengths, block table) for `tokens` rows over a cache of `num_blocks`
/// blocks of `block_size`: offsets start at 0, increase strictly and end at
/// `tokens`; each context holds at least its new tokens and fits its block
/// table; every block a context uses is inside the cache. Shared by
/// [`StepMetadata::validate`] and the interpreter's `paged_attention`, so
/// the two cannot disagree on what a well-formed step is.
pub fn check_sequences<T: Copy + Into<i64>>(
    query_start_loc: &[T],
    context_lens: &[T],
    block_table: &[T],
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    tokens: usize,
) -> Result<()> {
    let seqs = context_lens.len();
    let qsl: Vec<i64> = query_start_loc.iter().map(|&v| v.into()).collect();
    ensure!(seqs > 0, "a step needs at least one sequence");
    ensure!(qsl.len() == seqs + 1, "query_start_loc must have seqs + 1 = {} entries, found {}", seqs + 1, qsl.len());
    ensure!(block_table.len() == seqs * max_blocks, "block_table must be [seqs, max_blocks]");
    ensure!(qsl[0] == 0, "query_start_loc must start at 0");
    ensure!(qsl[seqs] == tokens as i64, "query_start_loc ends at {} but the step has {tokens} tokens", qsl[seqs]);
    for s in 0..seqs {
        let (a, b) = (qsl[s], qsl[s + 1]);
        ensure!(a < b, "sequence {s} has no new tokens");
        let (ctx, q) = (context_lens[s].into(), b - a);
        ensure!(ctx >= q, "sequence {s}: context length {ctx} is shorter than its {q} new tokens");
        let ctx = ctx as usize;
        ensure!(ctx <= max_blocks * block_size, "sequence {s}: context {ctx} exceeds its block table");
        for &b in &block_table[s * max_blocks..s * max_blocks + ctx.div_ceil(block_size)] {
            let b: i64 = b.into();
            if b < 0 || b as usize >= num_blocks {
                bail!("sequence {s}: block {b} is outside the cache of {num_blocks} blocks");
            }
        }
    }
    Ok(())
}

fn to_i32(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{v} does not fit the i32 batch metadata"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sequences_with_scattered_blocks() {
        // Sequence 0: 3 cached tokens, decodes 1; blocks 5 then 2 (size 2).
        // Sequence 1: a 3-token prefill chunk from scratch in blocks 0, 7.
        let m = StepMetadata::build(
            2,
            &[
                SeqChunk { past: 3, new_tokens: 1, blocks: &[5, 2] },
                SeqChunk { past: 0, new_tokens: 3, blocks: &[0, 7] },
            ],
        )
        .unwrap();
        assert_eq!(m.query_start_loc, vec![0, 1, 4]);
        assert_eq!(m.context_lens, vec![4, 3]);
        assert_eq!(m.positions, vec![3, 0, 1, 2]);
        // position 3 of seq 0 -> block 2 offset 1 = 5; seq 1: 0,1 in block 0, 2 in block 7 -> 14.
        assert_eq!(m.slot_mapping, vec![5, 0, 1, 14]);
        assert_eq!(m.block_table, vec![5, 2, 0, 7]);
        assert_eq!(m.rows(1), 1..4);
        m.validate(8).unwrap();
        assert!(m.validate(7).is_err(), "block 7 is outside a 7-block cache");
    }

    #[test]
    fn refuses_a_chunk_its_blocks_cannot_hold() {
        let e = StepMetadata::build(4, &[SeqChunk { past: 3, new_tokens: 2, blocks: &[1] }]).unwrap_err();
        assert!(e.to_string().contains("needs 5 cache slots"), "{e}");
    }
}

//! A sequence's state across prefill and decode for the interpreter.
//!
//! The entry-function contract every importer and engine shares:
//! inputs `ids: i64[tokens]`, `positions: i64[tokens]`, then for each layer
//! `l` the caches `k_cache.l`, `v_cache.l: f32[past, kv_heads, head_dim]`
//! (`i8` for an int8 KV cache);
//! outputs `logits: f32[tokens, vocab]`, then `k.l`, `v.l:
//! f32[past+tokens, kv_heads, head_dim]` for each layer (the caches with the
//! new tokens appended).

use crate::batch::StepMetadata;
use crate::interp::Interpreter;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// A zeroed cache of `shape` for the entry function's cache inputs (its
/// last inputs): f32, or integers for an int8 (C8) cache, held as i64 like
/// every integer tensor of the interpreter.
fn empty_cache(interp: &Interpreter<'_>, shape: Vec<usize>) -> Tensor {
    let entry = interp.module().entry_fn();
    let int_cache = entry.input_params().last().is_some_and(|p| entry.ty(p.value).dtype.is_int());
    if int_cache {
        let n = shape.iter().product();
        Tensor::i64(shape, vec![0; n])
    } else {
        Tensor::zeros(shape)
    }
}

pub struct InterpSession<'a> {
    interp: Interpreter<'a>,
    caches: Vec<Tensor>,
    past: usize,
}

impl<'a> InterpSession<'a> {
    /// `kv_shape` is `[kv_heads, head_dim]`, `layers` the number of layers.
    pub fn new(interp: Interpreter<'a>, layers: usize, kv_shape: [usize; 2]) -> Self {
        let empty = empty_cache(&interp, vec![0, kv_shape[0], kv_shape[1]]);
        InterpSession { interp, caches: vec![empty; 2 * layers], past: 0 }
    }

    pub fn past(&self) -> usize {
        self.past
    }

    /// Process `tokens` (a prompt or one decode token); returns logits
    /// `[tokens.len(), vocab]` and appends to the KV cache.
    pub fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        let n = tokens.len();
        let positions: Vec<i64> = (self.past..self.past + n).map(|p| p as i64).collect();
        let mut inputs = vec![Tensor::i64(vec![n], tokens.to_vec()), Tensor::i64(vec![n], positions)];
        inputs.extend(self.caches.iter().cloned());
        let mut outs = self.interp.run_entry(&inputs)?.into_iter();
        let logits = outs.next().expect("entry returns logits");
        self.caches = outs.collect();
        self.past += n;
        Ok(logits)
    }
}

/// The interpreter's state for ragged batch steps over a paged KV cache:
/// the per-layer caches, nothing else (which sequence owns which blocks is
/// the caller's business, carried in each step's [`StepMetadata`]).
///
/// The batched entry-function contract (`panguc::import::build_batched_module`):
/// inputs `ids: i64[tokens]`, the step metadata in
/// [`crate::batch::declare_step_inputs`] order, then for each layer `l`
/// `k_cache.l`, `v_cache.l: f32[num_blocks, block_size, kv_heads, head_dim]`;
/// outputs `logits: f32[tokens, vocab]`, then `k.l`, `v.l` (the caches with
/// this step's rows written at their slots).
pub struct BatchInterpSession<'a> {
    interp: Interpreter<'a>,
    caches: Vec<Tensor>,
    block_size: usize,
}

impl<'a> BatchInterpSession<'a> {
    /// Zeroed caches of `num_blocks` blocks of `block_size` tokens;
    /// `kv_shape` is `[kv_heads, head_dim]`.
    pub fn new(
        interp: Interpreter<'a>,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_shape: [usize; 2],
    ) -> Self {
        let empty = empty_cache(&interp, vec![num_blocks, block_size, kv_shape[0], kv_shape[1]]);
        BatchInterpSession { interp, caches: vec![empty; 2 * layers], block_size }
    }

    /// Run one step: `ids` are the step's new tokens (rows in `step` order);
    /// returns logits `[tokens, vocab]` and keeps the updated caches.
    pub fn step(&mut self, ids: &[i64], step: &StepMetadata) -> Result<Tensor> {
        ensure!(
            step.block_size == self.block_size,
            "step uses blocks of {} tokens, the cache {}",
            step.block_size,
            self.block_size
        );
        ensure!(ids.len() == step.tokens(), "{} token ids for a step of {} tokens", ids.len(), step.tokens());
        let num_blocks = self.caches.first().map_or(0, |c| c.shape[0]);
        step.validate(num_blocks)?;
        let mut inputs = vec![Tensor::i64(vec![ids.len()], ids.to_vec())];
        inputs.extend(step.tensors());
        inputs.extend(self.caches.iter().cloned());
        let mut outs = self.interp.run_entry(&inputs)?.into_iter();
        let logits = outs.next().expect("entry returns logits");
        self.caches = outs.collect();
        Ok(logits)
    }
}

//! A sequence's state across prefill and decode for the interpreter.
//!
//! The entry-function contract every importer and engine shares:
//! inputs `ids: i64[tokens]`, `positions: i64[tokens]`, then for each layer
//! `l` the caches `k_cache.l`, `v_cache.l: f32[past, kv_heads, head_dim]`;
//! outputs `logits: f32[tokens, vocab]`, then `k.l`, `v.l:
//! f32[past+tokens, kv_heads, head_dim]` for each layer (the caches with the
//! new tokens appended).

use crate::interp::Interpreter;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

pub struct InterpSession<'a> {
    interp: Interpreter<'a>,
    caches: Vec<Tensor>,
    past: usize,
}

impl<'a> InterpSession<'a> {
    /// `kv_shape` is `[kv_heads, head_dim]`, `layers` the number of layers.
    pub fn new(interp: Interpreter<'a>, layers: usize, kv_shape: [usize; 2]) -> Self {
        let empty = Tensor::zeros(vec![0, kv_shape[0], kv_shape[1]]);
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

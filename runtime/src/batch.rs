//! The batched-engine interface the scheduler drives, and the adapter that
//! runs today's one-sequence engines under it.
//!
//! One call of [`BatchEngine::step`] processes one step of a ragged batch:
//! each sequence's chunk of new tokens plus the step's [`StepMetadata`]
//! (positions, block table, slot mapping). An engine with paged kernels
//! consumes the metadata directly; [`PerSequenceEngines`] instead keeps one
//! [`Engine`] (with its own contiguous KV cache) per running sequence and
//! feeds each chunk to its sequence's engine in turn, so every engine runs
//! under the scheduler today.

use crate::generate::{Engine, Generation, Sampling};
use crate::scheduler::{Request, Scheduler, SchedulerConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use panguc_ir::batch::StepMetadata;
use std::collections::HashMap;

/// A sequence's identity inside one scheduler.
pub type SeqId = usize;

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepChunk<'a> {
    pub seq: SeqId,
    /// The new tokens, at positions `past .. past + tokens.len()`.
    pub tokens: &'a [i64],
    pub past: usize,
    /// Only rows `logits_from ..` of this chunk's logits are needed
    /// (`tokens.len()` when none are).
    pub logits_from: usize,
}

/// Logits rows returned for one chunk, `[rows][vocab]`.
pub type ChunkLogits = Vec<Vec<f32>>;

/// A model engine that processes a ragged batch per call.
pub trait BatchEngine {
    /// Run one step; returns, for every chunk in order, its logits rows
    /// `logits_from .. tokens.len()`.
    fn step(&mut self, chunks: &[StepChunk<'_>], meta: &StepMetadata) -> Result<Vec<ChunkLogits>>;
    /// Forget sequence `seq` (finished or preempted): its KV cache is no
    /// longer needed. A later chunk for `seq` starts again at position 0.
    fn release(&mut self, seq: SeqId);
}

/// Makes a fresh one-sequence engine.
pub type EngineFactory<'e> = Box<dyn FnMut() -> Result<Box<dyn Engine + 'e>> + 'e>;

/// The [`BatchEngine`] adapter for one-sequence engines: one engine per
/// running sequence, created on demand and reused (after a reset) once its
/// sequence is released.
pub struct PerSequenceEngines<'e> {
    make: EngineFactory<'e>,
    /// Engine and tokens in its cache, per running sequence.
    live: HashMap<SeqId, (Box<dyn Engine + 'e>, usize)>,
    /// Engines never used yet.
    fresh: Vec<Box<dyn Engine + 'e>>,
    /// Engines of released sequences that can be reset for reuse.
    released: Vec<Box<dyn Engine + 'e>>,
    /// The caller's engines ([`Self::from_engines`]): reset only when
    /// reused, so after `generate` the caller's engine keeps its cache.
    lazy_reset: bool,
    created: usize,
}

impl<'e> PerSequenceEngines<'e> {
    pub fn new(make: EngineFactory<'e>) -> Self {
        PerSequenceEngines {
            make,
            live: HashMap::new(),
            fresh: vec![],
            released: vec![],
            lazy_reset: false,
            created: 0,
        }
    }

    /// Serve sequences with exactly the given engines, which must be fresh
    /// (empty caches: this adapter cannot see how many tokens they hold).
    pub fn from_engines(engines: Vec<Box<dyn Engine + 'e>>) -> Self {
        let n = engines.len();
        let mut s = Self::new(Box::new(move || {
            bail!("all {n} engines are in use or could not be reset: give one engine per sequence")
        }));
        s.fresh = engines.into_iter().rev().collect();
        s.lazy_reset = true;
        s
    }

    /// Engines made by the factory so far.
    pub fn created(&self) -> usize {
        self.created
    }

    fn engine_for(&mut self, c: &StepChunk) -> Result<&mut (Box<dyn Engine + 'e>, usize)> {
        if !self.live.contains_key(&c.seq) {
            ensure!(c.past == 0, "sequence {} has no engine but its chunk starts at position {}", c.seq, c.past);
            let engine = match self.reusable() {
                Some(e) => e,
                None => {
                    self.created += 1;
                    (self.make)()?
                }
            };
            self.live.insert(c.seq, (engine, 0));
        }
        let entry = self.live.get_mut(&c.seq).ok_or_else(|| anyhow!("sequence {} has no engine", c.seq))?;
        ensure!(
            entry.1 == c.past,
            "sequence {}: its engine holds {} tokens but the chunk starts at position {}",
            c.seq,
            entry.1,
            c.past
        );
        Ok(entry)
    }

    /// A fresh engine, or a released one that could be reset.
    fn reusable(&mut self) -> Option<Box<dyn Engine + 'e>> {
        if let Some(e) = self.fresh.pop() {
            return Some(e);
        }
        while let Some(mut e) = self.released.pop() {
            if e.reset() {
                return Some(e);
            }
        }
        None
    }
}

impl BatchEngine for PerSequenceEngines<'_> {
    fn step(&mut self, chunks: &[StepChunk<'_>], _meta: &StepMetadata) -> Result<Vec<ChunkLogits>> {
        let mut out = Vec::with_capacity(chunks.len());
        for c in chunks {
            let (engine, past) = self.engine_for(c)?;
            let logits = engine
                .forward(c.tokens)
                .with_context(|| format!("sequence {}: {} tokens at position {}", c.seq, c.tokens.len(), c.past))?;
            *past += c.tokens.len();
            let vocab = *logits.shape.last().unwrap_or(&0);
            let data = logits.as_f32();
            ensure!(
                vocab > 0 && data.len() == c.tokens.len() * vocab,
                "sequence {}: the engine returned logits of shape {:?} for {} tokens",
                c.seq,
                logits.shape,
                c.tokens.len()
            );
            out.push(data[c.logits_from * vocab..].chunks(vocab).map(<[f32]>::to_vec).collect());
        }
        Ok(out)
    }

    fn release(&mut self, seq: SeqId) {
        if let Some((mut engine, _)) = self.live.remove(&seq) {
            // Engines that cannot be reset are dropped now, freeing their cache.
            if self.lazy_reset || engine.reset() {
                self.released.push(engine);
            }
        }
    }
}

/// The interpreter's paged session runs a whole step in one call: the
/// step's rows go in flattened, each chunk's wanted rows come out.
impl BatchEngine for panguc_ir::session::BatchInterpSession<'_> {
    fn step(&mut self, chunks: &[StepChunk<'_>], meta: &StepMetadata) -> Result<Vec<ChunkLogits>> {
        let ids: Vec<i64> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let logits = panguc_ir::session::BatchInterpSession::step(self, &ids, meta)?;
        let vocab = *logits.shape.last().unwrap_or(&0);
        split_step_logits(logits.as_f32(), vocab, chunks, meta)
    }

    /// The cache is paged: a released sequence's blocks are simply reused
    /// by the scheduler, nothing to do here.
    fn release(&mut self, _seq: SeqId) {}
}

/// A batched step's logits (`vocab` per row, the step's rows in order)
/// split into each chunk's wanted rows (from its `logits_from`).
pub fn split_step_logits(
    logits: &[f32],
    vocab: usize,
    chunks: &[StepChunk<'_>],
    meta: &StepMetadata,
) -> Result<Vec<ChunkLogits>> {
    ensure!(vocab > 0 && logits.len() == meta.tokens() * vocab, "{} logits for {} rows", logits.len(), meta.tokens());
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    Ok(chunks
        .iter()
        .enumerate()
        .map(|(s, c)| rows[meta.rows(s)][c.logits_from..].iter().map(|r| r.to_vec()).collect())
        .collect())
}

/// Prefill every prompt and decode up to `max_new` tokens per sequence
/// (stopping early at `eos` when given), all prompts through one scheduler
/// with one engine per sequence; every sequence samples with its own
/// sampler seeded like a single-sequence `generate`.
pub fn generate_batch(
    engines: &mut [&mut dyn Engine],
    prompts: &[Vec<i64>],
    max_new: usize,
    sampling: &Sampling,
    eos: Option<i64>,
) -> Result<Vec<Generation>> {
    if engines.len() != prompts.len() {
        bail!("{} engines for {} prompts: give one engine per sequence", engines.len(), prompts.len());
    }
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            max_new_tokens: max_new,
            sampling: sampling.clone(),
            stop_tokens: eos.into_iter().collect(),
        })
        .collect();
    let boxed: Vec<Box<dyn Engine + '_>> =
        engines.iter_mut().map(|e| Box::new(&mut **e) as Box<dyn Engine + '_>).collect();
    let mut engine = PerSequenceEngines::from_engines(boxed);
    let cfg = SchedulerConfig::fitting(&requests);
    Scheduler::run_all(cfg, requests, &mut engine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::generate;
    use panguc_ir::Tensor;

    /// Logits peak at (sum of all tokens seen so far) mod 5.
    struct Sum(i64);
    impl Engine for Sum {
        fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
            let mut out = vec![];
            for t in tokens {
                self.0 += t;
                let mut row = vec![0.0; 5];
                row[(self.0 % 5) as usize] = 1.0;
                out.extend(row);
            }
            Ok(Tensor::f32(vec![tokens.len(), 5], out))
        }
    }

    #[test]
    fn batch_matches_one_sequence_at_a_time() {
        let prompts = vec![vec![1, 2], vec![4], vec![3, 3, 3]];
        let s = Sampling { temperature: 0.8, top_k: 3, top_p: 0.9, seed: 5 };
        let (mut a, mut b, mut c) = (Sum(0), Sum(0), Sum(0));
        let mut engines: Vec<&mut dyn Engine> = vec![&mut a, &mut b, &mut c];
        let batch = generate_batch(&mut engines, &prompts, 4, &s, None).unwrap();
        for (p, g) in prompts.iter().zip(&batch) {
            let single = generate(&mut Sum(0), p, 4, &s, None).unwrap();
            assert_eq!(g.generated, single.generated);
            assert_eq!(g.prompt_logits, single.prompt_logits);
        }
        let mut one = Sum(0);
        let mut engines: Vec<&mut dyn Engine> = vec![&mut one];
        assert!(generate_batch(&mut engines, &prompts, 1, &s, None).is_err(), "engine/prompt count mismatch");
    }

    /// `Sum` that can be reset, counting its resets.
    struct ResettableSum(Sum, std::rc::Rc<std::cell::Cell<usize>>);
    impl Engine for ResettableSum {
        fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
            self.0.forward(tokens)
        }
        fn reset(&mut self) -> bool {
            self.0 .0 = 0;
            self.1.set(self.1.get() + 1);
            true
        }
    }

    #[test]
    fn engines_are_reused_after_release_and_preemption() {
        let resets = std::rc::Rc::new(std::cell::Cell::new(0));
        let r = resets.clone();
        let mut batch = PerSequenceEngines::new(Box::new(move || Ok(Box::new(ResettableSum(Sum(0), r.clone())))));
        // 3 blocks of 2 tokens: sequences needing 3, 2 and 3 blocks cannot
        // run together, so some are preempted and recomputed.
        let prompts = [vec![1, 2], vec![4], vec![3, 3, 3]];
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                max_new_tokens: 4,
                sampling: Sampling::default(),
                stop_tokens: vec![],
            })
            .collect();
        let cfg = SchedulerConfig { block_size: 2, num_blocks: 3, max_seqs: 2, max_batch_tokens: 4 };
        let mut s = Scheduler::new(cfg).unwrap();
        let ids: Vec<SeqId> = requests.iter().map(|r| s.add(r.clone()).unwrap()).collect();
        s.run(&mut batch).unwrap();
        assert!(s.stats().preemptions > 0, "{:?}", s.stats());
        assert_eq!(batch.created(), 2, "max_seqs engines, reused after reset");
        assert!(resets.get() >= 2);
        for (p, id) in prompts.iter().zip(ids) {
            let want = generate(&mut Sum(0), p, 4, &Sampling::default(), None).unwrap();
            assert_eq!(s.take(id).unwrap().generated, want.generated);
        }
    }

    #[test]
    fn a_chunk_out_of_step_with_its_engine_is_an_error() {
        let mut batch = PerSequenceEngines::new(Box::new(|| Ok(Box::new(Sum(0)))));
        let meta =
            StepMetadata::build(4, &[panguc_ir::batch::SeqChunk { past: 2, new_tokens: 1, blocks: &[0] }]).unwrap();
        let c = StepChunk { seq: 0, tokens: &[1], past: 2, logits_from: 0 };
        let e = batch.step(&[c], &meta).unwrap_err().to_string();
        assert!(e.contains("starts at position 2"), "{e}");
        let c = StepChunk { seq: 0, tokens: &[1, 2], past: 0, logits_from: 1 };
        let meta =
            StepMetadata::build(4, &[panguc_ir::batch::SeqChunk { past: 0, new_tokens: 2, blocks: &[0] }]).unwrap();
        let rows = batch.step(&[c], &meta).unwrap();
        assert_eq!(rows[0].len(), 1, "only the rows from logits_from");
        let c = StepChunk { seq: 0, tokens: &[1], past: 1, logits_from: 0 };
        assert!(batch.step(&[c], &meta).unwrap_err().to_string().contains("holds 2 tokens"));
    }
}

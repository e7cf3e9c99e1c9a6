//! The one-sequence engine interface, sampling, and `generate` (the
//! batch-of-one case of the scheduler, the generation path of every engine).

use anyhow::{bail, Result};
use panguc_ir::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Something that runs the model on one sequence, keeping its KV cache.
pub trait Engine {
    /// Process `tokens` at the next positions; returns logits `[n, vocab]`.
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor>;

    /// Empty the KV cache so the engine can serve another sequence from
    /// position 0; false when this engine cannot (it is then dropped and a
    /// fresh one made).
    fn reset(&mut self) -> bool {
        false
    }
}

impl<E: Engine + ?Sized> Engine for &mut E {
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        (**self).forward(tokens)
    }

    fn reset(&mut self) -> bool {
        (**self).reset()
    }
}

impl Engine for panguc_ir::session::InterpSession<'_> {
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        panguc_ir::session::InterpSession::forward(self, tokens)
    }
}

/// How the next token is picked from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax, lowest index on ties).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = no limit).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Argmax with the lowest index winning ties.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Picks tokens according to a [`Sampling`] configuration.
pub struct Sampler {
    cfg: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Sampler { cfg, rng }
    }

    pub fn pick(&mut self, logits: &[f32]) -> usize {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Stable sort keeps the lowest index first among equal logits.
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.cfg.top_k > 0 {
            order.truncate(self.cfg.top_k);
        }
        let m = logits[order[0]];
        let mut probs: Vec<f32> = order.iter().map(|&i| ((logits[i] - m) / self.cfg.temperature).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= self.cfg.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        let kept: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * kept;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return order[i];
            }
            r -= p;
        }
        order[keep - 1]
    }
}

/// Result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Logits for every prompt position, `[prompt_len][vocab]`.
    pub prompt_logits: Vec<Vec<f32>>,
    pub generated: Vec<i64>,
}

/// Prefill `prompt` on a fresh `engine`, then decode up to `max_new`
/// tokens (stopping early at `eos` when given): the scheduler with one
/// sequence.
pub fn generate(
    engine: &mut dyn Engine,
    prompt: &[i64],
    max_new: usize,
    sampling: &Sampling,
    eos: Option<i64>,
) -> Result<Generation> {
    generate_streaming(engine, prompt, max_new, sampling, eos, &mut |_| Ok(()))
}

/// [`generate`], handing each token to `on_token` as soon as it is picked
/// (before the next decode step), so callers can stream it.
pub fn generate_streaming(
    engine: &mut dyn Engine,
    prompt: &[i64],
    max_new: usize,
    sampling: &Sampling,
    eos: Option<i64>,
    on_token: &mut dyn FnMut(i64) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    use crate::batch::PerSequenceEngines;
    use crate::scheduler::{Request, Scheduler, SchedulerConfig};
    sampling.validate()?;
    let request = Request {
        prompt: prompt.to_vec(),
        max_new_tokens: max_new,
        sampling: sampling.clone(),
        stop_tokens: eos.into_iter().collect(),
    };
    let mut scheduler = Scheduler::new(SchedulerConfig::fitting(std::slice::from_ref(&request)))?;
    let id = scheduler.add(request)?;
    let mut engines = PerSequenceEngines::from_engines(vec![Box::new(engine) as Box<dyn Engine + '_>]);
    // Hand each token on as soon as the step that picked it is done.
    let mut streamed = 0;
    while scheduler.has_work() {
        scheduler.step(&mut engines)?;
        let generated = scheduler.generated(id);
        for &t in &generated[streamed..] {
            on_token(t)?;
        }
        streamed = generated.len();
    }
    scheduler.take(id).ok_or_else(|| anyhow::anyhow!("the sequence did not finish"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[0.0]), 0);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits = vec![0.0, 5.0, 4.9, -3.0, 1.0];
        let cfg = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 7 };
        let a: Vec<usize> = {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.pick(&logits)).collect()
        };
        let b: Vec<usize> = {
            let mut s = Sampler::new(cfg);
            (0..50).map(|_| s.pick(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        assert!(a.iter().all(|t| *t == 1 || *t == 2), "top-k 2 keeps only tokens 1 and 2: {a:?}");
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = vec![10.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(Sampling { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 1 });
        assert!((0..20).all(|_| s.pick(&logits) == 0));
    }

    struct Counter(usize);
    impl Engine for Counter {
        fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
            // Logits peak at (last token + 1) mod 4: a deterministic chain.
            let mut out = vec![];
            for t in tokens {
                let mut row = vec![0.0; 4];
                row[((*t + 1) % 4) as usize] = 1.0;
                out.extend(row);
            }
            self.0 += 1;
            Ok(Tensor::f32(vec![tokens.len(), 4], out))
        }
    }

    #[test]
    fn generate_prefills_then_decodes() {
        let mut e = Counter(0);
        let g = generate(&mut e, &[0, 1], 3, &Sampling::default(), None).unwrap();
        assert_eq!(g.generated, vec![2, 3, 0]);
        assert_eq!(g.prompt_logits.len(), 2);
        assert_eq!(e.0, 3, "one prefill + two decode calls");
        assert!(generate(&mut e, &[], 3, &Sampling::default(), None).is_err());
        let g = generate(&mut Counter(0), &[0], 5, &Sampling::default(), Some(2)).unwrap();
        assert_eq!(g.generated, vec![1, 2], "stops at eos");
    }

    #[test]
    fn streaming_hands_over_each_token_before_the_next_step() {
        let mut e = Counter(0);
        let mut seen = vec![];
        let g = generate_streaming(&mut e, &[0], 3, &Sampling::default(), None, &mut |t| {
            seen.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, g.generated);
        let mut stop = |_| anyhow::bail!("reader went away");
        let err = generate_streaming(&mut Counter(0), &[0], 3, &Sampling::default(), None, &mut stop).unwrap_err();
        assert!(err.to_string().contains("went away"));
    }
}

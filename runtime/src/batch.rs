//! Generation for a batch of sequences.
//!
//! The IR entry function processes one sequence (with its own `past`), so a
//! batch is one engine per sequence. This loop prefills every prompt, then
//! decodes one token per unfinished sequence per step, sequences in turn;
//! each engine's launches use all of the shared pool's threads. Every
//! sequence samples with its own sampler seeded like a single-sequence
//! `generate`, so a sequence's tokens do not depend on the rest of the batch.

use crate::generate::{Engine, Generation, Sampler, Sampling};
use anyhow::{bail, Context, Result};

/// Prefill every prompt, then decode up to `max_new` tokens per sequence
/// (a sequence stops early at `eos` when given).
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
    sampling.validate()?;
    let mut samplers: Vec<Sampler> = prompts.iter().map(|_| Sampler::new(sampling.clone())).collect();
    let mut out = Vec::with_capacity(prompts.len());
    let mut last = Vec::with_capacity(prompts.len());
    for (i, (e, p)) in engines.iter_mut().zip(prompts).enumerate() {
        if p.is_empty() {
            bail!("prompt {i} is empty: give at least one token");
        }
        let logits = e.forward(p).with_context(|| format!("prefill of sequence {i}"))?;
        let vocab = *logits.shape.last().unwrap_or(&1);
        let rows: Vec<Vec<f32>> = logits.as_f32().chunks(vocab.max(1)).map(<[f32]>::to_vec).collect();
        last.push(rows.last().cloned().unwrap_or_default());
        out.push(Generation { prompt_logits: rows, generated: vec![] });
    }
    let mut done = vec![max_new == 0; prompts.len()];
    for step in 0..max_new {
        for i in 0..prompts.len() {
            if done[i] {
                continue;
            }
            let next = samplers[i].pick(&last[i]) as i64;
            out[i].generated.push(next);
            if Some(next) == eos || step + 1 == max_new {
                done[i] = true;
                continue;
            }
            let l = engines[i].forward(&[next]).with_context(|| format!("decode step {step} of sequence {i}"))?;
            last[i] = l.as_f32().to_vec();
        }
    }
    Ok(out)
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
}

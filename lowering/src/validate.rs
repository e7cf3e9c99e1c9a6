//! Translation validation: run the reference interpreter on the unfused
//! and the fused module with the same random inputs and compare every
//! output.

use anyhow::{anyhow, bail, ensure, Context, Result};
use panguc_ir::interp::Interpreter;
use panguc_ir::shape::{bindings, Bindings};
use panguc_ir::{DType, Module, Op, Tensor, TensorData, WeightSource};
use serde::Serialize;
use std::collections::HashMap;

/// SplitMix64: tiny, fast, and stable across dependency upgrades, so a
/// seed means the same inputs forever.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Relative tolerance for outputs of dtype `d`. The interpreter computes in
/// f32 on both sides; fusion only reorders f32 additions (dot products
/// split or merged, softmax computed online, sums of experts over selected
/// slots instead of all slots). Reassociating K additions perturbs a result
/// by about sqrt(K) * 2^-24 of its magnitude: ~5e-6 for K = 5120, a few
/// times that after several layers and a softmax. 1e-4 leaves a ten-fold
/// margin over that noise, while a wrong fusion (a swapped operand, a
/// missing bias, another expert) changes outputs by O(1). 16-bit paths get
/// the precision of bf16 (2^-8) with the same margin; integers must match.
pub fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 2e-2,
        _ => 0.0,
    }
}

/// Largest absolute difference relative to the reference's largest
/// magnitude (elementwise relative error is meaningless near zero).
pub fn relative_error(reference: &Tensor, got: &Tensor) -> f64 {
    match (&reference.data, &got.data) {
        (TensorData::F32(a), TensorData::F32(b)) => {
            let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
            let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
                let d = (*x as f64 - *y as f64).abs();
                if d.is_nan() || x.is_nan() != y.is_nan() {
                    f64::INFINITY
                } else {
                    m.max(d)
                }
            });
            diff / scale
        }
        (TensorData::I64(a), TensorData::I64(b)) => f64::from(u8::from(a != b)),
        _ => f64::INFINITY,
    }
}

/// One compared output.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub phase: String,
    pub output: String,
    pub relative_error: f64,
    pub tolerance: f64,
}

/// Every comparison made.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub weights: String,
    pub prefill_tokens: usize,
    pub decode_past: usize,
    pub checks: Vec<Check>,
    pub max_relative_error: f64,
}

/// Run both modules' entry functions on `inputs` and compare the outputs.
/// Fails naming the first output that differs beyond its tolerance.
pub fn compare_once(
    reference: &Module,
    candidate: &Module,
    weights: &dyn WeightSource,
    inputs: &[Tensor],
    phase: &str,
) -> Result<(Vec<Tensor>, Vec<Tensor>, Vec<Check>)> {
    let want = Interpreter::new(reference, weights).run_entry(inputs).context("running the unfused module")?;
    let got = Interpreter::new(candidate, weights).run_entry(inputs).context("running the fused module")?;
    let checks = compare_outputs(reference, &want, &got, phase)?;
    Ok((want, got, checks))
}

/// Compare the outputs of the entry function of `m`, in order; fails
/// naming the first one beyond its dtype's tolerance.
pub fn compare_outputs(m: &Module, want: &[Tensor], got: &[Tensor], phase: &str) -> Result<Vec<Check>> {
    let f = m.entry_fn();
    ensure!(
        want.len() == got.len(),
        "{phase}: the fused module returns {} outputs, the unfused {}",
        got.len(),
        want.len()
    );
    let mut checks = vec![];
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let name = f.name_of(f.outputs[i]).to_string();
        ensure!(a.shape == b.shape, "{phase}: output `{name}` has shape {:?} fused, {:?} unfused", b.shape, a.shape);
        let tol = tolerance(f.ty(f.outputs[i]).dtype);
        let err = relative_error(a, b);
        if err.is_nan() || err > tol {
            bail!(
                "translation validation failed: {phase}: output `{name}` differs by {err:.3e} relative to its largest magnitude (tolerance {tol:.0e})"
            );
        }
        checks.push(Check { phase: phase.into(), output: name, relative_error: err, tolerance: tol });
    }
    Ok(checks)
}

/// Random values for every input of the entry function at `b`: floats
/// uniform in [-1, 1), rank-1 integer inputs as positions `past..`.
pub fn random_inputs(m: &Module, b: &Bindings, rng: &mut Rng) -> Result<Vec<Tensor>> {
    let f = m.entry_fn();
    let past = b.get(panguc_ir::shape::SYM_PAST).copied().unwrap_or(0) as i64;
    f.input_params()
        .map(|p| {
            let ty = f.ty(p.value);
            let shape = ty.concrete_shape(b).map_err(|e| anyhow!("input %{}: {e}", f.name_of(p.value)))?;
            let n: usize = shape.iter().product();
            Ok(if ty.dtype.is_float() {
                Tensor::f32(shape, (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect())
            } else {
                Tensor::i64(shape, (0..n as i64).map(|i| past + i).collect())
            })
        })
        .collect()
}

/// Every checkpoint tensor the module reads, with its shape: the entry's
/// weights and, for each call, the callee's weights under the call prefix.
pub fn weight_specs(m: &Module) -> Vec<(String, Vec<usize>)> {
    fn walk(m: &Module, fname: &str, prefix: &str, out: &mut Vec<(String, Vec<usize>)>) {
        let Some(f) = m.function(fname) else { return };
        for (p, tensor) in f.weight_params() {
            let shape = f.ty(p.value).static_shape().unwrap_or_default();
            out.push((format!("{prefix}{tensor}"), shape));
        }
        for n in &f.nodes {
            if let Op::Call { func, weight_prefix } = &n.op {
                walk(m, func, &format!("{prefix}{weight_prefix}"), out);
            }
        }
    }
    let mut out = vec![];
    walk(m, &m.entry, "", &mut out);
    out.sort();
    out.dedup();
    out
}

/// Random weights for a module whose checkpoint has none. Matrices are
/// scaled by 1/sqrt(fan-in) so activations stay O(1) through the layers;
/// norm weights and the router scale sit around 1, other vectors near 0.
pub fn random_weights(m: &Module, seed: u64, max_params: u64) -> Result<HashMap<String, Tensor>> {
    let specs = weight_specs(m);
    let total: u64 = specs.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    if total > max_params {
        bail!(
            "validation needs weights: the checkpoint has none and {total} random parameters exceed the limit of {max_params}; validate with a checkpoint that has weights, or a smaller config"
        );
    }
    let mut rng = Rng::new(seed);
    Ok(specs
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() >= 2 && !name.ends_with("router_scale") {
                let s = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
                (0..n).map(|_| rng.uniform(-s, s)).collect()
            } else if name.contains("norm") || name.ends_with("router_scale") {
                (0..n).map(|_| rng.uniform(0.5, 1.5)).collect()
            } else {
                (0..n).map(|_| rng.uniform(-0.1, 0.1)).collect()
            };
            (name, Tensor::f32(shape, data))
        })
        .collect())
}

/// Validate `candidate` against `reference` following the entry contract
/// of `panguc_ir::session` (inputs ids, positions, caches; outputs logits,
/// caches): a prefill of `prefill` random tokens from empty caches, then
/// one decode step with `past = prefill`, each module fed its own caches.
/// A batched module (its entry takes `slot_mapping`, see
/// `panguc_ir::session::BatchInterpSession`) is validated on ragged steps
/// instead ([`validate_batched`]).
pub fn validate_session(
    reference: &Module,
    candidate: &Module,
    weights: &dyn WeightSource,
    weights_kind: &str,
    prefill: usize,
    seed: u64,
) -> Result<ValidationReport> {
    if is_batched(reference) {
        return validate_batched(reference, candidate, weights, weights_kind, prefill, seed);
    }
    let f = reference.entry_fn();
    let inputs: Vec<_> = f.input_params().collect();
    ensure!(inputs.len() >= 2, "the entry function does not take (ids, positions, caches...)");
    let vocab = vocab_of(reference).ok_or_else(|| anyhow!("cannot find the embedding table of the entry function"))?;
    let mut rng = Rng::new(seed);
    let mut run = |past: usize, tokens: usize, caches: (Vec<Tensor>, Vec<Tensor>), phase: &str| {
        let ids = Tensor::i64(vec![tokens], (0..tokens).map(|_| rng.below(vocab as u64) as i64).collect());
        let pos = Tensor::i64(vec![tokens], (past..past + tokens).map(|p| p as i64).collect());
        let (ref_caches, cand_caches) = caches;
        let mut a = vec![ids.clone(), pos.clone()];
        a.extend(ref_caches);
        let want = Interpreter::new(reference, weights).run_entry(&a).context("running the unfused module")?;
        let mut b_in = vec![ids, pos];
        b_in.extend(cand_caches);
        let got = Interpreter::new(candidate, weights).run_entry(&b_in).context("running the fused module")?;
        let checks = compare_outputs(reference, &want, &got, phase)?;
        Ok::<_, anyhow::Error>((want[1..].to_vec(), got[1..].to_vec(), checks))
    };
    let empty: Vec<Tensor> = inputs[2..]
        .iter()
        .map(|p| {
            let shape = f.ty(p.value).concrete_shape(&bindings(0, 0)).map_err(|e| anyhow!(e))?;
            Ok(Tensor::zeros(shape))
        })
        .collect::<Result<_>>()?;
    let (rc, cc, mut checks) = run(0, prefill, (empty.clone(), empty), "prefill")?;
    let (_, _, decode_checks) = run(prefill, 1, (rc, cc), "decode")?;
    checks.extend(decode_checks);
    let max_relative_error = checks.iter().map(|c| c.relative_error).fold(0.0, f64::max);
    Ok(ValidationReport {
        weights: weights_kind.into(),
        prefill_tokens: prefill,
        decode_past: prefill,
        checks,
        max_relative_error,
    })
}

/// The entry function follows the batched (paged KV cache) contract.
pub fn is_batched(m: &Module) -> bool {
    let f = m.entry_fn();
    f.input_params().any(|p| f.name_of(p.value) == "slot_mapping")
}

/// Validate a batched module: two ragged steps over paged caches, each
/// module fed its own caches. Step 1 is a prefill of two sequences of
/// different lengths (`prefill` and `prefill - 1` tokens, or 1) in one
/// batch; step 2 is one decode row of each, in the other order. The blocks
/// are handed out interleaved and out of order, so a fusion that confused
/// slots, sequences or rows would show. Compares logits and every cache.
pub fn validate_batched(
    reference: &Module,
    candidate: &Module,
    weights: &dyn WeightSource,
    weights_kind: &str,
    prefill: usize,
    seed: u64,
) -> Result<ValidationReport> {
    use panguc_ir::batch::{SeqChunk, StepMetadata};
    const STEP_INPUTS: usize = 5;
    let f = reference.entry_fn();
    let inputs: Vec<_> = f.input_params().collect();
    ensure!(inputs.len() > 1 + STEP_INPUTS, "the batched entry function does not take (ids, step metadata, caches...)");
    let cache_ty = f.ty(inputs[1 + STEP_INPUTS].value);
    let block_size = cache_ty
        .shape
        .get(1)
        .and_then(|d| d.as_const())
        .ok_or_else(|| anyhow!("the first paged cache input has no constant block size: {cache_ty}"))?;
    let vocab = vocab_of(reference).ok_or_else(|| anyhow!("cannot find the embedding table of the entry function"))?;
    let prompts = [prefill.max(1), prefill.saturating_sub(1).max(1)];
    let per_seq: Vec<usize> = prompts.iter().map(|p| (p + 1).div_ceil(block_size)).collect();
    let num_blocks = per_seq.iter().sum::<usize>() + 1;
    // Dealt round-robin from the highest block down, so neither sequence's
    // blocks are contiguous or in cache order.
    let mut blocks: Vec<Vec<u32>> = vec![vec![]; per_seq.len()];
    let mut next = (0..num_blocks as u32).rev();
    while blocks.iter().zip(&per_seq).any(|(b, n)| b.len() < *n) {
        for (b, n) in blocks.iter_mut().zip(&per_seq) {
            if b.len() < *n {
                b.push(next.next().expect("num_blocks covers every sequence"));
            }
        }
    }
    let mut b = bindings(0, 0);
    b.insert(panguc_ir::shape::SYM_NUM_BLOCKS.to_string(), num_blocks);
    let empty: Vec<Tensor> = inputs[1 + STEP_INPUTS..]
        .iter()
        .map(|p| {
            let shape = f.ty(p.value).concrete_shape(&b).map_err(|e| anyhow!("input %{}: {e}", f.name_of(p.value)))?;
            Ok(Tensor::zeros(shape))
        })
        .collect::<Result<_>>()?;
    let mut rng = Rng::new(seed);
    let mut run = |chunks: &[SeqChunk], caches: (Vec<Tensor>, Vec<Tensor>), phase: &str| {
        let meta = StepMetadata::build(block_size, chunks)?;
        meta.validate(num_blocks)?;
        let t = meta.tokens();
        let ids = Tensor::i64(vec![t], (0..t).map(|_| rng.below(vocab as u64) as i64).collect());
        let mut a = vec![ids];
        a.extend(meta.tensors());
        let mut b_in = a.clone();
        a.extend(caches.0);
        b_in.extend(caches.1);
        let want = Interpreter::new(reference, weights).run_entry(&a).context("running the unfused module")?;
        let got = Interpreter::new(candidate, weights).run_entry(&b_in).context("running the fused module")?;
        let checks = compare_outputs(reference, &want, &got, phase)?;
        Ok::<_, anyhow::Error>((want[1..].to_vec(), got[1..].to_vec(), checks))
    };
    let step1: Vec<SeqChunk> =
        (0..2).map(|s| SeqChunk { past: 0, new_tokens: prompts[s], blocks: &blocks[s] }).collect();
    let (rc, cc, mut checks) = run(&step1, (empty.clone(), empty), "ragged prefill")?;
    let step2: Vec<SeqChunk> =
        (0..2).rev().map(|s| SeqChunk { past: prompts[s], new_tokens: 1, blocks: &blocks[s] }).collect();
    let (_, _, decode_checks) = run(&step2, (rc, cc), "ragged decode")?;
    checks.extend(decode_checks);
    let max_relative_error = checks.iter().map(|c| c.relative_error).fold(0.0, f64::max);
    Ok(ValidationReport {
        weights: weights_kind.into(),
        prefill_tokens: prompts[0],
        decode_past: prompts[0],
        checks,
        max_relative_error,
    })
}

/// Rows of the table the entry function gathers token ids from.
fn vocab_of(m: &Module) -> Option<usize> {
    let f = m.entry_fn();
    let ids = f.input_params().next()?.value;
    f.nodes
        .iter()
        .find(|n| matches!(n.op, Op::Gather) && n.args.get(1) == Some(&ids))
        .and_then(|n| f.ty(n.args[0]).shape.first()?.as_const())
}

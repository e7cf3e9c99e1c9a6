//! Batched measurements of `panguc bench`: a compiled batched package
//! driven step by step (no scheduler, no sampling), and the bytes and
//! FLOPs one step must move and compute, for its roofline.
//!
//! Decode at batch B and context C times steps where each of B sequences
//! decodes one token after C cached tokens. Its cache contents do not
//! matter for the time (attention reads the same bytes whatever they
//! hold), so the contexts are not prefilled: each sequence simply owns
//! enough blocks and the step metadata says C tokens are cached. The
//! cache's pages are written once first (`CpuEngine::commit_kv_cache`):
//! pages never written all read as one shared zero page, which is not the
//! memory a filled cache is read from.

use anyhow::Result;
use panguc_ir::batch::{SeqChunk, StepMetadata};
use panguc_ir::kernel::{BufferKind, Epilogue, KernelKind, KernelProgram};
use panguc_ir::shape::Bindings;
use panguc_runtime::engine::KernelTime;
use panguc_runtime::{BatchEngine, CpuEngine, Package, StepChunk};
use std::sync::Arc;
use std::time::Instant;

/// Sequences with their own blocks of one paged cache, stepped directly.
pub struct StepDriver {
    engine: CpuEngine,
    block_size: usize,
    /// Per sequence: tokens cached, blocks owned.
    seqs: Vec<(usize, Vec<u32>)>,
}

impl StepDriver {
    /// `batch` sequences that each reach at most `max_context` tokens.
    pub fn new(pkg: Arc<Package>, threads: usize, batch: usize, max_context: usize) -> Result<StepDriver> {
        let block_size = CpuEngine::block_size_of(&pkg)
            .ok_or_else(|| anyhow::anyhow!("the bench package's kernel program is not batched"))?;
        let per_seq = max_context.div_ceil(block_size);
        let mut engine = CpuEngine::batched(pkg, panguc_runtime::thread_pool(threads)?, batch * per_seq)?;
        engine.commit_kv_cache();
        // Sequence s owns blocks s*per_seq.. (any disjoint choice costs the same).
        let seqs = (0..batch).map(|s| (0, (0..per_seq).map(|b| (s * per_seq + b) as u32).collect())).collect();
        Ok(StepDriver { engine, block_size, seqs })
    }

    pub fn engine(&mut self) -> &mut CpuEngine {
        &mut self.engine
    }

    /// Pretend every sequence already holds `tokens` cached tokens.
    pub fn set_context(&mut self, tokens: usize) {
        for s in &mut self.seqs {
            s.0 = tokens;
        }
    }

    /// One step: `new[s]` are sequence s's new tokens (every sequence must
    /// have some). Returns the step's metadata.
    pub fn step(&mut self, new: &[Vec<i64>]) -> Result<StepMetadata> {
        let chunks: Vec<SeqChunk> = self
            .seqs
            .iter()
            .zip(new)
            .map(|((past, blocks), t)| SeqChunk { past: *past, new_tokens: t.len(), blocks })
            .collect();
        let meta = StepMetadata::build(self.block_size, &chunks)?;
        let step: Vec<StepChunk> = self
            .seqs
            .iter()
            .zip(new)
            .enumerate()
            // Only the last row's logits are wanted, as in generation.
            .map(|(s, ((past, _), t))| StepChunk { seq: s, tokens: t, past: *past, logits_from: t.len() - 1 })
            .collect();
        self.engine.step(&step, &meta)?;
        for (s, t) in self.seqs.iter_mut().zip(new) {
            s.0 += t.len();
        }
        Ok(meta)
    }
}

/// One decode measurement: seconds per step, the metadata of the middle
/// step, and (when asked for) where the steps' time went per kernel.
pub struct DecodeTiming {
    pub seconds: f64,
    pub meta: StepMetadata,
    pub kernels: Option<Vec<KernelTime>>,
}

/// Seconds per decode step of `batch` sequences at context `context`
/// (mean over `steps` after one untimed step), and the metadata of the
/// middle step; with `profile`, every launch is timed too (one clock read
/// before and after each of the step's ~100 launches).
pub fn decode_step_seconds(
    pkg: &Arc<Package>,
    threads: usize,
    batch: usize,
    context: usize,
    steps: usize,
    profile: bool,
) -> Result<DecodeTiming> {
    let mut d = StepDriver::new(pkg.clone(), threads, batch, context + steps + 1)?;
    d.set_context(context);
    let token = |s: usize, i: usize| vec![((s * 31 + i * 13) % 1000 + 3) as i64];
    // One untimed step faults in the decode path's pages.
    d.step(&(0..batch).map(|s| token(s, 0)).collect::<Vec<_>>())?;
    if profile {
        d.engine().enable_profiling();
    }
    let mut mid = None;
    let t0 = Instant::now();
    for i in 0..steps {
        let meta = d.step(&(0..batch).map(|s| token(s, i + 1)).collect::<Vec<_>>())?;
        if i == steps / 2 {
            mid = Some(meta);
        }
    }
    let seconds = t0.elapsed().as_secs_f64() / steps.max(1) as f64;
    Ok(DecodeTiming { seconds, meta: mid.expect("at least one step"), kernels: d.engine().kernel_profile() })
}

/// Lines of a per-kernel breakdown of `steps` profiled steps of
/// `step_seconds` each: milliseconds per step and share of the step per
/// kernel, busiest first, and what the launches leave out (binding,
/// inputs, logits).
pub fn profile_lines(kernels: &[KernelTime], steps: usize, step_seconds: f64) -> Vec<String> {
    let per_step = |t: std::time::Duration| t.as_secs_f64() / steps.max(1) as f64;
    let mut rows: Vec<&KernelTime> = kernels.iter().filter(|k| k.launches > 0).collect();
    rows.sort_by_key(|k| std::cmp::Reverse(k.time));
    let mut out = vec![];
    let mut total = 0.0;
    for k in rows {
        let s = per_step(k.time);
        total += s;
        out.push(format!(
            "    {:<40} {:>3} launches/step {:>8.3} ms/step {:>5.1}%",
            k.name,
            k.launches / steps.max(1) as u64,
            s * 1e3,
            100.0 * s / step_seconds
        ));
    }
    out.push(format!(
        "    {:<40} {:>8.3} ms/step {:>5.1}% (outside the launches)",
        "(rest of the step)",
        (step_seconds - total) * 1e3,
        100.0 * (step_seconds - total) / step_seconds
    ));
    out
}

/// The shape symbols of a step of a batched program.
pub fn step_bindings(meta: &StepMetadata, num_blocks: usize) -> Bindings {
    meta.bindings(num_blocks)
}

/// Bytes one step must read from memory, split into the weights and the
/// KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepBytes {
    pub weights: u64,
    pub kv: u64,
}

impl StepBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.kv
    }
}

/// Bytes one step must read from memory: every weight once, as stored
/// (int8 weights at one byte, their scales at theirs; the embedding rows
/// of the step's tokens; of the routed experts, the share a step's rows are
/// expected to select when every row picks one expert per group
/// uniformly, `groups` groups), and each sequence's cached K and V in the
/// cache's dtype.
pub fn step_bytes(p: &KernelProgram, meta: &StepMetadata, groups: usize) -> u64 {
    step_bytes_split(p, meta, groups).total()
}

/// [`step_bytes`], weights and KV cache apart.
pub fn step_bytes_split(p: &KernelProgram, meta: &StepMetadata, groups: usize) -> StepBytes {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = StepBytes::default();
    for l in &p.launches {
        let k = &p.kernels[l.kernel];
        for (i, a) in l.args.iter().enumerate() {
            let (root, _) = p.root_of(*a);
            if !seen.insert(root) {
                continue;
            }
            let buf = p.buffer(root);
            match &buf.kind {
                BufferKind::Weight { index } => {
                    let w = &p.weights[*index];
                    let bytes = w.stored_bytes() as u64;
                    let routed = match (&k.kind, i) {
                        (KernelKind::MoeGateUp | KernelKind::MoeDown, 3) | (KernelKind::MoeGroupedGateUp, 2) => true,
                        // The int8 expert kernels' weights and per-channel
                        // scales, `[E, ..]` (their per-expert `[E]` input
                        // scales are counted whole: a few bytes).
                        (kind, _) => int8_routed(kind) && w.shape.len() >= 2,
                    };
                    total.weights += match (&k.kind, i) {
                        _ if routed => {
                            let experts = w.shape[0];
                            let per_group = (experts / groups.max(1)).max(1) as f64;
                            let untouched = (1.0 - 1.0 / per_group).powi(meta.tokens() as i32);
                            (bytes as f64 * (1.0 - untouched)) as u64
                        }
                        (KernelKind::Gather, 0) => {
                            let row: usize = w.shape[1..].iter().product();
                            (meta.tokens() * row * w.dtype.size_bytes()) as u64
                        }
                        _ => bytes,
                    }
                }
                BufferKind::KvCache { .. } => {
                    // One cache of one layer: [num_blocks, block_size, row..].
                    let row: usize = buf.shape[2..].iter().filter_map(|d| d.as_const()).product();
                    let cached: usize = meta.context_lens.iter().map(|&c| c as usize).sum();
                    total.kv += (cached * row * buf.dtype.size_bytes()) as u64;
                }
                _ => {}
            }
        }
    }
    total
}

/// Floating-point operations of one step: the GEMMs (the routed experts
/// at the rows they receive) and paged attention (q.k and p.v over each
/// row's visible keys).
pub fn step_flops(p: &KernelProgram, meta: &StepMetadata, num_blocks: usize) -> f64 {
    let b = step_bindings(meta, num_blocks);
    // Keys visible to all rows together: row i of a sequence with q new
    // tokens and context c sees c - q + i + 1 keys.
    let visible: usize = (0..meta.seqs())
        .map(|s| {
            let (q, c) = (meta.rows(s).len(), meta.context_lens[s] as usize);
            (0..q).map(|i| c - q + i + 1).sum::<usize>()
        })
        .sum();
    let mut flops = 0.0;
    for l in &p.launches {
        let k = &p.kernels[l.kernel];
        let dims = |i: usize| -> Vec<usize> { k.args[i].shape.iter().map(|d| d.eval(&b).unwrap_or(0)).collect() };
        flops += match &k.kind {
            KernelKind::Gemm { epilogue } => {
                let (a, out) = (dims(0), dims(k.args.len() - 1));
                let rows: usize = out[..out.len() - 1].iter().product();
                let n = out[out.len() - 1] * if *epilogue == Epilogue::SwiGlu { 2 } else { 1 };
                2.0 * (rows * n * a[a.len() - 1]) as f64
            }
            KernelKind::MoeGateUp | KernelKind::MoeDown | KernelKind::MoeGroupedGateUp => {
                // One output row per routed slot: slots x (2I or H) x K.
                let (out, w) = (dims(k.args.len() - 1), dims(k.args.len() - 2));
                2.0 * (out[0] * w[1] * w[2]) as f64
            }
            KernelKind::PagedAttention { .. } => {
                let q = dims(0);
                // Per visible key and query head: a D-long dot and a D-long axpy.
                4.0 * (visible * q[1] * q[2]) as f64
            }
            _ => 0.0,
        };
    }
    flops
}

/// The int8 routed-expert kernels: each reads only the experts its rows
/// were routed to.
fn int8_routed(kind: &KernelKind) -> bool {
    matches!(
        kind,
        KernelKind::MoeGateUpQuant | KernelKind::MoeDownQuant | KernelKind::MoeGateUpStatic | KernelKind::MoeDownStatic
    )
}

/// Int8 multiply-add operations of one step (2 per int8 product): the
/// int8 matmuls, plain and fused (the projections that quantize their own
/// input, the shared expert's gate/up, and the routed experts at one row
/// per routed slot). [`step_flops`] leaves them out.
pub fn step_int8_ops(p: &KernelProgram, meta: &StepMetadata, num_blocks: usize) -> f64 {
    let b = step_bindings(meta, num_blocks);
    let mut ops = 0.0;
    for l in &p.launches {
        let k = &p.kernels[l.kernel];
        let dims = |i: usize| -> Vec<usize> { k.args[i].shape.iter().map(|d| d.eval(&b).unwrap_or(0)).collect() };
        // (rows, int8 weight argument, weights of that shape): every row
        // takes a K-long dot product with each of the weights' N rows.
        // A dense kernel's rows: every row of its input (batch dims too).
        let x_rows = || dims(0).iter().rev().skip(1).product::<usize>();
        let (rows, w, count) = match k.kind {
            KernelKind::QuantMatMul { .. } | KernelKind::DynQuantMatMul { .. } => (x_rows(), 1, 1),
            KernelKind::StaticQuantMatMul => (x_rows(), 3, 1),
            KernelKind::QuantGateUpQuant => (x_rows(), 2, 2),
            KernelKind::QuantGateUpStatic => (x_rows(), 3, 2),
            // Routed: the rows are the sorted slots (the int8 output's rows).
            KernelKind::MoeGateUpQuant => (dims(8)[0], 4, 2),
            KernelKind::MoeGateUpStatic => (dims(15)[0], 5, 2),
            KernelKind::MoeDownQuant => (dims(0)[0], 4, 1),
            KernelKind::MoeDownStatic => (dims(0)[0], 3, 1),
            _ => continue,
        };
        let wd = dims(w);
        let (n, kk) = (wd[wd.len() - 2], wd[wd.len() - 1]);
        ops += 2.0 * (rows * count * n * kk) as f64;
    }
    ops
}

/// The machine's rates measured in the run, that a step's roofline is
/// taken against.
#[derive(Debug, Clone, Copy)]
pub struct Peaks {
    /// Streaming read bandwidth, bytes/s.
    pub bandwidth: f64,
    /// The float GEMMs' peak (the bf16 dot-product peak on the avx512-bf16
    /// tier, else the FMA peak), FLOP/s.
    pub flops: f64,
    /// The int8 dot-product peak, operations/s (`None`: not measured; then
    /// int8 work is counted at the float peak).
    pub int8_ops: Option<f64>,
}

/// What one step must move and compute.
#[derive(Debug, Clone, Copy)]
pub struct StepCost {
    pub bytes: StepBytes,
    pub flops: f64,
    pub int8_ops: f64,
}

impl StepCost {
    pub fn of(p: &KernelProgram, meta: &StepMetadata, groups: usize, num_blocks: usize) -> StepCost {
        StepCost {
            bytes: step_bytes_split(p, meta, groups),
            flops: step_flops(p, meta, num_blocks),
            int8_ops: step_int8_ops(p, meta, num_blocks),
        }
    }

    /// The step's compute at the peaks: its float work at the float peak
    /// plus its int8 work at the int8 peak.
    pub fn compute_seconds(&self, peaks: &Peaks) -> f64 {
        self.flops / peaks.flops + self.int8_ops / peaks.int8_ops.unwrap_or(peaks.flops)
    }

    /// Roofline time: the bytes over the bandwidth or the compute at the
    /// peaks, whichever is longer.
    pub fn roofline_seconds(&self, peaks: &Peaks) -> f64 {
        (self.bytes.total() as f64 / peaks.bandwidth).max(self.compute_seconds(peaks))
    }
}

/// Batch sizes of the batched decode measurement, and their context.
pub const BATCHES: [usize; 4] = [1, 4, 16, 64];
pub const BATCH_CONTEXT: usize = 512;
/// The batched prefill: this many prompts of [`BATCH_CONTEXT`] tokens in one step.
pub const PREFILL_SEQS: usize = 4;

/// One batched decode measurement.
pub struct BatchedDecode {
    pub batch: usize,
    /// Seconds per step.
    pub seconds: f64,
    pub cost: StepCost,
    pub roofline: f64,
    /// Per-kernel breakdown lines, when profiled.
    pub profile: Option<Vec<String>>,
}

impl BatchedDecode {
    pub fn tokens_per_s(&self) -> f64 {
        self.batch as f64 / self.seconds
    }
}

/// Decode at each of [`BATCHES`] after [`BATCH_CONTEXT`] cached tokens per
/// sequence, `steps` timed steps each, against each step's roofline.
pub fn batched_decode(
    pkg: &Arc<Package>,
    threads: usize,
    steps: usize,
    peaks: &Peaks,
    profile: bool,
) -> Result<Vec<BatchedDecode>> {
    let groups = pkg.config().num_groups();
    let mut out = vec![];
    for b in BATCHES {
        let timing = decode_step_seconds(pkg, threads, b, BATCH_CONTEXT, steps, profile)?;
        let num_blocks = b * (BATCH_CONTEXT + steps + 1).div_ceil(timing.meta.block_size);
        let cost = StepCost::of(pkg.program(), &timing.meta, groups, num_blocks);
        out.push(BatchedDecode {
            batch: b,
            seconds: timing.seconds,
            roofline: cost.roofline_seconds(peaks),
            cost,
            profile: timing.kernels.as_ref().map(|k| profile_lines(k, steps, timing.seconds)),
        });
    }
    Ok(out)
}

/// The batched prefill: [`PREFILL_SEQS`] prompts of [`BATCH_CONTEXT`]
/// tokens in one step (best of two); seconds and the step's cost.
pub fn batched_prefill(pkg: &Arc<Package>, threads: usize) -> Result<(f64, StepCost)> {
    let groups = pkg.config().num_groups();
    let prompts: Vec<Vec<i64>> = (0..PREFILL_SEQS)
        .map(|s| (0..BATCH_CONTEXT as i64).map(|i| (i * 7919 + s as i64 * 101) % 31000 + 1).collect())
        .collect();
    let mut best: Option<(f64, StepCost)> = None;
    for _ in 0..2 {
        let mut d = StepDriver::new(pkg.clone(), threads, PREFILL_SEQS, BATCH_CONTEXT)?;
        let t0 = Instant::now();
        let meta = d.step(&prompts)?;
        let t = t0.elapsed().as_secs_f64();
        let num_blocks = PREFILL_SEQS * BATCH_CONTEXT.div_ceil(meta.block_size);
        if best.as_ref().is_none_or(|(b, _)| t < *b) {
            best = Some((t, StepCost::of(pkg.program(), &meta, groups, num_blocks)));
        }
    }
    Ok(best.expect("two runs"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::Checkpoint;
    use crate::quantize::{write_quantized, QuantizeOptions, Scheme};

    /// The batched program of the bundled tiny model quantized with `scheme`.
    fn quantized_program(scheme: Scheme, dir: &std::path::Path) -> (KernelProgram, panguc_ir::config::PanguConfig) {
        let tiny_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu");
        let tiny = Checkpoint::open(&tiny_dir).unwrap();
        let calib = vec![(1..30).map(|i| (i * 37) % 256).collect()];
        let q = dir.join(scheme.quant_type().name());
        write_quantized(&tiny, &q, &QuantizeOptions { scheme, kv_int8: false, calib, smooth_alpha: None }).unwrap();
        let ckpt = Checkpoint::open(&q).unwrap();
        let imported = crate::commands::import_with(&ckpt, crate::import::KvLayout::Paged { block_size: 4 }).unwrap();
        let fused = crate::pipeline::fuse_batched(&ckpt, &imported, &Default::default()).unwrap();
        (panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap(), ckpt.config().clone())
    }

    /// Int8 work of a step, by hand from the config: per layer q/k/v, o,
    /// the shared expert's gate/up and down, and the routed experts at
    /// one row per (token, expert) slot; and of the routed experts' bytes
    /// only the share a step selects, so one decode row reads far fewer
    /// int8 weight bytes than the package holds.
    #[test]
    fn int8_step_cost_counts_fused_kernels_and_the_routed_share() {
        let dir = tempfile::tempdir().unwrap();
        for scheme in [Scheme::W8A8Dynamic, Scheme::W8A8] {
            let (p, c) = quantized_program(scheme, dir.path());
            let tokens = 3;
            let chunk = SeqChunk { past: 0, new_tokens: tokens, blocks: &[0] };
            let meta = StepMetadata::build(4, &[chunk]).unwrap();
            let (h, d) = (c.hidden_size, c.head_dim());
            let qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d;
            let shared = c.shared_expert_intermediate_size;
            let slots = tokens * c.num_experts_per_tok;
            let per_layer = 2 * tokens * h * (qkv + c.num_attention_heads * d + 3 * shared)
                + 2 * slots * 3 * c.moe_intermediate_size * h;
            let want = (per_layer * c.num_hidden_layers) as f64;
            assert_eq!(step_int8_ops(&p, &meta, 1), want, "{scheme:?}");
            // Routed int8 experts: each token picks one expert per group.
            let one = SeqChunk { past: 0, new_tokens: 1, blocks: &[0] };
            let meta1 = StepMetadata::build(4, &[one]).unwrap();
            let read = step_bytes_split(&p, &meta1, c.num_groups()).weights;
            let share = 1.0 / (c.num_experts / c.num_groups()) as f64;
            // Every weight whole but the routed experts (their share) and
            // the embedding table (the one token's row).
            let want_read: f64 = p
                .weights
                .iter()
                .map(|w| {
                    let bytes = w.stored_bytes() as f64;
                    if w.name.contains(".experts_") {
                        bytes * share
                    } else if w.name.contains("embed_tokens") {
                        bytes / w.shape[0] as f64
                    } else {
                        bytes
                    }
                })
                .sum();
            let rel = (read as f64 - want_read).abs() / want_read;
            assert!(rel < 0.05, "{scheme:?}: {read} bytes read, about {want_read} expected");
        }
    }
}

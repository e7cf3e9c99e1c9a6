//! Whole-program estimates: time per decode step and per prefill, bytes of
//! weights and KV cache read, against the ideal of reading every active
//! weight exactly once.

use crate::cost::{expected_unique_experts, op_work, OpWork, Operand, Workload};
use crate::profile::HardwareProfile;
use crate::{kernel_nodes, weight_only_values};
use anyhow::{anyhow, Result};
use panguc_ir::{Module, Op, PanguConfig};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// Cost of running a function once (calls included).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StepCost {
    pub seconds: f64,
    pub kernels: usize,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
    pub bytes: f64,
    pub flops: f64,
    /// Kernels whose working set does not fit the profile's buffers.
    pub over_capacity: usize,
    /// `seconds` split: kernels bound by compute (their compute time),
    /// kernels bound by memory (their memory time), launch overheads.
    pub compute_bound_seconds: f64,
    pub memory_bound_seconds: f64,
    pub launch_seconds: f64,
}

impl StepCost {
    fn add(&mut self, o: &StepCost) {
        self.seconds += o.seconds;
        self.kernels += o.kernels;
        self.weight_bytes += o.weight_bytes;
        self.kv_bytes += o.kv_bytes;
        self.bytes += o.bytes;
        self.flops += o.flops;
        self.over_capacity += o.over_capacity;
        self.compute_bound_seconds += o.compute_bound_seconds;
        self.memory_bound_seconds += o.memory_bound_seconds;
        self.launch_seconds += o.launch_seconds;
    }
}

/// Cost of one call of function `name` of `module` at workload `w`.
pub fn function_cost(module: &Module, name: &str, w: &Workload, p: &HardwareProfile) -> Result<StepCost> {
    function_cost_with(module, name, w, p, &|_, _, work| work)
}

/// The share of a kernel's work one device does: given the function, the
/// node index of the kernel and its single-device work, the work left.
pub type KernelShare<'a> = dyn Fn(&panguc_ir::Function, usize, OpWork) -> OpWork + 'a;

/// [`function_cost`] with every kernel's work passed through `share`
/// first (one device's part of a partitioned step).
pub fn function_cost_with(
    module: &Module,
    name: &str,
    w: &Workload,
    p: &HardwareProfile,
    share: &KernelShare,
) -> Result<StepCost> {
    let mut memo = HashMap::new();
    cost_rec(module, name, w, p, share, &mut memo)
}

fn cost_rec(
    module: &Module,
    name: &str,
    w: &Workload,
    p: &HardwareProfile,
    share: &KernelShare,
    memo: &mut HashMap<String, StepCost>,
) -> Result<StepCost> {
    if let Some(c) = memo.get(name) {
        return Ok(c.clone());
    }
    let f = module.function(name).ok_or_else(|| anyhow!("no function @{name}"))?;
    let wo = weight_only_values(f);
    let mut total = StepCost::default();
    for (i, (n, is_kernel)) in f.nodes.iter().zip(kernel_nodes(f)).enumerate() {
        if let Op::Call { func, .. } = &n.op {
            let c = cost_rec(module, func, w, p, share, memo)?;
            total.add(&c);
            continue;
        }
        if !is_kernel {
            continue;
        }
        let operands: Vec<Operand> =
            n.args.iter().map(|a| Operand { ty: f.ty(*a), weight_only: wo[a.index()] }).collect();
        let results: Vec<_> = n.results.iter().map(|r| f.ty(*r).clone()).collect();
        let work = share(f, i, op_work(&n.op, &operands, &results, w, p));
        let seqs = w.copies();
        let (compute, memory) = work.compute_and_memory_seconds(w, p);
        let bound = |is: bool, s: f64| if is { s } else { 0.0 };
        total.add(&StepCost {
            compute_bound_seconds: bound(compute > memory, compute),
            memory_bound_seconds: bound(compute <= memory, memory),
            launch_seconds: p.launch_overhead_us * 1e-6,
            seconds: work.seconds(w, p),
            kernels: 1,
            weight_bytes: work.weight_bytes(w),
            kv_bytes: seqs * work.kv_bytes,
            bytes: work.bytes(w),
            flops: seqs * (work.matmul_flops + work.int8_ops + work.vector_flops),
            over_capacity: usize::from(!work.fits(p)),
        });
    }
    memo.insert(name.to_string(), total.clone());
    Ok(total)
}

/// Bytes of the weights one step must read if every active weight is read
/// exactly once: attention, norms, router, shared expert and the distinct
/// selected experts of every layer, the embedding rows of the step's
/// tokens, the final norm and the whole lm_head.
pub fn ideal_weight_bytes(cfg: &PanguConfig, weight_bytes: f64, tokens: f64) -> f64 {
    let (h, q, kv) = (cfg.hidden_size as f64, cfg.q_dim() as f64, cfg.kv_dim() as f64);
    let (e, g) = (cfg.num_experts as f64, cfg.num_groups() as f64);
    let (i, is) = (cfg.moe_intermediate_size as f64, cfg.shared_expert_intermediate_size as f64);
    let (v, layers) = (cfg.vocab_size as f64, cfg.num_hidden_layers as f64);
    let attention = q * h + 2.0 * kv * h + h * q + (q + 2.0 * kv + h);
    let dense = attention + 2.0 * h + e * h + e + 3.0 * is * h;
    let experts = expected_unique_experts(tokens, g, e / g) * 3.0 * i * h;
    let global = tokens.min(v) * h + h + v * h;
    weight_bytes * (layers * (dense + experts) + global)
}

/// Bytes of K and V one step must read: every cached and new position of
/// every layer, once.
pub fn ideal_kv_bytes(cfg: &PanguConfig, w: &Workload, act_bytes: f64) -> f64 {
    let per_pos = (cfg.num_key_value_heads * cfg.head_dim()) as f64 * act_bytes;
    2.0 * cfg.num_hidden_layers as f64 * w.seqs as f64 * (w.past + w.tokens_per_seq()) as f64 * per_pos
}

/// Size of the stored weights: the dtype of the entry function's first
/// weight parameter (the embedding).
fn weight_dtype_bytes(m: &Module) -> f64 {
    m.entry_fn().weight_params().next().map(|(p, _)| m.entry_fn().ty(p.value).dtype.size_bytes() as f64).unwrap_or(2.0)
}

/// True for the published Pangu Pro MoE 72B configuration.
pub fn is_pangu_pro_moe_72b(cfg: &PanguConfig) -> bool {
    (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.vocab_size, cfg.moe_intermediate_size)
        == (5120, 48, 64, 153376, 1344)
}

/// What the estimate report covers.
pub struct EstimateSpec {
    /// Tokens in the KV cache for decode estimates.
    pub context: usize,
    /// Batch sizes (sequences per step) for decode estimates.
    pub decode_batches: Vec<usize>,
    /// Prompt length for the prefill estimate.
    pub prefill_tokens: usize,
}

impl Default for EstimateSpec {
    fn default() -> Self {
        EstimateSpec { context: 2048, decode_batches: vec![1, 64], prefill_tokens: 2048 }
    }
}

fn ms(s: f64) -> f64 {
    (s * 1e3 * 1e4).round() / 1e4
}

/// A batched (paged KV cache) fused module and its KV block size, priced
/// for the decode estimates instead of scaling the per-sequence program.
#[derive(Clone, Copy)]
pub struct BatchedProgram<'a> {
    pub module: &'a Module,
    pub block_size: usize,
}

/// The `estimates` object of the report.
pub fn estimates(
    cfg: &PanguConfig,
    fused: &Module,
    unfused: &Module,
    profiles: &[HardwareProfile],
    spec: &EstimateSpec,
) -> Result<Value> {
    estimates_with_batched(cfg, fused, unfused, None, profiles, spec)
}

/// [`estimates`], with the `decode_batch_B` entries of the fused program
/// computed from `batched` when given: one run of the batched program over
/// a step of B rows from B sequences (tokens = B, seqs = B), each with
/// `context` cached tokens, rather than B runs of the per-sequence program.
/// The keys are the same; `program` says which program was priced.
pub fn estimates_with_batched(
    cfg: &PanguConfig,
    fused: &Module,
    unfused: &Module,
    batched: Option<BatchedProgram>,
    profiles: &[HardwareProfile],
    spec: &EstimateSpec,
) -> Result<Value> {
    let wbytes = weight_dtype_bytes(fused);
    let mut per_profile = serde_json::Map::new();
    for p in profiles {
        let mut obj = serde_json::Map::new();
        let mut unfused_obj = serde_json::Map::new();
        for &b in &spec.decode_batches {
            let w = Workload::decode(spec.context, b);
            let c = match batched {
                Some(bp) => {
                    let wb = Workload::batched_decode(spec.context, b, bp.block_size);
                    function_cost(bp.module, &bp.module.entry, &wb, p)?
                }
                None => function_cost(fused, &fused.entry, &w, p)?,
            };
            let u = function_cost(unfused, &unfused.entry, &w, p)?;
            let ideal_w = ideal_weight_bytes(cfg, wbytes, b as f64);
            let ideal_kv = ideal_kv_bytes(cfg, &w, p.activation_bytes);
            let mut entry = json!({
                "ms_per_step": ms(c.seconds),
                "ms_per_token": ms(c.seconds),
                "tokens_per_s": (b as f64 / c.seconds).round(),
                "kernels": c.kernels,
                "weight_bytes": c.weight_bytes.round(),
                "ideal_weight_bytes": ideal_w.round(),
                "weight_read_ratio": round4(c.weight_bytes / ideal_w),
                "kv_bytes": c.kv_bytes.round(),
                "ideal_kv_bytes": ideal_kv.round(),
                "kv_read_ratio": round4(c.kv_bytes / ideal_kv),
                "over_capacity_kernels": c.over_capacity,
            });
            if batched.is_some() {
                entry["program"] = json!("batched");
            }
            obj.insert(format!("decode_batch_{b}"), entry);
            unfused_obj.insert(format!("decode_batch_{b}_ms"), json!(ms(u.seconds)));
            unfused_obj.insert(format!("decode_batch_{b}_weight_read_ratio"), json!(round4(u.weight_bytes / ideal_w)));
            unfused_obj.insert(format!("decode_batch_{b}_kernels"), json!(u.kernels));
        }
        let w = Workload::prefill(spec.prefill_tokens);
        let c = function_cost(fused, &fused.entry, &w, p)?;
        let u = function_cost(unfused, &unfused.entry, &w, p)?;
        obj.insert(
            format!("prefill_{}", spec.prefill_tokens),
            json!({
                "ms": ms(c.seconds),
                "tokens_per_s": (spec.prefill_tokens as f64 / c.seconds).round(),
                "kernels": c.kernels,
                "tflop": round4(c.flops / 1e12),
                "weight_bytes": c.weight_bytes.round(),
            }),
        );
        unfused_obj.insert(format!("prefill_{}_ms", spec.prefill_tokens), json!(ms(u.seconds)));
        obj.insert("unfused".into(), Value::Object(unfused_obj));
        per_profile.insert(p.name.clone(), Value::Object(obj));
    }
    let out = json!({
        "context": spec.context,
        "weight_dtype_bytes": wbytes,
        "assumptions": [
            "one device: no tensor/expert parallelism and no communication",
            "kernel time = max(compute at peak, bytes at peak bandwidth) + launch overhead; kernels do not overlap",
            "weights are read in their stored dtype; activations and the KV cache at the profile's activation_bytes",
            "values that depend only on weights (concatenated, stacked or cast weights) are prepared at package time",
            "routing is uniform within each expert group: a step of N tokens reads the expected number of distinct experts",
            "decode batch B = B sequences of one new token each, every sequence with `context` cached tokens",
        ],
        "profiles": Value::Object(per_profile),
    });
    Ok(out)
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_config() -> PanguConfig {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pangu-pro-moe-72b/config.json");
        PanguConfig::from_json_str(&std::fs::read_to_string(path).unwrap(), path).unwrap()
    }

    #[test]
    fn ideal_decode_reads_the_published_active_parameters() {
        let cfg = real_config();
        assert!(is_pangu_pro_moe_72b(&cfg));
        // One token reads every active parameter once, except that of the
        // embedding table it reads a single row.
        let (v, h) = (cfg.vocab_size as f64, cfg.hidden_size as f64);
        let want = 2.0 * (cfg.active_params() as f64 - v * h + h);
        assert_eq!(ideal_weight_bytes(&cfg, 2.0, 1.0), want);
        assert_eq!(cfg.active_params(), 16_498_139_136);
    }

    #[test]
    fn ideal_kv_counts_every_position_of_every_layer() {
        let cfg = real_config();
        let w = Workload::decode(2048, 2);
        // 2 (k, v) x 48 layers x 2 sequences x 2049 positions x 8 heads x 128 x 2 bytes.
        assert_eq!(ideal_kv_bytes(&cfg, &w, 2.0), 2.0 * 48.0 * 2.0 * 2049.0 * 1024.0 * 2.0);
    }
}

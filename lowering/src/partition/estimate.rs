//! Per-device figures of a partitioned program: weight, KV-cache and peak
//! activation bytes, communication per decode step and per prefill, and
//! the estimated time per decode step at batch 1 and batch B (kernels from
//! the fusion cost model, collectives from an interconnect model), next to
//! the published figures.
//!
//! The programs priced are the package's rank programs: the batched
//! (ragged-step, paged KV cache) module partitioned. A decode step of
//! batch B is one run of the rank program over B rows, as the runtime
//! executes it, not B runs of a one-sequence program.

use super::{Layout, Partitioned, PlanChoice, PlanKind, Residency};
use crate::cost::{OpWork, Workload};
use crate::estimate::function_cost;
use crate::profile::{HardwareProfile, LinkParams};
use crate::weight_only_values;
use anyhow::{bail, Result};
use panguc_ir::graph::{Function, Module, ParamKind};
use panguc_ir::op::CollectiveKind;
use panguc_ir::shape::SYM_NUM_BLOCKS;
use panguc_ir::{DType, Op, ValueId};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The links between devices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interconnect {
    pub name: String,
    /// Per-device bandwidth a collective can use, GB/s (10^9 bytes).
    pub bandwidth_gbs: f64,
    /// Fixed cost of one communication step, microseconds.
    pub latency_us: f64,
    /// Full mesh (one step per phase) or ring (n-1 steps per phase).
    pub full_mesh: bool,
}

impl Interconnect {
    /// Atlas 800I A2's HCCS full mesh ([`crate::profile::HCCS_800I_A2`]).
    pub fn hccs() -> Interconnect {
        Interconnect::from_link("hccs-800i-a2", &crate::profile::HCCS_800I_A2)
    }

    /// Atlas 300I Duo cards over PCIe ([`crate::profile::PCIE_300I_DUO`]).
    pub fn pcie() -> Interconnect {
        Interconnect::from_link("pcie-300i-duo", &crate::profile::PCIE_300I_DUO)
    }

    pub fn from_link(name: &str, l: &LinkParams) -> Interconnect {
        Interconnect {
            name: name.into(),
            bandwidth_gbs: l.bandwidth_gbs,
            latency_us: l.latency_us,
            full_mesh: l.full_mesh,
        }
    }

    /// The usual links of a hardware profile's machines.
    pub fn for_profile(p: &HardwareProfile) -> Interconnect {
        if p.name.starts_with("ascend310p") {
            Interconnect::pcie()
        } else {
            Interconnect::hccs()
        }
    }

    /// Bytes one device sends and seconds taken for a collective whose
    /// operand on each device has `bytes` bytes, over `n` devices.
    pub fn collective(&self, kind: CollectiveKind, n: usize, bytes: f64) -> (f64, f64) {
        if n <= 1 {
            return (0.0, 0.0);
        }
        let nf = n as f64;
        let (sent, phases) = match kind {
            CollectiveKind::AllReduce => (2.0 * (nf - 1.0) / nf * bytes, 2.0),
            CollectiveKind::ReduceScatter | CollectiveKind::AllToAll => ((nf - 1.0) / nf * bytes, 1.0),
            CollectiveKind::AllGather => ((nf - 1.0) * bytes, 1.0),
        };
        let steps = if self.full_mesh { phases } else { phases * (nf - 1.0) };
        (sent, steps * self.latency_us * 1e-6 + sent / (self.bandwidth_gbs * 1e9))
    }
}

/// Published 800I A2 decode figure the report compares against.
pub const PUBLISHED_TPOT_MS_4_CARDS_BATCH_1: f64 = 18.44;

/// Per-device figures.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub rank: usize,
    pub weight_bytes: f64,
    pub kv_cache_bytes: f64,
    pub activation_peak_bytes: f64,
    pub comm_bytes_decode_step: f64,
    pub comm_bytes_prefill: f64,
    pub collectives_per_step: usize,
    pub kernel_ms_decode_step: f64,
    pub comm_ms_decode_step: f64,
    pub ms_per_decode_step: f64,
    /// One decode step of each of [`DeviceSpec::decode_batches`].
    pub decode_batches: Vec<BatchStep>,
    pub fits_memory: bool,
}

/// One decode step of `batch` sequences (one new token each, `context`
/// cached tokens each) on one device.
#[derive(Debug, Clone, Serialize)]
pub struct BatchStep {
    pub batch: usize,
    pub kernel_ms: f64,
    pub comm_ms: f64,
    pub ms_per_step: f64,
    pub comm_bytes: f64,
    pub weight_bytes_read: f64,
    pub kv_bytes_read: f64,
}

/// What to estimate at.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub context: usize,
    pub prefill_tokens: usize,
    /// Sequences per decode step of the batch-B estimates.
    pub decode_batches: Vec<usize>,
    pub profile: HardwareProfile,
    pub link: Interconnect,
}

/// Weight bytes `f` holds: a weight read only through slices counts only
/// the sliced range (its shard).
pub fn function_weight_bytes(f: &Function) -> f64 {
    held_weights(f).values().map(|(b, _)| *b).sum()
}

/// The slice of a weight a rank holds: `(axis, start, end)`.
type HeldRange = (usize, usize, usize);

/// Tensor name -> (bytes held, range held: None = all).
fn held_weights(f: &Function) -> BTreeMap<String, (f64, Option<HeldRange>)> {
    let mut out = BTreeMap::new();
    for (p, tensor) in f.weight_params() {
        let ty = f.ty(p.value);
        let shape: Vec<usize> = ty.shape.iter().map(|d| d.as_const().unwrap_or(0)).collect();
        let full = shape.iter().product::<usize>() as f64 * ty.dtype.size_bytes() as f64;
        let uses: Vec<&Op> = f.nodes.iter().filter(|n| n.args.contains(&p.value)).map(|n| &n.op).collect();
        let mut range: Option<HeldRange> = None;
        let mut all_slices = !uses.is_empty();
        for u in &uses {
            match u {
                Op::Slice { axis, start, end } => {
                    range = Some(match range {
                        None => (*axis, *start, *end),
                        Some((a, s, e)) if a == *axis => (a, s.min(*start), e.max(*end)),
                        Some(_) => {
                            all_slices = false;
                            break;
                        }
                    })
                }
                _ => {
                    all_slices = false;
                    break;
                }
            }
        }
        let held = match (all_slices, range) {
            (true, Some((a, s, e))) => (full * (e - s) as f64 / shape[a].max(1) as f64, Some((a, s, e))),
            _ => (full, None),
        };
        out.insert(tensor.to_string(), held);
    }
    out
}

/// (function, calls per step) for every function the entry runs.
fn call_counts(m: &Module) -> Vec<(&Function, f64)> {
    let entry = m.entry_fn();
    let mut out = vec![(entry, 1.0)];
    let mut counts: BTreeMap<&str, f64> = BTreeMap::new();
    for n in &entry.nodes {
        if let Op::Call { func, .. } = &n.op {
            *counts.entry(func.as_str()).or_default() += 1.0;
        }
    }
    for (name, c) in counts {
        if let Some(f) = m.function(name) {
            out.push((f, c));
        }
    }
    out
}

/// Weight bytes of a whole module (each function times its calls).
pub fn module_weight_bytes(m: &Module) -> f64 {
    call_counts(m).iter().map(|(f, c)| c * function_weight_bytes(f)).sum()
}

/// Per tensor: (full bytes, covered `[start, end)` intervals along the split
/// axis, that axis' length, whether some rank holds it whole).
type Coverage = (f64, Vec<(usize, usize)>, usize, bool);

/// Weight bytes held by at least one rank: the union of the ranks' shards
/// (equals the single-device bytes when nothing is lost).
pub fn union_weight_bytes(ranks: &[&Module]) -> f64 {
    let mut total = 0.0;
    let Some(first) = ranks.first() else { return 0.0 };
    for (f, calls) in call_counts(first) {
        let mut per: BTreeMap<String, Coverage> = BTreeMap::new();
        for m in ranks {
            let Some(g) = m.function(&f.name) else { continue };
            for (p, tensor) in g.weight_params() {
                let ty = g.ty(p.value);
                let shape: Vec<usize> = ty.shape.iter().map(|d| d.as_const().unwrap_or(0)).collect();
                let full = shape.iter().product::<usize>() as f64 * ty.dtype.size_bytes() as f64;
                let held = held_weights(g)[tensor];
                let e = per.entry(tensor.to_string()).or_insert((full, vec![], 1, false));
                match held.1 {
                    None => e.3 = true,
                    Some((a, s, en)) => {
                        e.1.push((s, en));
                        e.2 = shape[a];
                    }
                }
            }
        }
        for (_, (full, mut ranges, len, whole)) in per {
            if whole {
                total += calls * full;
                continue;
            }
            ranges.sort();
            let (mut covered, mut end) = (0usize, 0usize);
            for (s, e) in ranges {
                let s = s.max(end);
                if e > s {
                    covered += e - s;
                    end = e;
                }
            }
            total += calls * full * covered as f64 / len.max(1) as f64;
        }
    }
    total
}

/// Bytes of one element of a value in device memory: floats at the
/// profile's activation width, integers (int8 KV caches, ids) as stored.
fn stored_elem_bytes(dtype: DType, p: &HardwareProfile) -> f64 {
    if dtype.is_float() {
        p.activation_bytes
    } else {
        dtype.size_bytes() as f64
    }
}

/// Communication of one step at `w`: (bytes sent, seconds, collectives).
fn comm(m: &Module, w: &Workload, p: &HardwareProfile, link: &Interconnect) -> (f64, f64, usize) {
    let b = w.bindings();
    let (mut bytes, mut secs, mut count) = (0.0, 0.0, 0);
    for (f, calls) in call_counts(m) {
        for n in &f.nodes {
            if let Op::Collective { kind, group, .. } = &n.op {
                let ty = f.ty(n.args[0]);
                let numel = ty.concrete_shape(&b).map(|s| s.iter().product::<usize>()).unwrap_or(0) as f64;
                let operand = numel * stored_elem_bytes(ty.dtype, p) * w.copies();
                let (sent, t) = link.collective(*kind, group.len(), operand);
                bytes += calls * sent;
                secs += calls * t;
                count += calls as usize;
            }
        }
    }
    (bytes, secs, count)
}

/// Largest sum of live activation bytes over the nodes of the decoder
/// layer (or entry) at `w` (weights and weight-only values excluded).
fn activation_peak(m: &Module, w: &Workload, p: &HardwareProfile) -> f64 {
    let b = w.bindings();
    let mut peak: f64 = 0.0;
    for (f, _) in call_counts(m) {
        let wo = weight_only_values(f);
        let bytes = |v: panguc_ir::ValueId| -> f64 {
            if wo[v.index()] {
                return 0.0;
            }
            let ty = f.ty(v);
            let n = ty.concrete_shape(&b).map(|s| s.iter().product::<usize>()).unwrap_or(0) as f64;
            n * stored_elem_bytes(ty.dtype, p)
        };
        let mut remaining = f.use_counts();
        let mut live: f64 = f.params.iter().filter(|q| q.kind == ParamKind::Input).map(|q| bytes(q.value)).sum();
        for n in &f.nodes {
            if matches!(n.op, Op::Call { .. }) {
                continue;
            }
            live += n.results.iter().map(|r| bytes(*r)).sum::<f64>();
            peak = peak.max(live);
            for a in &n.args {
                remaining[a.index()] -= 1;
                if remaining[a.index()] == 0 {
                    live -= bytes(*a);
                }
            }
        }
    }
    peak
}

/// The paged KV-cache inputs of a batched program's entry
/// (`[num_blocks, block_size, kv_heads, head_dim]`) and their block size.
fn paged_caches(m: &Module) -> Result<(Vec<ValueId>, usize)> {
    let entry = m.entry_fn();
    let caches: Vec<ValueId> = entry
        .input_params()
        .map(|q| q.value)
        .filter(|v| entry.ty(*v).shape.first().is_some_and(|d| d.symbols().any(|s| s == SYM_NUM_BLOCKS)))
        .collect();
    let block = caches.first().and_then(|v| entry.ty(*v).shape.get(1)?.as_const());
    match block {
        Some(b) if b > 0 => Ok((caches, b)),
        _ => bail!(
            "@{} has no paged KV-cache input [num_blocks, block_size, kv_heads, head_dim]: the partition report prices \
             batched rank programs",
            entry.name
        ),
    }
}

/// Kernel seconds (collectives excluded), communication and the cost
/// model's totals of one step of rank program `m` at `w`.
struct Step {
    kernel_secs: f64,
    comm_bytes: f64,
    comm_secs: f64,
    collectives: usize,
    weight_bytes: f64,
    kv_bytes: f64,
}

fn step(m: &Module, w: &Workload, spec: &DeviceSpec) -> Result<Step> {
    let p = &spec.profile;
    let (comm_bytes, comm_secs, collectives) = comm(m, w, p, &spec.link);
    let kernels = function_cost(m, &m.entry, w, p)?;
    // The cost model prices a collective as a launch; the link model replaces it.
    let kernel_secs = kernels.seconds - collectives as f64 * p.launch_overhead_us * 1e-6;
    Ok(Step {
        kernel_secs,
        comm_bytes,
        comm_secs,
        collectives,
        weight_bytes: kernels.weight_bytes,
        kv_bytes: kernels.kv_bytes,
    })
}

/// The report of one rank's batched program.
pub fn device_report(rank: usize, m: &Module, spec: &DeviceSpec) -> Result<DeviceReport> {
    let p = &spec.profile;
    let (caches, block) = paged_caches(m)?;
    let prefill = Workload { tokens: spec.prefill_tokens, past: 0, seqs: 1, paged_block: Some(block) };
    let weight_bytes = module_weight_bytes(m);
    let entry = m.entry_fn();
    // Bytes of one cached position: the cache's [kv_heads, head_dim] (the
    // rank's KV heads) of every layer's K and V, in the cache's dtype.
    let kv_per_pos: f64 = caches
        .iter()
        .map(|v| {
            let ty = entry.ty(*v);
            let row = ty.shape[2..].iter().map(|d| d.as_const().unwrap_or(0)).product::<usize>() as f64;
            row * stored_elem_bytes(ty.dtype, p)
        })
        .sum();
    let kv_cache_bytes = kv_per_pos * spec.context as f64;
    let one = step(m, &Workload::batched_decode(spec.context, 1, block), spec)?;
    let (comm_prefill, _, _) = comm(m, &prefill, p, &spec.link);
    let decode_batches = spec
        .decode_batches
        .iter()
        .map(|&b| {
            let s = step(m, &Workload::batched_decode(spec.context, b, block), spec)?;
            Ok(BatchStep {
                batch: b,
                kernel_ms: s.kernel_secs * 1e3,
                comm_ms: s.comm_secs * 1e3,
                ms_per_step: (s.kernel_secs + s.comm_secs) * 1e3,
                comm_bytes: s.comm_bytes,
                weight_bytes_read: s.weight_bytes,
                kv_bytes_read: s.kv_bytes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let activation_peak_bytes = activation_peak(m, &prefill, p);
    let total = weight_bytes + kv_cache_bytes + activation_peak_bytes;
    Ok(DeviceReport {
        rank,
        weight_bytes,
        kv_cache_bytes,
        activation_peak_bytes,
        comm_bytes_decode_step: one.comm_bytes,
        comm_bytes_prefill: comm_prefill,
        collectives_per_step: one.collectives,
        kernel_ms_decode_step: one.kernel_secs * 1e3,
        comm_ms_decode_step: one.comm_secs * 1e3,
        ms_per_decode_step: (one.kernel_secs + one.comm_secs) * 1e3,
        decode_batches,
        fits_memory: total <= p.memory_gib * (1u64 << 30) as f64,
    })
}

/// The `partition` section of the report: `parts` are the rank programs
/// of the batched module `single` (the unpartitioned program).
pub fn partition_report(single: &Module, parts: &Partitioned, spec: &DeviceSpec) -> Result<Value> {
    let devices = parts.ranks.iter().map(|r| device_report(r.rank, &r.module, spec)).collect::<Result<Vec<_>>>()?;
    let (_, block_size) = paged_caches(single)?;
    // A step ends when the slowest rank's part (and its collectives) ends.
    let batches: Vec<Value> = spec
        .decode_batches
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let worst = devices.iter().map(|d| d.decode_batches[i].ms_per_step).fold(0.0, f64::max);
            json!({"batch": b, "ms_per_step": worst, "tokens_per_s": b as f64 / (worst * 1e-3)})
        })
        .collect();
    let modules: Vec<&Module> = parts.ranks.iter().map(|r| &r.module).collect();
    let single_bytes = module_weight_bytes(single);
    let union = union_weight_bytes(&modules);
    let sum: f64 = devices.iter().map(|d| d.weight_bytes).sum();
    let worst = devices.iter().map(|d| d.ms_per_decode_step).fold(0.0, f64::max);
    let mut rules: BTreeMap<String, usize> = BTreeMap::new();
    for r in &parts.ranks {
        for (k, v) in &r.rules_fired {
            *rules.entry(k.clone()).or_default() += v;
        }
    }
    let l = &parts.layout;
    Ok(json!({
        "plan": l.plan,
        "devices": l.devices,
        "layout": {
            "attention": format!("DP{} x TP{}", l.devices / l.attn_tp, l.attn_tp),
            "routed_experts": format!(
                "TP{} x EP{} ({} group{} per EP rank)",
                l.expert_tp,
                l.expert_ep(),
                l.groups_per_rank(),
                if l.groups_per_rank() == 1 { "" } else { "s" }
            ),
            "shared_expert": if l.shared_tp == 1 { "replicated".to_string() } else { format!("TP{}", l.shared_tp) },
        },
        "profile": spec.profile.name,
        "interconnect": spec.link,
        "program": "batched",
        "block_size": block_size,
        "context": spec.context,
        "prefill_tokens": spec.prefill_tokens,
        "per_device": devices,
        "decode_batches": batches,
        "weight_bytes": {
            "single_device": single_bytes,
            "union_of_devices": union,
            "sum_over_devices": sum,
            "max_per_device": devices.iter().map(|d| d.weight_bytes).fold(0.0, f64::max),
        },
        "ms_per_decode_step": worst,
        "rules_fired": rules,
        "published": {
            "hardware": "Ascend 800I A2, W8A8",
            "decode_batch_1_tpot_ms_4_cards": PUBLISHED_TPOT_MS_4_CARDS_BATCH_1,
            "note": "published figures use W8A8 weights, the estimate the checkpoint dtype",
        },
    }))
}

/// One device's share of the kernels of a single-device program under
/// `layout`, for programs the partitioning rules do not split (the int8
/// program): each kernel keeps the part of its weights the device holds
/// (`Layout::residency` of rank 0, weighted by bytes; ranks are balanced
/// by construction), and its work and activation traffic shrink by the
/// device count when it reads sharded weights or the KV cache (attention
/// heads x data-parallel sequences, expert groups x expert columns, shared
/// expert columns), else by the attention data-parallel degree (norms,
/// router, embedding and lm_head run on the sequences of the device's
/// data-parallel group). Activation-only kernels between the expert GEMMs
/// are counted as unsharded (1 / DP): an overestimate where TP > 1.
pub fn kernel_share(layout: &Layout) -> impl Fn(&Function, usize, OpWork) -> OpWork + '_ {
    move |f: &Function, node: usize, work: OpWork| {
        let n = &f.nodes[node];
        // Attention over the cache runs on the device's heads of its
        // data-parallel group's sequences.
        let (mut held, mut full, mut sharded) = (0.0, 0.0, work.kv_bytes > 0.0);
        for src in param_sources(f, &n.args) {
            let p = &f.params[src];
            let name = match &p.kind {
                ParamKind::Weight { tensor } => tensor.as_str(),
                ParamKind::Input => f.name_of(p.value),
            };
            let frac = held_fraction(layout, f, p.value, name);
            if let ParamKind::Weight { .. } = p.kind {
                let bytes = value_bytes(f, p.value);
                held += frac * bytes;
                full += bytes;
            }
            sharded |= frac < 1.0 || name.contains("cache");
        }
        let w_frac = if full > 0.0 { held / full } else { 1.0 };
        let dp = (layout.devices / layout.attn_tp.max(1)).max(1);
        let c = 1.0 / if sharded { layout.devices.max(1) } else { dp } as f64;
        OpWork {
            matmul_flops: work.matmul_flops * c,
            int8_ops: work.int8_ops * c,
            vector_flops: work.vector_flops * c,
            shared_weight_bytes: work.shared_weight_bytes * w_frac,
            seq_weight_bytes: work.seq_weight_bytes * c,
            kv_bytes: work.kv_bytes * c,
            act_bytes: work.act_bytes * c,
            small_copies: work.small_copies * c,
            working_set: work.working_set,
        }
    }
}

/// Indices into `f.params` of the parameters the values `args` derive from.
fn param_sources(f: &Function, args: &[ValueId]) -> Vec<usize> {
    let definers = f.definers();
    let wo = weight_only_values(f);
    let mut param_of = vec![None; f.values.len()];
    for (i, p) in f.params.iter().enumerate() {
        param_of[p.value.index()] = Some(i);
    }
    let mut seen = vec![false; f.values.len()];
    let mut stack: Vec<ValueId> = args.to_vec();
    let mut out = vec![];
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut seen[v.index()], true) {
            continue;
        }
        if let Some(i) = param_of[v.index()] {
            out.push(i);
        } else if let Some(d) = definers[v.index()] {
            // Only values prepared from weights are followed back: a
            // kernel's activation operands are its own inputs.
            if wo[v.index()] {
                stack.extend(f.nodes[d].args.iter().copied());
            }
        }
    }
    out
}

fn value_bytes(f: &Function, v: ValueId) -> f64 {
    let ty = f.ty(v);
    ty.shape.iter().map(|d| d.as_const().unwrap_or(0)).product::<usize>() as f64 * ty.dtype.size_bytes() as f64
}

/// Fraction of parameter `name` (value `v`) rank 0 holds under `layout`.
fn held_fraction(layout: &Layout, f: &Function, v: ValueId, name: &str) -> f64 {
    match layout.residency(0, name, f.ty(v).rank()) {
        Residency::Full => 1.0,
        Residency::None => 0.0,
        Residency::Slice { axis, start, end } => {
            let len = f.ty(v).shape.get(axis).and_then(|d| d.as_const()).unwrap_or(0);
            // A slice past the axis' end means the axis is not the split
            // one (a broadcast axis of 1: the per-output-channel scale
            // `[H, 1]` of a column-split down projection is held whole).
            if len == 0 || end > len {
                1.0
            } else {
                (end - start) as f64 / len as f64
            }
        }
    }
}

/// Collectives of one forward step of `tokens` rows under `layout`, per
/// device: (bytes sent, seconds, collectives). Per layer, with attention
/// TP > 1, the output projection's partial sums are reduce-scattered and
/// all-gathered within the attention group (rows of the device's
/// data-parallel group); with more than one device, the MoE input is
/// all-gathered from every device's rows and its output (routed plus
/// shared expert partial sums) reduce-scattered back: the published
/// reduce-scatter + all-gather form of an all-reduce.
pub fn layout_comm(
    layout: &Layout,
    tokens: f64,
    hidden: f64,
    act_bytes: f64,
    layers: f64,
    link: &Interconnect,
) -> (f64, f64, usize) {
    let n = layout.devices;
    let tp = layout.attn_tp.max(1);
    let dp = (n / tp).max(1) as f64;
    let row = hidden * act_bytes;
    let mut per_layer = vec![];
    if tp > 1 {
        let rows = tokens / dp;
        per_layer.push(link.collective(CollectiveKind::ReduceScatter, tp, rows * row));
        per_layer.push(link.collective(CollectiveKind::AllGather, tp, rows * row / tp as f64));
    }
    if n > 1 {
        per_layer.push(link.collective(CollectiveKind::AllGather, n, tokens / n as f64 * row));
        per_layer.push(link.collective(CollectiveKind::ReduceScatter, n, tokens * row));
    }
    let bytes: f64 = per_layer.iter().map(|c| c.0).sum();
    let secs: f64 = per_layer.iter().map(|c| c.1).sum();
    (layers * bytes, layers * secs, layers as usize * per_layer.len())
}

/// Resolve `--plan auto`: partition under every valid plan and keep the
/// fastest decode step among those whose devices fit their memory (the
/// smallest per-device footprint when none fits).
pub fn choose_plan(
    fused: &Module,
    layer_fn: &str,
    dims: super::Dims,
    devices: usize,
    opts: &crate::fuse::FuseOptions,
    spec: &DeviceSpec,
) -> Result<(Partitioned, Value)> {
    let mut candidates = vec![];
    let mut why = vec![];
    for choice in [PlanChoice::Ep, PlanChoice::H2p] {
        match super::Layout::new(dims, devices, choice) {
            Ok(l) => {
                if candidates.iter().any(|(p, _, _): &(Partitioned, f64, bool)| p.layout == l) {
                    continue;
                }
                let parts = super::partition_module(fused, layer_fn, &l, opts)?;
                let reps =
                    parts.ranks.iter().map(|r| device_report(r.rank, &r.module, spec)).collect::<Result<Vec<_>>>()?;
                let t = reps.iter().map(|d| d.ms_per_decode_step).fold(0.0, f64::max);
                let fits = reps.iter().all(|d| d.fits_memory);
                why.push(json!({"plan": l.plan, "ms_per_decode_step": t, "fits_memory": fits}));
                candidates.push((parts, t, fits));
            }
            Err(e) => why.push(json!({"plan": choice, "invalid": e.to_string()})),
        }
    }
    if candidates.is_empty() {
        bail!("--plan auto: no plan is valid for --devices {devices}: {}", serde_json::to_string(&why)?);
    }
    let any_fits = candidates.iter().any(|c| c.2);
    let best =
        candidates.into_iter().filter(|c| c.2 || !any_fits).min_by(|a, b| a.1.total_cmp(&b.1)).expect("non-empty");
    let _ = PlanKind::Single;
    Ok((best.0, json!({ "candidates": why })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_ir::{DType, Dim, TensorType};

    fn dims() -> super::super::Dims {
        super::super::Dims {
            hidden: 8,
            q_heads: 4,
            kv_heads: 4,
            head_dim: 2,
            experts: 8,
            groups: 4,
            moe_intermediate: 4,
            shared_intermediate: 8,
        }
    }

    /// x [tokens, 8]; q_proj [8, 8] bf16; eight experts [4, 8] int8, stacked.
    fn layer() -> (Function, usize, usize, usize) {
        let mut f = Function::new("decoder_layer");
        let x = f.add_input("x", TensorType::new(DType::F32, vec![Dim::tokens(), Dim::c(8)]));
        let wq = f.add_weight(
            "self_attn.q_proj.weight",
            "self_attn.q_proj.weight",
            TensorType::new(DType::BF16, vec![Dim::c(8), Dim::c(8)]),
        );
        let experts: Vec<ValueId> = (0..8)
            .map(|e| {
                let name = format!("mlp.experts.{e}.gate_proj.weight");
                f.add_weight(&name, &name, TensorType::new(DType::I8, vec![Dim::c(4), Dim::c(8)]))
            })
            .collect();
        let stacked = f.op(Op::Stack { axis: 0 }, &experts, "stacked").unwrap();
        let q = f.op(Op::MatMul { transpose_b: true }, &[x, wq], "q").unwrap();
        f.op(Op::Cast { dtype: DType::F32 }, &[stacked], "experts_f32").unwrap();
        f.op(Op::Unary(panguc_ir::op::UnaryOp::Neg), &[q], "neg").unwrap();
        (f, 1, 2, 3)
    }

    fn work() -> OpWork {
        OpWork {
            matmul_flops: 800.0,
            vector_flops: 80.0,
            shared_weight_bytes: 1000.0,
            act_bytes: 40.0,
            ..OpWork::default()
        }
    }

    #[test]
    fn a_device_keeps_its_weights_and_its_part_of_the_work() {
        let (f, matmul, experts, neg) = layer();
        // ep on 4 devices: attention replicated (DP4), one group of two experts each.
        let ep = Layout::new(dims(), 4, PlanChoice::Ep).unwrap();
        let share = kernel_share(&ep);
        let m = share(&f, matmul, work());
        assert_eq!((m.shared_weight_bytes, m.matmul_flops, m.act_bytes), (1000.0, 200.0, 10.0));
        let e = share(&f, experts, work());
        assert_eq!((e.shared_weight_bytes, e.matmul_flops), (250.0, 200.0), "2 of 8 experts held");
        // h2p on 8 devices: attention DP2 x TP4; the q projection is split by heads.
        let h2p = Layout::new(dims(), 8, PlanChoice::H2p).unwrap();
        assert_eq!(h2p.attn_tp, 4);
        let share = kernel_share(&h2p);
        let m = share(&f, matmul, work());
        assert_eq!((m.shared_weight_bytes, m.matmul_flops), (250.0, 100.0));
        // An activation-only kernel runs on the sequences of its DP group.
        let n = share(&f, neg, work());
        assert_eq!((n.shared_weight_bytes, n.vector_flops), (1000.0, 40.0));
    }

    /// A column-split down projection's per-output-channel scale `[H, 1]`
    /// is held whole: only the int8 weight's columns are split.
    #[test]
    fn down_projection_scales_are_not_split_with_the_columns() {
        let mut f = Function::new("decoder_layer");
        let mut parts = vec![];
        for e in 0..8 {
            let (w, s) =
                (format!("mlp.experts.{e}.down_proj.weight"), format!("mlp.experts.{e}.down_proj.weight_scale"));
            parts.push(f.add_weight(&w, &w, TensorType::new(DType::I8, vec![Dim::c(8), Dim::c(4)])));
            parts.push(f.add_weight(&s, &s, TensorType::new(DType::F32, vec![Dim::c(8), Dim::c(1)])));
        }
        let (w, s): (Vec<ValueId>, Vec<ValueId>) = parts.chunks(2).map(|p| (p[0], p[1])).unzip();
        let sw = f.op(Op::Stack { axis: 0 }, &w, "w").unwrap();
        let ss = f.op(Op::Stack { axis: 0 }, &s, "s").unwrap();
        let wf = f.op(Op::Cast { dtype: DType::F32 }, &[sw], "w_f32").unwrap();
        f.op(Op::Binary(panguc_ir::op::BinaryOp::Mul), &[wf, ss], "scaled").unwrap();
        // h2p on 8 devices: experts TP2 x EP4, so 2 experts of 8 with half
        // of each weight's 4 columns (2 x 16 B) and all of its scale (2 x 32 B)
        // out of 8 x (32 + 32) B.
        let h2p = Layout::new(dims(), 8, PlanChoice::H2p).unwrap();
        let kernel = f.nodes.len() - 1;
        let got = kernel_share(&h2p)(&f, kernel, work()).shared_weight_bytes;
        assert_eq!(got, 1000.0 * (2.0 * 16.0 + 2.0 * 32.0) / 512.0);
    }

    #[test]
    fn layout_collectives_follow_the_plan() {
        let link = Interconnect { name: "l".into(), bandwidth_gbs: 1.0, latency_us: 10.0, full_mesh: true };
        // ep on 4 devices, 4 rows of 8 x 2 B: all-gather of each device's
        // row (3 x 16 B sent) and reduce-scatter of all rows (3/4 x 64 B).
        let ep = Layout::new(dims(), 4, PlanChoice::Ep).unwrap();
        let (bytes, secs, count) = layout_comm(&ep, 4.0, 8.0, 2.0, 1.0, &link);
        assert_eq!((bytes, count), (96.0, 2));
        assert!((secs - (2.0 * 10e-6 + 96.0 / 1e9)).abs() < 1e-15, "{secs}");
        // h2p on 8 devices adds the attention group's pair: DP2 x TP4 over
        // 48 layers, four collectives each.
        let h2p = Layout::new(dims(), 8, PlanChoice::H2p).unwrap();
        assert_eq!(layout_comm(&h2p, 8.0, 8.0, 2.0, 48.0, &link).2, 4 * 48);
        // One device: nothing to send.
        let one = Layout::new(dims(), 1, PlanChoice::Ep).unwrap();
        assert_eq!(layout_comm(&one, 8.0, 8.0, 2.0, 48.0, &link), (0.0, 0.0, 0));
    }
}

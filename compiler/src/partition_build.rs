//! `panguc compile --devices N --plan ep|h2p|auto`: partition the fused
//! batched (ragged-step, paged KV cache) module into one program per
//! device, estimate them (the report's `partition` section), and write the
//! per-rank part of the package (glue over `panguc_lowering::partition`).
//!
//! Package layout added under the package directory:
//!
//! ```text
//! partition.json                   plan, layout, and per rank (its batched program): program, step
//!                                  inputs (ids and step metadata), weights (held shard of each
//!                                  checkpoint tensor), buffers (paged KV caches, local shapes),
//!                                  collectives in program order (HCCL call, group, dtype, element count)
//! ranks/rank<R>/ir/partitioned.txt the rank's batched module, canonical text
//! ranks/rank<R>/ascend/<target>/  (Ascend targets, written by `ascend_build`) the rank's complete CANN
//!                                  project: its kernels, weights and an ACL host program that joins
//!                                  the HCCL communicators and issues the collectives in program order
//! ```

use anyhow::{bail, Context, Result};
use panguc_ir::graph::{Function, Module};
use panguc_ir::op::CollectiveKind;
use panguc_ir::{DType, Dim, Op, PanguConfig};
use panguc_lowering::estimate::EstimateSpec;
use panguc_lowering::fuse::FuseOptions;
use panguc_lowering::partition::estimate::{choose_plan, partition_report, DeviceSpec, Interconnect};
use panguc_lowering::partition::{partition_module, Dims, Layout, Partitioned, PlanChoice};
use panguc_lowering::HardwareProfile;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Flags of `panguc compile` that partitioning uses.
#[derive(Debug, Clone)]
pub struct PartitionOptions {
    /// `--devices N`.
    pub devices: usize,
    /// `--plan ep|h2p|auto` (default auto: h2p for 8 devices, else ep; with
    /// an explicit `auto` the cost model picks).
    pub plan: PlanChoice,
    /// True when `--plan auto` was given explicitly (pick by cost model).
    pub plan_by_cost: bool,
    /// The hardware profile of the devices (report and `auto`).
    pub profile: HardwareProfile,
    /// Links between devices; by default HCCS for 910B, PCIe for 310P.
    pub link: Option<Interconnect>,
    /// Context length the report's KV-cache bytes and decode step use.
    pub context: usize,
}

pub struct PartitionOutput {
    /// The batched module partitioned: the package's rank programs (CPU
    /// rank packages, per-rank CANN projects, `partition.json`), which the
    /// report's estimates price.
    pub parts: Partitioned,
    /// The report's `partition` section.
    pub report: Value,
    /// Terminal summary.
    pub summary: String,
}

/// Partition `batched` (the fused batched module,
/// `commands::batched_cpu_module`) for `opts`.
pub fn partition(
    cfg: &PanguConfig,
    batched: &Module,
    layer_fn: &str,
    opts: &PartitionOptions,
    fuse: &FuseOptions,
) -> Result<PartitionOutput> {
    let dims = Dims::from_config(cfg);
    let link = opts.link.clone().unwrap_or_else(|| Interconnect::for_profile(&opts.profile));
    let spec = DeviceSpec {
        context: opts.context,
        prefill_tokens: 2048,
        // The batch sizes of the single-device estimates.
        decode_batches: EstimateSpec::default().decode_batches,
        profile: opts.profile.clone(),
        link,
    };
    let (parts, choice) = if opts.plan == PlanChoice::Auto && opts.plan_by_cost && opts.devices > 1 {
        let (p, why) = choose_plan(batched, layer_fn, dims, opts.devices, fuse, &spec)?;
        (p, Some(why))
    } else {
        let layout = Layout::new(dims, opts.devices, opts.plan)?;
        let parts = partition_module(batched, layer_fn, &layout, fuse).context("partitioning the batched module")?;
        (parts, None)
    };
    let mut report = partition_report(batched, &parts, &spec)?;
    if let Some(why) = choice {
        report["auto"] = why;
    }
    let mut summary = String::new();
    let l = &parts.layout;
    let _ = writeln!(
        summary,
        "partition: plan {} on {} devices (attention {}, routed experts {}, shared expert {})",
        l.plan,
        l.devices,
        report["layout"]["attention"].as_str().unwrap_or("?"),
        report["layout"]["routed_experts"].as_str().unwrap_or("?"),
        report["layout"]["shared_expert"].as_str().unwrap_or("?")
    );
    for d in report["per_device"].as_array().into_iter().flatten() {
        let gb = |k: &str| d[k].as_f64().unwrap_or(0.0) / 1e9;
        let _ = writeln!(
            summary,
            "  rank {}: weights {:.2} GB, KV cache {:.3} GB @ {} ctx, act peak {:.3} GB, comm {:.1} KB/decode step, {:.1} MB/prefill, {:.2} ms/decode step",
            d["rank"], gb("weight_bytes"), gb("kv_cache_bytes"), opts.context, gb("activation_peak_bytes"),
            d["comm_bytes_decode_step"].as_f64().unwrap_or(0.0) / 1e3, d["comm_bytes_prefill"].as_f64().unwrap_or(0.0) / 1e6,
            d["ms_per_decode_step"].as_f64().unwrap_or(0.0)
        );
    }
    for b in report["decode_batches"].as_array().into_iter().flatten() {
        let _ = writeln!(
            summary,
            "  decode batch {}: {:.2} ms/step (slowest rank), {:.0} tokens/s",
            b["batch"],
            b["ms_per_step"].as_f64().unwrap_or(0.0),
            b["tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        summary,
        "  published (800I A2, W8A8, 4 cards, batch 1): {} ms TPOT; estimate {:.2} ms on {}",
        report["published"]["decode_batch_1_tpot_ms_4_cards"],
        report["ms_per_decode_step"].as_f64().unwrap_or(0.0),
        opts.profile.name
    );
    Ok(PartitionOutput { parts, report, summary })
}

/// Write `partition.json` and `ranks/rank<R>/ir/partitioned.txt` for the
/// rank programs `parts` (the package's batched ones, [`partition`])
/// into the package staging directory. `ascend` lists the Ascend targets
/// whose per-rank host programs the document points to.
pub fn write_rank_programs(
    staging: &Path,
    parts: &Partitioned,
    weight_dtype: DType,
    ascend: &[panguc_codegen_ascendc::Target],
) -> Result<()> {
    let mut ranks = vec![];
    for r in &parts.ranks {
        let dir = staging.join(format!("ranks/rank{}", r.rank));
        std::fs::create_dir_all(dir.join("ir")).with_context(|| format!("creating {}", dir.display()))?;
        let ir = format!("ranks/rank{}/ir/partitioned.txt", r.rank);
        std::fs::write(staging.join(&ir), panguc_ir::text::print_module(&r.module))
            .with_context(|| format!("writing {ir}"))?;
        let colls = collectives(&r.module, weight_dtype);
        let hosts: BTreeMap<&str, String> = ascend
            .iter()
            .map(|t| (t.name(), format!("ranks/rank{}/ascend/{}/host/panguc_host.cpp", r.rank, t.name())))
            .collect();
        ranks.push(json!({
            "rank": r.rank,
            "program": ir,
            "ascend_host": hosts,
            "inputs": rank_step_inputs(&r.module),
            "weights": rank_weights(&r.module),
            "buffers": rank_buffers(&r.module),
            "collectives": colls,
        }));
    }
    let l = &parts.layout;
    let doc = json!({
        "plan": l.plan,
        "devices": l.devices,
        "layout": l,
        "ranks": ranks,
    });
    let path = staging.join("partition.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Each checkpoint tensor the rank reads, with the shard it holds.
fn rank_weights(m: &Module) -> Vec<Value> {
    let mut out = vec![];
    let entry = m.entry_fn();
    let mut prefixes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    prefixes.entry(entry.name.as_str()).or_default().push("");
    for n in &entry.nodes {
        if let Op::Call { func, weight_prefix } = &n.op {
            prefixes.entry(func.as_str()).or_default().push(weight_prefix.as_str());
        }
    }
    for (fname, pfx) in prefixes {
        let Some(f) = m.function(fname) else { continue };
        for (p, tensor) in f.weight_params() {
            let shape: Vec<usize> = f.ty(p.value).shape.iter().map(|d| d.as_const().unwrap_or(0)).collect();
            let slices: Vec<Value> = f
                .nodes
                .iter()
                .filter(|n| n.args.contains(&p.value))
                .filter_map(|n| match n.op {
                    Op::Slice { axis, start, end } => Some(json!({"axis": axis, "start": start, "end": end})),
                    _ => None,
                })
                .collect();
            let all_sliced =
                f.nodes.iter().filter(|n| n.args.contains(&p.value)).all(|n| matches!(n.op, Op::Slice { .. }));
            for prefix in &pfx {
                out.push(json!({
                    "tensor": format!("{prefix}{tensor}"),
                    "shape": shape,
                    "held": if all_sliced && !slices.is_empty() { json!(slices) } else { json!("all") },
                }));
            }
        }
    }
    out
}

/// How many of the entry's inputs lead the KV caches (the token ids and,
/// for a batched program, the step metadata): the caches are the last
/// inputs, one per output after the logits.
fn leading_inputs(f: &Function) -> usize {
    let inputs = f.input_params().count();
    inputs.saturating_sub(f.outputs.len().saturating_sub(1))
}

/// The rank's per-step inputs (token ids, positions and, in a batched
/// program, the rest of the step metadata), which every rank gets alike.
fn rank_step_inputs(m: &Module) -> Vec<Value> {
    let f = m.entry_fn();
    f.input_params()
        .take(leading_inputs(f))
        .map(|p| json!({"name": f.name_of(p.value), "type": f.ty(p.value).to_string()}))
        .collect()
}

/// The rank's KV-cache buffers (the entry inputs after the step inputs)
/// with their local shapes.
fn rank_buffers(m: &Module) -> Vec<Value> {
    let f = m.entry_fn();
    f.input_params()
        .skip(leading_inputs(f))
        .map(|p| json!({"name": f.name_of(p.value), "kind": "kv_cache", "type": f.ty(p.value).to_string()}))
        .collect()
}

/// The collectives of one call of every function, in program order
/// (the decoder layer's run once per layer).
fn collectives(m: &Module, weight_dtype: DType) -> Vec<Value> {
    let mut out = vec![];
    let mut seen = std::collections::BTreeSet::new();
    let visit = |f: &Function, out: &mut Vec<Value>| {
        for n in &f.nodes {
            let Op::Collective { kind, group, axis } = &n.op else { continue };
            let ty = f.ty(n.args[0]);
            let count = ty
                .shape
                .iter()
                .try_fold(Dim::c(1), |acc, d| acc.mul(d))
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into());
            let (call, reduce) = match kind {
                CollectiveKind::AllReduce => ("HcclAllReduce", true),
                CollectiveKind::AllGather => ("HcclAllGather", false),
                CollectiveKind::ReduceScatter => ("HcclReduceScatter", true),
                CollectiveKind::AllToAll => ("HcclAlltoAllV", false),
            };
            out.push(json!({
                "function": f.name,
                "value": f.name_of(n.results[0]),
                "op": n.op.mnemonic(),
                "hccl": call,
                "group": group,
                "axis": axis,
                "reduce": if reduce { Some("HCCL_REDUCE_SUM") } else { None },
                "dtype": activation_dtype(weight_dtype),
                "send_type": ty.to_string(),
                "send_count": count,
            }));
        }
    };
    // Entry first, then each callee at its first call (program order of one step).
    let entry = m.entry_fn();
    visit(entry, &mut out);
    for n in &entry.nodes {
        if let Op::Call { func, .. } = &n.op {
            if seen.insert(func.clone()) {
                if let Some(g) = m.function(func) {
                    visit(g, &mut out);
                }
            }
        }
    }
    out
}

/// Activations travel in the model's 16-bit dtype on the NPU.
fn activation_dtype(w: DType) -> &'static str {
    match w {
        DType::F16 => "HCCL_DATA_TYPE_FP16",
        DType::F32 => "HCCL_DATA_TYPE_FP32",
        _ => "HCCL_DATA_TYPE_BFP16",
    }
}

/// The links between devices: `--interconnect` (default: the profile's
/// usual links) with `--link-bandwidth` / `--link-latency` overrides.
pub fn interconnect(
    profile: &HardwareProfile,
    name: Option<&str>,
    bandwidth_gbs: Option<f64>,
    latency_us: Option<f64>,
) -> Result<Interconnect> {
    let mut link = match name {
        None => Interconnect::for_profile(profile),
        Some("hccs") => Interconnect::hccs(),
        Some("pcie") => Interconnect::pcie(),
        Some(other) => bail!("unknown --interconnect `{other}` (hccs, pcie)"),
    };
    if let Some(b) = bandwidth_gbs {
        if !(b.is_finite() && b > 0.0) {
            bail!("--link-bandwidth must be a positive number of GB/s, got {b}");
        }
        link.bandwidth_gbs = b;
        link.name += &format!(" @ {b} GB/s");
    }
    if let Some(l) = latency_us {
        if !(l.is_finite() && l >= 0.0) {
            bail!("--link-latency must be a non-negative number of microseconds, got {l}");
        }
        link.latency_us = l;
        link.name += &format!(" + {l} us");
    }
    Ok(link)
}

/// Parse `--devices` / `--plan` as the CLI gives them (for the lead's clap glue).
pub fn parse_plan(devices: usize, plan: Option<&str>) -> Result<(PlanChoice, bool)> {
    if devices == 0 {
        bail!("--devices must be at least 1");
    }
    match plan {
        None => Ok((PlanChoice::Auto, false)),
        Some(p) => {
            let c: PlanChoice = p.parse().map_err(anyhow::Error::msg)?;
            Ok((c, c == PlanChoice::Auto))
        }
    }
}

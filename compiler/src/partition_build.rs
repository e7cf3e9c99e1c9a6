//! `panguc compile --devices N --plan ep|h2p|auto`: partition the fused
//! module into one program per device, and write the per-rank part of the
//! package (glue over `panguc_lowering::partition`).
//!
//! Package layout added under the package directory:
//!
//! ```text
//! partition.json                   plan, layout, and per rank: program, weights (held shard of each
//!                                  checkpoint tensor), buffers (KV caches, local shapes), collectives
//!                                  in program order (HCCL call, group, dtype, element count)
//! ranks/rank<R>/ir/partitioned.txt the rank's module, canonical text
//! ranks/rank<R>/hccl_collectives.cpp (Ascend targets) HCCL communicator set-up and one function per
//!                                  collective site, for the host program to call in program order
//! ```
//!
//! This file uses only `panguc_ir` / `panguc_lowering` so it has no
//! dependency on the rest of the compiler crate.

use anyhow::{bail, Context, Result};
use panguc_ir::graph::{Function, Module};
use panguc_ir::op::CollectiveKind;
use panguc_ir::{DType, Dim, Op, PanguConfig};
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
    pub parts: Partitioned,
    /// The report's `partition` section.
    pub report: Value,
    /// Terminal summary.
    pub summary: String,
}

/// Partition `fused` (the output of the fusion pipeline) for `opts`.
pub fn partition(
    cfg: &PanguConfig,
    fused: &Module,
    layer_fn: &str,
    opts: &PartitionOptions,
    fuse: &FuseOptions,
) -> Result<PartitionOutput> {
    let dims = Dims::from_config(cfg);
    let link = opts.link.clone().unwrap_or_else(|| Interconnect::for_profile(&opts.profile));
    let spec = DeviceSpec { context: opts.context, prefill_tokens: 2048, profile: opts.profile.clone(), link };
    let (parts, choice) = if opts.plan == PlanChoice::Auto && opts.plan_by_cost && opts.devices > 1 {
        let (p, why) = choose_plan(fused, layer_fn, dims, opts.devices, fuse, &spec)?;
        (p, Some(why))
    } else {
        let layout = Layout::new(dims, opts.devices, opts.plan)?;
        (partition_module(fused, layer_fn, &layout, fuse)?, None)
    };
    let mut report = partition_report(fused, &parts, &spec)?;
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
    let _ = writeln!(
        summary,
        "  published (800I A2, W8A8, 4 cards, batch 1): {} ms TPOT; estimate {:.2} ms on {}",
        report["published"]["decode_batch_1_tpot_ms_4_cards"],
        report["ms_per_decode_step"].as_f64().unwrap_or(0.0),
        opts.profile.name
    );
    Ok(PartitionOutput { parts, report, summary })
}

/// Write `partition.json` and `ranks/` into the package staging directory.
/// `ascend` adds each rank's HCCL host source.
pub fn write_rank_programs(staging: &Path, out: &PartitionOutput, weight_dtype: DType, ascend: bool) -> Result<()> {
    let mut ranks = vec![];
    for r in &out.parts.ranks {
        let dir = staging.join(format!("ranks/rank{}", r.rank));
        std::fs::create_dir_all(dir.join("ir")).with_context(|| format!("creating {}", dir.display()))?;
        let ir = format!("ranks/rank{}/ir/partitioned.txt", r.rank);
        std::fs::write(staging.join(&ir), panguc_ir::text::print_module(&r.module))
            .with_context(|| format!("writing {ir}"))?;
        let colls = collectives(&r.module, weight_dtype);
        if ascend {
            let path = dir.join("hccl_collectives.cpp");
            std::fs::write(&path, hccl_source(r.rank, out.parts.layout.devices, &colls))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        ranks.push(json!({
            "rank": r.rank,
            "program": ir,
            "hccl": if ascend { Some(format!("ranks/rank{}/hccl_collectives.cpp", r.rank)) } else { None },
            "weights": rank_weights(&r.module),
            "buffers": rank_buffers(&r.module),
            "collectives": colls,
        }));
    }
    let l = &out.parts.layout;
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

/// The rank's KV-cache buffers (entry inputs after ids and positions).
fn rank_buffers(m: &Module) -> Vec<Value> {
    let f = m.entry_fn();
    f.input_params()
        .skip(2)
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

/// C++ for the rank's host program: one communicator per distinct group
/// (`HcclCommInitRootInfo`), and one function per collective site issuing
/// the HCCL call on the compute stream, in program order.
pub fn hccl_source(rank: usize, devices: usize, colls: &[Value]) -> String {
    let mut groups: Vec<Vec<u64>> = vec![];
    for c in colls {
        let g: Vec<u64> =
            c["group"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let mut s = String::new();
    let _ = writeln!(s, "// Generated by panguc: HCCL collectives of rank {rank} of {devices}. Do not edit.");
    let _ = writeln!(s, "// Call panguc_hccl_init once, then the collective functions in the order listed");
    let _ = writeln!(s, "// (each decoder layer issues its collectives in this order), on the compute stream.");
    let _ = writeln!(
        s,
        "#include <cstdint>\n#include \"acl/acl.h\"\n#include \"hccl/hccl.h\"\n#include \"hccl/hccl_types.h\"\n"
    );
    let _ = writeln!(s, "namespace panguc_rank{rank} {{\n");
    let _ = writeln!(
        s,
        "constexpr uint32_t kRank = {rank};\nconstexpr uint32_t kNumComms = {};\nstatic HcclComm g_comm[kNumComms];\n",
        groups.len()
    );
    for (i, g) in groups.iter().enumerate() {
        let _ = writeln!(s, "// communicator {i}: ranks {g:?}");
    }
    let _ = writeln!(s, "\n// root_info[i]: the HcclRootInfo of communicator i (HcclGetRootInfo on its first member, broadcast out of band).");
    let _ = writeln!(s, "extern \"C\" HcclResult panguc_hccl_init(const HcclRootInfo* root_info) {{");
    for (i, g) in groups.iter().enumerate() {
        let pos = g.iter().position(|r| *r as usize == rank).unwrap_or(0);
        let _ = writeln!(s, "  if (HcclResult r = HcclCommInitRootInfo({}, &root_info[{i}], {pos}, &g_comm[{i}]); r != HCCL_SUCCESS) return r;", g.len());
    }
    let _ = writeln!(s, "  return HCCL_SUCCESS;\n}}\n");
    for (k, c) in colls.iter().enumerate() {
        let g: Vec<u64> =
            c["group"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        let ci = groups.iter().position(|x| *x == g).unwrap_or(0);
        let n = g.len();
        let count = c["send_count"].as_str().unwrap_or("0");
        let dt = c["dtype"].as_str().unwrap_or("HCCL_DATA_TYPE_BFP16");
        let _ = writeln!(
            s,
            "// #{k} @{}: %{} = {} of {} over {:?}",
            c["function"].as_str().unwrap_or(""),
            c["value"].as_str().unwrap_or(""),
            c["op"].as_str().unwrap_or(""),
            c["send_type"].as_str().unwrap_or(""),
            g
        );
        let _ = writeln!(s, "extern \"C\" HcclResult panguc_collective_{k}(void* send, void* recv, uint64_t tokens, uint64_t past, aclrtStream stream) {{");
        let _ = writeln!(s, "  (void)tokens; (void)past;\n  const uint64_t send_count = {count};");
        let body = match c["hccl"].as_str().unwrap_or("") {
            "HcclAllReduce" => {
                format!("HcclAllReduce(send, recv, send_count, {dt}, HCCL_REDUCE_SUM, g_comm[{ci}], stream)")
            }
            "HcclAllGather" => format!("HcclAllGather(send, recv, send_count, {dt}, g_comm[{ci}], stream)"),
            "HcclReduceScatter" => {
                format!("HcclReduceScatter(send, recv, send_count / {n}, {dt}, HCCL_REDUCE_SUM, g_comm[{ci}], stream)")
            }
            _ => {
                let _ = writeln!(s, "  uint64_t counts[{n}], displs[{n}];\n  for (uint64_t i = 0; i < {n}; ++i) {{ counts[i] = send_count / {n}; displs[i] = i * (send_count / {n}); }}");
                format!("HcclAlltoAllV(send, counts, displs, {dt}, recv, counts, displs, {dt}, g_comm[{ci}], stream)")
            }
        };
        let _ = writeln!(s, "  return {body};\n}}\n");
    }
    let _ =
        writeln!(s, "extern \"C\" void panguc_hccl_finalize() {{\n  for (auto& c : g_comm) HcclCommDestroy(c);\n}}\n");
    let _ = writeln!(s, "}}  // namespace panguc_rank{rank}");
    s
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

//! Multi-device partitioning: one program per device (rank) and the
//! collectives between them, derived from the fused single-device module by
//! rewrites in the same e-graph machinery as fusion.
//!
//! For each rank, the fused decoder layer is loaded into an e-graph and the
//! rank's partitioning rules ([`rules`]) add, next to each value that needs
//! weights the rank does not hold, an equal expression over the rank's own
//! weight shards plus collectives:
//!
//! * `moe-expert-parallel`: the MoE over all expert groups equals the sum
//!   over ranks of the MoE over each rank's groups (routing columns of its
//!   groups, expert ids rebased to its shard of the stacked experts),
//!   plus, with expert TP, the intermediate dimension split in halves, and
//!   with shared-expert TP, the shared MLP split by columns/rows; the sum
//!   is an `all_reduce` (ep) or `reduce_scatter` + `all_gather` (h2p);
//! * `attention-tensor-parallel`: the merged QKV projection split by heads
//!   (column split), the KV cache sharded by KV head, attention on the
//!   rank's heads, and the output projection split by rows, its partial
//!   sums combined by `reduce_scatter` + `all_gather`; for the one-sequence
//!   form (`qkv_rope` + `flash_attention`, contiguous caches `[P, Hkv, D]`)
//!   and the batched one (`qkv_rope_cache_write` + `paged_attention`, each
//!   rank holding its KV heads of every block: `[blocks, block_size,
//!   Hkv / attn_tp, D]`);
//! * the int8 forms of both ([`quant`]; W8A8_DYNAMIC and static W8A8 with
//!   the int8 KV cache): column-parallel int8 projections split their
//!   weight rows and per-channel scales, row-parallel ones quantize their
//!   input exactly as one device does (all-gathered whole rows for the
//!   per-token scales of W8A8_DYNAMIC; the rank's own columns for static
//!   per-tensor scales, `quant_bias` on the group's first rank);
//! * `slice-pushdown`: slices of weight-only values are pushed through
//!   `concat`, `stack`, `cast` and `slice` down to the checkpoint tensors,
//!   so that every weight the rank reads is a shard it holds.
//!
//! The fusion rules run in the same saturation, inside each rank's part.
//! Extraction uses the fusion cost model plus *residency*: an e-node that
//! reads a checkpoint tensor (or a KV-cache input) the rank does not hold,
//! or a shard other than its own, costs infinity. So the extracted program
//! only reads what the rank holds. A post-pass ([`signature`]) then gives
//! the rank's functions their local signatures (sharded KV caches) and
//! drops weights the rank does not use.

pub mod estimate;
pub mod quant;
pub mod rules;
pub mod signature;

use crate::analysis::EG;
use crate::convert::{load_function, rebuild_function};
use crate::extract::extract_dag;
use crate::fuse::{enode_cost, FuseOptions};
use crate::lang::TLang;
use anyhow::{anyhow, bail, Context, Result};
use egg::{Id, Runner, SimpleScheduler};
use panguc_ir::graph::ParamKind;
use panguc_ir::verify::verify_module;
use panguc_ir::{Module, Op, PanguConfig};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// `--plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanChoice {
    Ep,
    H2p,
    Auto,
}

impl std::str::FromStr for PlanChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ep" => Ok(PlanChoice::Ep),
            "h2p" => Ok(PlanChoice::H2p),
            "auto" => Ok(PlanChoice::Auto),
            other => Err(format!("unknown --plan `{other}` (known plans: ep, h2p, auto)")),
        }
    }
}

/// A concrete plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanKind {
    /// One device, nothing partitioned.
    Single,
    /// Expert parallel: attention and shared expert replicated, whole
    /// expert groups per device, MoE output all-reduced.
    Ep,
    /// The report's hybrid: attention DP x TP, routed experts TP2 x EP,
    /// shared expert TP over all devices.
    H2p,
}

impl fmt::Display for PlanKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanKind::Single => "single",
            PlanKind::Ep => "ep",
            PlanKind::H2p => "h2p",
        })
    }
}

/// The model dimensions partitioning needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Dims {
    pub hidden: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub groups: usize,
    pub moe_intermediate: usize,
    pub shared_intermediate: usize,
}

impl Dims {
    pub fn from_config(c: &PanguConfig) -> Dims {
        Dims {
            hidden: c.hidden_size,
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            experts: c.num_experts,
            groups: c.num_groups(),
            moe_intermediate: c.moe_intermediate_size,
            shared_intermediate: c.shared_expert_intermediate_size,
        }
    }
}

/// How N devices split the model. Rank `r`:
/// * attention: TP group `[r / attn_tp * attn_tp, +attn_tp)`, index `r % attn_tp`
///   (the `devices / attn_tp` groups are data-parallel replicas);
/// * routed experts: EP rank `r / expert_tp` holds expert groups
///   `[ep * groups_per_ep, +groups_per_ep)`, TP index `r % expert_tp` holds
///   that slice of each expert's intermediate dimension;
/// * shared expert: TP index `r % shared_tp` over all devices (1 = replicated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub plan: PlanKind,
    pub devices: usize,
    pub attn_tp: usize,
    pub expert_tp: usize,
    pub shared_tp: usize,
    pub dims: Dims,
}

impl Layout {
    /// Validate `devices` for `plan` (`Auto` is resolved by
    /// [`estimate::choose_plan`]; here it means the default: h2p for 8
    /// devices, ep otherwise).
    pub fn new(dims: Dims, devices: usize, plan: PlanChoice) -> Result<Layout> {
        if devices == 0 {
            bail!("--devices must be at least 1");
        }
        if devices == 1 {
            return Ok(Layout { plan: PlanKind::Single, devices, attn_tp: 1, expert_tp: 1, shared_tp: 1, dims });
        }
        let plan = match plan {
            PlanChoice::Ep => PlanKind::Ep,
            PlanChoice::H2p => PlanKind::H2p,
            PlanChoice::Auto => {
                if devices == 8 {
                    PlanKind::H2p
                } else {
                    PlanKind::Ep
                }
            }
        };
        let g = dims.groups;
        let layout = match plan {
            PlanKind::Ep => {
                if devices > g {
                    bail!(
                        "--devices {devices} exceeds the model's {g} expert groups: plan `ep` gives every device whole \
                         expert groups; use --plan h2p (which splits experts by tensor parallelism too) or at most {g} devices"
                    );
                }
                if !g.is_multiple_of(devices) {
                    bail!("--devices {devices} does not divide the model's {g} expert groups (plan `ep` needs equal whole groups per device)");
                }
                Layout { plan, devices, attn_tp: 1, expert_tp: 1, shared_tp: 1, dims }
            }
            PlanKind::H2p => {
                if !devices.is_multiple_of(2) {
                    bail!("plan `h2p` splits routed experts TP2 x EP{{devices/2}}: --devices {devices} must be even");
                }
                let ep = devices / 2;
                if ep > g || !g.is_multiple_of(ep) {
                    bail!("plan `h2p`: the {ep} expert-parallel ranks (--devices {devices} / TP2) must divide the model's {g} expert groups");
                }
                if !dims.moe_intermediate.is_multiple_of(2) {
                    bail!("plan `h2p`: moe_intermediate_size {} does not split in two", dims.moe_intermediate);
                }
                if !dims.shared_intermediate.is_multiple_of(devices) || !dims.hidden.is_multiple_of(devices) {
                    bail!(
                        "plan `h2p`: shared_expert_intermediate_size {} and hidden_size {} must divide by --devices {devices}",
                        dims.shared_intermediate,
                        dims.hidden
                    );
                }
                // Attention TP4 as in the report, scaled down to what the
                // KV heads and the device count allow (tiny models).
                let attn_tp = (1..=4.min(devices))
                    .rev()
                    .find(|t| {
                        devices.is_multiple_of(*t)
                            && dims.kv_heads.is_multiple_of(*t)
                            && dims.q_heads.is_multiple_of(*t)
                            && dims.hidden.is_multiple_of(*t)
                    })
                    .unwrap_or(1);
                Layout { plan, devices, attn_tp, expert_tp: 2, shared_tp: devices, dims }
            }
            PlanKind::Single => unreachable!(),
        };
        Ok(layout)
    }

    pub fn all(&self) -> Vec<usize> {
        (0..self.devices).collect()
    }

    pub fn attn_group(&self, r: usize) -> Vec<usize> {
        let start = r / self.attn_tp * self.attn_tp;
        (start..start + self.attn_tp).collect()
    }

    pub fn expert_ep(&self) -> usize {
        self.devices / self.expert_tp
    }

    pub fn groups_per_rank(&self) -> usize {
        self.dims.groups / self.expert_ep()
    }

    /// Expert groups `[g0, g1)` of rank `r`.
    pub fn local_groups(&self, r: usize) -> (usize, usize) {
        let gp = self.groups_per_rank();
        let ep = r / self.expert_tp;
        (ep * gp, (ep + 1) * gp)
    }

    /// Experts `[e0, e1)` of rank `r`.
    pub fn local_experts(&self, r: usize) -> (usize, usize) {
        let per = self.dims.experts / self.dims.groups;
        let (g0, g1) = self.local_groups(r);
        (g0 * per, g1 * per)
    }

    /// Slice `[i0, i1)` of each routed expert's intermediate dimension.
    pub fn expert_cols(&self, r: usize) -> (usize, usize) {
        let w = self.dims.moe_intermediate / self.expert_tp;
        let t = r % self.expert_tp;
        (t * w, (t + 1) * w)
    }

    /// Slice of the shared expert's intermediate dimension.
    pub fn shared_cols(&self, r: usize) -> (usize, usize) {
        let w = self.dims.shared_intermediate / self.shared_tp;
        let t = r % self.shared_tp;
        (t * w, (t + 1) * w)
    }

    /// Query heads `[h0, h1)` and KV heads `[k0, k1)` of rank `r`.
    pub fn heads(&self, r: usize) -> ((usize, usize), (usize, usize)) {
        let t = r % self.attn_tp;
        let (q, kv) = (self.dims.q_heads / self.attn_tp, self.dims.kv_heads / self.attn_tp);
        ((t * q, (t + 1) * q), (t * kv, (t + 1) * kv))
    }

    /// What the checkpoint tensor / cache input `name` (a parameter name of
    /// the decoder layer, of `ndim` dimensions) is on rank `r`.
    pub fn residency(&self, r: usize, name: &str, ndim: usize) -> Residency {
        let d = &self.dims;
        let hd = d.head_dim;
        let ((q0, q1), (k0, k1)) = self.heads(r);
        if let Some(rest) = name.strip_prefix("mlp.experts.") {
            let (idx, tensor) = rest.split_once('.').unwrap_or((rest, ""));
            let Ok(e) = idx.parse::<usize>() else { return Residency::Full };
            let (e0, e1) = self.local_experts(r);
            if !(e0..e1).contains(&e) {
                return Residency::None;
            }
            if self.expert_tp == 1 {
                return Residency::Full;
            }
            let (i0, i1) = self.expert_cols(r);
            return linear_shard(tensor, "down_proj", i0, i1);
        }
        if let Some(tensor) = name.strip_prefix("mlp.shared_expert.") {
            if self.shared_tp == 1 {
                return Residency::Full;
            }
            let (j0, j1) = self.shared_cols(r);
            return linear_shard(tensor, "down_proj", j0, j1);
        }
        if self.attn_tp > 1 {
            if let Some(tensor) = name.strip_prefix("self_attn.") {
                let proj = tensor.split_once('.').map_or(tensor, |(p, _)| p);
                let shard = match proj {
                    "q_proj" | "o_proj" => Some((q0 * hd, q1 * hd)),
                    "k_proj" | "v_proj" => Some((k0 * hd, k1 * hd)),
                    _ => None,
                };
                if let Some((s, e)) = shard {
                    return linear_shard(tensor, "o_proj", s, e);
                }
            }
            if name == "k_cache" || name == "v_cache" {
                return match kv_head_axis(ndim) {
                    Some(axis) => Residency::slice(axis, k0, k1),
                    None => Residency::None,
                };
            }
        }
        Residency::Full
    }
}

/// The shard `[s, e)` of tensor `tensor` (`<proj>.<part>`) of a linear split
/// by tensor parallelism: the row-parallel projection `row_proj` holds
/// input channels (axis 1 of its weight `[N, K]`) and every per-output
/// tensor whole; the column-parallel ones hold output channels: the rows of
/// the weight and of every per-output-channel tensor (float bias, int8
/// `weight_scale` / `weight_offset`, static W8A8 `quant_bias` / `deq_scale`).
/// Per-tensor activation quantization parameters (`input_scale`,
/// `input_offset`) and the int8 KV cache's per-channel `kv_cache_scale` /
/// `kv_cache_offset` (read through a reshape to `[Hkv, D]`) stay whole.
fn linear_shard(tensor: &str, row_proj: &str, s: usize, e: usize) -> Residency {
    let (proj, part) = tensor.split_once('.').unwrap_or((tensor, ""));
    match part {
        "weight" if proj == row_proj => Residency::slice(1, s, e),
        _ if proj == row_proj => Residency::Full,
        "weight" | "bias" | "weight_scale" | "weight_offset" | "quant_bias" | "deq_scale" => Residency::slice(0, s, e),
        _ => Residency::Full,
    }
}

/// The KV-head axis of a KV cache of `ndim` dimensions: the second to last
/// in both the one-sequence layout `[P, Hkv, D]` and the paged layout
/// `[num_blocks, block_size, Hkv, D]`.
pub(crate) fn kv_head_axis(ndim: usize) -> Option<usize> {
    ndim.checked_sub(2).filter(|_| ndim >= 3)
}

/// Which part of a parameter a rank holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Residency {
    Full,
    /// Only `x[.., start:end, ..]` along `axis`: the rank may only read it
    /// through a slice inside that range.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    None,
}

impl Residency {
    fn slice(axis: usize, start: usize, end: usize) -> Residency {
        Residency::Slice { axis, start, end }
    }
}

/// One rank's program.
#[derive(Debug, Clone)]
pub struct RankModule {
    pub rank: usize,
    pub module: Module,
    /// Partitioning rule -> applications in this rank's e-graph.
    pub rules_fired: BTreeMap<String, usize>,
    pub egraph_nodes: usize,
    pub seconds: f64,
}

/// The partitioned program.
#[derive(Debug, Clone)]
pub struct Partitioned {
    pub layout: Layout,
    pub ranks: Vec<RankModule>,
}

/// Partition the fused module for `layout`: one module per rank. With one
/// device the module is returned unchanged.
pub fn partition_module(fused: &Module, layer_fn: &str, layout: &Layout, opts: &FuseOptions) -> Result<Partitioned> {
    let layout = &int8_routed_layout(fused, layer_fn, layout)?;
    let mut ranks = vec![];
    for r in 0..layout.devices {
        if layout.plan == PlanKind::Single {
            ranks.push(RankModule {
                rank: 0,
                module: fused.clone(),
                rules_fired: BTreeMap::new(),
                egraph_nodes: 0,
                seconds: 0.0,
            });
            continue;
        }
        ranks.push(partition_rank(fused, layer_fn, layout, r, opts).with_context(|| format!("partitioning rank {r}"))?);
    }
    Ok(Partitioned { layout: layout.clone(), ranks })
}

/// `layout`, with whole expert groups per device when the module's routed
/// experts are the W8A8_DYNAMIC chain (init routing, int8 gate/up GEMMs,
/// SwiGLU, per-row requantization, int8 down GEMM, combine). Splitting an
/// expert's intermediate channels (h2p's expert TP2) would need the whole
/// SwiGLU rows on each rank before the requantization, a collective inside
/// the chain that the backends run as one fused launch; whole groups per
/// device keep every row's quantization exactly the single device's with
/// the one all-reduce after the chain (the same expert bytes per device).
fn int8_routed_layout(fused: &Module, layer_fn: &str, layout: &Layout) -> Result<Layout> {
    let f = fused.function(layer_fn).ok_or_else(|| anyhow!("no function @{layer_fn} to partition"))?;
    if layout.expert_tp == 1 || !f.nodes.iter().any(|n| matches!(n.op, Op::GroupedQuantMatMul)) {
        return Ok(layout.clone());
    }
    let (n, g) = (layout.devices, layout.dims.groups);
    if !g.is_multiple_of(n) {
        bail!(
            "plan {}: a W8A8_DYNAMIC module's routed experts are placed as whole expert groups per device (expert TP \
             would split the per-row requantization between the gate/up and down GEMMs), and --devices {n} does not \
             divide the model's {g} expert groups",
            layout.plan
        );
    }
    Ok(Layout { expert_tp: 1, ..layout.clone() })
}

fn partition_rank(
    fused: &Module,
    layer_fn: &str,
    layout: &Layout,
    rank: usize,
    opts: &FuseOptions,
) -> Result<RankModule> {
    let start = Instant::now();
    let f = fused.function(layer_fn).ok_or_else(|| anyhow!("no function @{layer_fn} to partition"))?;
    let loaded = load_function(fused, f);
    let cx = Arc::new(rules::RankCx { layout: layout.clone(), rank });
    let part_rules = rules::partition_rules(cx.clone());
    let fusion = crate::rules::select_rules(opts.rules.as_deref()).map_err(|e| anyhow!(e))?;
    let rewrites: Vec<_> = part_rules.iter().chain(fusion.iter().flat_map(|r| r.rewrites.iter())).collect();
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_iter_limit(opts.limits.iter_limit)
        .with_node_limit(opts.limits.node_limit)
        .with_time_limit(opts.limits.time_limit)
        .with_scheduler(SimpleScheduler)
        .run(rewrites);
    let eg = runner.egraph;
    let resident = residency_of_classes(&eg, f, &loaded.value_class, layout, rank);
    let (profile, points) = (&opts.profile, &opts.points);
    let rules_fired: BTreeMap<String, usize> = eg.analysis.fired.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    // Every program reads a weight (or KV cache) the rank does not hold
    // whole when some op reading it has no partitioning rule.
    let uncovered = || {
        let fired: Vec<String> =
            rules::RULES.iter().map(|(r, _)| format!("{r} x{}", rules_fired.get(*r).copied().unwrap_or(0))).collect();
        anyhow!(
            "rank {rank}: no program of @{layer_fn} reads only the weights the rank holds under plan {} (attention TP{}, \
             routed experts TP{} x EP{}, shared expert TP{}): some op reading a sharded weight has no partitioning rule \
             (partitioning rules applied: {}). Covered: the float MoE and attention; W8A8_DYNAMIC and static W8A8 \
             attention (float or int8 C8 KV cache), shared expert and routed experts",
            layout.plan,
            layout.attn_tp,
            layout.expert_tp,
            layout.expert_ep(),
            layout.shared_tp,
            fired.join(", ")
        )
    };
    let extraction = extract_dag(&eg, loaded.root, |eg, class, node| {
        if !reads_only_resident(eg, node, &resident) {
            return f64::INFINITY;
        }
        enode_cost(eg, class, node, points, profile)
    })
    .map_err(|e| uncovered().context(format!("extracting rank {rank}'s @{layer_fn}: {e}")))?;
    if !extraction.cost.is_finite() {
        return Err(uncovered());
    }
    let rebuilt = rebuild_function(&eg, loaded.root, &extraction.choice, f, &loaded.value_class)
        .map_err(|e| anyhow!("rebuilding rank {rank}'s @{layer_fn}: {e}"))?;
    let module = signature::localize(fused, layer_fn, rebuilt).context("giving the rank its local signature")?;
    verify_module(&module).map_err(|e| anyhow!("rank {rank}'s module fails verification: {e}"))?;
    Ok(RankModule {
        rank,
        module,
        rules_fired,
        egraph_nodes: eg.total_number_of_nodes(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Residency of every parameter class of the loaded function.
fn residency_of_classes(
    eg: &EG,
    f: &panguc_ir::Function,
    value_class: &[Id],
    layout: &Layout,
    rank: usize,
) -> HashMap<Id, Residency> {
    let mut out = HashMap::new();
    for p in &f.params {
        let name = f.name_of(p.value);
        let ndim = f.ty(p.value).rank();
        let res = match &p.kind {
            ParamKind::Weight { tensor } => layout.residency(rank, tensor, ndim),
            ParamKind::Input => layout.residency(rank, name, ndim),
        };
        out.insert(eg.find(value_class[p.value.index()]), res);
    }
    out
}

/// False when `node` reads a parameter the rank does not hold, or a part
/// of one outside its shard.
fn reads_only_resident(eg: &EG, node: &TLang, resident: &HashMap<Id, Residency>) -> bool {
    use egg::Language;
    let slice = match crate::analysis::node_op(eg, node) {
        Some((Op::Slice { axis, start, end }, _)) => Some((axis, start, end)),
        _ => None,
    };
    node.children().iter().all(|c| match resident.get(&eg.find(*c)) {
        None | Some(Residency::Full) => true,
        Some(Residency::None) => false,
        Some(Residency::Slice { axis, start, end }) => {
            matches!(slice, Some((a, s, e)) if a == *axis && s >= *start && e <= *end)
        }
    })
}

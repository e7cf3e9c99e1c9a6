//! The fusion driver: saturate one function's e-graph under budgets,
//! extract the cheapest program, rebuild the graph IR, and report.

use crate::analysis::{node_op, EG};
use crate::convert::{load_function, rebuild_function};
use crate::cost::{op_work, Operand, Workload};
use crate::estimate::function_cost;
use crate::extract::extract_dag;
use crate::lang::TLang;
use crate::profile::{builtin_profile, HardwareProfile};
use crate::rules::select_rules;
use crate::{is_view, kernel_count};
use anyhow::{anyhow, Context, Result};
use egg::{Id, Language, Runner, SimpleScheduler, StopReason};
use panguc_ir::verify::{verify_function, verify_module};
use panguc_ir::{Function, Module, Op};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Saturation budgets. The defaults are far above what the decoder layer
/// of the real model needs (it saturates after 4 iterations with about 450
/// e-nodes) and low enough that a runaway rule set stops within seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub iter_limit: usize,
    pub node_limit: usize,
    pub time_limit: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { iter_limit: 64, node_limit: 50_000, time_limit: Duration::from_secs(10) }
    }
}

/// What to fuse with and how to price it.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    pub limits: Limits,
    /// The profile extraction minimises time on.
    pub profile: HardwareProfile,
    /// Only these rules (all when `None`).
    pub rules: Option<Vec<String>>,
    /// Workloads whose times are summed into one cost: by default a decode
    /// step at 2048 tokens of context and a 2048-token prefill, so that
    /// neither the memory-bound nor the compute-bound regime is ignored.
    pub points: Vec<Workload>,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            limits: Limits::default(),
            profile: builtin_profile(DEFAULT_COST_PROFILE).expect("built-in profile"),
            rules: None,
            points: vec![Workload::decode(2048, 1), Workload::prefill(2048)],
        }
    }
}

/// The profile extraction targets unless told otherwise.
pub const DEFAULT_COST_PROFILE: &str = "ascend910b1";

/// What happened to one function.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStats {
    pub function: String,
    pub kernels_before: usize,
    pub kernels_after: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    /// `saturated`, `iteration limit`, `node limit`, `time limit`.
    pub stop_reason: String,
    /// When a budget stopped saturation: what happened and which flag to raise.
    pub limit_note: Option<String>,
    pub rules_fired: BTreeMap<String, usize>,
    /// Rule -> number of e-nodes it introduced that the extracted program uses.
    pub rules_chosen: BTreeMap<String, usize>,
    pub saturation_seconds: f64,
    pub extraction_seconds: f64,
    /// Cost-model time (summed over the design points) before and after, seconds.
    pub cost_before: f64,
    pub cost_after: f64,
}

/// Fuse function `name` of `module`; returns the new function (same
/// signature) and what happened.
pub fn fuse_function(module: &Module, name: &str, opts: &FuseOptions) -> Result<(Function, FunctionStats)> {
    let f = module.function(name).ok_or_else(|| anyhow!("no function @{name} to fuse"))?;
    let rules = select_rules(opts.rules.as_deref()).map_err(|e| anyhow!(e))?;
    let rewrites: Vec<_> = rules.iter().flat_map(|r| r.rewrites.iter()).collect();

    let start = Instant::now();
    let loaded = load_function(module, f);
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_iter_limit(opts.limits.iter_limit)
        .with_node_limit(opts.limits.node_limit)
        .with_time_limit(opts.limits.time_limit)
        .with_scheduler(SimpleScheduler)
        .run(rewrites);
    let saturation_seconds = start.elapsed().as_secs_f64();
    let iterations = runner.iterations.len();
    let stop = runner.stop_reason.clone().expect("a finished runner has a stop reason");
    let eg = runner.egraph;
    let (stop_reason, limit_note) = describe_stop(&stop, name, &opts.limits, iterations);

    let start = Instant::now();
    let points = &workloads_for(module, &opts.points);
    let profile = &opts.profile;
    let extraction = extract_dag(&eg, loaded.root, |eg, class, node| enode_cost(eg, class, node, points, profile))
        .map_err(|e| anyhow!("extracting @{name}: {e}"))?;
    let fused = rebuild_function(&eg, loaded.root, &extraction.choice, f, &loaded.value_class)
        .map_err(|e| anyhow!("rebuilding @{name}: {e}"))?;
    let extraction_seconds = start.elapsed().as_secs_f64();
    verify_function(&fused, Some(module)).map_err(|e| anyhow!("fused @{name} fails verification: {e}"))?;

    let rules_chosen = chosen_rules(&eg, &extraction.choice);
    let rules_fired = eg.analysis.fired.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let cost = |g: &Function| -> Result<f64> {
        let mut m = module.clone();
        m.functions.insert(name.to_string(), g.clone());
        points.iter().map(|w| Ok(function_cost(&m, name, w, profile)?.seconds)).sum()
    };
    let stats = FunctionStats {
        function: name.to_string(),
        kernels_before: kernel_count(f),
        kernels_after: kernel_count(&fused),
        egraph_nodes: eg.total_number_of_nodes(),
        egraph_classes: eg.number_of_classes(),
        iterations,
        stop_reason,
        limit_note,
        rules_fired,
        rules_chosen,
        saturation_seconds,
        extraction_seconds,
        cost_before: cost(f)?,
        cost_after: cost(&fused)?,
    };
    Ok((fused, stats))
}

/// Fuse every function of `module`, callees first (module order), so the
/// decoder layer is optimised once for all layers. `after_pass(name, m)`
/// sees the module after each function (for `--dump-ir`).
pub fn fuse_module(
    module: &Module,
    opts: &FuseOptions,
    mut after_pass: impl FnMut(&str, &Module) -> Result<()>,
) -> Result<(Module, Vec<FunctionStats>)> {
    let mut m = module.clone();
    let mut stats = vec![];
    let names: Vec<String> = module.functions.keys().cloned().collect();
    for name in names {
        let (f, s) = fuse_function(&m, &name, opts)?;
        m.functions.insert(name.clone(), f);
        verify_module(&m).map_err(|e| anyhow!("module after fusing @{name}: {e}"))?;
        after_pass(&format!("fuse-{name}"), &m).with_context(|| format!("after fusing @{name}"))?;
        stats.push(s);
    }
    Ok((m, stats))
}

/// The design points as they apply to `module`: unchanged for a
/// per-sequence program; for a batched one (its entry takes
/// `slot_mapping`) the same steps priced as one run over all rows, so that
/// extraction and the reported costs see the batched program's own shapes.
fn workloads_for(module: &Module, points: &[Workload]) -> Vec<Workload> {
    match paged_block_size(module) {
        Some(block) => {
            points.iter().map(|w| Workload { tokens: w.tokens * w.seqs, paged_block: Some(block), ..*w }).collect()
        }
        None => points.to_vec(),
    }
}

/// Block size of a batched module's paged caches: dimension 1 of the
/// entry's first rank-4 input, when the entry takes `slot_mapping`.
pub fn paged_block_size(module: &Module) -> Option<usize> {
    if !crate::validate::is_batched(module) {
        return None;
    }
    let f = module.entry_fn();
    f.input_params().map(|p| f.ty(p.value)).find(|t| t.rank() == 4).and_then(|t| t.shape[1].as_const())
}

/// Cost of choosing `node` for `class`: summed kernel time over the design
/// points; zero for leaves, views, calls and weight-only values; infinite
/// when a fused kernel's working set does not fit on chip.
pub fn enode_cost(eg: &EG, class: Id, node: &TLang, points: &[Workload], p: &HardwareProfile) -> f64 {
    if eg[class].data.weight_only {
        return 0.0;
    }
    let Some((op, args)) = node_op(eg, node) else { return 0.0 };
    if is_view(&op) || matches!(op, Op::Call { .. }) {
        return 0.0;
    }
    let mut operands = Vec::with_capacity(args.len());
    for a in args {
        let data = &eg[*a].data;
        match data.ty() {
            Some(ty) => operands.push(Operand { ty, weight_only: data.weight_only }),
            None => return f64::INFINITY,
        }
    }
    let results = &eg[class].data.tys;
    let mut total = 0.0;
    for w in points {
        let work = op_work(&op, &operands, results, w, p);
        if !work.fits(p) {
            return f64::INFINITY;
        }
        total += work.seconds(w, p);
    }
    total
}

/// Rule -> number of nodes of the extracted program that the rule introduced.
fn chosen_rules(eg: &EG, choice: &HashMap<Id, TLang>) -> BTreeMap<String, usize> {
    let mut origin: HashMap<TLang, &'static str> = HashMap::new();
    for (node, rule) in &eg.analysis.origins {
        origin.entry(node.clone().map_children(|c| eg.find(c))).or_insert(rule);
    }
    let mut out = BTreeMap::new();
    for node in choice.values() {
        if let Some(rule) = origin.get(node) {
            *out.entry(rule.to_string()).or_default() += 1;
        }
    }
    out
}

fn describe_stop(stop: &StopReason, f: &str, limits: &Limits, iterations: usize) -> (String, Option<String>) {
    let less = "the result is correct but may be less fused";
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    match stop {
        StopReason::Saturated => ("saturated".into(), None),
        StopReason::IterationLimit(n) => (
            "iteration limit".into(),
            Some(format!(
                "saturation of @{f} stopped at the iteration limit ({n} iteration{}): {less}; raise --iter-limit",
                plural(*n)
            )),
        ),
        StopReason::NodeLimit(n) => {
            let when = if iterations <= 1 {
                format!("before any rewrite could run (the e-graph of @{f} already has {n} e-nodes)")
            } else {
                format!("after {iterations} iteration{} ({n} e-nodes)", plural(iterations))
            };
            (
                "node limit".into(),
                Some(format!(
                    "saturation of @{f} stopped at the node limit ({} e-nodes) {when}: {less}; raise --node-limit",
                    limits.node_limit
                )),
            )
        }
        StopReason::TimeLimit(s) => (
            "time limit".into(),
            Some(format!(
                "saturation of @{f} stopped at the time limit ({:.3} s, after {s:.3} s and {iterations} iteration{}): {less}; raise --time-limit-ms",
                limits.time_limit.as_secs_f64(),
                plural(iterations)
            )),
        ),
        StopReason::Other(s) => (s.clone(), Some(format!("saturation of @{f} stopped: {s}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testing::*;
    use panguc_ir::op::{BinaryOp, ReduceOp, UnaryOp};
    use panguc_ir::DType;

    fn rmsnorm_graph() -> Module {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(64)]);
        let w = g.weight("w", DType::F32, &[64]);
        let sq = g.op(Op::Binary(BinaryOp::Mul), &[x, x]);
        let ms = g.op(Op::Reduce { op: ReduceOp::Mean, axis: 1, keepdim: true }, &[sq]);
        let eps = g.op(Op::Scalar { value: 1e-5, dtype: DType::F32 }, &[]);
        let mse = g.op(Op::Binary(BinaryOp::Add), &[ms, eps]);
        let inv = g.op(Op::Unary(UnaryOp::Rsqrt), &[mse]);
        let xn = g.op(Op::Binary(BinaryOp::Mul), &[x, inv]);
        let y = g.op(Op::Binary(BinaryOp::Mul), &[xn, w]);
        g.output(y);
        g.module()
    }

    #[test]
    fn a_zero_time_limit_stops_before_any_rewrite_and_says_so() {
        let m = rmsnorm_graph();
        let opts = FuseOptions {
            limits: Limits { time_limit: Duration::ZERO, ..Limits::default() },
            ..FuseOptions::default()
        };
        let (f, stats) = fuse_function(&m, "main", &opts).unwrap();
        assert_eq!(stats.stop_reason, "time limit");
        assert!(stats.limit_note.as_deref().unwrap().contains("--time-limit-ms"), "{:?}", stats.limit_note);
        assert!(stats.rules_fired.is_empty());
        assert_eq!(kernel_count(&f), kernel_count(m.entry_fn()));
    }

    #[test]
    fn a_fusion_whose_working_set_does_not_fit_is_not_chosen() {
        let m = rmsnorm_graph();
        let (_, fits) = fuse_function(&m, "main", &FuseOptions::default()).unwrap();
        assert_eq!(fits.rules_chosen.get("rmsnorm"), Some(&1));
        // A 64-wide f32 row needs 5 x 256 B of unified buffer; give it 1 KiB.
        let mut profile = builtin_profile("ascend910b1").unwrap();
        profile.ub_kib = 1.0;
        let (f, stats) = fuse_function(&m, "main", &FuseOptions { profile, ..FuseOptions::default() }).unwrap();
        assert_eq!(stats.rules_fired.get("rmsnorm"), Some(&1), "the rule fires...");
        assert!(!stats.rules_chosen.contains_key("rmsnorm"), "...but extraction rejects it");
        assert!(f.nodes.iter().all(|n| n.op.mnemonic() != "rms_norm"));
    }

    #[test]
    fn an_unknown_rule_name_is_an_error() {
        let opts = FuseOptions { rules: Some(vec!["fuse-everything".into()]), ..FuseOptions::default() };
        let err = fuse_function(&rmsnorm_graph(), "main", &opts).unwrap_err().to_string();
        assert!(err.contains("unknown rule `fuse-everything`") && err.contains("rmsnorm"), "{err}");
    }

    #[test]
    fn a_batched_module_is_priced_as_one_run_over_all_rows() {
        let points = FuseOptions::default().points;
        let m = rmsnorm_graph();
        assert_eq!(workloads_for(&m, &points), points, "a per-sequence program keeps the design points");
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(4)]);
        g.input("k_cache", &[panguc_ir::Dim::num_blocks(), c(16), c(2), c(4)]);
        g.input_i32("slot_mapping", &[tok()]);
        let y = g.op(Op::Unary(UnaryOp::Neg), &[x]);
        g.output(y);
        let batched = workloads_for(&g.module(), &[Workload::decode(100, 8), Workload::prefill(64)]);
        assert_eq!(batched[0], Workload { tokens: 8, past: 100, seqs: 8, paged_block: Some(16) });
        assert_eq!(batched[1], Workload { tokens: 64, past: 0, seqs: 1, paged_block: Some(16) });
    }
}

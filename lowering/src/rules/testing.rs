//! Test support for rules: build a small graph by hand, fuse it with some
//! rules, and check the fused graph against the original under the
//! reference interpreter.

use crate::convert::load_function;
use crate::fuse::{fuse_function, FunctionStats, FuseOptions};
use crate::rules::Rule;
use crate::validate::{compare_once, random_inputs, random_weights, Rng};
use egg::{Runner, SimpleScheduler};
use panguc_ir::shape::bindings;
use panguc_ir::text::print_module;
use panguc_ir::verify::verify_module;
use panguc_ir::Tensor;
use panguc_ir::{DType, Dim, Function, Module, Op, TensorType, ValueId};
use std::collections::HashMap;
use std::time::Duration;

pub fn tok() -> Dim {
    Dim::tokens()
}

pub fn c(n: usize) -> Dim {
    Dim::c(n)
}

/// A graph under construction: function `@main`, values by index.
pub struct G {
    pub f: Function,
}

impl G {
    pub fn new() -> G {
        G { f: Function::new("main") }
    }

    pub fn input(&mut self, name: &str, dims: &[Dim]) -> usize {
        self.f.add_input(name, TensorType::new(DType::F32, dims.to_vec())).index()
    }

    pub fn input_i64(&mut self, name: &str, dims: &[Dim]) -> usize {
        self.f.add_input(name, TensorType::new(DType::I64, dims.to_vec())).index()
    }

    /// An `i32` input (ragged-batch step metadata such as `slot_mapping`).
    pub fn input_i32(&mut self, name: &str, dims: &[Dim]) -> usize {
        self.f.add_input(name, TensorType::new(DType::I32, dims.to_vec())).index()
    }

    pub fn weight(&mut self, name: &str, dtype: DType, shape: &[usize]) -> usize {
        let ty = TensorType::new(dtype, shape.iter().map(|&d| Dim::c(d)).collect());
        self.f.add_weight(name, name, ty).index()
    }

    pub fn op(&mut self, op: Op, args: &[usize]) -> usize {
        let name = format!("v{}", self.f.values.len());
        let args: Vec<ValueId> = args.iter().map(|&a| ValueId(a as u32)).collect();
        self.f.op(op, &args, &name).unwrap_or_else(|e| panic!("test graph does not type: {e}")).index()
    }

    /// A multi-result op: one value per result.
    pub fn ops(&mut self, op: Op, args: &[usize], results: usize) -> Vec<usize> {
        let base = format!("v{}", self.f.values.len());
        let names: Vec<String> = (0..results).map(|i| format!("{base}_{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let args: Vec<ValueId> = args.iter().map(|&a| ValueId(a as u32)).collect();
        let ids = self.f.push_node(None, op, &args, &names).unwrap_or_else(|e| panic!("test graph does not type: {e}"));
        ids.iter().map(|v| v.index()).collect()
    }

    pub fn output(&mut self, v: usize) {
        self.f.outputs.push(ValueId(v as u32));
    }

    pub fn module(self) -> Module {
        let mut m = Module::new("test", "main");
        m.add_function(self.f);
        verify_module(&m).unwrap_or_else(|e| panic!("test module does not verify: {e}"));
        m
    }
}

/// The outcome of fusing a test graph.
pub struct RuleCheck {
    pub text: String,
    pub stats: FunctionStats,
    pub kernels_before: usize,
    pub kernels_after: usize,
    pub fused: Module,
}

impl RuleCheck {
    /// Nodes of the fused function with this mnemonic.
    pub fn count_op(&self, mnemonic: &str) -> usize {
        self.fused.entry_fn().nodes.iter().filter(|n| n.op.mnemonic() == mnemonic).count()
    }

    pub fn fired(&self, rule: &str) -> usize {
        self.stats.rules_fired.get(rule).copied().unwrap_or(0)
    }

    pub fn assert_fired(&self, rule: &str) {
        assert!(self.fired(rule) > 0, "rule {rule} did not fire; fired: {:?}\n{}", self.stats.rules_fired, self.text);
        assert!(
            self.stats.rules_chosen.contains_key(rule),
            "rule {rule} fired but extraction did not keep it; chosen: {:?}\n{}",
            self.stats.rules_chosen,
            self.text
        );
    }
}

/// Fuse with `rules`, then compare against the original at `tokens` new
/// tokens and 2 cached ones.
pub fn check_rule(g: G, rules: &[&str], tokens: usize) -> RuleCheck {
    check_rule_at(g, rules, &[(tokens, 2)])
}

/// Fuse with `rules`, then compare against the original at each
/// (tokens, past) point with random inputs and random weights.
pub fn check_rule_at(g: G, rules: &[&str], points: &[(usize, usize)]) -> RuleCheck {
    let module = g.module();
    let opts = FuseOptions { rules: Some(rules.iter().map(|r| r.to_string()).collect()), ..FuseOptions::default() };
    let (f, stats) = fuse_function(&module, "main", &opts).unwrap_or_else(|e| panic!("fusion failed: {e:#}"));
    let mut fused = module.clone();
    fused.functions.insert("main".into(), f);
    verify_module(&fused).unwrap_or_else(|e| panic!("fused module does not verify: {e}"));
    let text = print_module(&fused);
    let weights = integer_weights(&module, random_weights(&module, 11, 1 << 24).unwrap());
    let mut rng = Rng::new(5);
    for &(t, past) in points {
        let inputs = random_inputs(&module, &bindings(t, past), &mut rng).unwrap();
        compare_once(&module, &fused, &weights, &inputs, &format!("tokens={t} past={past}"))
            .unwrap_or_else(|e| panic!("{e:#}\nfused:\n{text}"));
    }
    RuleCheck { kernels_before: stats.kernels_before, kernels_after: stats.kernels_after, text, stats, fused }
}

/// Integer weights (int8 matrices, int32 quant biases) as integers: the
/// random floats scaled into the int8 range and rounded.
fn integer_weights(m: &Module, mut w: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    for f in m.functions.values() {
        for (p, t) in f.weight_params() {
            let Some(x) = w.get_mut(t) else { continue };
            if f.ty(p.value).dtype.is_float() || !x.is_f32() {
                continue;
            }
            let ints = x.as_f32().iter().map(|v| ((v * 400.0).round() as i64).clamp(-128, 127)).collect();
            *x = Tensor::i64(x.shape.clone(), ints);
        }
    }
    w
}

/// Saturate a test graph with arbitrary rules under small budgets; returns
/// the e-graph size and the stop reason.
pub fn saturate_only(g: G, rules: Vec<Rule>) -> (usize, String) {
    let module = g.module();
    let loaded = load_function(&module, module.entry_fn());
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_iter_limit(20)
        .with_node_limit(3_000)
        .with_time_limit(Duration::from_secs(10))
        .with_scheduler(SimpleScheduler)
        .run(rules.iter().flat_map(|r| r.rewrites.iter()));
    let stop = match runner.stop_reason.expect("finished") {
        egg::StopReason::Saturated => "saturated".to_string(),
        other => format!("{other:?}"),
    };
    (runner.egraph.total_number_of_nodes(), stop)
}

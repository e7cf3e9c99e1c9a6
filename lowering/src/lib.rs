//! panguc-lowering: operator fusion with egg, the cost model and hardware
//! profiles, DAG-aware extraction, performance estimates and translation
//! validation.
//!
//! The flow for one function: [`convert::load_function`] puts the graph IR
//! into an e-graph ([`lang::TLang`] nodes, [`analysis::TensorAnalysis`]
//! types and weight-only flags); the named rules of [`rules`] saturate it
//! within the budgets of [`fuse::Limits`]; [`extract::extract_dag`] picks
//! the cheapest program under [`cost`] for a [`profile::HardwareProfile`];
//! [`convert::rebuild_function`] turns the choice back into graph IR.
//! [`fuse::fuse_module`] does this for the decoder layer (once, for all
//! layers) and the entry function.

pub mod analysis;
pub mod convert;
pub mod cost;
pub mod dataflow;
pub mod estimate;
pub mod extract;
pub mod fuse;
pub mod lang;
pub mod partition;
pub mod profile;
pub mod published;
pub mod report;
pub mod rules;
pub mod schedule;
pub mod validate;

pub use cost::Workload;
pub use fuse::{fuse_function, fuse_module, FunctionStats, FuseOptions, Limits};
pub use profile::{builtin_profiles, HardwareProfile};

use panguc_ir::graph::ParamKind;
use panguc_ir::{Function, Op};

/// For each value of `f`: true when it depends only on weights and
/// constants. Such values are computed once when the package is built
/// (concatenated QKV weights, stacked expert weights, casts of norm
/// weights), never by a kernel at run time.
pub fn weight_only_values(f: &Function) -> Vec<bool> {
    let mut wo = vec![false; f.values.len()];
    for p in &f.params {
        wo[p.value.index()] = matches!(p.kind, ParamKind::Weight { .. });
    }
    for n in &f.nodes {
        let v = !matches!(n.op, Op::Call { .. }) && n.args.iter().all(|a| wo[a.index()]);
        for r in &n.results {
            wo[r.index()] = v;
        }
    }
    wo
}

/// Ops that never need a kernel: a reshape of a contiguous tensor is a
/// view of the same buffer. Transpose, slice, concat and split are counted
/// as kernels (they move data in a row-major layout); a scheduler that can
/// express some of them as strided views will launch fewer.
pub fn is_view(op: &Op) -> bool {
    matches!(op, Op::Reshape { .. })
}

/// For each node of `f`: whether it runs as a kernel. Not kernels: views,
/// weight-only nodes (package-time preparation) and calls (the callee's
/// kernels run instead).
pub fn kernel_nodes(f: &Function) -> Vec<bool> {
    let wo = weight_only_values(f);
    f.nodes
        .iter()
        .map(|n| !is_view(&n.op) && !matches!(n.op, Op::Call { .. }) && !n.results.iter().all(|r| wo[r.index()]))
        .collect()
}

/// Number of kernels one call of `f` launches (see [`kernel_nodes`]).
pub fn kernel_count(f: &Function) -> usize {
    kernel_nodes(f).into_iter().filter(|k| *k).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_ir::op::BinaryOp;
    use panguc_ir::{DType, Dim, TensorType};

    #[test]
    fn kernels_exclude_views_calls_and_weight_only_values() {
        let mut f = Function::new("f");
        let x = f.add_input("x", TensorType::new(DType::F32, vec![Dim::tokens(), Dim::c(4)]));
        let w = f.add_weight("w", "w", TensorType::new(DType::BF16, vec![Dim::c(4)]));
        let wf = f.op(Op::Cast { dtype: DType::F32 }, &[w], "wf").unwrap(); // package time
        let eps = f.op(Op::Scalar { value: 1.0, dtype: DType::F32 }, &[], "one").unwrap(); // constant
        let ww = f.op(Op::Binary(BinaryOp::Add), &[wf, eps], "ww").unwrap(); // package time
        let y = f.op(Op::Binary(BinaryOp::Mul), &[x, ww], "y").unwrap(); // kernel
        let r = f.op(Op::Reshape { shape: vec![Dim::tokens().scale(4)] }, &[y], "r").unwrap(); // view
        let z = f.op(Op::Unary(panguc_ir::op::UnaryOp::Neg), &[r], "z").unwrap(); // kernel
        f.outputs = vec![z];
        assert!(weight_only_values(&f)[ww.index()]);
        assert!(!weight_only_values(&f)[y.index()]);
        assert_eq!(kernel_nodes(&f), vec![false, false, false, true, false, true]);
        assert_eq!(kernel_count(&f), 2);
    }
}

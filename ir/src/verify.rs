//! The verifier: SSA form, unique names, operand/result types, calls.

use crate::graph::{Function, Module};
use crate::infer::infer_types;
use std::collections::HashSet;

/// Verify every function of `module`. The error names the function, the
/// node (by its first result) and the mismatch.
pub fn verify_module(module: &Module) -> Result<(), String> {
    if !module.functions.contains_key(&module.entry) {
        return Err(format!("module @{}: entry function @{} does not exist", module.name, module.entry));
    }
    for f in module.functions.values() {
        verify_function(f, Some(module))?;
    }
    check_no_recursion(module)
}

pub fn verify_function(f: &Function, module: Option<&Module>) -> Result<(), String> {
    let err = |msg: String| Err(format!("function @{}: {msg}", f.name));
    let mut names = HashSet::new();
    for v in &f.values {
        if !names.insert(v.name.as_str()) {
            return err(format!("value name %{} is defined twice", v.name));
        }
    }
    let mut defined = vec![false; f.values.len()];
    let mut weight_names = HashSet::new();
    for p in &f.params {
        if p.value.index() >= f.values.len() {
            return err(format!("parameter refers to missing value {}", p.value.0));
        }
        if defined[p.value.index()] {
            return err(format!("parameter %{} listed twice", f.name_of(p.value)));
        }
        if let crate::graph::ParamKind::Weight { tensor } = &p.kind {
            if !weight_names.insert(tensor.as_str()) {
                return err(format!("weight tensor \"{tensor}\" bound to two parameters"));
            }
        }
        defined[p.value.index()] = true;
    }
    for node in &f.nodes {
        let label = node
            .results
            .first()
            .map(|r| format!("%{} = {}", f.name_of(*r), node.op.mnemonic()))
            .unwrap_or_else(|| node.op.mnemonic().to_string());
        for a in &node.args {
            if a.index() >= f.values.len() || !defined[a.index()] {
                let name = f.values.get(a.index()).map(|v| v.name.as_str()).unwrap_or("?");
                return err(format!("node `{label}` uses %{name} before it is defined"));
            }
        }
        let arg_types: Vec<_> = node.args.iter().map(|a| f.ty(*a)).collect();
        let inferred = match infer_types(&node.op, &arg_types, module) {
            Ok(t) => t,
            Err(e) => return err(format!("node `{label}`: {e}")),
        };
        if inferred.len() != node.results.len() {
            return err(format!(
                "node `{label}` has {} results, its op produces {}",
                node.results.len(),
                inferred.len()
            ));
        }
        for (r, want) in node.results.iter().zip(&inferred) {
            if defined[r.index()] {
                return err(format!("node `{label}` redefines %{}", f.name_of(*r)));
            }
            let got = f.ty(*r);
            if got != want {
                return err(format!(
                    "node `{label}`: result %{} is declared {got} but the op produces {want}",
                    f.name_of(*r)
                ));
            }
            defined[r.index()] = true;
        }
    }
    if f.outputs.is_empty() {
        return err("function has no outputs".into());
    }
    for o in &f.outputs {
        if o.index() >= f.values.len() || !defined[o.index()] {
            return err(format!("output {} is not defined", o.0));
        }
    }
    Ok(())
}

fn check_no_recursion(module: &Module) -> Result<(), String> {
    // Callee must be defined before the caller in module order: this keeps
    // the call graph acyclic and gives printers a stable, readable order.
    for (i, f) in module.functions.values().enumerate() {
        for n in &f.nodes {
            if let crate::op::Op::Call { func, .. } = &n.op {
                let j = module
                    .functions
                    .get_index_of(func.as_str())
                    .ok_or_else(|| format!("function @{}: call of unknown @{func}", f.name))?;
                if j >= i {
                    return Err(format!(
                        "function @{}: calls @{func}, which is not defined before it (recursion is not allowed)",
                        f.name
                    ));
                }
            }
        }
    }
    Ok(())
}

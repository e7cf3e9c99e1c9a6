//! The post-extraction step of partitioning: give a rank's functions their
//! local signatures.
//!
//! Extraction keeps the single-device signature (rebuild keeps parameters
//! and output types), so a rank's sharded KV cache appears as
//! `slice(k_cache, 1, k0, k1)` of the full cache input and its new cache as
//! `all_gather(k_local)`. Here an input read only through one slice takes
//! that slice's type, a cache output that is an all-gather of the local
//! cache becomes the local cache, unused weights are dropped, and the
//! entry function is retyped to pass the local caches through.

use anyhow::{anyhow, Result};
use panguc_ir::graph::{Function, Module, ParamKind, ValueId};
use panguc_ir::infer::infer_types;
use panguc_ir::op::CollectiveKind;
use panguc_ir::{Op, TensorType};
use std::collections::HashMap;

/// The rank module: `fused` with `layer_fn` replaced by `rebuilt`, both
/// given local signatures.
pub fn localize(fused: &Module, layer_fn: &str, rebuilt: Function) -> Result<Module> {
    let mut types: HashMap<ValueId, TensorType> = HashMap::new();
    let mut subst: HashMap<ValueId, ValueId> = HashMap::new();
    let def = rebuilt.definers();
    let mut uses: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, n) in rebuilt.nodes.iter().enumerate() {
        for a in &n.args {
            uses.entry(*a).or_default().push(i);
        }
    }
    let outputs_of: Vec<ValueId> = rebuilt.outputs.clone();
    let mut sharded_inputs = false;
    for p in rebuilt.input_params() {
        let Some(us) = uses.get(&p.value) else { continue };
        let slices: Vec<&Op> = us.iter().map(|i| &rebuilt.nodes[*i].op).collect();
        let first = slices[0];
        if !matches!(first, Op::Slice { .. }) || slices.iter().any(|s| *s != first) || outputs_of.contains(&p.value) {
            continue;
        }
        let Op::Slice { axis, start, end } = first else { continue };
        let mut ty = rebuilt.ty(p.value).clone();
        ty.shape[*axis] = panguc_ir::Dim::c(end - start);
        types.insert(p.value, ty);
        for i in us {
            subst.insert(rebuilt.nodes[*i].results[0], p.value);
        }
        sharded_inputs = true;
    }
    let mut outputs = rebuilt.outputs.clone();
    if sharded_inputs {
        for o in outputs.iter_mut().skip(1) {
            if let Some(i) = def[o.index()] {
                let n = &rebuilt.nodes[i];
                if let Op::Collective { kind: CollectiveKind::AllGather, .. } = n.op {
                    *o = n.args[0];
                }
            }
        }
    }
    let mut m = fused.clone();
    let layer = retype(&rebuilt, &types, &subst, outputs, None)?;
    m.functions.insert(layer_fn.to_string(), layer);
    // Entry and other callers: inputs passed straight to a call take the
    // callee's (local) parameter types.
    let names: Vec<String> = m.functions.keys().filter(|n| *n != layer_fn).cloned().collect();
    for name in names {
        let f = m.functions[&name].clone();
        let mut types = HashMap::new();
        for n in &f.nodes {
            if let Op::Call { func, .. } = &n.op {
                let callee = &m.functions[func];
                let ins: Vec<TensorType> = callee.input_params().map(|p| callee.ty(p.value).clone()).collect();
                for (a, ty) in n.args.iter().zip(ins) {
                    if f.params.iter().any(|p| p.value == *a) && f.ty(*a) != &ty {
                        types.insert(*a, ty);
                    }
                }
            }
        }
        let g = retype(&f, &types, &HashMap::new(), f.outputs.clone(), Some(&m))?;
        m.functions.insert(name, g);
    }
    Ok(m)
}

/// Rebuild `f` with parameter types overridden by `types`, uses of values
/// replaced through `subst`, the given outputs, dead nodes and unused
/// weights dropped, and every node's result types re-inferred.
fn retype(
    f: &Function,
    types: &HashMap<ValueId, TensorType>,
    subst: &HashMap<ValueId, ValueId>,
    outputs: Vec<ValueId>,
    module: Option<&Module>,
) -> Result<Function> {
    let sub = |v: ValueId| *subst.get(&v).unwrap_or(&v);
    let def = f.definers();
    // Liveness, from the outputs backwards.
    let mut live = vec![false; f.values.len()];
    let mut stack: Vec<ValueId> = outputs.iter().map(|o| sub(*o)).collect();
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut live[v.index()], true) {
            continue;
        }
        if let Some(i) = def[v.index()] {
            for r in &f.nodes[i].results {
                live[r.index()] = true;
            }
            stack.extend(f.nodes[i].args.iter().map(|a| sub(*a)));
        }
    }
    let mut g = Function::new(f.name.clone());
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    for p in &f.params {
        let used = live[p.value.index()];
        let ty = types.get(&p.value).cloned().unwrap_or_else(|| f.ty(p.value).clone());
        let name = f.name_of(p.value);
        let id = match &p.kind {
            ParamKind::Input => g.add_input(name, ty),
            ParamKind::Weight { tensor } if used => g.add_weight(name, tensor, ty),
            ParamKind::Weight { .. } => continue,
        };
        map.insert(p.value, id);
    }
    for n in &f.nodes {
        if !n.results.iter().any(|r| live[r.index()]) || n.results.iter().all(|r| subst.contains_key(r)) {
            continue;
        }
        let args: Vec<ValueId> = n
            .args
            .iter()
            .map(|a| map.get(&sub(*a)).copied().ok_or_else(|| anyhow!("%{} used before definition", f.name_of(*a))))
            .collect::<Result<_>>()?;
        let arg_tys: Vec<&TensorType> = args.iter().map(|a| g.ty(*a)).collect();
        let tys = infer_types(&n.op, &arg_tys, module)
            .map_err(|e| anyhow!("@{}: %{} = {}: {e}", f.name, f.name_of(n.results[0]), n.op.mnemonic()))?;
        let names: Vec<String> = n.results.iter().map(|r| f.name_of(*r).to_string()).collect();
        let results: Vec<(&str, TensorType)> = names.iter().map(String::as_str).zip(tys).collect();
        let ids = g.push_node_typed(n.op.clone(), &args, &results);
        for (r, id) in n.results.iter().zip(ids) {
            map.insert(*r, id);
        }
    }
    g.outputs = outputs.iter().map(|o| map[&sub(*o)]).collect();
    Ok(g)
}

//! Inline every call into one flat graph over the entry's inputs and the
//! checkpoint's tensors (full names).

use anyhow::{anyhow, bail, Result};
use panguc_ir::graph::{Function, ParamKind};
use panguc_ir::{Module, Op, TensorType};
use std::collections::{BTreeMap, HashSet};

/// Where a flat value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Def {
    /// Entry input `i`.
    Input(usize),
    /// Checkpoint tensor (full name).
    Weight(String),
    /// Result of flat node `n`.
    Node(usize),
}

#[derive(Debug, Clone)]
pub struct FlatValue {
    /// Unique; a layer's values are prefixed with its weight prefix.
    pub name: String,
    pub ty: TensorType,
    pub def: Def,
}

#[derive(Debug, Clone)]
pub struct FlatNode {
    pub op: Op,
    pub args: Vec<usize>,
    pub results: Vec<usize>,
}

/// The entry function with every call inlined. Values are in topological
/// order (a value's index is larger than those of its node's operands).
#[derive(Debug, Clone, Default)]
pub struct FlatGraph {
    pub values: Vec<FlatValue>,
    pub nodes: Vec<FlatNode>,
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    leaves: BTreeMap<String, usize>,
    names: HashSet<String>,
}

/// Calls nest at most this deep (the importer uses one level).
const MAX_DEPTH: usize = 16;

pub fn flatten(module: &Module) -> Result<FlatGraph> {
    let f = module.function(&module.entry).ok_or_else(|| anyhow!("module has no entry function @{}", module.entry))?;
    let mut g = FlatGraph::default();
    let mut args = vec![];
    for (i, p) in f.input_params().enumerate() {
        let v = f.value(p.value);
        args.push(g.push_value(&v.name, v.ty.clone(), Def::Input(i)));
    }
    g.inputs = args.clone();
    g.outputs = g.inline(module, f, &args, "", "", 0)?;
    Ok(g)
}

impl FlatGraph {
    fn push_value(&mut self, name: &str, ty: TensorType, def: Def) -> usize {
        let mut unique = name.to_string();
        let mut i = 1;
        while self.names.contains(&unique) {
            unique = format!("{name}.{i}");
            i += 1;
        }
        self.names.insert(unique.clone());
        self.values.push(FlatValue { name: unique, ty, def });
        self.values.len() - 1
    }

    fn leaf(&mut self, tensor: String, ty: &TensorType) -> Result<usize> {
        if let Some(&v) = self.leaves.get(&tensor) {
            if self.values[v].ty != *ty {
                bail!("weight `{tensor}` is used with two types: {} and {ty}", self.values[v].ty);
            }
            return Ok(v);
        }
        let v = self.push_value(&tensor, ty.clone(), Def::Weight(tensor.clone()));
        self.leaves.insert(tensor, v);
        Ok(v)
    }

    fn inline(
        &mut self,
        module: &Module,
        f: &Function,
        args: &[usize],
        weight_prefix: &str,
        value_prefix: &str,
        depth: usize,
    ) -> Result<Vec<usize>> {
        if depth > MAX_DEPTH {
            bail!("calls nest deeper than {MAX_DEPTH} levels at @{}", f.name);
        }
        let mut map = vec![usize::MAX; f.values.len()];
        let mut next_input = 0;
        for p in &f.params {
            map[p.value.index()] = match &p.kind {
                ParamKind::Input => {
                    next_input += 1;
                    *args.get(next_input - 1).ok_or_else(|| anyhow!("@{}: missing call argument", f.name))?
                }
                ParamKind::Weight { tensor } => self.leaf(format!("{weight_prefix}{tensor}"), f.ty(p.value))?,
            };
        }
        for (ni, n) in f.nodes.iter().enumerate() {
            let a: Vec<usize> = n.args.iter().map(|x| map[x.index()]).collect();
            if let Op::Call { func, weight_prefix: wp } = &n.op {
                let callee = module.function(func).ok_or_else(|| anyhow!("call of unknown function @{func}"))?;
                // A layer's values are named after its weight prefix
                // (`model.layers.3.q`), or after the call site.
                let vp =
                    if wp.is_empty() { format!("{value_prefix}{func}.{ni}.") } else { format!("{value_prefix}{wp}") };
                let outs = self.inline(module, callee, &a, &format!("{weight_prefix}{wp}"), &vp, depth + 1)?;
                if outs.len() != n.results.len() {
                    bail!("@{func} returns {} values, the call expects {}", outs.len(), n.results.len());
                }
                for (r, o) in n.results.iter().zip(outs) {
                    map[r.index()] = o;
                }
            } else {
                let node = self.nodes.len();
                let results: Vec<usize> = n
                    .results
                    .iter()
                    .map(|r| {
                        let v = f.value(*r);
                        self.push_value(&format!("{value_prefix}{}", v.name), v.ty.clone(), Def::Node(node))
                    })
                    .collect();
                for (r, v) in n.results.iter().zip(&results) {
                    map[r.index()] = *v;
                }
                self.nodes.push(FlatNode { op: n.op.clone(), args: a, results });
            }
        }
        Ok(f.outputs.iter().map(|o| map[o.index()]).collect())
    }
}

//! Graph IR -> e-graph, and an extracted choice of e-nodes -> graph IR.

use crate::analysis::{node_op, TensorAnalysis, EG};
use crate::lang::{has_attr_leaf, op_node, OpAttr, TLang};
use crate::rules::proj;
use egg::{Id, Symbol};
use panguc_ir::graph::ParamKind;
use panguc_ir::{Function, Module, ValueId};
use std::collections::{HashMap, HashSet};

/// A function loaded into an e-graph.
pub struct Loaded {
    pub egraph: EG,
    /// The `outputs` root.
    pub root: Id,
    /// E-class of every IR value of the original function.
    pub value_class: Vec<Id>,
}

/// Load `f` (a function of `module`) into a fresh e-graph. Identical
/// sub-expressions share a class (hash-consing acts as CSE).
pub fn load_function(module: &Module, f: &Function) -> Loaded {
    let mut analysis = TensorAnalysis::default();
    for p in &f.params {
        let weight = matches!(p.kind, ParamKind::Weight { .. });
        analysis.params.insert(Symbol::from(f.name_of(p.value)), (f.ty(p.value).clone(), weight));
    }
    for g in module.functions.values() {
        analysis.signatures.insert(g.name.clone(), g.outputs.iter().map(|o| g.ty(*o).clone()).collect());
    }
    let mut eg = EG::new(analysis);
    let mut cls: Vec<Option<Id>> = vec![None; f.values.len()];
    for p in &f.params {
        cls[p.value.index()] = Some(eg.add(TLang::Param(Symbol::from(f.name_of(p.value)))));
    }
    for n in &f.nodes {
        let args: Vec<Id> = n.args.iter().map(|a| cls[a.index()].expect("verified SSA")).collect();
        let attr = has_attr_leaf(&n.op).then(|| eg.add(TLang::Attr(OpAttr::new(n.op.clone()))));
        let id = eg.add(op_node(&n.op, attr, &args));
        if n.results.len() == 1 {
            cls[n.results[0].index()] = Some(id);
        } else {
            for (i, r) in n.results.iter().enumerate() {
                cls[r.index()] = Some(proj(&mut eg, id, i));
            }
        }
    }
    let outs: Vec<Id> = f.outputs.iter().map(|o| cls[o.index()].expect("verified output")).collect();
    let root = eg.add(TLang::Outputs(outs.into_boxed_slice()));
    eg.rebuild();
    // A value no node defines and no node reads (a weight parameter the
    // importer dropped as unused: a static W8A8 module's folded bias) has
    // no class of its own; it stands in the root's so the table stays
    // indexed by value. Nothing refers to it, so nothing is emitted for it.
    let value_class = cls.into_iter().map(|c| eg.find(c.unwrap_or(root))).collect();
    Loaded { egraph: eg, root, value_class }
}

/// Rebuild a function from the e-nodes chosen for each class reachable
/// from `root`. Parameters keep their order, names and kinds (callers bind
/// inputs by position and weights by name); values whose class held an
/// original value keep that value's name; new values are named after their
/// op. Nodes are emitted in depth-first post-order from the outputs, which
/// is a valid (and deterministic) topological order.
pub fn rebuild_function(
    eg: &EG,
    root: Id,
    choice: &HashMap<Id, TLang>,
    original: &Function,
    value_class: &[Id],
) -> Result<Function, String> {
    // Names rules suggested for new values, by class (first suggestion wins).
    let mut hints: HashMap<Id, &'static str> = HashMap::new();
    for (node, name) in &eg.analysis.names {
        if let Some(c) = eg.lookup(node.clone()) {
            hints.entry(eg.find(c)).or_insert(name);
        }
    }
    let mut class_name: HashMap<Id, String> = HashMap::new();
    for (i, c) in value_class.iter().enumerate() {
        class_name.entry(eg.find(*c)).or_insert_with(|| original.values[i].name.clone());
    }
    let mut f = Function::new(original.name.clone());
    let mut env: HashMap<Id, ValueId> = HashMap::new();
    for p in &original.params {
        let v = original.value(p.value);
        let id = match &p.kind {
            ParamKind::Input => f.add_input(&v.name, v.ty.clone()),
            ParamKind::Weight { tensor } => f.add_weight(&v.name, tensor, v.ty.clone()),
        };
        env.insert(eg.find(value_class[p.value.index()]), id);
    }
    let reserved: HashSet<String> = original.values.iter().map(|v| v.name.clone()).collect();
    let mut e =
        Emitter { eg, choice, f, env, tuples: HashMap::new(), class_name, hints, reserved, used: HashSet::new() };
    let TLang::Outputs(outs) = choice.get(&eg.find(root)).ok_or("the root has no chosen node")? else {
        return Err("the root class is not the outputs node".into());
    };
    let mut outputs = vec![];
    for o in outs.iter() {
        outputs.push(e.value(*o, 0)?);
    }
    e.f.outputs = outputs;
    Ok(e.f)
}

struct Emitter<'a> {
    eg: &'a EG,
    choice: &'a HashMap<Id, TLang>,
    f: Function,
    env: HashMap<Id, ValueId>,
    tuples: HashMap<Id, Vec<ValueId>>,
    class_name: HashMap<Id, String>,
    hints: HashMap<Id, &'static str>,
    /// Names of the original function's values: new values avoid them.
    reserved: HashSet<String>,
    used: HashSet<String>,
}

/// Deeper than any real function: a cycle in the choice would recurse
/// forever, so it is reported instead.
const MAX_DEPTH: usize = 100_000;

impl Emitter<'_> {
    fn chosen(&self, class: Id) -> Result<&TLang, String> {
        self.choice.get(&class).ok_or_else(|| format!("class {class} has no chosen node"))
    }

    fn value(&mut self, class: Id, depth: usize) -> Result<ValueId, String> {
        let class = self.eg.find(class);
        if let Some(v) = self.env.get(&class) {
            return Ok(*v);
        }
        if depth > MAX_DEPTH {
            return Err("the extracted graph has a cycle".into());
        }
        let node = self.chosen(class)?.clone();
        let v = match &node {
            TLang::Proj([i, t]) => {
                let i = self.eg[*i].data.int().ok_or("proj index is not an Int leaf")? as usize;
                self.tuple(*t, depth + 1)?[i]
            }
            TLang::Param(name) => return Err(format!("parameter %{name} is not a parameter of the function")),
            _ => {
                let (op, args) = node_op(self.eg, &node).ok_or_else(|| format!("`{node}` is not an op"))?;
                let mut vals = vec![];
                for a in args {
                    vals.push(self.value(*a, depth + 1)?);
                }
                let base = self.hints.get(&class).copied().unwrap_or(op.mnemonic());
                let name = self.name_for(class, base);
                let ty = self.eg[class].data.ty().ok_or("op class without a single type")?.clone();
                self.f.push_node_typed(op, &vals, &[(&name, ty)])[0]
            }
        };
        self.env.insert(class, v);
        Ok(v)
    }

    fn tuple(&mut self, t: Id, depth: usize) -> Result<Vec<ValueId>, String> {
        let t = self.eg.find(t);
        if let Some(v) = self.tuples.get(&t) {
            return Ok(v.clone());
        }
        let node = self.chosen(t)?.clone();
        let (op, args) = node_op(self.eg, &node).ok_or_else(|| format!("`{node}` is not a multi-result op"))?;
        let mut vals = vec![];
        for a in args {
            vals.push(self.value(*a, depth + 1)?);
        }
        let tys = self.eg[t].data.tys.clone();
        let mut names = vec![];
        for i in 0..tys.len() {
            // Name result i after the original value its projection holds.
            let class = self
                .eg
                .lookup(TLang::Int(i as i64))
                .and_then(|idx| self.eg.lookup(TLang::Proj([idx, t])))
                .map(|c| self.eg.find(c));
            let fallback = format!("{}.{i}", self.hints.get(&t).copied().unwrap_or(op.mnemonic()));
            names.push(match class {
                Some(c) => self.name_for(c, &fallback),
                None => self.fresh(&fallback),
            });
        }
        let results: Vec<(&str, _)> = names.iter().map(String::as_str).zip(tys).collect();
        let ids = self.f.push_node_typed(op, &vals, &results);
        self.tuples.insert(t, ids.clone());
        Ok(ids)
    }

    fn name_for(&mut self, class: Id, base: &str) -> String {
        match self.class_name.get(&class) {
            Some(n) if !self.used.contains(n) => {
                let n = n.clone();
                self.used.insert(n.clone());
                n
            }
            _ => self.fresh(base),
        }
    }

    fn fresh(&mut self, base: &str) -> String {
        let free = |n: &str, s: &Self| !s.reserved.contains(n) && !s.used.contains(n);
        let name = if free(base, self) {
            base.to_string()
        } else {
            (1..).map(|i| format!("{base}.{i}")).find(|n| free(n, self)).expect("unbounded")
        };
        self.used.insert(name.clone());
        name
    }
}

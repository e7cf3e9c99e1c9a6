//! Modules, functions, values and nodes of the graph IR.

use crate::infer::infer_types;
use crate::op::Op;
use crate::shape::TensorType;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// Index of a value inside its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub name: String,
    pub ty: TensorType,
}

/// How a function parameter gets its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// Passed by the caller (activations, positions, KV cache).
    Input,
    /// A checkpoint tensor, named relative to the call's weight prefix.
    Weight { tensor: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub value: ValueId,
    pub kind: ParamKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub args: Vec<ValueId>,
    pub results: Vec<ValueId>,
}

/// A function in SSA form: parameters, nodes in execution order, outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    pub values: Vec<Value>,
    pub params: Vec<Param>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<ValueId>,
}

impl Function {
    pub fn new(name: impl Into<String>) -> Self {
        Function { name: name.into(), values: vec![], params: vec![], nodes: vec![], outputs: vec![] }
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.values[id.index()].ty
    }

    pub fn name_of(&self, id: ValueId) -> &str {
        &self.values[id.index()].name
    }

    fn fresh_value(&mut self, name: &str, ty: TensorType) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value { name: self.unique_name(name), ty });
        id
    }

    /// `name` if unused, else `name.1`, `name.2`, ... (deterministic).
    fn unique_name(&self, name: &str) -> String {
        let taken = |n: &str| self.values.iter().any(|v| v.name == n);
        if !taken(name) {
            return name.to_string();
        }
        (1..).map(|i| format!("{name}.{i}")).find(|n| !taken(n)).expect("unbounded")
    }

    pub fn add_input(&mut self, name: &str, ty: TensorType) -> ValueId {
        let v = self.fresh_value(name, ty);
        self.params.push(Param { value: v, kind: ParamKind::Input });
        v
    }

    pub fn add_weight(&mut self, name: &str, tensor: &str, ty: TensorType) -> ValueId {
        let v = self.fresh_value(name, ty);
        self.params.push(Param { value: v, kind: ParamKind::Weight { tensor: tensor.to_string() } });
        v
    }

    /// Append a node whose result types are inferred; `names` gives one
    /// result name per result (uniquified).
    pub fn push_node(
        &mut self,
        module: Option<&Module>,
        op: Op,
        args: &[ValueId],
        names: &[&str],
    ) -> Result<Vec<ValueId>, String> {
        let arg_types: Vec<&TensorType> = args.iter().map(|a| self.ty(*a)).collect();
        let tys = infer_types(&op, &arg_types, module)
            .map_err(|e| format!("{} `{}`: {e}", op.mnemonic(), names.first().copied().unwrap_or("?")))?;
        if tys.len() != names.len() {
            return Err(format!("op `{}` has {} results, {} names given", op.mnemonic(), tys.len(), names.len()));
        }
        let results: Vec<ValueId> = tys.into_iter().zip(names).map(|(t, n)| self.fresh_value(n, t)).collect();
        self.nodes.push(Node { op, args: args.to_vec(), results: results.clone() });
        Ok(results)
    }

    /// Append a node with explicitly given result types (used by the parser
    /// and by passes that already know the types; the verifier re-checks).
    pub fn push_node_typed(&mut self, op: Op, args: &[ValueId], results: &[(&str, TensorType)]) -> Vec<ValueId> {
        let ids: Vec<ValueId> = results.iter().map(|(n, t)| self.fresh_value(n, t.clone())).collect();
        self.nodes.push(Node { op, args: args.to_vec(), results: ids.clone() });
        ids
    }

    /// Single-result convenience wrapper around [`Function::push_node`].
    pub fn op(&mut self, op: Op, args: &[ValueId], name: &str) -> Result<ValueId, String> {
        Ok(self.push_node(None, op, args, &[name])?[0])
    }

    pub fn input_params(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.kind == ParamKind::Input)
    }

    pub fn weight_params(&self) -> impl Iterator<Item = (&Param, &str)> {
        self.params.iter().filter_map(|p| match &p.kind {
            ParamKind::Weight { tensor } => Some((p, tensor.as_str())),
            ParamKind::Input => None,
        })
    }

    /// For each value, the node index that defines it (None for params).
    pub fn definers(&self) -> Vec<Option<usize>> {
        let mut def = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for r in &n.results {
                def[r.index()] = Some(i);
            }
        }
        def
    }

    /// Number of uses of each value (node operands and function outputs).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.values.len()];
        for n in &self.nodes {
            for a in &n.args {
                uses[a.index()] += 1;
            }
        }
        for o in &self.outputs {
            uses[o.index()] += 1;
        }
        uses
    }
}

/// A module: named functions and the entry point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Module {
    pub name: String,
    pub entry: String,
    pub functions: IndexMap<String, Function>,
}

impl Module {
    pub fn new(name: impl Into<String>, entry: impl Into<String>) -> Self {
        Module { name: name.into(), entry: entry.into(), functions: IndexMap::new() }
    }

    pub fn entry_fn(&self) -> &Function {
        &self.functions[&self.entry]
    }

    pub fn add_function(&mut self, f: Function) {
        self.functions.insert(f.name.clone(), f);
    }

    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.get(name)
    }

    /// Output types of a function, used to type `call` nodes.
    pub fn signature(&self, name: &str) -> Option<(Vec<TensorType>, Vec<TensorType>)> {
        let f = self.functions.get(name)?;
        let ins = f.input_params().map(|p| f.ty(p.value).clone()).collect();
        let outs = f.outputs.iter().map(|o| f.ty(*o).clone()).collect();
        Some((ins, outs))
    }

    /// Total nodes over all functions (a size measure for reports).
    pub fn node_count(&self) -> usize {
        self.functions.values().map(|f| f.nodes.len()).sum()
    }
}

//! The e-class analysis: types (shape + dtype), "depends only on weights",
//! and attribute leaf values. Types come from the IR's own inference
//! (`panguc_ir::infer`), so the e-graph can never disagree with the
//! verifier about what a node produces.

use crate::lang::{decode_op, TLang};
use egg::{Analysis, DidMerge, EGraph, Id, Language, Symbol};
use panguc_ir::infer::infer_types;
use panguc_ir::{Op, TensorType};
use std::collections::{BTreeMap, HashMap};

pub type EG = EGraph<TLang, TensorAnalysis>;

/// Analysis data of one e-class.
#[derive(Debug, Clone)]
pub struct Info {
    /// One type for a tensor class, one per result for a tuple class (a
    /// multi-result op), none for leaves and the outputs root.
    pub tys: Vec<TensorType>,
    /// The value depends only on weights and constants: it is computed once
    /// when the package is built, never by a kernel at run time.
    pub weight_only: bool,
    /// The class is a parameter leaf (an input or a checkpoint weight).
    pub param: bool,
    pub leaf: Option<Leaf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Leaf {
    Attr(Op),
    Int(i64),
}

impl Info {
    fn leaf(l: Leaf) -> Info {
        Info { tys: vec![], weight_only: true, param: false, leaf: Some(l) }
    }

    /// The single type of a tensor class.
    pub fn ty(&self) -> Option<&TensorType> {
        match self.tys.as_slice() {
            [t] if self.leaf.is_none() => Some(t),
            _ => None,
        }
    }

    pub fn attr(&self) -> Option<&Op> {
        match &self.leaf {
            Some(Leaf::Attr(op)) => Some(op),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match &self.leaf {
            Some(Leaf::Int(i)) => Some(*i),
            _ => None,
        }
    }
}

/// Per-function context of the analysis, plus bookkeeping of the rules.
#[derive(Debug, Default)]
pub struct TensorAnalysis {
    /// Parameter name -> (type, is a weight).
    pub params: HashMap<Symbol, (TensorType, bool)>,
    /// Callee name -> output types, to type `call` nodes.
    pub signatures: HashMap<String, Vec<TensorType>>,
    /// E-nodes introduced by rules, with the rule that introduced them
    /// first (children as they were when added; canonicalise before use).
    pub origins: Vec<(TLang, &'static str)>,
    /// Names suggested by rules for the values of new e-nodes.
    pub names: Vec<(TLang, &'static str)>,
    /// Rule name -> number of applications that changed the e-graph.
    pub fired: BTreeMap<&'static str, usize>,
}

/// The IR op of `node` and its tensor operands (attribute leaf removed).
pub fn node_op<'a>(eg: &EG, node: &'a TLang) -> Option<(Op, &'a [Id])> {
    let ch = node.children();
    let attr = ch.first().and_then(|c| eg[*c].data.attr());
    let op = decode_op(node, attr)?;
    let args = if attr.is_some() { &ch[1..] } else { ch };
    Some((op, args))
}

/// Result types of `op` over the classes `args`, or why it does not type.
pub fn infer_node(eg: &EG, op: &Op, args: &[Id]) -> Result<Vec<TensorType>, String> {
    let mut tys = Vec::with_capacity(args.len());
    for a in args {
        match eg[*a].data.ty() {
            Some(t) => tys.push(t),
            None => return Err(format!("operand of `{}` is not a single tensor", op.mnemonic())),
        }
    }
    if let Op::Call { func, .. } = op {
        return eg.analysis.signatures.get(func).cloned().ok_or_else(|| format!("call of unknown function @{func}"));
    }
    infer_types(op, &tys, None)
}

impl Analysis<TLang> for TensorAnalysis {
    type Data = Info;

    fn make(eg: &mut EG, enode: &TLang, _id: Id) -> Info {
        match enode {
            TLang::Attr(a) => Info::leaf(Leaf::Attr(a.op().clone())),
            TLang::Int(i) => Info::leaf(Leaf::Int(*i)),
            TLang::Param(name) => {
                let (ty, weight) =
                    eg.analysis.params.get(name).cloned().unwrap_or_else(|| panic!("unknown parameter %{name}"));
                Info { tys: vec![ty], weight_only: weight, param: true, leaf: None }
            }
            TLang::Proj([i, t]) => {
                let i = eg[*i].data.int().expect("proj index is an Int leaf") as usize;
                let t = &eg[*t].data;
                Info { tys: vec![t.tys[i].clone()], weight_only: t.weight_only, param: false, leaf: None }
            }
            TLang::Outputs(_) => Info { tys: vec![], weight_only: false, param: false, leaf: None },
            _ => {
                let (op, args) = node_op(eg, enode).expect("an op node");
                // Rules only add nodes that type (see `rules::Cx::add`), and
                // the importer's graph is verified, so this cannot fail.
                let tys = infer_node(eg, &op, args).unwrap_or_else(|e| panic!("ill-typed e-node `{enode}`: {e}"));
                let weight_only = !matches!(op, Op::Call { .. }) && args.iter().all(|a| eg[*a].data.weight_only);
                Info { tys, weight_only, param: false, leaf: None }
            }
        }
    }

    fn merge(&mut self, a: &mut Info, b: Info) -> DidMerge {
        debug_assert_eq!(a.tys, b.tys, "a rule merged values of different types");
        // A value equal to a weight-only expression is itself computable at
        // package time, whatever other expressions compute it too.
        let weight_only = a.weight_only || b.weight_only;
        let param = a.param || b.param;
        let changed_a = weight_only != a.weight_only || param != a.param;
        let changed_b = weight_only != b.weight_only || param != b.param;
        a.weight_only = weight_only;
        a.param = param;
        DidMerge(changed_a, changed_b)
    }
}

//! The e-graph language of the graph IR (TENSAT style).
//!
//! Every IR op is an e-node whose children are e-classes. Operator
//! attributes are not part of the operator symbol: an op with attributes
//! gets one extra first child, an [`OpAttr`] leaf holding the op itself.
//! Patterns therefore bind attributes to variables (`(reduce_mean ?a ?x)`)
//! and rule guards inspect them, instead of needing one pattern per axis or
//! shape. Function parameters are [`TLang::Param`] leaves named after the
//! IR value; multi-result ops produce a tuple class whose results are read
//! with `(proj i ?t)`; the function's outputs hang under one `outputs` root.

use egg::{define_language, Id, Symbol};
use panguc_ir::op::AttrMap;
use panguc_ir::Op;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// An op's attributes as an e-graph leaf. Equality, hashing and ordering go
/// through the canonical text of the attributes, so float attributes (eps,
/// scale) compare exactly and the leaf is a valid hash-cons key.
#[derive(Clone)]
pub struct OpAttr {
    key: String,
    op: Op,
}

impl OpAttr {
    pub fn new(op: Op) -> Self {
        OpAttr { key: format!("{}{:?}", op.mnemonic(), op.attrs()), op }
    }

    pub fn op(&self) -> &Op {
        &self.op
    }
}

impl PartialEq for OpAttr {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for OpAttr {}
impl Hash for OpAttr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}
impl PartialOrd for OpAttr {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OpAttr {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}
impl fmt::Debug for OpAttr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}
impl fmt::Display for OpAttr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.op.attrs().iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        write!(f, "{{{}}}", parts.join(","))
    }
}
impl FromStr for OpAttr {
    type Err = String;
    /// Attribute leaves never appear literally in patterns: bind them to a
    /// variable and check them in the rule's guard.
    fn from_str(_: &str) -> Result<Self, String> {
        Err("attribute leaves cannot be written in patterns".into())
    }
}

define_language! {
    /// One e-node. Variant strings are the IR mnemonics.
    pub enum TLang {
        "gather" = Gather([Id; 2]),
        "matmul" = MatMul([Id; 3]),
        "neg" = Neg(Id),
        "exp" = Exp(Id),
        "sqrt" = Sqrt(Id),
        "rsqrt" = Rsqrt(Id),
        "reciprocal" = Reciprocal(Id),
        "sigmoid" = Sigmoid(Id),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "max" = Max([Id; 2]),
        "scalar" = Scalar(Id),
        "reduce_sum" = ReduceSum([Id; 2]),
        "reduce_mean" = ReduceMean([Id; 2]),
        "reduce_max" = ReduceMax([Id; 2]),
        "argmax" = ArgMax([Id; 2]),
        "softmax" = Softmax([Id; 2]),
        "reshape" = Reshape([Id; 2]),
        "transpose" = Transpose([Id; 2]),
        "slice" = Slice([Id; 2]),
        "concat" = Concat(Box<[Id]>),
        "stack" = Stack(Box<[Id]>),
        "repeat_interleave" = RepeatInterleave([Id; 2]),
        "cast" = Cast([Id; 2]),
        "rope_table" = RopeTable([Id; 2]),
        "causal_mask" = CausalMask([Id; 2]),
        "iota" = Iota(Id),
        "one_hot" = OneHot([Id; 2]),
        "kv_cache_write" = KvCacheWrite([Id; 3]),
        "paged_attention" = PagedAttention([Id; 7]),
        "call" = Call(Box<[Id]>),
        "rms_norm" = RmsNorm([Id; 3]),
        "add_rms_norm" = AddRmsNorm([Id; 4]),
        "matmul_bias" = MatMulBias([Id; 4]),
        "split" = Split([Id; 2]),
        "rope" = Rope([Id; 3]),
        "swiglu" = SwiGlu([Id; 2]),
        "gate_up_swiglu" = GateUpSwiGlu([Id; 2]),
        "flash_attention" = FlashAttention([Id; 5]),
        "moe_gating_group_topk" = MoeGatingGroupTopK([Id; 3]),
        "grouped_matmul_moe" = GroupedMatmulMoe([Id; 5]),
        "all_reduce" = AllReduce([Id; 2]),
        "all_gather" = AllGather([Id; 2]),
        "reduce_scatter" = ReduceScatter([Id; 2]),
        "all_to_all" = AllToAll([Id; 2]),
        "qkv_rope" = QkvRope([Id; 8]),
        "moe_router_topk" = MoeRouterTopK([Id; 4]),
        "moe_ffn" = MoeFfn([Id; 8]),
        "moe_grouped_ffn" = MoeGroupedFfn([Id; 8]),
        "qkv_rope_cache_write" = QkvRopeCacheWrite([Id; 9]),
        "moe_init_routing" = MoeInitRouting([Id; 3]),
        "grouped_matmul" = GroupedMatmul([Id; 3]),
        // Expanded rows, weights, row index, then any number of skip terms.
        "moe_finalize_routing" = MoeFinalizeRouting(Box<[Id]>),
        "fused_elementwise" = FusedElementwise(Box<[Id]>),
        "quantize" = Quantize([Id; 3]),
        "dequantize" = Dequantize([Id; 3]),
        "dynamic_quant" = DynamicQuant(Id),
        "quant_matmul" = QuantMatMul([Id; 4]),
        "quant_matmul_per_token" = QuantMatMulPerToken([Id; 4]),
        "grouped_quant_matmul" = GroupedQuantMatMul([Id; 5]),
        // ---- structure, not IR ops ----
        // `(proj i ?tuple)`: result `i` of a multi-result op.
        "proj" = Proj([Id; 2]),
        // The function's outputs, in order: the single root.
        "outputs" = Outputs(Box<[Id]>),
        Attr(OpAttr),
        Int(i64),
        // A function parameter (input or weight), by IR value name.
        Param(Symbol),
    }
}

/// Build the e-node of `op` applied to `args`; `attr` is the class of the
/// op's [`OpAttr`] leaf, required exactly when the op has attributes.
pub fn op_node(op: &Op, attr: Option<Id>, args: &[Id]) -> TLang {
    use egg::FromOp;
    let children: Vec<Id> = attr.into_iter().chain(args.iter().copied()).collect();
    TLang::from_op(op.mnemonic(), children)
        .unwrap_or_else(|e| panic!("op `{}` has no e-graph form with {} operands: {e}", op.mnemonic(), args.len()))
}

/// True when `op` carries an attribute leaf as its first child.
pub fn has_attr_leaf(op: &Op) -> bool {
    !op.attrs().is_empty()
}

/// The IR op of a node whose attribute leaf (if any) is `attr`, or None for
/// structural nodes and leaves.
pub fn decode_op(node: &TLang, attr: Option<&Op>) -> Option<Op> {
    match node {
        TLang::Proj(_) | TLang::Outputs(_) | TLang::Attr(_) | TLang::Int(_) | TLang::Param(_) => None,
        _ => match attr {
            Some(op) => Some(op.clone()),
            None => Some(
                Op::from_parts(&node.to_string(), &AttrMap::default())
                    .unwrap_or_else(|e| panic!("e-node `{node}` without attributes: {e}")),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_ir::op::ReduceOp;

    #[test]
    fn attr_leaves_compare_by_canonical_text() {
        let a = OpAttr::new(Op::RmsNorm { eps: 1e-5 });
        let b = OpAttr::new(Op::RmsNorm { eps: 1e-5 });
        let c = OpAttr::new(Op::RmsNorm { eps: 1e-6 });
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "{eps=Float(1e-5)}");
    }

    #[test]
    fn every_op_kind_round_trips_through_a_node() {
        let ops = [
            Op::Reduce { op: ReduceOp::Mean, axis: 1, keepdim: true },
            Op::Binary(panguc_ir::op::BinaryOp::Mul),
            Op::QkvRope { q_heads: 4, kv_heads: 2 },
            Op::MoeFfn,
            Op::MoeGroupedFfn,
            Op::KvCacheWrite,
            Op::PagedAttention { scale: 0.25 },
            Op::QkvRopeCacheWrite { q_heads: 4, kv_heads: 2 },
            Op::MoeInitRouting { experts: 8 },
            Op::GroupedMatmul,
            Op::MoeFinalizeRouting,
            Op::Quantize,
            Op::Dequantize,
            Op::DynamicQuant,
            Op::QuantMatMul,
            Op::QuantMatMulPerToken,
            Op::GroupedQuantMatMul,
        ];
        for op in ops {
            let arity = match &op {
                Op::Reduce { .. } | Op::DynamicQuant => 1,
                Op::Binary(_) | Op::MoeInitRouting { .. } => 2,
                Op::KvCacheWrite | Op::GroupedMatmul | Op::Quantize | Op::Dequantize => 3,
                Op::QuantMatMul | Op::QuantMatMulPerToken => 4,
                Op::MoeFinalizeRouting | Op::GroupedQuantMatMul => 5,
                Op::PagedAttention { .. } => 6,
                Op::QkvRope { .. } => 7,
                _ => 8,
            };
            let attr = has_attr_leaf(&op).then_some(Id::from(100usize));
            let args: Vec<Id> = (0..arity).map(Id::from).collect();
            let node = op_node(&op, attr, &args);
            assert_eq!(node.to_string(), op.mnemonic());
            let back = decode_op(&node, attr.map(|_| &op)).unwrap();
            assert_eq!(back, op);
        }
    }

    #[test]
    fn patterns_parse_with_attribute_variables() {
        let p: egg::Pattern<TLang> = "(reduce_mean ?a (mul ?x ?x))".parse().unwrap();
        assert_eq!(p.to_string(), "(reduce_mean ?a (mul ?x ?x))");
        let p: egg::Pattern<TLang> = "(proj 1 ?t)".parse().unwrap();
        assert_eq!(p.to_string(), "(proj 1 ?t)");
    }
}

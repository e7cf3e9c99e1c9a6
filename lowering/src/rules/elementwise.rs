//! `elementwise-chain`: an elementwise op whose operand is computed by
//! another elementwise op becomes one `fused_elementwise` kernel, so the
//! intermediate never goes through memory.
//!
//! The searcher is hand-written because "some operand class holds an
//! elementwise node" is not expressible as one pattern over ops of
//! different arities. Growth is bounded: fused expressions are capped at
//! [`MAX_CHAIN_OPS`] ops and [`MAX_CHAIN_OPERANDS`] operands, weight-only
//! producers are never inlined (they run at package time), and operands are
//! numbered canonically so equal expressions share one e-node.

use super::{Cx, Rule};
use crate::analysis::EG;
use crate::lang::TLang;
use egg::{Id, SearchMatches, Searcher, Subst, Var};
use panguc_ir::Op;

pub const MAX_CHAIN_OPS: usize = 12;
pub const MAX_CHAIN_OPERANDS: usize = 4;

pub fn rules() -> Vec<Rule> {
    vec![Rule::custom(
        "elementwise-chain",
        "elementwise op of elementwise ops (float, not weight-only)  ->  one fused_elementwise",
        ChainSearcher,
        fuse_chain,
    )]
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Operand(Id),
    Op(&'static str),
}

/// An elementwise e-node as a postfix expression over operand classes.
fn as_expr(eg: &EG, node: &TLang) -> Option<Vec<Tok>> {
    let unary = |name, a: &Id| Some(vec![Tok::Operand(*a), Tok::Op(name)]);
    let binary = |name, [a, b]: &[Id; 2]| Some(vec![Tok::Operand(*a), Tok::Operand(*b), Tok::Op(name)]);
    match node {
        TLang::Neg(a) => unary("neg", a),
        TLang::Exp(a) => unary("exp", a),
        TLang::Sqrt(a) => unary("sqrt", a),
        TLang::Rsqrt(a) => unary("rsqrt", a),
        TLang::Reciprocal(a) => unary("reciprocal", a),
        TLang::Sigmoid(a) => unary("sigmoid", a),
        TLang::Add(ab) => binary("add", ab),
        TLang::Sub(ab) => binary("sub", ab),
        TLang::Mul(ab) => binary("mul", ab),
        TLang::Div(ab) => binary("div", ab),
        TLang::Max(ab) => binary("max", ab),
        TLang::FusedElementwise(ch) => {
            let Some(Op::FusedElementwise { expr }) = eg[*ch.first()?].data.attr() else { return None };
            let operands = &ch[1..];
            expr.split_whitespace()
                .map(|t| match t.strip_prefix('$') {
                    Some(i) => Some(Tok::Operand(*operands.get(i.parse::<usize>().ok()?)?)),
                    None => Some(Tok::Op(static_name(t)?)),
                })
                .collect()
        }
        _ => None,
    }
}

fn static_name(t: &str) -> Option<&'static str> {
    ["neg", "exp", "sqrt", "rsqrt", "reciprocal", "sigmoid", "add", "sub", "mul", "div", "max"]
        .into_iter()
        .find(|n| *n == t)
}

/// A float activation class: the only kind of value this rule fuses.
fn fusable(eg: &EG, c: Id) -> bool {
    let d = &eg[c].data;
    !d.weight_only && d.ty().is_some_and(|t| t.dtype.is_float())
}

/// Matches (root class, operand class) where the root holds an elementwise
/// node and the operand class holds one too.
pub struct ChainSearcher;

fn child_var() -> Var {
    "?child".parse().expect("valid variable")
}

impl Searcher<TLang, crate::analysis::TensorAnalysis> for ChainSearcher {
    fn search_eclass_with_limit(&self, eg: &EG, eclass: Id, limit: usize) -> Option<SearchMatches<'_, TLang>> {
        if !fusable(eg, eclass) {
            return None;
        }
        let mut children: Vec<Id> = vec![];
        for node in &eg[eclass].nodes {
            let Some(expr) = as_expr(eg, node) else { continue };
            for t in expr {
                let Tok::Operand(c) = t else { continue };
                let c = eg.find(c);
                if c != eg.find(eclass)
                    && fusable(eg, c)
                    && !children.contains(&c)
                    && eg[c].nodes.iter().any(|n| as_expr(eg, n).is_some())
                {
                    children.push(c);
                }
            }
        }
        children.truncate(limit);
        if children.is_empty() {
            return None;
        }
        let substs = children
            .into_iter()
            .map(|c| {
                let mut s = Subst::with_capacity(1);
                s.insert(child_var(), c);
                s
            })
            .collect();
        Some(SearchMatches { eclass, substs, ast: None })
    }

    fn vars(&self) -> Vec<Var> {
        vec![child_var()]
    }
}

/// Inline every elementwise node of the operand class into every
/// elementwise node of the root that reads it.
fn fuse_chain(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let child = cx.find(cx.var("?child"));
    let outers: Vec<Vec<Tok>> = cx.eg[cx.root].nodes.iter().filter_map(|n| as_expr(cx.eg, n)).collect();
    let inners: Vec<Vec<Tok>> = cx.eg[child].nodes.iter().filter_map(|n| as_expr(cx.eg, n)).collect();
    let mut pairs = vec![];
    for outer in &outers {
        for inner in &inners {
            let mut expr = vec![];
            for t in outer {
                match t {
                    Tok::Operand(c) if cx.find(*c) == child => expr.extend(inner.iter().cloned()),
                    other => expr.push(other.clone()),
                }
            }
            if expr.len() == outer.len() {
                continue; // this node of the root does not read the child
            }
            let Some((text, operands)) = canonical(cx, &expr) else { continue };
            if let Some(n) = cx.add(Op::FusedElementwise { expr: text }, &operands) {
                pairs.push((cx.root, n));
            }
        }
    }
    Some(pairs)
}

/// Number operands by first appearance so that equal expressions print
/// (and hash-cons) identically; `None` when over the size caps.
fn canonical(cx: &Cx, expr: &[Tok]) -> Option<(String, Vec<Id>)> {
    let mut operands: Vec<Id> = vec![];
    let mut words = vec![];
    let mut ops = 0;
    for t in expr {
        match t {
            Tok::Operand(c) => {
                let c = cx.find(*c);
                let i = operands.iter().position(|o| *o == c).unwrap_or_else(|| {
                    operands.push(c);
                    operands.len() - 1
                });
                words.push(format!("${i}"));
            }
            Tok::Op(name) => {
                ops += 1;
                words.push(name.to_string());
            }
        }
    }
    (ops <= MAX_CHAIN_OPS && operands.len() <= MAX_CHAIN_OPERANDS).then(|| (words.join(" "), operands))
}

#[cfg(test)]
mod tests {
    use crate::rules::testing::*;
    use panguc_ir::op::{BinaryOp, UnaryOp};
    use panguc_ir::{DType, Op};

    #[test]
    fn elementwise_chain_fires_and_preserves_numbers() {
        // y = (x * sigmoid(x) + b) * s: four elementwise kernels unfused.
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let b = g.weight("b", DType::F32, &[8]);
        let s = g.input("s", &[tok(), c(1)]);
        let sig = g.op(Op::Unary(UnaryOp::Sigmoid), &[x]);
        let silu = g.op(Op::Binary(BinaryOp::Mul), &[x, sig]);
        let add = g.op(Op::Binary(BinaryOp::Add), &[silu, b]);
        let y = g.op(Op::Binary(BinaryOp::Mul), &[add, s]);
        g.output(y);
        let r = check_rule(g, &["elementwise-chain"], 3);
        r.assert_fired("elementwise-chain");
        assert_eq!(r.kernels_before, 4);
        assert_eq!(r.kernels_after, 1, "{}", r.text);
        assert!(r.text.contains("$0 $0 sigmoid mul $1 add $2 mul"), "{}", r.text);
    }

    #[test]
    fn a_cheap_shared_producer_is_recomputed_in_each_consumer() {
        // t = exp(x) feeds two consumers. Unfused: three kernels moving six
        // tensors. Fusing exp into both consumers computes it twice but
        // moves four tensors in two kernels, which the cost model prefers.
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let t = g.op(Op::Unary(UnaryOp::Exp), &[x]);
        let a = g.op(Op::Unary(UnaryOp::Neg), &[t]);
        let b = g.op(Op::Unary(UnaryOp::Sqrt), &[t]);
        g.output(a);
        g.output(b);
        let r = check_rule(g, &["elementwise-chain"], 3);
        assert_eq!(r.kernels_after, 2, "{}", r.text);
        assert_eq!((r.count_op("exp"), r.count_op("fused_elementwise")), (0, 2), "{}", r.text);
    }
}

//! `rmsnorm` and `add-rmsnorm`.

use super::{check, Cx, Rule};
use panguc_ir::op::ReduceOp;
use panguc_ir::Op;

pub fn rules() -> Vec<Rule> {
    vec![
        Rule::patterns(
            "rmsnorm",
            "x * rsqrt(mean(x*x, last) + eps) * w  ->  rms_norm(x, w)",
            &["(mul (mul ?x (rsqrt (add (reduce_mean ?m (mul ?x ?x)) (scalar ?e)))) ?w)"],
            rmsnorm,
        ),
        Rule::multi(
            "add-rmsnorm",
            "s = a + b feeding rms_norm(s, w)  ->  add_rms_norm(a, b, w) giving (s, normed)",
            "?s = (add ?a ?b), ?n = (rms_norm ?e ?s ?w)",
            add_rmsnorm,
        ),
    ]
}

fn rmsnorm(cx: &mut Cx) -> Option<Vec<(egg::Id, egg::Id)>> {
    let x = cx.var("?x");
    let last = cx.ty(x)?.rank().checked_sub(1)?;
    let mean_ok =
        matches!(cx.attr(cx.var("?m"))?, Op::Reduce { op: ReduceOp::Mean, axis, keepdim: true } if axis == last);
    check(mean_ok)?;
    let Op::Scalar { value: eps, dtype } = cx.attr(cx.var("?e"))? else { return None };
    check(dtype.is_float() && eps >= 0.0)?;
    // RmsNorm's typing requires w to be a vector over the last axis, so a
    // broadcast multiply by anything else is left alone.
    let n = cx.add(Op::RmsNorm { eps }, &[x, cx.var("?w")])?;
    Some(vec![(cx.root, n)])
}

fn add_rmsnorm(cx: &mut Cx) -> Option<Vec<(egg::Id, egg::Id)>> {
    let Op::RmsNorm { eps } = cx.attr(cx.var("?e"))? else { return None };
    let (a, b, w) = (cx.var("?a"), cx.var("?b"), cx.var("?w"));
    // AddRmsNorm adds without broadcasting: both operands have one type.
    check(cx.ty(a)? == cx.ty(b)?)?;
    let t = cx.add(Op::AddRmsNorm { eps }, &[a, b, w])?;
    let (sum, normed) = (cx.proj(t, 0), cx.proj(t, 1));
    Some(vec![(cx.var("?s"), sum), (cx.var("?n"), normed)])
}

#[cfg(test)]
mod tests {
    use crate::rules::testing::*;
    use panguc_ir::op::{BinaryOp, ReduceOp, UnaryOp};
    use panguc_ir::{DType, Op};

    /// The importer's primitive RMSNorm: x * rsqrt(mean(x*x) + eps) * w.
    pub(crate) fn rms_primitives(g: &mut G, x: usize, w: usize) -> usize {
        let sq = g.op(Op::Binary(BinaryOp::Mul), &[x, x]);
        let ms = g.op(Op::Reduce { op: ReduceOp::Mean, axis: 1, keepdim: true }, &[sq]);
        let eps = g.op(Op::Scalar { value: 1e-5, dtype: DType::F32 }, &[]);
        let mse = g.op(Op::Binary(BinaryOp::Add), &[ms, eps]);
        let inv = g.op(Op::Unary(UnaryOp::Rsqrt), &[mse]);
        let xn = g.op(Op::Binary(BinaryOp::Mul), &[x, inv]);
        let wf = g.op(Op::Cast { dtype: DType::F32 }, &[w]);
        g.op(Op::Binary(BinaryOp::Mul), &[xn, wf])
    }

    #[test]
    fn rmsnorm_fires_and_preserves_numbers() {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(16)]);
        let w = g.weight("w", DType::BF16, &[16]);
        let y = rms_primitives(&mut g, x, w);
        g.output(y);
        let r = check_rule(g, &["rmsnorm"], 3);
        r.assert_fired("rmsnorm");
        assert_eq!(r.count_op("rms_norm"), 1);
        assert_eq!(r.count_op("rsqrt"), 0, "the primitive chain is gone:\n{}", r.text);
    }

    #[test]
    fn rmsnorm_rejects_a_mean_over_the_wrong_axis() {
        let mut g = G::new();
        let x = g.input("x", &[c(4), c(16)]);
        let w = g.weight("w", DType::F32, &[16]);
        let sq = g.op(Op::Binary(BinaryOp::Mul), &[x, x]);
        let ms = g.op(Op::Reduce { op: ReduceOp::Mean, axis: 0, keepdim: true }, &[sq]);
        let eps = g.op(Op::Scalar { value: 1e-5, dtype: DType::F32 }, &[]);
        let mse = g.op(Op::Binary(BinaryOp::Add), &[ms, eps]);
        let inv = g.op(Op::Unary(UnaryOp::Rsqrt), &[mse]);
        let xn = g.op(Op::Binary(BinaryOp::Mul), &[x, inv]);
        let y = g.op(Op::Binary(BinaryOp::Mul), &[xn, w]);
        g.output(y);
        let r = check_rule(g, &["rmsnorm"], 1);
        assert_eq!(r.count_op("rms_norm"), 0);
        assert!(r.fired("rmsnorm") == 0);
    }

    #[test]
    fn add_rmsnorm_fires_and_gives_both_results() {
        let mut g = G::new();
        let a = g.input("a", &[tok(), c(16)]);
        let b = g.input("b", &[tok(), c(16)]);
        let w = g.weight("w", DType::BF16, &[16]);
        let s = g.op(Op::Binary(BinaryOp::Add), &[a, b]);
        let n = rms_primitives(&mut g, s, w);
        // Both the sum (the residual stream) and the normalised value are used.
        g.output(s);
        g.output(n);
        let r = check_rule(g, &["rmsnorm", "add-rmsnorm"], 3);
        r.assert_fired("add-rmsnorm");
        assert_eq!(r.count_op("add_rms_norm"), 1);
        assert_eq!(r.count_op("add"), 0, "the sum comes from add_rms_norm:\n{}", r.text);
        assert_eq!(r.kernels_after, 1);
    }
}

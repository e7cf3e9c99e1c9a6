//! Projections: `matmul-bias`, `merge-qkv` (and its W8A8_DYNAMIC and
//! static W8A8 forms `merge-qkv-quant`, `merge-qkv-static`), `swiglu`,
//! `merge-gate-up`.

use super::{check, Cx, Rule};
use egg::Id;
use panguc_ir::Op;

pub fn rules() -> Vec<Rule> {
    vec![
        Rule::patterns(
            "matmul-bias",
            "matmul(x, w) + b, b a vector over the columns  ->  matmul_bias(x, w, b)",
            &["(add (matmul ?t ?x ?w) ?b)"],
            matmul_bias,
        ),
        Rule::multi(
            "merge-qkv",
            "three biased projections of one input  ->  one matmul_bias on concatenated weights + split",
            "?q = (matmul_bias ?t ?x ?wq ?bq), ?k = (matmul_bias ?t ?x ?wk ?bk), ?v = (matmul_bias ?t ?x ?wv ?bv)",
            merge_qkv,
        ),
        Rule::multi(
            "merge-qkv-quant",
            "three biased W8A8_DYNAMIC projections of one quantized input  ->  one quant_matmul_per_token on concatenated weights and scales + bias + split",
            "?q = (add (quant_matmul_per_token ?xq ?wq ?sq ?xs) ?bq), \
             ?k = (add (quant_matmul_per_token ?xq ?wk ?sk ?xs) ?bk), \
             ?v = (add (quant_matmul_per_token ?xq ?wv ?sv ?xs) ?bv)",
            merge_qkv_quant,
        ),
        Rule::multi(
            "merge-qkv-static",
            "three static W8A8 projections of one quantized input  ->  one quant_matmul on concatenated weights, quant biases and deq scales + split",
            "?q = (quant_matmul ?xq ?wq ?bq ?dq), \
             ?k = (quant_matmul ?xq ?wk ?bk ?dk), \
             ?v = (quant_matmul ?xq ?wv ?bv ?dv)",
            merge_qkv_static,
        ),
        Rule::patterns("swiglu", "(g * sigmoid(g)) * u  ->  swiglu(g, u)", &["(mul (mul ?g (sigmoid ?g)) ?u)"], swiglu),
        Rule::patterns(
            "merge-gate-up",
            "swiglu(x w_g^T, x w_u^T)  ->  gate_up_swiglu(x, concat(w_g, w_u))",
            &["(swiglu (matmul ?t ?x ?wg) (matmul ?t ?x ?wu))"],
            merge_gate_up,
        ),
    ]
}

fn matmul_bias(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let Op::MatMul { transpose_b } = cx.attr(cx.var("?t"))? else { return None };
    let n = cx.add(Op::MatMulBias { transpose_b }, &[cx.var("?x"), cx.var("?w"), cx.var("?b")])?;
    Some(vec![(cx.root, n)])
}

/// Guards that keep this rule from blowing the e-graph up: every weight is
/// a checkpoint tensor (so a merged projection, whose weight is a concat,
/// is never merged again), the three weights are distinct and taken in
/// e-class order (one match per triple instead of six permutations), and
/// the shared input is an activation (merging weight-only products would
/// only move package-time work around).
fn merge_qkv(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    check(cx.attr(cx.var("?t"))? == Op::MatMulBias { transpose_b: true })?;
    let ws = [cx.var("?wq"), cx.var("?wk"), cx.var("?wv")].map(|w| cx.find(w));
    let bs = [cx.var("?bq"), cx.var("?bk"), cx.var("?bv")];
    check(ws[0] < ws[1] && ws[1] < ws[2])?;
    check(ws.iter().all(|w| cx.is_weight_param(*w)) && bs.iter().all(|b| cx.weight_only(*b)))?;
    let x = cx.var("?x");
    check(!cx.weight_only(x))?;
    let rows: Vec<usize> = ws.iter().map(|w| cx.ty(*w)?.shape.first()?.as_const()).collect::<Option<_>>()?;
    let w = cx.add_named(Op::Concat { axis: 0 }, &ws, Some("qkv_weight"))?;
    let b = cx.add_named(Op::Concat { axis: 0 }, &bs, Some("qkv_bias"))?;
    let y = cx.add_named(Op::MatMulBias { transpose_b: true }, &[x, w, b], Some("qkv"))?;
    let axis = cx.ty(y)?.rank() - 1;
    let s = cx.add_named(Op::Split { axis, sizes: rows }, &[y], Some("qkv_split"))?;
    let outs = [cx.var("?q"), cx.var("?k"), cx.var("?v")];
    Some(outs.iter().enumerate().map(|(i, o)| (*o, cx.proj(s, i))).collect())
}

/// `merge-qkv` for int8 projections sharing one per-token quantized
/// input: output column `n` of the merged matmul is the dot product with
/// weight row `n` scaled by that row's scale, exactly as in the projection
/// it came from. Same guards as `merge-qkv`; the per-channel scales and
/// the biases are vectors over the output columns.
fn merge_qkv_quant(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let ws = [cx.var("?wq"), cx.var("?wk"), cx.var("?wv")].map(|w| cx.find(w));
    let ss = [cx.var("?sq"), cx.var("?sk"), cx.var("?sv")];
    let bs = [cx.var("?bq"), cx.var("?bk"), cx.var("?bv")];
    check(ws[0] < ws[1] && ws[1] < ws[2])?;
    check(ws.iter().all(|w| cx.is_weight_param(*w)))?;
    check(ss.iter().chain(&bs).all(|v| cx.weight_only(*v) && cx.ty(*v).is_some_and(|t| t.rank() == 1)))?;
    let (xq, xs) = (cx.var("?xq"), cx.var("?xs"));
    check(!cx.weight_only(xq) && cx.ty(xq)?.rank() == 2)?;
    let rows: Vec<usize> = ws.iter().map(|w| cx.ty(*w)?.shape.first()?.as_const()).collect::<Option<_>>()?;
    let w = cx.add_named(Op::Concat { axis: 0 }, &ws, Some("qkv_weight"))?;
    let s = cx.add_named(Op::Concat { axis: 0 }, &ss, Some("qkv_weight_scale"))?;
    let b = cx.add_named(Op::Concat { axis: 0 }, &bs, Some("qkv_bias"))?;
    let mm = cx.add_named(Op::QuantMatMulPerToken, &[xq, w, s, xs], Some("qkv_mm"))?;
    let y = cx.add_named(Op::Binary(panguc_ir::op::BinaryOp::Add), &[mm, b], Some("qkv"))?;
    let s = cx.add_named(Op::Split { axis: 1, sizes: rows }, &[y], Some("qkv_split"))?;
    let outs = [cx.var("?q"), cx.var("?k"), cx.var("?v")];
    Some(outs.iter().enumerate().map(|(i, o)| (*o, cx.proj(s, i))).collect())
}

/// `merge-qkv` for static W8A8 projections reading one quantized input
/// (the importer quantizes the row once when q, k and v share their input
/// scale and offset): output column `n` of the merged matmul is
/// `f32(acc + quant_bias[n]) * deq_scale[n]` of weight row `n`, exactly
/// as in the projection it came from. Same guards as `merge-qkv-quant`;
/// quant biases and deq scales are vectors over the output columns.
fn merge_qkv_static(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let ws = [cx.var("?wq"), cx.var("?wk"), cx.var("?wv")].map(|w| cx.find(w));
    let bs = [cx.var("?bq"), cx.var("?bk"), cx.var("?bv")];
    let ds = [cx.var("?dq"), cx.var("?dk"), cx.var("?dv")];
    check(ws[0] < ws[1] && ws[1] < ws[2])?;
    check(ws.iter().all(|w| cx.is_weight_param(*w) && cx.ty(*w).is_some_and(|t| t.rank() == 2)))?;
    check(bs.iter().chain(&ds).all(|v| cx.weight_only(*v) && cx.ty(*v).is_some_and(|t| t.rank() == 1)))?;
    let xq = cx.var("?xq");
    check(!cx.weight_only(xq) && cx.ty(xq)?.rank() == 2)?;
    let rows: Vec<usize> = ws.iter().map(|w| cx.ty(*w)?.shape.first()?.as_const()).collect::<Option<_>>()?;
    let w = cx.add_named(Op::Concat { axis: 0 }, &ws, Some("qkv_weight"))?;
    let b = cx.add_named(Op::Concat { axis: 0 }, &bs, Some("qkv_quant_bias"))?;
    let d = cx.add_named(Op::Concat { axis: 0 }, &ds, Some("qkv_deq_scale"))?;
    let y = cx.add_named(Op::QuantMatMul, &[xq, w, b, d], Some("qkv"))?;
    let s = cx.add_named(Op::Split { axis: 1, sizes: rows }, &[y], Some("qkv_split"))?;
    let outs = [cx.var("?q"), cx.var("?k"), cx.var("?v")];
    Some(outs.iter().enumerate().map(|(i, o)| (*o, cx.proj(s, i))).collect())
}

fn swiglu(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    // SwiGlu takes operands of one type: no broadcasting between gate and up.
    let (g, u) = (cx.var("?g"), cx.var("?u"));
    check(cx.ty(g)? == cx.ty(u)?)?;
    let n = cx.add(Op::SwiGlu, &[g, u])?;
    Some(vec![(cx.root, n)])
}

/// Merges the gate and up projections of one MLP (the shared expert). The
/// routed experts' stacked `[E, I, H]` weights do not type as
/// `gate_up_swiglu` (a single matrix); their gate/up merge happens in
/// `grouped-matmul`, whose kernel takes the merged `[E, 2I, H]` weight.
fn merge_gate_up(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    check(cx.attr(cx.var("?t"))? == Op::MatMul { transpose_b: true })?;
    let (x, wg, wu) = (cx.var("?x"), cx.var("?wg"), cx.var("?wu"));
    check(cx.find(wg) != cx.find(wu) && cx.weight_only(wg) && cx.weight_only(wu) && !cx.weight_only(x))?;
    check(cx.ty(wg)? == cx.ty(wu)?)?;
    let w = cx.add_named(Op::Concat { axis: 0 }, &[wg, wu], Some("gate_up_weight"))?;
    let n = cx.add(Op::GateUpSwiGlu, &[x, w])?;
    Some(vec![(cx.root, n)])
}

#[cfg(test)]
mod tests {
    use crate::rules::testing::*;
    use panguc_ir::op::{BinaryOp, UnaryOp};
    use panguc_ir::{DType, Op};

    fn linear_bias(g: &mut G, x: usize, w: usize, b: usize) -> usize {
        let m = g.op(Op::MatMul { transpose_b: true }, &[x, w]);
        let bf = g.op(Op::Cast { dtype: DType::F32 }, &[b]);
        g.op(Op::Binary(BinaryOp::Add), &[m, bf])
    }

    fn silu_mul(g: &mut G, gate: usize, up: usize) -> usize {
        let s = g.op(Op::Unary(UnaryOp::Sigmoid), &[gate]);
        let silu = g.op(Op::Binary(BinaryOp::Mul), &[gate, s]);
        g.op(Op::Binary(BinaryOp::Mul), &[silu, up])
    }

    #[test]
    fn matmul_bias_fires_and_preserves_numbers() {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let w = g.weight("w", DType::BF16, &[6, 8]);
        let b = g.weight("b", DType::BF16, &[6]);
        let y = linear_bias(&mut g, x, w, b);
        g.output(y);
        let r = check_rule(g, &["matmul-bias"], 3);
        r.assert_fired("matmul-bias");
        assert_eq!((r.count_op("matmul_bias"), r.count_op("matmul"), r.count_op("add")), (1, 0, 0));
    }

    fn qkv_graph() -> G {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let mut outs = vec![];
        for (name, rows) in [("q", 8), ("k", 4), ("v", 4)] {
            let w = g.weight(&format!("{name}_proj.weight"), DType::BF16, &[rows, 8]);
            let b = g.weight(&format!("{name}_proj.bias"), DType::BF16, &[rows]);
            outs.push((w, b));
        }
        let ys: Vec<usize> = outs.iter().map(|(w, b)| linear_bias(&mut g, x, *w, *b)).collect();
        for y in ys {
            g.output(y);
        }
        g
    }

    #[test]
    fn merge_qkv_fires_once_and_preserves_numbers() {
        let r = check_rule(qkv_graph(), &["matmul-bias", "merge-qkv"], 3);
        assert_eq!(r.fired("merge-qkv"), 1, "one canonical triple, not six permutations");
        assert_eq!(r.count_op("matmul_bias"), 1, "{}", r.text);
        assert_eq!(r.count_op("split"), 1);
        assert_eq!(r.kernels_after, 2, "merged matmul + split:\n{}", r.text);
    }

    /// The importer's W8A8_DYNAMIC q/k/v: one per-token quantization of the
    /// input, three int8 projections with per-channel scales and a bias.
    #[test]
    fn merge_qkv_quant_fires_once_and_preserves_numbers() {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let q = g.ops(Op::DynamicQuant, &[x], 2);
        for (name, rows) in [("q", 8), ("k", 4), ("v", 4)] {
            let w = g.weight(&format!("{name}_proj.weight"), DType::I8, &[rows, 8]);
            let s = g.weight(&format!("{name}_proj.weight_scale"), DType::F32, &[rows]);
            let b = g.weight(&format!("{name}_proj.bias"), DType::BF16, &[rows]);
            let mm = g.op(Op::QuantMatMulPerToken, &[q[0], w, s, q[1]]);
            let bf = g.op(Op::Cast { dtype: DType::F32 }, &[b]);
            let y = g.op(Op::Binary(BinaryOp::Add), &[mm, bf]);
            g.output(y);
        }
        let r = check_rule(g, &["merge-qkv-quant"], 3);
        assert_eq!(r.fired("merge-qkv-quant"), 1, "one canonical triple, not six permutations");
        r.assert_fired("merge-qkv-quant");
        assert_eq!((r.count_op("quant_matmul_per_token"), r.count_op("split")), (1, 1), "{}", r.text);
    }

    /// The importer's static W8A8 q/k/v: the input quantized with one
    /// per-tensor scale and offset (shared: a scale per projection, as
    /// `shared` false builds, is three quantizations the rule leaves
    /// alone), three int8 projections with quant biases and deq scales.
    fn static_qkv_graph(shared: bool) -> G {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let quantized = |g: &mut G, name: &str| {
            let s = g.weight(&format!("{name}.input_scale"), DType::F32, &[1]);
            let o = g.weight(&format!("{name}.input_offset"), DType::F32, &[1]);
            g.op(Op::Quantize, &[x, s, o])
        };
        let xq = quantized(&mut g, "q_proj");
        for (name, rows) in [("q", 8), ("k", 4), ("v", 4)] {
            let module = format!("{name}_proj");
            let xq = if shared || name == "q" { xq } else { quantized(&mut g, &module) };
            let w = g.weight(&format!("{module}.weight"), DType::I8, &[rows, 8]);
            let b = g.weight(&format!("{module}.quant_bias"), DType::I32, &[rows]);
            let d = g.weight(&format!("{module}.deq_scale"), DType::F32, &[rows]);
            let y = g.op(Op::QuantMatMul, &[xq, w, b, d]);
            g.output(y);
        }
        g
    }

    #[test]
    fn merge_qkv_static_fires_once_and_preserves_numbers() {
        let r = check_rule(static_qkv_graph(true), &["merge-qkv-static"], 3);
        assert_eq!(r.fired("merge-qkv-static"), 1, "one canonical triple, not six permutations");
        r.assert_fired("merge-qkv-static");
        assert_eq!((r.count_op("quant_matmul"), r.count_op("split"), r.count_op("quantize")), (1, 1, 1), "{}", r.text);
    }

    #[test]
    fn merge_qkv_static_needs_one_quantized_input() {
        let r = check_rule(static_qkv_graph(false), &["merge-qkv-static"], 3);
        assert_eq!(r.fired("merge-qkv-static"), 0, "{}", r.text);
        assert_eq!((r.count_op("quant_matmul"), r.count_op("quantize")), (3, 3), "{}", r.text);
    }

    #[test]
    fn merge_qkv_without_its_guards_blows_up() {
        // The same multi-pattern with the ordering and "checkpoint weight"
        // guards removed merges every permutation and then merges merged
        // projections again, until the node limit stops it.
        let guarded = saturate_only(qkv_graph(), super::rules().into_iter().filter(|r| r.name != "swiglu").collect());
        let unguarded = saturate_only(
            qkv_graph(),
            vec![
            super::rules().remove(0),
            crate::rules::Rule::multi(
                "merge-qkv-unguarded",
                "",
                "?q = (matmul_bias ?t ?x ?wq ?bq), ?k = (matmul_bias ?t ?x ?wk ?bk), ?v = (matmul_bias ?t ?x ?wv ?bv)",
                unguarded_merge,
            ),
        ],
        );
        assert_eq!(guarded.1, "saturated");
        assert_ne!(unguarded.1, "saturated", "the unguarded rule never saturates");
        assert!(unguarded.0 > 10 * guarded.0, "unguarded {} e-nodes vs guarded {}", unguarded.0, guarded.0);
    }

    fn unguarded_merge(cx: &mut crate::rules::Cx) -> Option<Vec<(egg::Id, egg::Id)>> {
        let ws = [cx.var("?wq"), cx.var("?wk"), cx.var("?wv")];
        let bs = [cx.var("?bq"), cx.var("?bk"), cx.var("?bv")];
        let rows: Vec<usize> = ws.iter().map(|w| cx.ty(*w)?.shape.first()?.as_const()).collect::<Option<_>>()?;
        let w = cx.add(Op::Concat { axis: 0 }, &ws)?;
        let b = cx.add(Op::Concat { axis: 0 }, &bs)?;
        let y = cx.add(Op::MatMulBias { transpose_b: true }, &[cx.var("?x"), w, b])?;
        let s = cx.add(Op::Split { axis: 1, sizes: rows }, &[y])?;
        let outs = [cx.var("?q"), cx.var("?k"), cx.var("?v")];
        Some(outs.iter().enumerate().map(|(i, o)| (*o, cx.proj(s, i))).collect())
    }

    fn mlp_graph() -> G {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(8)]);
        let wg = g.weight("gate_proj.weight", DType::BF16, &[12, 8]);
        let wu = g.weight("up_proj.weight", DType::BF16, &[12, 8]);
        let gate = g.op(Op::MatMul { transpose_b: true }, &[x, wg]);
        let up = g.op(Op::MatMul { transpose_b: true }, &[x, wu]);
        let act = silu_mul(&mut g, gate, up);
        g.output(act);
        g
    }

    #[test]
    fn swiglu_fires_and_preserves_numbers() {
        let r = check_rule(mlp_graph(), &["swiglu"], 3);
        r.assert_fired("swiglu");
        assert_eq!((r.count_op("swiglu"), r.count_op("sigmoid")), (1, 0));
    }

    #[test]
    fn merge_gate_up_fires_and_preserves_numbers() {
        let r = check_rule(mlp_graph(), &["swiglu", "merge-gate-up"], 3);
        r.assert_fired("merge-gate-up");
        assert_eq!(r.count_op("gate_up_swiglu"), 1);
        assert_eq!(r.kernels_after, 1, "one GateUp matmul with a SwiGLU epilogue:\n{}", r.text);
    }
}

//! Mixture of grouped experts: `moe-gating`, `moe-router`,
//! `grouped-matmul` and `moe-shared-residual` (routing per row), and the
//! batched form: `moe-batched-routing` and `moe-grouped-ffn`; and the
//! W8A8_DYNAMIC experts in the batched form: `moe-batched-routing-quant`
//! and `moe-finalize-skips`.

use super::{check, Cx, Rule};
use egg::Id;
use panguc_ir::op::ReduceOp;
use panguc_ir::{Dim, Op};

pub fn rules() -> Vec<Rule> {
    vec![
        Rule::multi(
            "moe-gating",
            "softmax over all experts -> per-group max/argmax -> gather router_scale -> multiply  ->  moe_gating_group_topk",
            "?ids = (add (argmax ?am (reshape ?rg (softmax ?sm ?logits))) (iota ?io)), \
             ?w = (mul (reduce_max ?rm (reshape ?rg (softmax ?sm ?logits))) (gather ?scale ?ids))",
            moe_gating,
        ),
        Rule::patterns(
            "moe-router",
            "moe_gating_group_topk(x w_router^T, scale)  ->  moe_router_topk(x, w_router, scale)",
            &["(moe_gating_group_topk ?g (matmul ?t ?x ?wr) ?scale)"],
            moe_router,
        ),
        Rule::patterns(
            "grouped-matmul",
            "all experts computed densely, combined through one-hot routing weights  ->  grouped_matmul_moe over the selected experts",
            &[DENSE_EXPERTS],
            grouped_matmul,
        ),
        Rule::patterns(
            "moe-shared-residual",
            "r + (grouped_matmul_moe(x, ..) + shared_down(gate_up_swiglu(x, ..)))  ->  moe_ffn",
            &[
                "(add ?r (add (grouped_matmul_moe ?x ?w ?ids ?gu ?dn) (matmul ?t (gate_up_swiglu ?x ?sgu) ?sdn)))",
            ],
            moe_shared_residual,
        ),
        Rule::patterns(
            "moe-batched-routing",
            "all experts computed densely, combined through one-hot routing weights  ->  moe_init_routing (pairs sorted by expert, per-expert counts) -> grouped_matmul gate, up -> swiglu -> grouped_matmul down -> moe_finalize_routing",
            &[DENSE_EXPERTS],
            moe_batched_routing,
        ),
        Rule::patterns(
            "moe-grouped-ffn",
            "r + (moe_finalize_routing(init/grouped gate-up/swiglu/grouped down chain) + shared_down(gate_up_swiglu(x, ..)))  ->  moe_grouped_ffn",
            &[&grouped_chain_pattern()],
            moe_grouped_ffn,
        ),
        Rule::patterns(
            "moe-batched-routing-quant",
            "W8A8_DYNAMIC experts computed densely, combined through one-hot routing weights  ->  moe_init_routing -> dynamic_quant -> grouped_quant_matmul gate, up -> swiglu -> dynamic_quant -> grouped_quant_matmul down -> moe_finalize_routing",
            &[&dense_quant_experts_pattern()],
            moe_batched_routing_quant,
        ),
        Rule::patterns(
            "moe-finalize-skips",
            "r + (moe_finalize_routing(grouped_quant_matmul(..), w, idx) + s)  ->  moe_finalize_routing(.., s, r)",
            &["(add ?r (add (moe_finalize_routing (grouped_quant_matmul ?aq ?wd ?sd ?as ?counts) ?w ?idx) ?s))"],
            moe_finalize_skips,
        ),
    ]
}

/// The importer's routed W8A8_DYNAMIC experts (`DENSE_EXPERTS` with every
/// matmul a per-token quantized one): every expert on every row, its
/// activation quantized per token before each projection.
fn dense_quant_experts_pattern() -> String {
    let qmm = |x: &str, w: &str, s: &str| {
        format!("(quant_matmul_per_token (proj 0 (dynamic_quant {x})) {w} {s} (proj 1 (dynamic_quant {x})))")
    };
    let act = format!("(swiglu {} {})", qmm("?x", "?wg", "?sg"), qmm("?x", "?wu", "?su"));
    format!(
        "(reduce_sum ?r0 (mul {} \
         (reshape ?rc (transpose ?tp (reduce_sum ?r1 (mul (one_hot ?oh ?ids) (reshape ?rw ?w)))))))",
        qmm(&act, "?wd", "?sd")
    )
}

/// The importer's routed experts: every expert on every row, weighted by
/// a one-hot combine of the routing weights.
const DENSE_EXPERTS: &str = "(reduce_sum ?r0 (mul (matmul ?t (swiglu (matmul ?t ?x ?wg) (matmul ?t ?x ?wu)) ?wd) \
    (reshape ?rc (transpose ?tp (reduce_sum ?r1 (mul (one_hot ?oh ?ids) (reshape ?rw ?w)))))))";

/// `residual + (batched routed experts + shared expert)` as
/// `moe-batched-routing` builds the routed part.
fn grouped_chain_pattern() -> String {
    let init = "(moe_init_routing ?ie ?x ?ids)";
    let (rows, idx, counts) = (format!("(proj 0 {init})"), format!("(proj 1 {init})"), format!("(proj 2 {init})"));
    format!(
        "(add ?r (add (moe_finalize_routing (grouped_matmul (swiglu (grouped_matmul {rows} ?wg {counts}) \
         (grouped_matmul {rows} ?wu {counts})) ?wd {counts}) ?w {idx}) (matmul ?t (gate_up_swiglu ?x ?sgu) ?sdn)))"
    )
}

fn moe_gating(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let logits = cx.var("?logits");
    let lt = cx.ty(logits)?;
    check(lt.rank() == 2 && lt.dtype.is_float())?;
    let e = lt.shape[1].as_const()?;
    check(cx.attr(cx.var("?sm"))? == Op::Softmax { axis: 1 })?;
    let Op::Iota { len: groups, step } = cx.attr(cx.var("?io"))? else { return None };
    check(groups > 0 && e % groups == 0 && step as usize == e / groups)?;
    let grouped = vec![lt.shape[0].clone(), Dim::c(groups), Dim::c(e / groups)];
    check(cx.attr(cx.var("?rg"))? == Op::Reshape { shape: grouped })?;
    check(cx.attr(cx.var("?am"))? == Op::ArgMax { axis: 2, keepdim: false })?;
    check(cx.attr(cx.var("?rm"))? == Op::Reduce { op: ReduceOp::Max, axis: 2, keepdim: false })?;
    let t = cx.add(Op::MoeGatingGroupTopK { groups }, &[logits, cx.var("?scale")])?;
    let (w, ids) = (cx.proj(t, 0), cx.proj(t, 1));
    Some(vec![(cx.var("?w"), w), (cx.var("?ids"), ids)])
}

fn moe_router(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let Op::MoeGatingGroupTopK { groups } = cx.attr(cx.var("?g"))? else { return None };
    check(cx.attr(cx.var("?t"))? == Op::MatMul { transpose_b: true })?;
    let wr = cx.var("?wr");
    check(cx.weight_only(wr))?;
    let n = cx.add(Op::MoeRouterTopK { groups }, &[cx.var("?x"), wr, cx.var("?scale")])?;
    Some(vec![(cx.root, n)])
}

/// The dense form computes every expert on every token and weights the
/// results by `combine[t, e]`, which is zero except at the selected
/// experts; the grouped matmul computes only the selected (token, expert)
/// pairs and adds them in group order. Skipped terms are exact zeros, so
/// the two agree up to f32 summation order.
fn grouped_matmul(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let d = dense_experts(cx)?;
    // Gate rows first, then up rows: the layout GroupedMatmulMoe expects.
    let gate_up = cx.add_named(Op::Concat { axis: 1 }, &[d.wg, d.wu], Some("experts_gate_up_weight"))?;
    let n = cx.add(Op::GroupedMatmulMoe, &[d.x, d.w, d.ids, gate_up, d.wd])?;
    Some(vec![(cx.root, n)])
}

/// The operands of a match of [`DENSE_EXPERTS`].
struct DenseExperts {
    x: Id,
    wg: Id,
    wu: Id,
    wd: Id,
    w: Id,
    ids: Id,
    experts: usize,
}

/// Guards shared by the rules that replace the dense experts: stacked
/// expert weights `[E, I, H]`, a one-hot combine over the same `E`.
fn dense_experts(cx: &Cx) -> Option<DenseExperts> {
    check(cx.attr(cx.var("?t"))? == Op::MatMul { transpose_b: true })?;
    dense_combine(cx)
}

/// [`dense_experts`] without the float matmul's attribute (the W8A8_DYNAMIC
/// form has none).
fn dense_combine(cx: &Cx) -> Option<DenseExperts> {
    check(cx.attr(cx.var("?r0"))? == Op::Reduce { op: ReduceOp::Sum, axis: 0, keepdim: false })?;
    check(cx.attr(cx.var("?r1"))? == Op::Reduce { op: ReduceOp::Sum, axis: 1, keepdim: false })?;
    check(cx.attr(cx.var("?tp"))? == Op::Transpose { perm: vec![1, 0] })?;
    let (x, wg, wu, wd, w, ids) =
        (cx.var("?x"), cx.var("?wg"), cx.var("?wu"), cx.var("?wd"), cx.var("?w"), cx.var("?ids"));
    check([wg, wu, wd].iter().all(|c| cx.weight_only(*c)) && !cx.weight_only(x))?;
    let (wgt, wdt, routing) = (cx.ty(wg)?, cx.ty(wd)?, cx.ty(w)?);
    check(wgt.rank() == 3 && cx.ty(wu)? == wgt && routing.rank() == 2)?;
    let e = wgt.shape[0].as_const()?;
    let t = routing.shape[0].clone();
    check(cx.attr(cx.var("?oh"))? == Op::OneHot { depth: e })?;
    check(cx.attr(cx.var("?rw"))? == Op::Reshape { shape: vec![t.clone(), routing.shape[1].clone(), Dim::c(1)] })?;
    check(cx.attr(cx.var("?rc"))? == Op::Reshape { shape: vec![Dim::c(e), t, Dim::c(1)] })?;
    check(wdt.rank() == 3 && wdt.shape[0] == wgt.shape[0])?;
    Some(DenseExperts { x, wg, wu, wd, w, ids, experts: e })
}

/// The dense experts over a batch as the named batched ops: the (row,
/// expert) pairs sorted by expert with each pair's row gathered into its
/// expert's contiguous block, one grouped matmul per projection over the
/// experts that received rows (driven by the counts), and the weighted
/// combine. As with `grouped-matmul`, the skipped (row, expert) terms are
/// exact zeros in the dense form.
fn moe_batched_routing(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let d = dense_experts(cx)?;
    let init = cx.add(Op::MoeInitRouting { experts: d.experts }, &[d.x, d.ids])?;
    let (rows, row_idx, counts) = (cx.proj(init, 0), cx.proj(init, 1), cx.proj(init, 2));
    let gate = cx.add(Op::GroupedMatmul, &[rows, d.wg, counts])?;
    let up = cx.add(Op::GroupedMatmul, &[rows, d.wu, counts])?;
    let act = cx.add(Op::SwiGlu, &[gate, up])?;
    let y = cx.add(Op::GroupedMatmul, &[act, d.wd, counts])?;
    let out = cx.add(Op::MoeFinalizeRouting, &[y, d.w, row_idx])?;
    Some(vec![(cx.root, out)])
}

/// The dense W8A8_DYNAMIC experts over a batch in the batched form of
/// `moe-batched-routing`. Quantization is per row, so quantizing the
/// gathered rows gives each row the int8 values and scale it has in the
/// dense form; the per-expert weight scales `[E, N]` are the dense
/// matmuls' own. Skipped (row, expert) terms are exact zeros there.
fn moe_batched_routing_quant(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let d = dense_combine(cx)?;
    let (sg, su, sd) = (cx.var("?sg"), cx.var("?su"), cx.var("?sd"));
    check([sg, su, sd].iter().all(|c| cx.weight_only(*c)))?;
    let init = cx.add(Op::MoeInitRouting { experts: d.experts }, &[d.x, d.ids])?;
    let (rows, row_idx, counts) = (cx.proj(init, 0), cx.proj(init, 1), cx.proj(init, 2));
    let xq = cx.add(Op::DynamicQuant, &[rows])?;
    let (q, s) = (cx.proj(xq, 0), cx.proj(xq, 1));
    let gate = cx.add(Op::GroupedQuantMatMul, &[q, d.wg, sg, s, counts])?;
    let up = cx.add(Op::GroupedQuantMatMul, &[q, d.wu, su, s, counts])?;
    let act = cx.add(Op::SwiGlu, &[gate, up])?;
    let aq = cx.add(Op::DynamicQuant, &[act])?;
    let (q, s) = (cx.proj(aq, 0), cx.proj(aq, 1));
    let y = cx.add(Op::GroupedQuantMatMul, &[q, d.wd, sd, s, counts])?;
    let out = cx.add(Op::MoeFinalizeRouting, &[y, d.w, row_idx])?;
    Some(vec![(cx.root, out)])
}

/// The shared expert `s` and the residual `r` as the finalize's skip terms
/// (added after the weighted sum, in that order: `(routed + s) + r` is
/// `r + (routed + s)` exactly). Only the quantized chain's finalize is
/// extended: the float one is priced as a whole by `moe-grouped-ffn`.
fn moe_finalize_skips(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let [aq, wd, sd, x_scale, counts] = ["?aq", "?wd", "?sd", "?as", "?counts"].map(|v| cx.var(v));
    let y = cx.add(Op::GroupedQuantMatMul, &[aq, wd, sd, x_scale, counts])?;
    let [w, idx, s, r] = ["?w", "?idx", "?s", "?r"].map(|v| cx.var(v));
    let n = cx.add(Op::MoeFinalizeRouting, &[y, w, idx, s, r])?;
    Some(vec![(cx.root, n)])
}

/// The batched chain plus the shared expert and the residual as one op
/// with `moe_ffn`'s operands; extraction prices the two against each other.
fn moe_grouped_ffn(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    check(cx.attr(cx.var("?t"))? == Op::MatMul { transpose_b: true })?;
    let (wg, wu, sgu, sdn) = (cx.var("?wg"), cx.var("?wu"), cx.var("?sgu"), cx.var("?sdn"));
    check([wg, wu, sgu, sdn].iter().all(|c| cx.weight_only(*c)))?;
    let gate_up = cx.add_named(Op::Concat { axis: 1 }, &[wg, wu], Some("experts_gate_up_weight"))?;
    let [x, w, ids, wd, r] = ["?x", "?w", "?ids", "?wd", "?r"].map(|v| cx.var(v));
    let n = cx.add(Op::MoeGroupedFfn, &[x, w, ids, gate_up, wd, sgu, sdn, r])?;
    Some(vec![(cx.root, n)])
}

fn moe_shared_residual(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    check(cx.attr(cx.var("?t"))? == Op::MatMul { transpose_b: true })?;
    let (sgu, sdn) = (cx.var("?sgu"), cx.var("?sdn"));
    check(cx.weight_only(sgu) && cx.weight_only(sdn))?;
    let args = ["?x", "?w", "?ids", "?gu", "?dn"].map(|v| cx.var(v));
    let mut all = args.to_vec();
    all.extend([sgu, sdn, cx.var("?r")]);
    let n = cx.add(Op::MoeFfn, &all)?;
    Some(vec![(cx.root, n)])
}

#[cfg(test)]
mod tests {
    use crate::rules::testing::*;
    use panguc_ir::op::{BinaryOp, ReduceOp, UnaryOp};
    use panguc_ir::{DType, Op};

    const E: usize = 8;
    const G_: usize = 4;

    /// The importer's routing: softmax over all experts, per-group
    /// max/argmax, router_scale gathered and multiplied. Returns
    /// (weights [T, G], expert ids [T, G]).
    fn routing(g: &mut G, logits: usize) -> (usize, usize) {
        let scale = g.weight("router_scale", DType::BF16, &[1, E]);
        let p = g.op(Op::Softmax { axis: 1 }, &[logits]);
        let pg = g.op(Op::Reshape { shape: vec![tok(), c(G_), c(E / G_)] }, &[p]);
        let gmax = g.op(Op::Reduce { op: ReduceOp::Max, axis: 2, keepdim: false }, &[pg]);
        let garg = g.op(Op::ArgMax { axis: 2, keepdim: false }, &[pg]);
        let off = g.op(Op::Iota { len: G_, step: (E / G_) as i64 }, &[]);
        let ids = g.op(Op::Binary(BinaryOp::Add), &[garg, off]);
        let s1 = g.op(Op::Reshape { shape: vec![c(E)] }, &[scale]);
        let sf = g.op(Op::Cast { dtype: DType::F32 }, &[s1]);
        let sel = g.op(Op::Gather, &[sf, ids]);
        let w = g.op(Op::Binary(BinaryOp::Mul), &[gmax, sel]);
        (w, ids)
    }

    fn router(g: &mut G, x: usize) -> usize {
        let wr = g.weight("gate.weight", DType::BF16, &[E, 16]);
        g.op(Op::MatMul { transpose_b: true }, &[x, wr])
    }

    #[test]
    fn moe_gating_fires_and_preserves_numbers() {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(16)]);
        let logits = router(&mut g, x);
        let (w, ids) = routing(&mut g, logits);
        g.output(w);
        g.output(ids);
        let r = check_rule(g, &["moe-gating"], 5);
        r.assert_fired("moe-gating");
        assert_eq!((r.count_op("moe_gating_group_topk"), r.count_op("softmax"), r.count_op("argmax")), (1, 0, 0));
    }

    #[test]
    fn moe_router_fuses_the_router_matmul_into_gating() {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(16)]);
        let logits = router(&mut g, x);
        let (w, ids) = routing(&mut g, logits);
        g.output(w);
        g.output(ids);
        let r = check_rule(g, &["moe-gating", "moe-router"], 5);
        r.assert_fired("moe-router");
        assert_eq!(r.count_op("moe_router_topk"), 1);
        assert_eq!(r.kernels_after, 1, "{}", r.text);
    }

    /// The MoE block's inputs (`x`, `residual`, both `[tokens, h]`) and the
    /// importer's dense per-expert combine weights `[tokens, E]`: router,
    /// group top-k, one-hot of the chosen experts times their weights,
    /// summed over the k slots.
    fn routed_combine_weights(g: &mut G, h: usize) -> (usize, usize, usize) {
        let x = g.input("x", &[tok(), c(h)]);
        let r = g.input("residual", &[tok(), c(h)]);
        let logits = router(g, x);
        let (w, ids) = routing(g, logits);
        let oh = g.op(Op::OneHot { depth: E }, &[ids]);
        let w3 = g.op(Op::Reshape { shape: vec![tok(), c(G_), c(1)] }, &[w]);
        let slots = g.op(Op::Binary(BinaryOp::Mul), &[oh, w3]);
        let combine = g.op(Op::Reduce { op: ReduceOp::Sum, axis: 1, keepdim: false }, &[slots]);
        (x, r, combine)
    }

    /// The importer's dense routed experts plus the shared expert and the
    /// residual add.
    fn moe_block(g: &mut G) -> usize {
        let (h, i, is) = (16, 6, 10);
        let (x, r, combine) = routed_combine_weights(g, h);
        let stack = |g: &mut G, kind: &str, shape: &[usize]| {
            let ws: Vec<usize> =
                (0..E).map(|e| g.weight(&format!("experts.{e}.{kind}_proj.weight"), DType::BF16, shape)).collect();
            g.op(Op::Stack { axis: 0 }, &ws)
        };
        let wg = stack(g, "gate", &[i, h]);
        let wu = stack(g, "up", &[i, h]);
        let wd = stack(g, "down", &[h, i]);
        let mlp = |g: &mut G, x: usize, wg: usize, wu: usize, wd: usize| {
            let gate = g.op(Op::MatMul { transpose_b: true }, &[x, wg]);
            let up = g.op(Op::MatMul { transpose_b: true }, &[x, wu]);
            let s = g.op(Op::Unary(UnaryOp::Sigmoid), &[gate]);
            let silu = g.op(Op::Binary(BinaryOp::Mul), &[gate, s]);
            let act = g.op(Op::Binary(BinaryOp::Mul), &[silu, up]);
            g.op(Op::MatMul { transpose_b: true }, &[act, wd])
        };
        let ey = mlp(g, x, wg, wu, wd);
        let ct = g.op(Op::Transpose { perm: vec![1, 0] }, &[combine]);
        let cb = g.op(Op::Reshape { shape: vec![c(E), tok(), c(1)] }, &[ct]);
        let weighted = g.op(Op::Binary(BinaryOp::Mul), &[ey, cb]);
        let routed = g.op(Op::Reduce { op: ReduceOp::Sum, axis: 0, keepdim: false }, &[weighted]);
        let sg = g.weight("shared.gate_proj.weight", DType::BF16, &[is, h]);
        let su = g.weight("shared.up_proj.weight", DType::BF16, &[is, h]);
        let sd = g.weight("shared.down_proj.weight", DType::BF16, &[h, is]);
        let shared = mlp(g, x, sg, su, sd);
        let moe = g.op(Op::Binary(BinaryOp::Add), &[routed, shared]);
        g.op(Op::Binary(BinaryOp::Add), &[r, moe])
    }

    #[test]
    fn grouped_matmul_fires_and_matches_the_dense_experts() {
        let mut g = G::new();
        let y = moe_block(&mut g);
        g.output(y);
        let r = check_rule(g, &["swiglu", "moe-gating", "grouped-matmul"], 6);
        r.assert_fired("grouped-matmul");
        assert_eq!(r.count_op("grouped_matmul_moe"), 1, "{}", r.text);
        assert_eq!(r.count_op("one_hot"), 0, "the dense combine is gone:\n{}", r.text);
    }

    #[test]
    fn moe_shared_residual_makes_the_block_one_kernel_after_routing() {
        let mut g = G::new();
        let y = moe_block(&mut g);
        g.output(y);
        let rules = ["swiglu", "merge-gate-up", "moe-gating", "moe-router", "grouped-matmul", "moe-shared-residual"];
        let r = check_rule(g, &rules, 6);
        r.assert_fired("moe-shared-residual");
        assert_eq!(r.count_op("moe_ffn"), 1, "{}", r.text);
        assert_eq!(r.kernels_after, 2, "router+gating and the moe_ffn:\n{}", r.text);
    }

    #[test]
    fn moe_batched_routing_fires_and_matches_the_dense_experts() {
        let mut g = G::new();
        let y = moe_block(&mut g);
        g.output(y);
        let r = check_rule(g, &["swiglu", "moe-gating", "moe-batched-routing"], 6);
        r.assert_fired("moe-batched-routing");
        let chain = (r.count_op("moe_init_routing"), r.count_op("grouped_matmul"), r.count_op("moe_finalize_routing"));
        assert_eq!(chain, (1, 3, 1), "init, gate, up, down, finalize:\n{}", r.text);
        assert_eq!(r.count_op("one_hot"), 0, "the dense combine is gone:\n{}", r.text);
    }

    /// `moe_block` with W8A8_DYNAMIC linears (the importer's form): every
    /// projection `quant_matmul_per_token` of a per-token `dynamic_quant`,
    /// int8 weights stacked per expert, per-channel scales `[E, N]`.
    fn quant_moe_block(g: &mut G) -> usize {
        let (h, i, is) = (16, 6, 10);
        let (x, r, combine) = routed_combine_weights(g, h);
        let stack = |g: &mut G, kind: &str, shape: &[usize]| {
            let ws: Vec<usize> =
                (0..E).map(|e| g.weight(&format!("experts.{e}.{kind}_proj.weight"), DType::I8, shape)).collect();
            g.op(Op::Stack { axis: 0 }, &ws)
        };
        let qlinear = |g: &mut G, x: usize, w: usize, scale: usize| {
            let q = g.ops(Op::DynamicQuant, &[x], 2);
            g.op(Op::QuantMatMulPerToken, &[q[0], w, scale, q[1]])
        };
        let mlp = |g: &mut G, x: usize, w: [usize; 6]| {
            let gate = qlinear(g, x, w[0], w[1]);
            let up = qlinear(g, x, w[2], w[3]);
            let s = g.op(Op::Unary(UnaryOp::Sigmoid), &[gate]);
            let silu = g.op(Op::Binary(BinaryOp::Mul), &[gate, s]);
            let act = g.op(Op::Binary(BinaryOp::Mul), &[silu, up]);
            qlinear(g, act, w[4], w[5])
        };
        let experts = [
            stack(g, "gate", &[i, h]),
            g.weight("experts.gate_scale", DType::F32, &[E, i]),
            stack(g, "up", &[i, h]),
            g.weight("experts.up_scale", DType::F32, &[E, i]),
            stack(g, "down", &[h, i]),
            g.weight("experts.down_scale", DType::F32, &[E, h]),
        ];
        let ey = mlp(g, x, experts);
        let ct = g.op(Op::Transpose { perm: vec![1, 0] }, &[combine]);
        let cb = g.op(Op::Reshape { shape: vec![c(E), tok(), c(1)] }, &[ct]);
        let weighted = g.op(Op::Binary(BinaryOp::Mul), &[ey, cb]);
        let routed = g.op(Op::Reduce { op: ReduceOp::Sum, axis: 0, keepdim: false }, &[weighted]);
        let shared = [
            g.weight("shared.gate_proj.weight", DType::I8, &[is, h]),
            g.weight("shared.gate_scale", DType::F32, &[is]),
            g.weight("shared.up_proj.weight", DType::I8, &[is, h]),
            g.weight("shared.up_scale", DType::F32, &[is]),
            g.weight("shared.down_proj.weight", DType::I8, &[h, is]),
            g.weight("shared.down_scale", DType::F32, &[h]),
        ];
        let shared = mlp(g, x, shared);
        let moe = g.op(Op::Binary(BinaryOp::Add), &[routed, shared]);
        g.op(Op::Binary(BinaryOp::Add), &[r, moe])
    }

    #[test]
    fn quantized_experts_take_the_batched_form_with_the_skips_in_the_finalize() {
        let mut g = G::new();
        let y = quant_moe_block(&mut g);
        g.output(y);
        let rules = ["swiglu", "moe-gating", "moe-router", "moe-batched-routing-quant", "moe-finalize-skips"];
        let r = check_rule(g, &rules, 6);
        r.assert_fired("moe-batched-routing-quant");
        r.assert_fired("moe-finalize-skips");
        let chain =
            (r.count_op("moe_init_routing"), r.count_op("grouped_quant_matmul"), r.count_op("moe_finalize_routing"));
        assert_eq!(chain, (1, 3, 1), "init, gate, up, down, finalize:\n{}", r.text);
        assert_eq!(r.count_op("one_hot"), 0, "the dense combine is gone:\n{}", r.text);
        let fin = r.fused.entry_fn().nodes.iter().find(|n| n.op == Op::MoeFinalizeRouting).expect("finalize");
        assert_eq!(fin.args.len(), 5, "shared expert and residual added in the finalize:\n{}", r.text);
        assert_eq!(r.count_op("add"), 0, "{}", r.text);
    }

    const BATCHED_RULES: [&str; 6] =
        ["swiglu", "merge-gate-up", "moe-gating", "moe-router", "moe-batched-routing", "moe-grouped-ffn"];

    #[test]
    fn moe_grouped_ffn_makes_the_batched_block_one_kernel_after_routing() {
        let mut g = G::new();
        let y = moe_block(&mut g);
        g.output(y);
        let r = check_rule(g, &BATCHED_RULES, 6);
        r.assert_fired("moe-grouped-ffn");
        assert_eq!(r.count_op("moe_grouped_ffn"), 1, "{}", r.text);
        assert_eq!(r.kernels_after, 2, "router+gating and the moe_grouped_ffn:\n{}", r.text);
    }

    /// With both forms in the e-graph the cost model decides. These experts
    /// are one cube tile wide and deep, so the per-row form fetches each
    /// row once per expert anyway and gathering first only adds copies:
    /// extraction keeps `moe_ffn` (the 72B shapes go the other way, see
    /// `cost::tests::batched_moe_wins_when_rows_share_experts`).
    #[test]
    fn extraction_prices_the_batched_moe_against_the_per_row_one() {
        let mut g = G::new();
        let y = moe_block(&mut g);
        g.output(y);
        let mut rules = BATCHED_RULES.to_vec();
        rules.extend(["grouped-matmul", "moe-shared-residual"]);
        let r = check_rule(g, &rules, 6);
        assert!(r.fired("moe-grouped-ffn") > 0 && r.fired("moe-shared-residual") > 0, "{:?}", r.stats.rules_fired);
        assert_eq!((r.count_op("moe_ffn"), r.count_op("moe_grouped_ffn")), (1, 0), "{}", r.text);
    }
}

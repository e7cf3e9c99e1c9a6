//! Attention: `rope`, `qkv-rope` (RoPE and the KV-cache append fused into
//! the QKV projection's epilogue), its paged-cache counterpart
//! `qkv-rope-cache-write` (RoPE and the two `kv_cache_write`s), and
//! `flash-attention`. The batched import already emits `paged_attention`
//! as one op, so it needs no rule of its own.

use super::{check, Cx, Rule};
use egg::Id;
use panguc_ir::{Dim, Op};

pub fn rules() -> Vec<Rule> {
    vec![
        Rule::patterns(
            "rope",
            "x*cos + concat(-x[.., D/2:], x[.., :D/2])*sin  ->  rope(x, cos, sin)",
            &["(add (mul ?x (reshape ?rc ?cos)) (mul (concat ?ca (neg (slice ?hi ?x)) (slice ?lo ?x)) (reshape ?rs ?sin)))"],
            rope,
        ),
        Rule::multi(
            "qkv-rope",
            "split(matmul_bias(x, w, b)) -> rope on q and k -> k, v appended to the caches  ->  qkv_rope",
            "?s = (split ?sa (matmul_bias ?mb ?x ?w ?b)), \
             ?q = (rope (reshape ?rq (proj 0 ?s)) ?cos ?sin), \
             ?kall = (concat ?ca ?kc (rope (reshape ?rk (proj 1 ?s)) ?cos ?sin)), \
             ?vall = (concat ?ca ?vc (reshape ?rv (proj 2 ?s)))",
            qkv_rope,
        ),
        Rule::multi(
            "qkv-rope-cache-write",
            "split(matmul_bias(x, w, b)) -> rope on q and k -> k, v stored at their paged-cache slots  ->  qkv_rope_cache_write",
            "?s = (split ?sa (matmul_bias ?mb ?x ?w ?b)), \
             ?q = (rope (reshape ?rq (proj 0 ?s)) ?cos ?sin), \
             ?kall = (kv_cache_write ?kc (rope (reshape ?rk (proj 1 ?s)) ?cos ?sin) ?slots), \
             ?vall = (kv_cache_write ?vc (reshape ?rv (proj 2 ?s)) ?slots)",
            qkv_rope_cache_write,
        ),
        Rule::patterns(
            "flash-attention",
            "softmax(q k^T * scale + causal_mask) v over repeat-interleaved (GQA) heads  ->  flash_attention",
            &["(transpose ?p (matmul ?mn (softmax ?sm (add (mul (matmul ?mt (transpose ?p ?q) \
               (transpose ?p (repeat_interleave ?ri ?k))) (scalar ?sc)) (causal_mask ?pos ?k))) \
               (transpose ?p (repeat_interleave ?ri ?v))))"],
            flash_attention,
        ),
    ]
}

/// `reshape` attribute of `[T, D]` to `[T, 1, D]`: the rope tables
/// broadcast over heads.
fn is_head_broadcast(cx: &Cx, attr: Id, table: Id) -> Option<()> {
    let t = cx.ty(table)?;
    check(t.rank() == 2)?;
    let want = vec![t.shape[0].clone(), Dim::c(1), t.shape[1].clone()];
    check(matches!(cx.attr(attr)?, Op::Reshape { shape } if shape == want))
}

fn rope(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let x = cx.var("?x");
    let xt = cx.ty(x)?;
    check(xt.rank() == 3)?;
    let d = xt.shape[2].as_const()?;
    check(d % 2 == 0)?;
    check(cx.attr(cx.var("?ca"))? == Op::Concat { axis: 2 })?;
    check(cx.attr(cx.var("?hi"))? == Op::Slice { axis: 2, start: d / 2, end: d })?;
    check(cx.attr(cx.var("?lo"))? == Op::Slice { axis: 2, start: 0, end: d / 2 })?;
    let (cos, sin) = (cx.var("?cos"), cx.var("?sin"));
    is_head_broadcast(cx, cx.var("?rc"), cos)?;
    is_head_broadcast(cx, cx.var("?rs"), sin)?;
    let n = cx.add(Op::Rope, &[x, cos, sin])?;
    Some(vec![(cx.root, n)])
}

/// Guards shared by the two QKV fusions: the merged projection split into
/// q, k, v widths whose reshapes to heads agree. Returns (q heads, kv heads).
fn qkv_heads(cx: &Cx) -> Option<(usize, usize)> {
    check(cx.attr(cx.var("?mb"))? == Op::MatMulBias { transpose_b: true })?;
    let Op::Split { axis: 1, sizes } = cx.attr(cx.var("?sa"))? else { return None };
    check(sizes.len() == 3)?;
    let heads = |cx: &Cx, r: &str| -> Option<(usize, usize)> {
        let Op::Reshape { shape } = cx.attr(cx.var(r))? else { return None };
        check(shape.len() == 3)?;
        Some((shape[1].as_const()?, shape[2].as_const()?))
    };
    let (hq, d) = heads(cx, "?rq")?;
    let (hk, dk) = heads(cx, "?rk")?;
    let (hv, dv) = heads(cx, "?rv")?;
    check(hk == hv && d == dk && d == dv && sizes == [hq * d, hk * d, hv * d])?;
    Some((hq, hk))
}

/// Fires on the merged QKV projection (after `merge-qkv` and `rope`): q and
/// k rotated, v reshaped to heads, k and v appended to the caches along the
/// sequence axis. The fused op's typing checks head counts and widths.
fn qkv_rope(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    check(cx.attr(cx.var("?ca"))? == Op::Concat { axis: 0 })?;
    let (hq, hk) = qkv_heads(cx)?;
    let (kc, vc) = (cx.var("?kc"), cx.var("?vc"));
    check(!cx.weight_only(kc) && !cx.weight_only(vc))?;
    let args = [cx.var("?x"), cx.var("?w"), cx.var("?b"), cx.var("?cos"), cx.var("?sin"), kc, vc];
    let t = cx.add(Op::QkvRope { q_heads: hq, kv_heads: hk }, &args)?;
    let outs = [cx.var("?q"), cx.var("?kall"), cx.var("?vall")];
    Some(outs.iter().enumerate().map(|(i, o)| (*o, cx.proj(t, i))).collect())
}

/// The paged layout's `qkv-rope`: the same projection and RoPE, with k and
/// v stored at their slots by `kv_cache_write` (both through the same slot
/// mapping, which the pattern requires) instead of appended.
fn qkv_rope_cache_write(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    let (hq, hk) = qkv_heads(cx)?;
    let (kc, vc) = (cx.var("?kc"), cx.var("?vc"));
    check(!cx.weight_only(kc) && !cx.weight_only(vc))?;
    let args = [cx.var("?x"), cx.var("?w"), cx.var("?b"), cx.var("?cos"), cx.var("?sin"), kc, vc, cx.var("?slots")];
    let t = cx.add(Op::QkvRopeCacheWrite { q_heads: hq, kv_heads: hk }, &args)?;
    let outs = [cx.var("?q"), cx.var("?kall"), cx.var("?vall")];
    Some(outs.iter().enumerate().map(|(i, o)| (*o, cx.proj(t, i))).collect())
}

fn flash_attention(cx: &mut Cx) -> Option<Vec<(Id, Id)>> {
    check(cx.attr(cx.var("?p"))? == Op::Transpose { perm: vec![1, 0, 2] })?;
    check(cx.attr(cx.var("?mt"))? == Op::MatMul { transpose_b: true })?;
    check(cx.attr(cx.var("?mn"))? == Op::MatMul { transpose_b: false })?;
    check(cx.attr(cx.var("?sm"))? == Op::Softmax { axis: 2 })?;
    let Op::RepeatInterleave { axis: 1, repeats } = cx.attr(cx.var("?ri"))? else { return None };
    let Op::Scalar { value: scale, dtype } = cx.attr(cx.var("?sc"))? else { return None };
    check(dtype.is_float())?;
    let (q, k, v) = (cx.var("?q"), cx.var("?k"), cx.var("?v"));
    let (qt, kt) = (cx.ty(q)?, cx.ty(k)?);
    // GQA: each KV head serves `repeats` consecutive query heads.
    check(qt.rank() == 3 && kt.rank() == 3 && qt.shape[1] == kt.shape[1].scale(repeats as i64))?;
    let n = cx.add(Op::FlashAttention { scale }, &[q, k, v, cx.var("?pos")])?;
    Some(vec![(cx.root, n)])
}

#[cfg(test)]
mod tests {
    use crate::rules::testing::*;
    use panguc_ir::op::{BinaryOp, RopeKind, UnaryOp};
    use panguc_ir::{DType, Dim, Op};

    /// The importer's rotate-half RoPE on x[T, heads, D] with [T, 1, D] tables.
    pub(crate) fn rope_primitives(g: &mut G, x: usize, cos3: usize, sin3: usize, d: usize) -> usize {
        let lo = g.op(Op::Slice { axis: 2, start: 0, end: d / 2 }, &[x]);
        let hi = g.op(Op::Slice { axis: 2, start: d / 2, end: d }, &[x]);
        let neg = g.op(Op::Unary(UnaryOp::Neg), &[hi]);
        let rot = g.op(Op::Concat { axis: 2 }, &[neg, lo]);
        let xc = g.op(Op::Binary(BinaryOp::Mul), &[x, cos3]);
        let rs = g.op(Op::Binary(BinaryOp::Mul), &[rot, sin3]);
        g.op(Op::Binary(BinaryOp::Add), &[xc, rs])
    }

    /// Positions input plus [T, 1, D] rope tables computed from them.
    fn tables(g: &mut G, d: usize) -> (usize, usize, usize, usize, usize) {
        let pos = g.input_i64("positions", &[tok()]);
        let cos = g.op(Op::RopeTable { kind: RopeKind::Cos, theta: 10000.0, head_dim: d }, &[pos]);
        let sin = g.op(Op::RopeTable { kind: RopeKind::Sin, theta: 10000.0, head_dim: d }, &[pos]);
        let b = vec![tok(), c(1), c(d)];
        let cos3 = g.op(Op::Reshape { shape: b.clone() }, &[cos]);
        let sin3 = g.op(Op::Reshape { shape: b }, &[sin]);
        (pos, cos, sin, cos3, sin3)
    }

    #[test]
    fn rope_fires_and_preserves_numbers() {
        let mut g = G::new();
        let x = g.input("x", &[tok(), c(3), c(8)]);
        let (_, _, _, cos3, sin3) = tables(&mut g, 8);
        let y = rope_primitives(&mut g, x, cos3, sin3, 8);
        g.output(y);
        let r = check_rule(g, &["rope"], 3);
        r.assert_fired("rope");
        assert_eq!((r.count_op("rope"), r.count_op("neg"), r.count_op("concat")), (1, 0, 0));
    }

    /// The importer's attention front half: merged-able q/k/v projections,
    /// rope on q and k, k and v appended to the caches.
    fn qkv_graph(g: &mut G) -> (usize, usize, usize, usize) {
        let (hq, hkv, d, h) = (4, 2, 8, 16);
        let x = g.input("x", &[tok(), c(h)]);
        let (pos, _, _, cos3, sin3) = tables(g, d);
        let kc = g.input("k_cache", &[Dim::past(), c(hkv), c(d)]);
        let vc = g.input("v_cache", &[Dim::past(), c(hkv), c(d)]);
        let proj = |g: &mut G, name: &str, heads: usize| {
            let w = g.weight(&format!("{name}_proj.weight"), DType::BF16, &[heads * d, h]);
            let b = g.weight(&format!("{name}_proj.bias"), DType::BF16, &[heads * d]);
            let m = g.op(Op::MatMul { transpose_b: true }, &[x, w]);
            let bf = g.op(Op::Cast { dtype: DType::F32 }, &[b]);
            let y = g.op(Op::Binary(BinaryOp::Add), &[m, bf]);
            g.op(Op::Reshape { shape: vec![tok(), c(heads), c(d)] }, &[y])
        };
        let q = proj(g, "q", hq);
        let k = proj(g, "k", hkv);
        let v = proj(g, "v", hkv);
        let qr = rope_primitives(g, q, cos3, sin3, d);
        let kr = rope_primitives(g, k, cos3, sin3, d);
        let kall = g.op(Op::Concat { axis: 0 }, &[kc, kr]);
        let vall = g.op(Op::Concat { axis: 0 }, &[vc, v]);
        (qr, kall, vall, pos)
    }

    #[test]
    fn qkv_rope_fires_and_preserves_numbers() {
        let mut g = G::new();
        let (q, kall, vall, _) = qkv_graph(&mut g);
        g.output(q);
        g.output(kall);
        g.output(vall);
        let r = check_rule(g, &["matmul-bias", "merge-qkv", "rope", "qkv-rope"], 3);
        r.assert_fired("qkv-rope");
        assert_eq!(r.count_op("qkv_rope"), 1);
        // Only the rope tables remain besides the fused projection.
        assert_eq!(r.kernels_after, 3, "{}", r.text);
    }

    /// The importer's GQA attention over q[T, 4, D] and caches with 2 heads.
    fn attention(g: &mut G, q: usize, kall: usize, vall: usize, pos: usize, d: usize) -> usize {
        let qt = g.op(Op::Transpose { perm: vec![1, 0, 2] }, &[q]);
        let kr = g.op(Op::RepeatInterleave { axis: 1, repeats: 2 }, &[kall]);
        let vr = g.op(Op::RepeatInterleave { axis: 1, repeats: 2 }, &[vall]);
        let kt = g.op(Op::Transpose { perm: vec![1, 0, 2] }, &[kr]);
        let vt = g.op(Op::Transpose { perm: vec![1, 0, 2] }, &[vr]);
        let s = g.op(Op::MatMul { transpose_b: true }, &[qt, kt]);
        let sc = g.op(Op::Scalar { value: 1.0 / (d as f64).sqrt(), dtype: DType::F32 }, &[]);
        let ss = g.op(Op::Binary(BinaryOp::Mul), &[s, sc]);
        let mask = g.op(Op::CausalMask, &[pos, kall]);
        let sm = g.op(Op::Binary(BinaryOp::Add), &[ss, mask]);
        let p = g.op(Op::Softmax { axis: 2 }, &[sm]);
        let ctx = g.op(Op::MatMul { transpose_b: false }, &[p, vt]);
        g.op(Op::Transpose { perm: vec![1, 0, 2] }, &[ctx])
    }

    #[test]
    fn flash_attention_fires_for_prefill_and_decode_and_preserves_numbers() {
        let mut g = G::new();
        let q = g.input("q", &[tok(), c(4), c(8)]);
        let kc = g.input("k_cache", &[Dim::past(), c(2), c(8)]);
        let vc = g.input("v_cache", &[Dim::past(), c(2), c(8)]);
        let kn = g.input("k_new", &[tok(), c(2), c(8)]);
        let vn = g.input("v_new", &[tok(), c(2), c(8)]);
        let pos = g.input_i64("positions", &[tok()]);
        let kall = g.op(Op::Concat { axis: 0 }, &[kc, kn]);
        let vall = g.op(Op::Concat { axis: 0 }, &[vc, vn]);
        let o = attention(&mut g, q, kall, vall, pos, 8);
        g.output(o);
        // Prefill (past = 0) and decode against a cache (past = 5, one token).
        let r = check_rule_at(g, &["flash-attention"], &[(4, 0), (1, 5)]);
        r.assert_fired("flash-attention");
        assert_eq!((r.count_op("flash_attention"), r.count_op("softmax")), (1, 0));
    }

    #[test]
    fn attention_block_fuses_to_two_kernels() {
        let mut g = G::new();
        let (q, kall, vall, pos) = qkv_graph(&mut g);
        let o = attention(&mut g, q, kall, vall, pos, 8);
        g.output(o);
        g.output(kall);
        g.output(vall);
        let r =
            check_rule_at(g, &["matmul-bias", "merge-qkv", "rope", "qkv-rope", "flash-attention"], &[(3, 0), (1, 4)]);
        assert_eq!(r.count_op("qkv_rope"), 1, "{}", r.text);
        assert_eq!(r.count_op("flash_attention"), 1, "{}", r.text);
        // qkv_rope + flash_attention + the two rope tables.
        assert_eq!(r.kernels_after, 4, "{}", r.text);
    }

    /// `qkv_graph` over paged caches: k and v stored through
    /// `kv_cache_write` at `slot_mapping` instead of appended. The caches
    /// have a constant 5 blocks of 2 slots, so the harness's integer inputs
    /// (`past..past+tokens`) are distinct in-range slots. With
    /// `separate_v_slots`, v goes through its own slot-mapping input.
    fn paged_qkv_graph(g: &mut G, separate_v_slots: bool) -> (usize, usize, usize) {
        let (hq, hkv, d, h) = (4, 2, 8, 16);
        let x = g.input("x", &[tok(), c(h)]);
        let (_, _, _, cos3, sin3) = tables(g, d);
        let kc = g.input("k_cache", &[c(5), c(2), c(hkv), c(d)]);
        let vc = g.input("v_cache", &[c(5), c(2), c(hkv), c(d)]);
        let slots = g.input_i32("slot_mapping", &[tok()]);
        let proj = |g: &mut G, name: &str, heads: usize| {
            let w = g.weight(&format!("{name}_proj.weight"), DType::BF16, &[heads * d, h]);
            let b = g.weight(&format!("{name}_proj.bias"), DType::BF16, &[heads * d]);
            let m = g.op(Op::MatMul { transpose_b: true }, &[x, w]);
            let bf = g.op(Op::Cast { dtype: DType::F32 }, &[b]);
            let y = g.op(Op::Binary(BinaryOp::Add), &[m, bf]);
            g.op(Op::Reshape { shape: vec![tok(), c(heads), c(d)] }, &[y])
        };
        let q = proj(g, "q", hq);
        let k = proj(g, "k", hkv);
        let v = proj(g, "v", hkv);
        let qr = rope_primitives(g, q, cos3, sin3, d);
        let kr = rope_primitives(g, k, cos3, sin3, d);
        let kall = g.op(Op::KvCacheWrite, &[kc, kr, slots]);
        let v_slots = if separate_v_slots { g.input_i32("v_slot_mapping", &[tok()]) } else { slots };
        let vall = g.op(Op::KvCacheWrite, &[vc, v, v_slots]);
        (qr, kall, vall)
    }

    #[test]
    fn qkv_rope_cache_write_fires_and_preserves_numbers() {
        let mut g = G::new();
        let (q, kall, vall) = paged_qkv_graph(&mut g, false);
        g.output(q);
        g.output(kall);
        g.output(vall);
        let rules = ["matmul-bias", "merge-qkv", "rope", "qkv-rope-cache-write"];
        // A prefill chunk (slots 2..6) and a single decode row (slot 7).
        let r = check_rule_at(g, &rules, &[(4, 2), (1, 7)]);
        r.assert_fired("qkv-rope-cache-write");
        assert_eq!((r.count_op("qkv_rope_cache_write"), r.count_op("kv_cache_write")), (1, 0), "{}", r.text);
        // Only the rope tables remain besides the fused projection.
        assert_eq!(r.kernels_after, 3, "{}", r.text);
    }

    #[test]
    fn qkv_rope_cache_write_needs_one_slot_mapping_for_k_and_v() {
        // v stored through a different slot mapping: not the fused op's
        // semantics, so the rule must not fire.
        let mut g = G::new();
        let (q, kall, vall) = paged_qkv_graph(&mut g, true);
        g.output(q);
        g.output(kall);
        g.output(vall);
        let rules = ["matmul-bias", "merge-qkv", "rope", "qkv-rope-cache-write"];
        let r = check_rule_at(g, &rules, &[(3, 2)]);
        assert_eq!(r.fired("qkv-rope-cache-write"), 0, "{}", r.text);
    }
}

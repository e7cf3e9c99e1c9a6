//! Partitioning rules for the int8 forms of attention, the shared expert
//! and the static W8A8 routed experts (the W8A8_DYNAMIC routed chain is in
//! [`super::rules`]).
//!
//! Column-parallel int8 projections take the rank's output channels: rows
//! of the int8 weight and of every per-output-channel tensor (scales,
//! `quant_bias`, `deq_scale`, float bias). Row-parallel ones must quantize
//! their input exactly as one device does:
//!
//! * W8A8_DYNAMIC (one scale per token row, from the whole row): the
//!   rank's float columns are all-gathered over the TP group, the full rows
//!   quantized (the single-device scales), the rank's int8 columns sliced
//!   out and multiplied with its shard of the weight's input channels; the
//!   partial products are summed by the collective.
//! * static W8A8 (one scale per tensor, or per expert): quantization is
//!   elementwise, so the rank quantizes its own columns; the integer
//!   `quant_bias` (which also folds the input offset) is added by the
//!   first rank of the group only, as vllm-ascend does.

use super::rules::{all_reduce_rs_ag, coll, dim, rewrite, slice, RankCx};
use crate::analysis::{TensorAnalysis, EG};
use crate::lang::TLang;
use crate::rules::Cx;
use egg::{ENodeOrVar, Id, Language, Pattern, Rewrite, Subst, Var};
use panguc_ir::op::{BinaryOp, CollectiveKind};
use panguc_ir::{Dim, Op};
use std::sync::Arc;

/// The int8 rewrites for `cx.rank`'s layout.
pub fn quant_rules(cx: &Arc<RankCx>) -> Vec<Rewrite<TLang, TensorAnalysis>> {
    let l = &cx.layout;
    let mut out = vec![];
    if l.attn_tp > 1 {
        out.push(rewrite(
            "attention-tensor-parallel",
            "attention-tensor-parallel/w8a8-dynamic",
            "(quant_matmul_per_token (proj 0 ?oq) ?wo ?so (proj 1 ?oq))",
            cx,
            attention_dynamic,
        ));
        out.push(rewrite(
            "attention-tensor-parallel",
            "attention-tensor-parallel/w8a8",
            "(quant_matmul (quantize ?ctx ?is ?io) ?wo ?qb ?dq)",
            cx,
            attention_static,
        ));
    }
    if l.shared_tp > 1 {
        out.push(rewrite(
            "moe-expert-parallel",
            "moe-expert-parallel/shared-w8a8-dynamic",
            "(quant_matmul_per_token (proj 0 (dynamic_quant (swiglu ?g ?u))) ?wd ?sd (proj 1 (dynamic_quant (swiglu ?g ?u))))",
            cx,
            shared_dynamic,
        ));
        out.push(rewrite(
            "moe-expert-parallel",
            "moe-expert-parallel/shared-w8a8",
            "(quant_matmul (quantize (swiglu ?g ?u) ?is ?io) ?wd ?qb ?dq)",
            cx,
            shared_static,
        ));
    }
    out.push(rewrite(
        "moe-expert-parallel",
        "moe-expert-parallel/w8a8",
        "(reduce_sum ?a (mul (quant_matmul (quantize (swiglu ?g ?u) ?is ?io) ?wd ?qb ?dq) ?cb))",
        cx,
        routed_static,
    ));
    out
}

/// The first match of `pattern` at class `class`. A plain walk over the
/// e-graph's nodes rather than egg's searcher: appliers add nodes while
/// they match sub-terms, and egg refuses to search an e-graph with pending
/// additions (added nodes do not disturb the existing classes).
fn match_at(cx: &Cx, pattern: &str, class: Id) -> Option<Subst> {
    let pat: Pattern<TLang> = pattern.parse().ok()?;
    let ast = pat.ast.as_ref();
    let mut subst = Subst::default();
    match_node(cx.eg, ast, ast.len() - 1, class, &mut subst).then_some(subst)
}

/// Match pattern node `at` of `ast` against class `class`, extending
/// `subst` (restored on failure, so alternatives can be tried).
fn match_node(eg: &EG, ast: &[ENodeOrVar<TLang>], at: usize, class: Id, subst: &mut Subst) -> bool {
    let class = eg.find(class);
    match &ast[at] {
        ENodeOrVar::Var(v) => match subst.get(*v) {
            Some(bound) => eg.find(*bound) == class,
            None => {
                subst.insert(*v, class);
                true
            }
        },
        ENodeOrVar::ENode(p) => eg[class].nodes.iter().any(|n| {
            if !p.matches(n) {
                return false;
            }
            let saved = subst.clone();
            let ok =
                p.children().iter().zip(n.children()).all(|(pc, nc)| match_node(eg, ast, usize::from(*pc), *nc, subst));
            if !ok {
                *subst = saved;
            }
            ok
        }),
    }
}

fn get(s: &Subst, name: &str) -> Option<Id> {
    let v: Var = name.parse().ok()?;
    s.get(v).copied()
}

fn add(cx: &mut Cx, a: Id, b: Id) -> Option<Id> {
    cx.add(Op::Binary(BinaryOp::Add), &[a, b])
}

/// Output channels `[c0, c1)` (last axis) of the projection `y` (a class
/// of type `[T, N]`), computed from those channels' weights only: an int8
/// projection (dynamic or static) with an optional float bias added, or a
/// part of a `split` of one along the last axis.
fn col_shard(cx: &mut Cx, y: Id, (c0, c1): (usize, usize)) -> Option<Id> {
    if cx.ty(y)?.rank() != 2 {
        return None;
    }
    if let Some(s) = match_at(cx, "(quant_matmul_per_token ?xq ?w ?ws ?xs)", y) {
        let [xq, w, ws, xs] = ["?xq", "?w", "?ws", "?xs"].map(|v| get(&s, v));
        let w = slice(cx, w?, 0, c0, c1)?;
        let ws = slice(cx, ws?, 0, c0, c1)?;
        return cx.add(Op::QuantMatMulPerToken, &[xq?, w, ws, xs?]);
    }
    if let Some(s) = match_at(cx, "(quant_matmul ?xq ?w ?qb ?dq)", y) {
        let [xq, w, qb, dq] = ["?xq", "?w", "?qb", "?dq"].map(|v| get(&s, v));
        let [w, qb, dq] = [w?, qb?, dq?].map(|v| slice(cx, v, 0, c0, c1));
        return cx.add(Op::QuantMatMul, &[xq?, w?, qb?, dq?]);
    }
    if let Some(s) = match_at(cx, "(add ?p ?b)", y) {
        let (p, b) = (get(&s, "?p")?, get(&s, "?b")?);
        if cx.weight_only(b) && cx.ty(b)?.rank() == 1 {
            let p = col_shard(cx, p, (c0, c1))?;
            let b = slice(cx, b, 0, c0, c1)?;
            return add(cx, p, b);
        }
    }
    for i in 0..4 {
        let Some(s) = match_at(cx, &format!("(proj {i} (split ?a ?z))"), y) else { continue };
        let Op::Split { axis: 1, sizes } = cx.attr(get(&s, "?a")?)? else { return None };
        let off: usize = sizes.get(..i)?.iter().sum();
        return col_shard(cx, get(&s, "?z")?, (off + c0, off + c1));
    }
    None
}

/// `v` with its shape's axis `axis` set to `n`, through a reshape (the
/// rank's heads of `reshape(y, [T, H, D])`).
fn reshape_local(cx: &mut Cx, shape: &[Dim], axis: usize, n: usize, v: Id) -> Option<Id> {
    let mut shape = shape.to_vec();
    *shape.get_mut(axis)? = Dim::c(n);
    cx.add(Op::Reshape { shape }, &[v])
}

/// Zeros shaped like the integer tensor `b`: the `quant_bias` of a
/// row-parallel static projection on every rank but the group's first.
fn zeros_like(cx: &mut Cx, b: Id) -> Option<Id> {
    let zero = cx.add(Op::Scalar { value: 0.0, dtype: cx.ty(b)?.dtype }, &[])?;
    cx.add(Op::Binary(BinaryOp::Mul), &[b, zero])
}

/// The rank's attention context `[T, Hq / tp * D]` from the single-device
/// `paged_attention` class `pa`: q, k and v from the rank's output channels
/// of their projections, the paged caches (float, or int8 with C8) sharded
/// by KV head.
/// Also returns the pairs (single-device new cache, all-gather of the
/// rank's) that the signature pass turns into local cache outputs.
fn local_attention(cx: &mut Cx, rc: &RankCx, ctx2d: Id) -> Option<(Id, Vec<(Id, Id)>)> {
    let l = &rc.layout;
    let s = match_at(cx, "(reshape ?ra (paged_attention ?pa ?q ?kr ?vr ?bt ?qsl ?cl))", ctx2d)?;
    let [ra, pa, q, kr, vr, bt, qsl, cl] = ["?ra", "?pa", "?q", "?kr", "?vr", "?bt", "?qsl", "?cl"].map(|v| get(&s, v));
    let Op::PagedAttention { scale } = cx.attr(pa?)? else { return None };
    let Op::Reshape { shape: ctx_shape } = cx.attr(ra?)? else { return None };
    let hd = l.dims.head_dim;
    let ((q0, q1), (k0, k1)) = l.heads(rc.rank);
    let group = l.attn_group(rc.rank);
    // q: rope(reshape(y_q, [T, Hq, D])).
    let sq = match_at(cx, "(rope (reshape ?r ?y) ?cos ?sin)", q?)?;
    let Op::Reshape { shape: q_shape } = cx.attr(get(&sq, "?r")?)? else { return None };
    if q_shape.len() != 3 || q_shape[1].as_const()? != l.dims.q_heads {
        return None;
    }
    let yq = col_shard(cx, get(&sq, "?y")?, (q0 * hd, q1 * hd))?;
    let qh = reshape_local(cx, &q_shape, 1, q1 - q0, yq)?;
    let q_l = cx.add(Op::Rope, &[qh, get(&sq, "?cos")?, get(&sq, "?sin")?])?;
    // k and v: (rope of) reshape(y, [T, Hkv, D]), written into the paged
    // cache and read back; with an int8 (C8) cache quantized per channel on
    // the way in and dequantized on the way out.
    let mut caches = vec![];
    let mut read = vec![];
    for c in [kr?, vr?] {
        let (full, c8) = match match_at(cx, "(dequantize ?w ?cs ?co)", c) {
            Some(sd) => (get(&sd, "?w")?, Some((get(&sd, "?cs")?, get(&sd, "?co")?))),
            None => (c, None),
        };
        let (cache, x, slot) = match c8 {
            Some((cs, co)) => {
                let sw = match_at(cx, "(kv_cache_write ?cache (quantize ?x ?cs ?co) ?slot)", full)?;
                if get(&sw, "?cs")? != cx.find(cs) || get(&sw, "?co")? != cx.find(co) {
                    return None;
                }
                (get(&sw, "?cache")?, get(&sw, "?x")?, get(&sw, "?slot")?)
            }
            None => {
                let sw = match_at(cx, "(kv_cache_write ?cache ?x ?slot)", full)?;
                (get(&sw, "?cache")?, get(&sw, "?x")?, get(&sw, "?slot")?)
            }
        };
        let axis = super::kv_head_axis(cx.ty(cache)?.rank())?;
        // `x` is rope(reshape(y_k)) for k, reshape(y_v) for v.
        let rope = match_at(cx, "(rope ?h ?cos ?sin)", x);
        let heads = match &rope {
            Some(sr) => get(sr, "?h")?,
            None => x,
        };
        let sh = match_at(cx, "(reshape ?r ?y)", heads)?;
        let Op::Reshape { shape } = cx.attr(get(&sh, "?r")?)? else { return None };
        if shape.len() != 3 || shape[1].as_const()? != l.dims.kv_heads {
            return None;
        }
        let y = col_shard(cx, get(&sh, "?y")?, (k0 * hd, k1 * hd))?;
        let mut x_l = reshape_local(cx, &shape, 1, k1 - k0, y)?;
        if let Some(sr) = &rope {
            x_l = cx.add(Op::Rope, &[x_l, get(sr, "?cos")?, get(sr, "?sin")?])?;
        }
        // Per-channel cache scales `[Hkv, D]`: the rank's heads.
        let c8 = match c8 {
            Some((cs, co)) => Some((slice(cx, cs, 0, k0, k1)?, slice(cx, co, 0, k0, k1)?)),
            None => None,
        };
        let stored = match c8 {
            Some((cs, co)) => cx.add(Op::Quantize, &[x_l, cs, co])?,
            None => x_l,
        };
        let cache_l = slice(cx, cache, axis, k0, k1)?;
        let written = cx.add(Op::KvCacheWrite, &[cache_l, stored, slot])?;
        let all = coll(cx, CollectiveKind::AllGather, group.clone(), axis, written)?;
        caches.push((full, all));
        read.push(match c8 {
            Some((cs, co)) => cx.add(Op::Dequantize, &[written, cs, co])?,
            None => written,
        });
    }
    let ctx = cx.add(Op::PagedAttention { scale }, &[q_l, read[0], read[1], bt?, qsl?, cl?])?;
    let last = ctx_shape.len().checked_sub(1)?;
    let ctx2 = reshape_local(cx, &ctx_shape, last, (q1 - q0) * hd, ctx)?;
    Some((ctx2, caches))
}

/// W8A8_DYNAMIC attention on the rank's heads; the row-parallel output
/// projection all-gathers the context to quantize whole rows.
fn attention_dynamic(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let so = match_at(cx, "(dynamic_quant ?ctx)", cx.var("?oq"))?;
    let (ctx2, caches) = local_attention(cx, rc, get(&so, "?ctx")?)?;
    let l = &rc.layout;
    let ((q0, q1), _) = l.heads(rc.rank);
    let hd = l.dims.head_dim;
    let group = l.attn_group(rc.rank);
    let partial = row_parallel_dynamic(cx, ctx2, group.clone(), (q0 * hd, q1 * hd), cx.var("?wo"), cx.var("?so"))?;
    let o = all_reduce_rs_ag(cx, group, partial)?;
    Some([(cx.root, o)].into_iter().chain(caches).collect())
}

/// Static W8A8 attention on the rank's heads; the output projection
/// quantizes the rank's context columns with the per-tensor scale.
fn attention_static(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let (ctx2, caches) = local_attention(cx, rc, cx.var("?ctx"))?;
    let l = &rc.layout;
    let ((q0, q1), _) = l.heads(rc.rank);
    let hd = l.dims.head_dim;
    let group = l.attn_group(rc.rank);
    let first = rc.rank.is_multiple_of(l.attn_tp);
    let partial = row_parallel_static(cx, ctx2, None, (q0 * hd, q1 * hd), first)?;
    let o = all_reduce_rs_ag(cx, group, partial)?;
    Some([(cx.root, o)].into_iter().chain(caches).collect())
}

/// The partial product of a row-parallel W8A8_DYNAMIC projection (weight
/// `w [N, K]`, per-output scale `ws`) whose input columns `[k0, k1)` the
/// rank holds as `x_l`: all-gather over `group`, quantize whole rows, this
/// rank's int8 columns times its weight columns.
fn row_parallel_dynamic(
    cx: &mut Cx,
    x_l: Id,
    group: Vec<usize>,
    (k0, k1): (usize, usize),
    w: Id,
    ws: Id,
) -> Option<Id> {
    let x = coll(cx, CollectiveKind::AllGather, group, 1, x_l)?;
    let xq = cx.add(Op::DynamicQuant, &[x])?;
    let (q, s) = (cx.proj(xq, 0), cx.proj(xq, 1));
    let q = slice(cx, q, 1, k0, k1)?;
    let w = slice(cx, w, 1, k0, k1)?;
    cx.add(Op::QuantMatMulPerToken, &[q, w, ws, s])
}

/// The partial product of a row-parallel static W8A8 projection matched as
/// `quant_matmul(quantize(_, ?is, ?io), ?wd|?wo, ?qb, ?dq)`, on the rank's
/// input columns `x_l` (its columns `[k0, k1)` along the weight's last
/// axis), restricted to experts `[e0, e1)` for stacked experts. The
/// quantization scale is per tensor (per expert), so quantizing the
/// columns equals slicing the quantized whole; `first` adds the bias.
fn row_parallel_static(
    cx: &mut Cx,
    x_l: Id,
    experts: Option<(usize, usize)>,
    (k0, k1): (usize, usize),
    first: bool,
) -> Option<Id> {
    let w = cx.subst.get("?wo".parse().ok()?).or(cx.subst.get("?wd".parse().ok()?)).copied()?;
    let [is, io, qb, dq] = ["?is", "?io", "?qb", "?dq"].map(|v| cx.var(v));
    // Per tensor (`[1]`) or per expert (`[E, 1, 1]`) only.
    let per_tensor = |cx: &Cx, v: Id| cx.ty(v).is_some_and(|t| t.shape.iter().skip(1).all(|d| d.as_const() == Some(1)));
    if !per_tensor(cx, is) || !per_tensor(cx, io) {
        return None;
    }
    let ex = |cx: &mut Cx, v: Id| match experts {
        Some((e0, e1)) => slice(cx, v, 0, e0, e1),
        None => Some(v),
    };
    let [is, io, w, qb, dq] = [is, io, w, qb, dq].map(|v| ex(cx, v));
    let w = w?;
    let kaxis = cx.ty(w)?.rank() - 1;
    let w = slice(cx, w, kaxis, k0, k1)?;
    let qb = if first { qb? } else { zeros_like(cx, qb?)? };
    let xq = cx.add(Op::Quantize, &[x_l, is?, io?])?;
    cx.add(Op::QuantMatMul, &[xq, w, qb, dq?])
}

/// A shared expert split by its intermediate channels over all devices:
/// gate and up column-parallel, SwiGLU, then the down projection
/// row-parallel on the rank's columns (`down`, per scheme) and reduced.
fn shared_split(
    cx: &mut Cx,
    rc: &RankCx,
    down: impl FnOnce(&mut Cx, Id, (usize, usize)) -> Option<Id>,
) -> Option<Vec<(Id, Id)>> {
    let l = &rc.layout;
    let (g, u, wd) = (cx.var("?g"), cx.var("?u"), cx.var("?wd"));
    if cx.ty(wd)?.rank() != 2 || dim(cx, g, 1)? != l.dims.shared_intermediate {
        return None;
    }
    let cols = l.shared_cols(rc.rank);
    let (g, u) = (col_shard(cx, g, cols)?, col_shard(cx, u, cols)?);
    let act = cx.add(Op::SwiGlu, &[g, u])?;
    let partial = down(cx, act, cols)?;
    Some(vec![(cx.root, all_reduce_rs_ag(cx, l.all(), partial)?)])
}

/// The W8A8_DYNAMIC shared expert ([`shared_split`]).
fn shared_dynamic(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    shared_split(cx, rc, |cx, act, cols| {
        let (wd, sd) = (cx.var("?wd"), cx.var("?sd"));
        row_parallel_dynamic(cx, act, rc.layout.all(), cols, wd, sd)
    })
}

/// The static W8A8 shared expert ([`shared_split`]); the first rank of
/// each shared-TP group adds the quant bias.
fn shared_static(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let first = rc.rank.is_multiple_of(rc.layout.shared_tp);
    shared_split(cx, rc, |cx, act, cols| row_parallel_static(cx, act, None, cols, first))
}

/// A stacked static W8A8 projection `quant_matmul(quantize(x, is[E,1,1],
/// io), w[E, N, K], qb[E, N], dq[E, N])` of experts `[e0, e1)` and output
/// channels `[c0, c1)`.
fn stacked_col_shard(cx: &mut Cx, y: Id, (e0, e1): (usize, usize), (c0, c1): (usize, usize)) -> Option<Id> {
    let s = match_at(cx, "(quant_matmul (quantize ?x ?is ?io) ?w ?qb ?dq)", y)?;
    let [x, is, io, w, qb, dq] = ["?x", "?is", "?io", "?w", "?qb", "?dq"].map(|v| get(&s, v));
    if cx.ty(w?)?.rank() != 3 {
        return None;
    }
    let [is, io, w, qb, dq] = [is?, io?, w?, qb?, dq?].map(|v| slice(cx, v, 0, e0, e1));
    let [w, qb, dq] = [w?, qb?, dq?].map(|v| slice(cx, v, 1, c0, c1));
    let xq = cx.add(Op::Quantize, &[x?, is?, io?])?;
    cx.add(Op::QuantMatMul, &[xq, w?, qb?, dq?])
}

/// The static W8A8 routed experts (every expert on every token, weighted by
/// the dense combine matrix `?cb [E, T, 1]`, summed over experts) = the
/// all-reduce over ranks of the same over the rank's experts and, with
/// expert TP, its slice of their intermediate channels.
fn routed_static(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let l = &rc.layout;
    let Op::Reduce { op: panguc_ir::op::ReduceOp::Sum, axis: 0, keepdim: false } = cx.attr(cx.var("?a"))? else {
        return None;
    };
    let (g, u, wd, cb) = (cx.var("?g"), cx.var("?u"), cx.var("?wd"), cx.var("?cb"));
    if cx.ty(wd)?.rank() != 3 || dim(cx, wd, 0)? != l.dims.experts || dim(cx, g, 2)? != l.dims.moe_intermediate {
        return None;
    }
    let ex = l.local_experts(rc.rank);
    let cols = l.expert_cols(rc.rank);
    let (g, u) = (stacked_col_shard(cx, g, ex, cols)?, stacked_col_shard(cx, u, ex, cols)?);
    let act = cx.add(Op::SwiGlu, &[g, u])?;
    let y = row_parallel_static(cx, act, Some(ex), cols, rc.rank.is_multiple_of(l.expert_tp))?;
    let cb = slice(cx, cb, 0, ex.0, ex.1)?;
    let weighted = cx.add(Op::Binary(BinaryOp::Mul), &[y, cb])?;
    let part = cx.add(Op::Reduce { op: panguc_ir::op::ReduceOp::Sum, axis: 0, keepdim: false }, &[weighted])?;
    Some(vec![(cx.root, coll(cx, CollectiveKind::AllReduce, l.all(), 0, part)?)])
}

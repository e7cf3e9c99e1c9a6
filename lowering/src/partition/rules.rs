//! The partitioning rewrites (see the module docs of [`super`]). Each is an
//! egg pattern plus an applier that knows the rank it partitions for; new
//! nodes go through [`Cx::add`], so they type-check and are recorded with
//! the rule that introduced them, like the fusion rules' nodes.

use super::Layout;
use crate::analysis::{TensorAnalysis, EG};
use crate::lang::TLang;
use crate::rules::Cx;
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol};
use panguc_ir::op::{BinaryOp, CollectiveKind};
use panguc_ir::{DType, Op};
use std::sync::Arc;

/// The rank a rule set partitions for.
#[derive(Debug)]
pub struct RankCx {
    pub layout: Layout,
    pub rank: usize,
}

pub(super) type RankFn = fn(&mut Cx, &RankCx) -> Option<Vec<(Id, Id)>>;

struct RankApplier {
    rule: &'static str,
    cx: Arc<RankCx>,
    apply: RankFn,
}

impl Applier<TLang, TensorAnalysis> for RankApplier {
    fn apply_one(&self, eg: &mut EG, eclass: Id, subst: &Subst, _: Option<&PatternAst<TLang>>, _: Symbol) -> Vec<Id> {
        let mut cx = Cx { eg, subst, root: eclass, rule: self.rule };
        let Some(pairs) = (self.apply)(&mut cx, &self.cx) else { return vec![] };
        crate::rules::union_pairs(eg, self.rule, pairs)
    }
}

/// The rewrite `variant` (unique for egg's scheduling) of rule `name` (the
/// name its applications are counted under).
pub(super) fn rewrite(
    name: &'static str,
    variant: &'static str,
    pattern: &str,
    cx: &Arc<RankCx>,
    apply: RankFn,
) -> Rewrite<TLang, TensorAnalysis> {
    let pat: Pattern<TLang> = pattern.parse().unwrap_or_else(|e| panic!("rule {name}: bad pattern {pattern}: {e}"));
    Rewrite::new(variant, pat, RankApplier { rule: name, cx: cx.clone(), apply })
        .unwrap_or_else(|e| panic!("rule {name}: {e}"))
}

/// Rule names with their one-line summaries, for reports.
pub const RULES: &[(&str, &str)] = &[
    ("slice-pushdown", "slice(concat|stack|cast|slice(..)) of weights -> the same over slices of the parts"),
    (
        "moe-expert-parallel",
        "moe_ffn (or moe_grouped_ffn) over all groups -> residual + collective-sum(grouped_matmul_moe over the rank's groups [+ shared-expert TP shard]); the W8A8_DYNAMIC routed experts (moe_init_routing .. grouped_quant_matmul .. moe_finalize_routing) -> all_reduce(the same chain over the rank's groups,); the static W8A8 dense experts -> all_reduce(the rank's experts and channels); the int8 shared expert -> its TP shard (row-parallel down projection on all-gathered, whole-row quantized input for W8A8_DYNAMIC)",
    ),
    (
        "attention-tensor-parallel",
        "qkv_rope/flash_attention/o-proj (or qkv_rope_cache_write/paged_attention/o-proj) -> the rank's heads (column split, KV cache sharded by KV head) + row-split o-proj with reduce_scatter + all_gather; the int8 forms (quant_matmul(_per_token) projections, C8 caches) alike, the W8A8_DYNAMIC o-proj quantizing the all-gathered context",
    ),
];

/// The rewrites partitioning for `cx.rank`.
pub fn partition_rules(cx: Arc<RankCx>) -> Vec<Rewrite<TLang, TensorAnalysis>> {
    let mut out = super::quant::quant_rules(&cx);
    out.extend([
        rewrite("slice-pushdown", "slice-pushdown", "(slice ?a ?x)", &cx, slice_pushdown),
        rewrite(
            "moe-expert-parallel",
            "moe-expert-parallel",
            "(moe_ffn ?x ?w ?ids ?gu ?dn ?sgu ?sdn ?r)",
            &cx,
            moe_expert_parallel,
        ),
        // The batched form has the same operands and meaning.
        rewrite(
            "moe-expert-parallel",
            "moe-expert-parallel/grouped",
            "(moe_grouped_ffn ?x ?w ?ids ?gu ?dn ?sgu ?sdn ?r)",
            &cx,
            moe_expert_parallel,
        ),
        // The W8A8_DYNAMIC routed experts (shared expert and residual
        // outside, partitioned by their own rules).
        rewrite(
            "moe-expert-parallel",
            "moe-expert-parallel/quant",
            &quant_routed_pattern(""),
            &cx,
            moe_expert_parallel_quant,
        ),
        // With the shared expert and the residual as the finalize's skip
        // terms (`moe-finalize-skips`), as the fused module has it.
        rewrite(
            "moe-expert-parallel",
            "moe-expert-parallel/quant-skips",
            &quant_routed_pattern(" ?s ?r"),
            &cx,
            moe_expert_parallel_quant,
        ),
    ]);
    if cx.layout.attn_tp > 1 {
        out.push(rewrite(
            "attention-tensor-parallel",
            "attention-tensor-parallel",
            "(matmul_bias ?ma (reshape ?ra (flash_attention ?fa (proj 0 ?t) (proj 1 ?t) (proj 2 ?t) ?pos)) ?wo ?bo)",
            &cx,
            attention_tensor_parallel,
        ));
        // The batched form: K/V written into the paged caches by
        // `qkv_rope_cache_write`, read through the block table.
        out.push(rewrite(
            "attention-tensor-parallel",
            "attention-tensor-parallel/paged",
            "(matmul_bias ?ma (reshape ?ra (paged_attention ?fa (proj 0 ?t) (proj 1 ?t) (proj 2 ?t) ?bt ?qsl ?cl)) ?wo ?bo)",
            &cx,
            paged_attention_tensor_parallel,
        ));
    }
    out
}

pub(super) fn dim(cx: &Cx, id: Id, axis: usize) -> Option<usize> {
    cx.ty(id)?.shape.get(axis)?.as_const()
}

/// `x[.., s:e, ..]` along `axis` (the value itself for the full range).
pub(super) fn slice(cx: &mut Cx, x: Id, axis: usize, s: usize, e: usize) -> Option<Id> {
    if s == 0 && dim(cx, x, axis)? == e {
        return Some(x);
    }
    cx.add(Op::Slice { axis, start: s, end: e }, &[x])
}

pub(super) fn coll(cx: &mut Cx, kind: CollectiveKind, group: Vec<usize>, axis: usize, x: Id) -> Option<Id> {
    cx.add(Op::Collective { kind, group, axis }, &[x])
}

/// `slice(concat|stack|cast|slice(...))` of a weight-only value becomes the
/// same op over slices of its operands, so slices reach the checkpoint
/// tensors and a rank reads only its shard.
fn slice_pushdown(cx: &mut Cx, _: &RankCx) -> Option<Vec<(Id, Id)>> {
    let root_ty = cx.ty(cx.root)?;
    let Op::Slice { axis, start, end } = cx.attr(cx.var("?a"))? else { return None };
    let x = cx.var("?x");
    if !cx.weight_only(x) {
        return None;
    }
    let nodes = cx.eg[cx.find(x)].nodes.clone();
    let mut pairs = vec![];
    for node in nodes {
        let Some((op, args)) = crate::analysis::node_op(cx.eg, &node) else { continue };
        let args = args.to_vec();
        let alt = match op {
            Op::Concat { axis: b } if b == axis => {
                let mut off = 0;
                let mut parts = vec![];
                for a in &args {
                    let len = dim(cx, *a, axis)?;
                    let (s, e) = (start.max(off), end.min(off + len));
                    if s < e {
                        parts.push(slice(cx, *a, axis, s - off, e - off)?);
                    }
                    off += len;
                }
                if parts.len() == 1 {
                    parts[0]
                } else {
                    cx.add(Op::Concat { axis }, &parts)?
                }
            }
            Op::Concat { axis: b } => {
                let parts = args.iter().map(|a| slice(cx, *a, axis, start, end)).collect::<Option<Vec<_>>>()?;
                cx.add(Op::Concat { axis: b }, &parts)?
            }
            Op::Stack { axis: b } if b == axis => cx.add(Op::Stack { axis: b }, &args[start..end])?,
            Op::Stack { axis: b } => {
                let inner = if axis > b { axis - 1 } else { axis };
                let parts = args.iter().map(|a| slice(cx, *a, inner, start, end)).collect::<Option<Vec<_>>>()?;
                cx.add(Op::Stack { axis: b }, &parts)?
            }
            Op::Cast { dtype } => {
                let s = slice(cx, args[0], axis, start, end)?;
                cx.add(Op::Cast { dtype }, &[s])?
            }
            Op::Slice { axis: b, start: s0, .. } if b == axis => slice(cx, args[0], axis, s0 + start, s0 + end)?,
            // A reshape that keeps the dimensions up to the sliced one
            // (stacked per-channel scales `[E, N, 1] -> [E, N]`).
            Op::Reshape { shape } => {
                let from = cx.ty(args[0])?.shape.clone();
                if from.len() <= axis || shape.len() <= axis || from[..=axis] != shape[..=axis] {
                    continue;
                }
                let part = slice(cx, args[0], axis, start, end)?;
                cx.add(Op::Reshape { shape: root_ty.shape.clone() }, &[part])?
            }
            _ => continue,
        };
        pairs.push((cx.root, alt));
    }
    (!pairs.is_empty()).then_some(pairs)
}

/// `moe_ffn(x, w, ids, gu, dn, sgu, sdn, r)` = `r + sum over ranks of the
/// rank's part`: routed experts of its groups (and, with expert TP, its
/// half of each expert's intermediate dimension) plus, with shared-expert
/// TP, its shard of the shared MLP.
fn moe_expert_parallel(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let l = &rc.layout;
    let (x, w, ids, gu, dn) = (cx.var("?x"), cx.var("?w"), cx.var("?ids"), cx.var("?gu"), cx.var("?dn"));
    let (sgu, sdn, res) = (cx.var("?sgu"), cx.var("?sdn"), cx.var("?r"));
    let (groups, experts) = (dim(cx, w, 1)?, dim(cx, gu, 0)?);
    let inter = dim(cx, gu, 1)? / 2;
    if groups != l.dims.groups || experts != l.dims.experts || inter != l.dims.moe_intermediate {
        return None;
    }
    let r = rc.rank;
    let (e0, e1) = l.local_experts(r);
    let (w_l, ids_l) = local_routing(cx, rc, w, ids)?;
    let gu_e = slice(cx, gu, 0, e0, e1)?;
    let dn_e = slice(cx, dn, 0, e0, e1)?;
    let (gu_l, dn_l) = if l.expert_tp > 1 {
        let (i0, i1) = l.expert_cols(r);
        let gate = slice(cx, gu_e, 1, i0, i1)?;
        let up = slice(cx, gu_e, 1, inter + i0, inter + i1)?;
        (cx.add(Op::Concat { axis: 1 }, &[gate, up])?, slice(cx, dn_e, 2, i0, i1)?)
    } else {
        (gu_e, dn_e)
    };
    let routed = cx.add(Op::GroupedMatmulMoe, &[x, w_l, ids_l, gu_l, dn_l])?;
    let moe = if l.shared_tp == 1 {
        let act = cx.add(Op::GateUpSwiGlu, &[x, sgu])?;
        let shared = cx.add(Op::MatMul { transpose_b: true }, &[act, sdn])?;
        let summed = coll(cx, CollectiveKind::AllReduce, l.all(), 0, routed)?;
        cx.add(Op::Binary(BinaryOp::Add), &[summed, shared])?
    } else {
        let is = dim(cx, sgu, 0)? / 2;
        let (j0, j1) = l.shared_cols(r);
        let gate = slice(cx, sgu, 0, j0, j1)?;
        let up = slice(cx, sgu, 0, is + j0, is + j1)?;
        let sgu_l = cx.add(Op::Concat { axis: 0 }, &[gate, up])?;
        let sdn_l = slice(cx, sdn, 1, j0, j1)?;
        let act = cx.add(Op::GateUpSwiGlu, &[x, sgu_l])?;
        let shared = cx.add(Op::MatMul { transpose_b: true }, &[act, sdn_l])?;
        let partial = cx.add(Op::Binary(BinaryOp::Add), &[routed, shared])?;
        all_reduce_rs_ag(cx, l.all(), partial)?
    };
    let out = cx.add(Op::Binary(BinaryOp::Add), &[res, moe])?;
    Some(vec![(cx.root, out)])
}

/// The routing weights and expert ids `[T, G]` of the rank's groups, the
/// ids rebased to its shard of the stacked experts.
pub(super) fn local_routing(cx: &mut Cx, rc: &RankCx, w: Id, ids: Id) -> Option<(Id, Id)> {
    let (g0, g1) = rc.layout.local_groups(rc.rank);
    let (e0, _) = rc.layout.local_experts(rc.rank);
    let w_l = slice(cx, w, 1, g0, g1)?;
    let ids_s = slice(cx, ids, 1, g0, g1)?;
    let ids_l = if e0 == 0 {
        ids_s
    } else {
        let off = cx.add(Op::Scalar { value: e0 as f64, dtype: DType::I64 }, &[])?;
        cx.add(Op::Binary(BinaryOp::Sub), &[ids_s, off])?
    };
    Some((w_l, ids_l))
}

/// The routed W8A8_DYNAMIC experts as fusion builds them
/// (`moe-batched-routing-quant`): rows sorted by expert, quantized per
/// token, grouped int8 gate and up projections, SwiGLU, quantized again,
/// grouped int8 down projection, weighted combine (then the `skips`
/// operands of the finalize).
fn quant_routed_pattern(skips: &str) -> String {
    let init = "(moe_init_routing ?ie ?x ?ids)";
    let counts = format!("(proj 2 {init})");
    let gqmm =
        |xq: &str, w: &str, s: &str| format!("(grouped_quant_matmul (proj 0 {xq}) {w} {s} (proj 1 {xq}) {counts})");
    let xq = format!("(dynamic_quant (proj 0 {init}))");
    let aq = format!("(dynamic_quant (swiglu {} {}))", gqmm(&xq, "?wg", "?sg"), gqmm(&xq, "?wu", "?su"));
    format!("(moe_finalize_routing {} ?w (proj 1 {init}){skips})", gqmm(&aq, "?wd", "?sd"))
}

/// The routed W8A8_DYNAMIC experts = the all-reduce over ranks of the same
/// chain over each rank's expert groups (whole groups: [`super::partition_module`]
/// gives an int8 module no expert TP) (rows routed to other groups are
/// not gathered, so each rank quantizes exactly the rows the single-device
/// chain quantizes for its experts, with the same per-row scales). With
/// skip terms `?s` (shared expert) and `?r` (residual), replicated on
/// every rank, they are added after the sum, in the finalize's order.
fn moe_expert_parallel_quant(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let l = &rc.layout;
    if l.expert_tp != 1 {
        return None;
    }
    let [x, w, ids, wg, sg, wu, su, wd, sd] =
        ["?x", "?w", "?ids", "?wg", "?sg", "?wu", "?su", "?wd", "?sd"].map(|v| cx.var(v));
    let (groups, experts) = (dim(cx, w, 1)?, dim(cx, wg, 0)?);
    if groups != l.dims.groups
        || experts != l.dims.experts
        || cx.attr(cx.var("?ie"))? != (Op::MoeInitRouting { experts })
    {
        return None;
    }
    let (e0, e1) = l.local_experts(rc.rank);
    let (w_l, ids_l) = local_routing(cx, rc, w, ids)?;
    let init = cx.add(Op::MoeInitRouting { experts: e1 - e0 }, &[x, ids_l])?;
    let (rows, row_idx, counts) = (cx.proj(init, 0), cx.proj(init, 1), cx.proj(init, 2));
    let experts_of = |cx: &mut Cx, v: Id| slice(cx, v, 0, e0, e1);
    let [wg, sg, wu, su, wd, sd] = [wg, sg, wu, su, wd, sd].map(|v| experts_of(cx, v));
    let xq = cx.add(Op::DynamicQuant, &[rows])?;
    let (q, s) = (cx.proj(xq, 0), cx.proj(xq, 1));
    let gate = cx.add(Op::GroupedQuantMatMul, &[q, wg?, sg?, s, counts])?;
    let up = cx.add(Op::GroupedQuantMatMul, &[q, wu?, su?, s, counts])?;
    let act = cx.add(Op::SwiGlu, &[gate, up])?;
    let aq = cx.add(Op::DynamicQuant, &[act])?;
    let (q, s) = (cx.proj(aq, 0), cx.proj(aq, 1));
    let y = cx.add(Op::GroupedQuantMatMul, &[q, wd?, sd?, s, counts])?;
    let part = cx.add(Op::MoeFinalizeRouting, &[y, w_l, row_idx])?;
    let mut out = coll(cx, CollectiveKind::AllReduce, l.all(), 0, part)?;
    for skip in ["?s", "?r"].into_iter().filter_map(|v| cx.subst.get(v.parse().ok()?).copied()) {
        out = cx.add(Op::Binary(BinaryOp::Add), &[out, skip])?;
    }
    Some(vec![(cx.root, out)])
}

/// An all-reduce over the hidden (last) axis as reduce-scatter + all-gather.
pub(super) fn all_reduce_rs_ag(cx: &mut Cx, group: Vec<usize>, x: Id) -> Option<Id> {
    let axis = cx.ty(x)?.rank().checked_sub(1)?;
    let rs = coll(cx, CollectiveKind::ReduceScatter, group.clone(), axis, x)?;
    coll(cx, CollectiveKind::AllGather, group, axis, rs)
}

/// One-sequence attention (`qkv_rope` + `flash_attention`) on the rank's heads.
fn attention_tensor_parallel(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let Op::FlashAttention { scale } = cx.attr(cx.var("?fa"))? else { return None };
    let pos = cx.var("?pos");
    split_attention_by_heads(cx, rc, &|cx, [q, k, v]| cx.add(Op::FlashAttention { scale }, &[q, k, v, pos]))
}

/// Batched attention (`qkv_rope_cache_write` + `paged_attention`) on the
/// rank's heads: every rank keeps its KV heads' slice of every block of
/// the paged caches, indexed by the step's one block table.
fn paged_attention_tensor_parallel(cx: &mut Cx, rc: &RankCx) -> Option<Vec<(Id, Id)>> {
    let Op::PagedAttention { scale } = cx.attr(cx.var("?fa"))? else { return None };
    let meta = [cx.var("?bt"), cx.var("?qsl"), cx.var("?cl")];
    split_attention_by_heads(cx, rc, &|cx, [q, k, v]| {
        cx.add(Op::PagedAttention { scale }, &[q, k, v, meta[0], meta[1], meta[2]])
    })
}

/// Builds the attention of the rank's (local) q, k and v.
type AttentionOf<'a> = dyn Fn(&mut Cx, [Id; 3]) -> Option<Id> + 'a;

/// Attention on the rank's heads: the merged QKV projection split by
/// output rows (column-parallel), the KV caches sharded by KV head (the
/// second-to-last axis of the contiguous `[P, Hkv, D]` and the paged
/// `[blocks, block_size, Hkv, D]` layouts alike), attention (`attend`) on
/// the local heads, and the output projection split by input columns
/// (row-parallel) with its partial sums combined over the attention TP
/// group. The full new caches equal the all-gather of the local ones,
/// which the signature pass turns into local cache outputs.
fn split_attention_by_heads(cx: &mut Cx, rc: &RankCx, attend: &AttentionOf) -> Option<Vec<(Id, Id)>> {
    let l = &rc.layout;
    let t = cx.find(cx.var("?t"));
    let Op::Reshape { shape } = cx.attr(cx.var("?ra"))? else { return None };
    let Op::MatMulBias { transpose_b: true } = cx.attr(cx.var("?ma"))? else { return None };
    let (wo, bo) = (cx.var("?wo"), cx.var("?bo"));
    // The projection node and its operands after the attribute:
    // x, w, b, cos, sin, k_cache, v_cache [, slot_mapping].
    let (op, ch) = cx.eg[t].nodes.iter().find_map(|n| match n {
        TLang::QkvRope(ch) => Some((cx.attr(ch[0])?, ch[1..].to_vec())),
        TLang::QkvRopeCacheWrite(ch) => Some((cx.attr(ch[0])?, ch[1..].to_vec())),
        _ => None,
    })?;
    let (Op::QkvRope { q_heads, kv_heads } | Op::QkvRopeCacheWrite { q_heads, kv_heads }) = op else { return None };
    let (w, b, kc, vc) = (ch[1], ch[2], ch[5], ch[6]);
    let (hd, tp) = (l.dims.head_dim, l.attn_tp);
    if q_heads != l.dims.q_heads || kv_heads != l.dims.kv_heads || q_heads % tp != 0 || kv_heads % tp != 0 {
        return None;
    }
    let kv_axis = super::kv_head_axis(cx.ty(kc)?.rank())?;
    let ((q0, q1), (k0, k1)) = l.heads(rc.rank);
    let (qd, kvd) = (q_heads * hd, kv_heads * hd);
    let rows = |cx: &mut Cx, m: Id| -> Option<Id> {
        let q = slice(cx, m, 0, q0 * hd, q1 * hd)?;
        let k = slice(cx, m, 0, qd + k0 * hd, qd + k1 * hd)?;
        let v = slice(cx, m, 0, qd + kvd + k0 * hd, qd + kvd + k1 * hd)?;
        cx.add(Op::Concat { axis: 0 }, &[q, k, v])
    };
    let mut args = ch.clone();
    args[1] = rows(cx, w)?;
    args[2] = rows(cx, b)?;
    args[5] = slice(cx, kc, kv_axis, k0, k1)?;
    args[6] = slice(cx, vc, kv_axis, k0, k1)?;
    let (lq, lkv) = (q_heads / tp, kv_heads / tp);
    let local_op = match op {
        Op::QkvRope { .. } => Op::QkvRope { q_heads: lq, kv_heads: lkv },
        _ => Op::QkvRopeCacheWrite { q_heads: lq, kv_heads: lkv },
    };
    let t_l = cx.add(local_op, &args)?;
    let (q_l, k_l, v_l) = (cx.proj(t_l, 0), cx.proj(t_l, 1), cx.proj(t_l, 2));
    let ctx = attend(cx, [q_l, k_l, v_l])?;
    let mut local_shape = shape.clone();
    *local_shape.last_mut()? = panguc_ir::Dim::c((q1 - q0) * hd);
    let ctx2 = cx.add(Op::Reshape { shape: local_shape }, &[ctx])?;
    let wo_l = slice(cx, wo, 1, q0 * hd, q1 * hd)?;
    let partial = cx.add(Op::MatMul { transpose_b: true }, &[ctx2, wo_l])?;
    let group = l.attn_group(rc.rank);
    let summed = all_reduce_rs_ag(cx, group.clone(), partial)?;
    let o = cx.add(Op::Binary(BinaryOp::Add), &[summed, bo])?;
    let k_all = coll(cx, CollectiveKind::AllGather, group.clone(), kv_axis, k_l)?;
    let v_all = coll(cx, CollectiveKind::AllGather, group, kv_axis, v_l)?;
    let (k_full, v_full) = (cx.proj(t, 1), cx.proj(t, 2));
    Some(vec![(cx.root, o), (k_full, k_all), (v_full, v_all)])
}

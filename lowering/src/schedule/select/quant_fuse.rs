//! Scheduler fusions of the W8A8_DYNAMIC MLPs: the two int8 GEMMs of the
//! gate and up projections, the SwiGLU and the per-token quantization of
//! its result run as one kernel, so a quantized MLP takes as many launches
//! as the bf16 one (`gemm` with a SwiGLU epilogue):
//!
//! - the routed experts in the batched form `moe-batched-routing-quant`
//!   builds (`moe_init_routing -> dynamic_quant -> grouped_quant_matmul`
//!   gate, up `-> swiglu -> dynamic_quant -> grouped_quant_matmul` down
//!   `-> moe_finalize_routing`) become `moe_route`, `moe_gate_up_quant`,
//!   `moe_down_quant` and `moe_combine`, the bf16 MoE's launches;
//! - the shared expert's `dynamic_quant(swiglu(quant_matmul_per_token(xq,
//!   w_gate, ..), quant_matmul_per_token(xq, w_up, ..)))` becomes one
//!   `quant_gate_up_quant`.
//!
//! - the merged int8 q/k/v projection of `merge-qkv-quant` (or of
//!   `merge-qkv-static`), split, q and k roped and k, v written to the
//!   paged caches: the `split` and what follows become one
//!   `qkv_rope_cache_write` (the bf16 kernel) over the int8 matmul's
//!   output, as `qkv-rope-cache-write` does for bf16; with int8 (C8)
//!   caches, whose writes quantize k and v per channel,
//!   `qkv_rope_cache_write_quant`;
//! - a `dynamic_quant` read only by one `quant_matmul_per_token` (the o
//!   projection's input) is done inside that matmul (`dyn_quant_matmul`),
//!   with the projection's bias add and the residual add after it (as an
//!   `add` or the elementwise-chain rule's `fused_elementwise` of both) in
//!   its epilogue: the bf16 program adds the residual inside `add_rms_norm`,
//!   which the chain hides from `add-rmsnorm` here.
//!
//! - static W8A8: a `quantize` with a per-tensor (one element) scale and
//!   offset read only by one 2-d `quant_matmul` (every projection's input)
//!   is done inside that matmul (`static_quant_matmul`); static W8A8's
//!   routed experts are fused in `static_moe`.
//!
//! Every intermediate value must be read only inside the chain; anything
//! else keeps the ops' own kernels.

use super::super::flatten::Def;
use super::{static_shape, Selector};
use crate::rules::check;
use anyhow::{anyhow, bail, Result};
use panguc_ir::kernel::KernelKind;
use panguc_ir::op::{BinaryOp, EwToken, ReduceOp};
use panguc_ir::{DType, Dim, Op};

/// The routed W8A8_DYNAMIC experts ending at a `moe_finalize_routing`.
pub(super) struct QuantMoe {
    /// The normalized rows `[T, H]` (f32) and the expert ids `[T, k]`.
    x: usize,
    ids: usize,
    /// Routing weights `[T, k]`.
    weights: usize,
    /// Gate, gate scale, up, up scale, down, down scale (weights).
    w: [usize; 6],
    /// Skip terms of the finalize (none, or shared expert and residual).
    skips: Vec<usize>,
}

/// The rope and paged-cache writes after a merged q/k/v projection split.
pub(super) struct QkvRopeWrite {
    /// The merged projection `[T, (Hq+2*Hkv)*D]`, the RoPE tables, the slot mapping.
    y: usize,
    cos: usize,
    sin: usize,
    slots: usize,
    /// Roped q, and the k and v caches after the writes.
    q: usize,
    k_all: usize,
    v_all: usize,
    q_heads: usize,
    kv_heads: usize,
    /// Int8 (C8) caches: the per-channel k scale, k offset, v scale and v
    /// offset the rows are quantized with on the way in.
    quant: Option<[usize; 4]>,
}

/// A `quant_matmul_per_token` that quantizes its input itself.
pub(super) struct DynQuantMm {
    /// Float input, int8 weight, weight scale, optional bias, optional
    /// residual added after the bias.
    x: usize,
    w: usize,
    w_scale: usize,
    bias: Option<usize>,
    residual: Option<usize>,
}

/// A static `quant_matmul` that quantizes its input itself.
pub(super) struct StaticQuantMm {
    /// Float input, per-tensor input scale and offset, int8 weight,
    /// quant bias, deq scale.
    args: [usize; 6],
}

/// The shared expert's fused gate/up: operands of the two int8 matmuls.
pub(super) struct QuantGateUp {
    /// Quantized rows and their scales, then gate, gate scale, up, up scale.
    args: [usize; 6],
}

impl Selector<'_> {
    /// The node defining value `v`, if `v` is result `result` of an `op`
    /// node.
    fn defined_by(&self, v: usize, op: fn(&Op) -> bool, result: usize) -> Option<usize> {
        let Def::Node(ni) = self.g.values[v].def else { return None };
        let n = &self.g.nodes[ni];
        (op(&n.op) && n.results.get(result) == Some(&v)).then_some(ni)
    }

    /// Finds the chains of the module docs among the live nodes; their
    /// intermediate results are marked absorbed (no launch of their own).
    pub(super) fn fuse_quant_mlps(&mut self, live: &[bool]) {
        let uses = self.use_counts(live);
        for ni in 0..self.g.nodes.len() {
            if !live[ni] {
                continue;
            }
            match self.g.nodes[ni].op {
                Op::MoeFinalizeRouting => {
                    if let Some((moe, inner)) = self.match_quant_moe(ni, &uses) {
                        inner.into_iter().for_each(|v| self.absorbed[v] = true);
                        self.quant_moe.insert(ni, moe);
                    }
                }
                Op::DynamicQuant => {
                    if let Some((gu, inner)) = self.match_quant_gate_up(ni, &uses) {
                        inner.into_iter().for_each(|v| self.absorbed[v] = true);
                        self.quant_gate_up.insert(ni, gu);
                    } else if let Some((at, mm, inner)) = self.match_dyn_quant_mm(ni, &uses, live) {
                        inner.into_iter().for_each(|v| self.absorbed[v] = true);
                        self.dyn_quant_mm.insert(at, mm);
                    }
                }
                Op::Reduce { op: ReduceOp::Sum, axis: 0, .. } => {
                    if let Some((mut moe, inner)) = self.match_static_moe(ni, &uses) {
                        inner.into_iter().for_each(|v| self.absorbed[v] = true);
                        let routed = self.g.nodes[ni].results[0];
                        match self.match_static_moe_skips(routed, &uses, live) {
                            Some((at, skips)) => {
                                self.absorbed[routed] = true;
                                moe.skips = Some(skips);
                                self.static_moe.insert(at, moe);
                            }
                            None => {
                                self.static_moe.insert(ni, moe);
                            }
                        }
                    }
                }
                Op::Quantize => {
                    if let Some((mm, fused, q)) = self.match_static_quant_mm(ni, &uses, live) {
                        self.absorbed[q] = true;
                        self.static_quant_mm.insert(mm, fused);
                    }
                }
                Op::SwiGlu => self.match_static_gate_up(ni, &uses),
                Op::Split { axis: 1, ref sizes } if sizes.len() == 3 => {
                    if let Some((qkv, inner)) = self.match_qkv_rope_write(ni, &uses, live) {
                        inner.into_iter().for_each(|v| self.absorbed[v] = true);
                        [qkv.q, qkv.k_all, qkv.v_all].into_iter().for_each(|v| self.computed[v] = true);
                        self.qkv_rope_write.insert(ni, qkv);
                    }
                }
                _ => {}
            }
        }
    }

    /// The live nodes reading value `v`.
    fn readers(&self, v: usize, live: &[bool]) -> Vec<usize> {
        (0..self.g.nodes.len()).filter(|n| live[*n] && self.g.nodes[*n].args.contains(&v)).collect()
    }

    /// The one live reader of `v` if it is an `op` node reading `v` once.
    pub(super) fn only_reader(&self, v: usize, uses: &[usize], live: &[bool], op: fn(&Op) -> bool) -> Option<usize> {
        check(uses[v] == 1)?;
        let r = *self.readers(v, live).first()?;
        op(&self.g.nodes[r].op).then_some(r)
    }

    /// `split(y)` into q, k, v widths; `reshape -> rope` for q,
    /// `reshape -> rope -> kv_cache_write` for k, `reshape ->
    /// kv_cache_write` for v through the same slots, into float caches, or
    /// into int8 caches with a per-channel `quantize` before each write
    /// (which `fuse_int8_kv` has already given to the write).
    fn match_qkv_rope_write(&self, split: usize, uses: &[usize], live: &[bool]) -> Option<(QkvRopeWrite, Vec<usize>)> {
        let g = self.g;
        let sp = &g.nodes[split];
        let [r0, r1, r2] = sp.results[..] else { return None };
        let reshape = |v: usize| self.only_reader(v, uses, live, |o| matches!(o, Op::Reshape { .. }));
        let rope = |v: usize| self.only_reader(v, uses, live, |o| *o == Op::Rope);
        let write = |v: usize| self.only_reader(v, uses, live, |o| *o == Op::KvCacheWrite);
        let quantize = |v: usize| self.only_reader(v, uses, live, |o| *o == Op::Quantize);
        let heads = |n: usize| -> Option<(usize, usize)> {
            let sh = &g.values[g.nodes[n].results[0]].ty.shape;
            Some((sh.get(1)?.as_const()?, sh.get(2)?.as_const()?))
        };
        let (rq, rk, rv) = (reshape(r0)?, reshape(r1)?, reshape(r2)?);
        let (q3, k3, v3) = (g.nodes[rq].results[0], g.nodes[rk].results[0], g.nodes[rv].results[0]);
        let (ropeq, ropek) = (&g.nodes[rope(q3)?], &g.nodes[rope(k3)?]);
        let kr = ropek.results[0];
        // The rows the writes store: k and v themselves, or their
        // absorbed per-channel quantizations into int8 caches.
        let (mut k_new, mut v_new, mut quant) = (kr, v3, None);
        if let (Some(kq), Some(vq)) = (quantize(kr), quantize(v3)) {
            let (kq, vq) = (&g.nodes[kq], &g.nodes[vq]);
            let int8 = [kq.results[0], vq.results[0]].iter().all(|v| self.absorbed[*v]);
            check(int8 && kq.args[0] == kr && vq.args[0] == v3)?;
            (k_new, v_new) = (kq.results[0], vq.results[0]);
            quant = Some([kq.args[1], kq.args[2], vq.args[1], vq.args[2]]);
        }
        let (kw, vw) = (&g.nodes[write(k_new)?], &g.nodes[write(v_new)?]);
        let ((hq, d), (hk, dk), (hv, dv)) = (heads(rq)?, heads(rk)?, heads(rv)?);
        let cache_dtype = if quant.is_some() { DType::I8 } else { DType::F32 };
        let ok = ropeq.args[1..] == ropek.args[1..]
            && kw.args[1] == k_new
            && vw.args[1] == v_new
            && kw.args[2] == vw.args[2]
            && hk == hv
            && d == dk
            && d == dv
            && matches!(&sp.op, Op::Split { sizes, .. } if *sizes == [hq * d, hk * d, hv * d])
            && [kw.args[0], vw.args[0]].iter().all(|c| self.storage[*c] == cache_dtype);
        let qkv = QkvRopeWrite {
            y: sp.args[0],
            cos: ropeq.args[1],
            sin: ropeq.args[2],
            slots: kw.args[2],
            q: ropeq.results[0],
            k_all: kw.results[0],
            v_all: vw.results[0],
            q_heads: hq,
            kv_heads: hk,
            quant,
        };
        // Everything after the split is this one launch's; q and the caches
        // are computed by it (not absorbed: attention reads them as they
        // are), at the split node.
        let inner = vec![q3, k3, v3, kr];
        ok.then_some((qkv, inner))
    }

    /// The merged q/k/v projection's split and what follows it.
    pub(super) fn qkv_rope_write(&mut self, split: usize) -> Result<()> {
        let f = self.qkv_rope_write.remove(&split).ok_or_else(|| anyhow!("no fused rope/cache write here"))?;
        let (q_heads, kv_heads) = (f.q_heads, f.kv_heads);
        let mut args = vec![];
        for v in [f.y, f.cos, f.sin, f.slots].into_iter().chain(f.quant.into_iter().flatten()) {
            args.push(self.rm(v)?);
        }
        args.push(self.act(f.q));
        args.push(self.paged_cache_result(f.k_all)?);
        args.push(self.paged_cache_result(f.v_all)?);
        let kind = match f.quant {
            Some(_) => KernelKind::QkvRopeCacheWriteQuant { q_heads, kv_heads },
            None => KernelKind::QkvRopeCacheWrite { q_heads, kv_heads },
        };
        self.launch(kind, args)
    }

    /// A `dynamic_quant` `dq` of an activation no norm produced, read only
    /// by one 2-d `quant_matmul_per_token` (and that, if biased, only by its
    /// fused bias add): returns the node that launches the fused matmul.
    fn match_dyn_quant_mm(&self, dq: usize, uses: &[usize], live: &[bool]) -> Option<(usize, DynQuantMm, Vec<usize>)> {
        let g = self.g;
        let n = &g.nodes[dq];
        let x = n.args[0];
        let from_norm = matches!(g.values[x].def, Def::Node(d) if matches!(g.nodes[d].op, Op::RmsNorm { .. } | Op::AddRmsNorm { .. }));
        let (q, s) = (n.results[0], n.results[1]);
        let mm = self.only_reader(q, uses, live, |o| *o == Op::QuantMatMulPerToken)?;
        let m = &g.nodes[mm];
        let y = m.results[0];
        let ok = !from_norm
            && uses[s] == 1
            && m.args[0] == q
            && m.args[3] == s
            && self.konst[m.args[1]]
            && self.konst[m.args[2]]
            && g.values[m.args[1]].ty.rank() == 2
            && g.values[x].ty.rank() == 2
            && g.values[x].ty.shape[1].as_const().is_some()
            && n.results.iter().all(|r| !self.absorbed[*r]);
        check(ok)?;
        let fused = DynQuantMm { x, w: m.args[1], w_scale: m.args[2], bias: None, residual: None };
        // `fuse_quant_bias` runs later: look for its pattern here (the
        // bias add becomes part of this launch the same way).
        if self.absorbed[y] {
            return None;
        }
        let bias_add = self.only_reader(y, uses, live, |o| *o == Op::Binary(BinaryOp::Add));
        let (at, fused, mut inner) = match bias_add {
            Some(add) if g.nodes[add].args[0] == y && self.is_quant_bias_add(add, uses) => {
                let bias = g.nodes[add].args[1];
                (add, DynQuantMm { bias: Some(bias), ..fused }, vec![q, s, y])
            }
            _ => (mm, fused, vec![q, s]),
        };
        // Then the residual add after it, as a plain `add` of what `at`
        // computes, or (no bias add found) both adds in one expression.
        let sum = g.nodes[at].results[0];
        if let Some((radd, residual)) = self.residual_add(sum, uses, live) {
            inner.push(sum);
            return Some((radd, DynQuantMm { residual: Some(residual), ..fused }, inner));
        }
        if fused.bias.is_none() {
            if let Some((e, bias, residual)) = self.bias_residual_expr(y, uses, live) {
                inner.push(y);
                return Some((e, DynQuantMm { bias: Some(bias), residual: Some(residual), ..fused }, inner));
            }
        }
        Some((at, fused, inner))
    }

    /// A float activation `r` that can be added to `v` elementwise: same
    /// type, not a constant.
    fn is_residual_for(&self, v: usize, r: usize) -> bool {
        r != v && !self.konst[r] && self.storage[r].is_float() && self.g.values[r].ty == self.g.values[v].ty
    }

    /// The one live reader of `v` when it is `add(v, r)` or `add(r, v)` of
    /// a residual `r` ([`Self::is_residual_for`]): the add node and `r`.
    fn residual_add(&self, v: usize, uses: &[usize], live: &[bool]) -> Option<(usize, usize)> {
        let add = self.only_reader(v, uses, live, |o| *o == Op::Binary(BinaryOp::Add))?;
        let n = &self.g.nodes[add];
        let r = if n.args[0] == v { n.args[1] } else { n.args[0] };
        let ok = self.is_residual_for(v, r) && self.g.values[n.results[0]].ty == self.g.values[v].ty;
        ok.then_some((add, r))
    }

    /// The one live reader of the int8 matmul output `y` when it is a
    /// `fused_elementwise` computing `(y + bias) + r` (operands of each add
    /// in either order: float adds commute exactly) with `bias` a column
    /// bias of `y` and `r` a residual: the node, `bias` and `r`.
    fn bias_residual_expr(&self, y: usize, uses: &[usize], live: &[bool]) -> Option<(usize, usize, usize)> {
        let g = self.g;
        let e = self.only_reader(y, uses, live, |o| matches!(o, Op::FusedElementwise { .. }))?;
        let n = &g.nodes[e];
        let Op::FusedElementwise { expr } = &n.op else { return None };
        let tokens = panguc_ir::op::parse_elementwise(expr, n.args.len()).ok()?;
        let (pair, r) = add_of_add(&tokens)?;
        let (a, b) = (n.args[pair[0]], n.args[pair[1]]);
        let bias = if a == y { b } else { a };
        let r = n.args[r];
        let ok = (a == y) != (b == y)
            && self.is_column_bias(y, bias)
            && self.is_residual_for(y, r)
            && g.values[n.results[0]].ty == g.values[y].ty;
        ok.then_some((e, bias, r))
    }

    /// The int8 matmul that quantizes its own input, launched at node `at`
    /// (the matmul, its bias add, or the residual add after them).
    pub(super) fn dyn_quant_mm(&mut self, at: usize) -> Result<()> {
        let f = self.dyn_quant_mm.remove(&at).ok_or_else(|| anyhow!("no fused int8 matmul here"))?;
        let mut args = vec![self.rm(f.x)?, self.rm(f.w)?, self.rm(f.w_scale)?];
        if let Some(b) = f.bias {
            args.push(self.rm(b)?);
        }
        if let Some(r) = f.residual {
            args.push(self.rm(r)?);
        }
        let out = self.act(self.g.nodes[at].results[0]);
        args.push(out);
        self.launch(KernelKind::DynQuantMatMul { bias: f.bias.is_some(), residual: f.residual.is_some() }, args)
    }

    /// A `quantize` node `qn` of a float 2-d activation with a constant
    /// one-element scale and offset, read only by one `quant_matmul` of a
    /// constant 2-d weight: the matmul node, the fused operands and the
    /// int8 value it absorbs.
    fn match_static_quant_mm(&self, qn: usize, uses: &[usize], live: &[bool]) -> Option<(usize, StaticQuantMm, usize)> {
        let g = self.g;
        let n = &g.nodes[qn];
        let (x, q) = (n.args[0], n.results[0]);
        let mm = self.only_reader(q, uses, live, |o| *o == Op::QuantMatMul)?;
        let m = &g.nodes[mm];
        let one = |v: usize| {
            self.konst[v] && g.values[v].ty.shape.iter().map(|d| d.as_const()).product::<Option<usize>>() == Some(1)
        };
        let ok = m.args[0] == q
            && !self.absorbed[q]
            && one(n.args[1])
            && one(n.args[2])
            && m.args[1..].iter().all(|a| self.konst[*a])
            && g.values[m.args[1]].ty.rank() == 2
            && g.values[x].ty.rank() == 2
            && g.values[x].ty.shape[1].as_const().is_some()
            && self.storage[x].is_float();
        let args = [x, n.args[1], n.args[2], m.args[1], m.args[2], m.args[3]];
        ok.then_some((mm, StaticQuantMm { args }, q))
    }

    /// `swiglu(g, u)` of two static int8 matmuls of one input, each
    /// quantizing it itself (already matched) and read only here: one
    /// `quant_gate_up_static` at the `swiglu` node (the shared expert).
    fn match_static_gate_up(&mut self, sw: usize, uses: &[usize]) {
        let g = self.g;
        let (gate, up) = (g.nodes[sw].args[0], g.nodes[sw].args[1]);
        let mm = |v: usize| self.defined_by(v, |o| *o == Op::QuantMatMul, 0);
        let (Some(gm), Some(um)) = (mm(gate), mm(up)) else { return };
        let (Some(gf), Some(uf)) = (self.static_quant_mm.get(&gm), self.static_quant_mm.get(&um)) else { return };
        if gate == up || uses[gate] != 1 || uses[up] != 1 || gf.args[0] != uf.args[0] {
            return;
        }
        let mut args = [0usize; 11];
        args[0] = gf.args[0];
        args[1..6].copy_from_slice(&gf.args[1..]);
        args[6..].copy_from_slice(&uf.args[1..]);
        self.static_quant_mm.remove(&gm);
        self.static_quant_mm.remove(&um);
        self.absorbed[gate] = true;
        self.absorbed[up] = true;
        self.static_gate_up.insert(sw, args);
    }

    /// The shared expert's static gate/up/SwiGLU at its `swiglu` node.
    pub(super) fn static_gate_up(&mut self, sw: usize) -> Result<()> {
        let a = self.static_gate_up.remove(&sw).ok_or_else(|| anyhow!("no fused static gate/up here"))?;
        // The gate and up weights (args 3 and 8) in int8 dot panels.
        let mut args = (a.iter().enumerate())
            .map(|(j, v)| if j == 3 || j == 8 { self.int8_weight(*v) } else { self.rm(*v) })
            .collect::<Result<Vec<_>>>()?;
        args.push(self.act(self.g.nodes[sw].results[0]));
        self.launch(KernelKind::QuantGateUpStatic, args)
    }

    /// The static int8 matmul that quantizes its own input, at its node `mm`.
    pub(super) fn static_quant_mm(&mut self, mm: usize) -> Result<()> {
        let f = self.static_quant_mm.remove(&mm).ok_or_else(|| anyhow!("no fused static int8 matmul here"))?;
        let mut args = f.args.iter().map(|a| self.rm(*a)).collect::<Result<Vec<_>>>()?;
        args.push(self.act(self.g.nodes[mm].results[0]));
        self.launch(KernelKind::StaticQuantMatMul, args)
    }

    /// `dynamic_quant(swiglu(qmm(xq, wg, sg, xs), qmm(xq, wu, su, xs)))`
    /// over 2-d weights; returns the operands and the values it absorbs.
    fn match_quant_gate_up(&self, dq: usize, uses: &[usize]) -> Option<(QuantGateUp, Vec<usize>)> {
        let g = self.g;
        let act = g.nodes[dq].args[0];
        let sw = self.defined_by(act, |o| *o == Op::SwiGlu, 0)?;
        let qmm = |v: usize| self.defined_by(v, |o| *o == Op::QuantMatMulPerToken, 0);
        let (gate, up) = (g.nodes[sw].args[0], g.nodes[sw].args[1]);
        let (gn, un) = (&g.nodes[qmm(gate)?], &g.nodes[qmm(up)?]);
        let same_input = gn.args[0] == un.args[0] && gn.args[3] == un.args[3];
        let weights = [gn.args[1], gn.args[2], un.args[1], un.args[2]];
        let plain = g.values[gn.args[1]].ty.rank() == 2 && g.values[gn.args[0]].ty.rank() == 2;
        let ok = same_input
            && plain
            && weights.iter().all(|w| self.konst[*w])
            && [act, gate, up].iter().all(|v| uses[*v] == 1)
            && self.storage[gn.args[0]] == DType::I8
            && g.nodes[dq].results.iter().all(|r| !self.absorbed[*r]);
        ok.then(|| {
            let args = [gn.args[0], gn.args[3], weights[0], weights[1], weights[2], weights[3]];
            (QuantGateUp { args }, vec![act, gate, up])
        })
    }

    /// The routed chain of the module docs ending at finalize node `fin`.
    fn match_quant_moe(&self, fin: usize, uses: &[usize]) -> Option<(QuantMoe, Vec<usize>)> {
        let g = self.g;
        let f = &g.nodes[fin];
        let gqmm = |v: usize| self.defined_by(v, |o| *o == Op::GroupedQuantMatMul, 0);
        let dq = |v: usize| self.defined_by(v, |o| *o == Op::DynamicQuant, 0);
        let (y, skips) = (f.args[0], f.args[3..].to_vec());
        let down = &g.nodes[gqmm(y)?];
        let (aq, a_scale, counts) = (down.args[0], down.args[3], down.args[4]);
        let dq2 = &g.nodes[dq(aq)?];
        let act = dq2.args[0];
        let sw = &g.nodes[self.defined_by(act, |o| *o == Op::SwiGlu, 0)?];
        let (gate, up) = (sw.args[0], sw.args[1]);
        let (gn, un) = (&g.nodes[gqmm(gate)?], &g.nodes[gqmm(up)?]);
        let (xq, x_scale) = (gn.args[0], gn.args[3]);
        let dq1 = &g.nodes[dq(xq)?];
        let rows = dq1.args[0];
        let init = &g.nodes[self.defined_by(rows, |o| matches!(o, Op::MoeInitRouting { .. }), 0)?];
        let chain_ok = dq2.results[1] == a_scale
            && dq1.results[1] == x_scale
            && un.args[0] == xq
            && un.args[3] == x_scale
            && gn.args[4] == counts
            && un.args[4] == counts
            && init.results[2] == counts
            && init.results[1] == f.args[2];
        let w = [gn.args[1], gn.args[2], un.args[1], un.args[2], down.args[1], down.args[2]];
        // Each intermediate read only inside the chain.
        let once = [y, aq, a_scale, act, gate, up, rows, f.args[2]];
        let ok = chain_ok
            && w.iter().all(|v| self.konst[*v])
            && once.iter().all(|v| uses[*v] == 1)
            && uses[xq] == 2
            && uses[x_scale] == 2
            && uses[counts] == 3
            && matches!(skips.len(), 0 | 2);
        let inner = vec![y, aq, a_scale, act, gate, up, xq, x_scale, rows, f.args[2], counts];
        let moe = QuantMoe { x: init.args[0], ids: init.args[1], weights: f.args[1], w, skips };
        ok.then_some((moe, inner))
    }

    /// The shared expert's gate/up/SwiGLU/quant as one launch at its
    /// `dynamic_quant` node `dq`.
    pub(super) fn quant_gate_up(&mut self, dq: usize) -> Result<()> {
        let gu = self.quant_gate_up.remove(&dq).ok_or_else(|| anyhow!("no fused gate/up at this node"))?;
        // Quantized rows and scales row-major; gate and up weights (args 2
        // and 4) in int8 dot panels.
        let mut args = (gu.args.iter().enumerate())
            .map(|(j, a)| if j == 2 || j == 4 { self.int8_weight(*a) } else { self.rm(*a) })
            .collect::<Result<Vec<_>>>()?;
        let results = self.g.nodes[dq].results.clone();
        args.extend(results.iter().map(|r| self.act(*r)));
        self.launch(KernelKind::QuantGateUpQuant, args)
    }

    /// The per-token quantization of the MoE input `x`: the buffers of a
    /// `dynamic_quant(x)` already scheduled (the shared expert's, usually
    /// computed by the norm's kernel), else a launch of its own.
    fn quantized_rows(
        &mut self,
        x: usize,
        name: &str,
    ) -> Result<(panguc_ir::kernel::BufferId, panguc_ir::kernel::BufferId)> {
        let g = self.g;
        let done = g.nodes.iter().find(|n| n.op == Op::DynamicQuant && n.args[0] == x).and_then(|n| {
            let (q, s) = (n.results[0], n.results[1]);
            Some((self.buf[q]?, self.buf[s]?))
        });
        if let Some(bufs) = done {
            return Ok(bufs);
        }
        let xs = g.values[x].ty.shape.clone();
        let xb = self.rm(x)?;
        let q = self.scratch(format!("{name}.xq"), DType::I8, xs.clone());
        let s = self.scratch(format!("{name}.x_scale"), DType::F32, xs[..1].to_vec());
        self.launch(KernelKind::DynamicQuant, vec![xb, q, s])?;
        Ok((q, s))
    }

    /// The routed W8A8_DYNAMIC experts at their finalize node `fin`.
    pub(super) fn quant_moe(&mut self, fin: usize) -> Result<()> {
        let g = self.g;
        let moe = self.quant_moe.remove(&fin).ok_or_else(|| anyhow!("no fused MoE at this node"))?;
        let out_v = g.nodes[fin].results[0];
        let name = g.values[out_v].name.clone();
        let (t, h) = (g.values[moe.x].ty.shape[0].clone(), g.values[moe.x].ty.shape[1].clone());
        let k = g.values[moe.weights].ty.shape[1].clone();
        let slots = t.mul(&k).ok_or_else(|| anyhow!("symbolic number of experts per token"))?;
        let gate_shape = static_shape(&g.values[moe.w[0]].ty, "expert gate weights")?;
        let (e, i) = (gate_shape[0], gate_shape[1]);
        let (wb, ib) = (self.rm(moe.weights)?, self.rm(moe.ids)?);
        let (xq, x_scale) = self.quantized_rows(moe.x, &name)?;
        // Gate, up and down weights (even entries) in int8 dot panels, their
        // scales row-major.
        let w = (moe.w.iter().enumerate())
            .map(|(j, v)| if j % 2 == 0 { self.int8_weight(*v) } else { self.rm(*v) })
            .collect::<Result<Vec<_>>>()?;
        let offsets = self.scratch(format!("{name}.offsets"), DType::I64, vec![Dim::c(e + 1)]);
        let rows = self.scratch(format!("{name}.rows"), DType::I64, vec![slots.clone()]);
        let row_w = self.scratch(format!("{name}.row_weight"), DType::F32, vec![slots.clone()]);
        let slot_row = self.scratch(format!("{name}.slot_row"), DType::I64, vec![slots.clone()]);
        let aq = self.scratch(format!("{name}.act_q"), DType::I8, vec![slots.clone(), Dim::c(i)]);
        let a_scale = self.scratch(format!("{name}.act_scale"), DType::F32, vec![slots.clone()]);
        let ys = self.scratch(format!("{name}.ys"), DType::F32, vec![slots, h]);
        self.launch(KernelKind::MoeRoute, vec![wb, ib, offsets, rows, row_w, slot_row])?;
        let gate_up = vec![xq, x_scale, offsets, rows, w[0], w[1], w[2], w[3], aq, a_scale];
        self.launch(KernelKind::MoeGateUpQuant, gate_up)?;
        self.launch(KernelKind::MoeDownQuant, vec![aq, a_scale, offsets, row_w, w[4], w[5], ys])?;
        let mut args = vec![ys, slot_row];
        for s in &moe.skips {
            args.push(self.rm(*s)?);
        }
        args.push(self.act(out_v));
        if !matches!(moe.skips.len(), 0 | 2) {
            bail!("moe_finalize_routing with {} skip terms has no fused kernel", moe.skips.len());
        }
        self.launch(KernelKind::MoeCombine { shared_residual: moe.skips.len() == 2 }, args)
    }
}

/// `(a + b) + c` or `c + (a + b)` over three operands, as postfix tokens:
/// the operand indices `[a, b]` of the inner add and `c`.
fn add_of_add(tokens: &[EwToken]) -> Option<([usize; 2], usize)> {
    use EwToken::{Binary as B, Operand as O};
    match tokens {
        [O(a), O(b), B(BinaryOp::Add), O(c), B(BinaryOp::Add)]
        | [O(c), O(a), O(b), B(BinaryOp::Add), B(BinaryOp::Add)] => Some(([*a, *b], *c)),
        _ => None,
    }
}

//! Scheduler fusion of the routed static W8A8 experts. The importer
//! computes every expert on every token (per-expert `quantize` with the
//! expert's per-tensor input scale, `quant_matmul` gate and up, `swiglu`,
//! `quantize`, `quant_matmul` down) and combines them through one-hot
//! routing weights (`one_hot`, `mul`, `reduce_sum`, `transpose`, `mul`,
//! `reduce_sum` over the experts). Here that becomes the bf16 MoE's
//! launches over the selected (token, expert) pairs only: `moe_route`,
//! `moe_gate_up_static`, `moe_down_static`, `moe_combine` (which also does
//! the layer's residual sum after it, when that follows). The skipped
//! pairs are exact zeros in the dense form, so the two agree up to the f32
//! order of the sum over the selected experts (group order here, expert
//! order there).
//!
//! Every intermediate value must be read only inside the chain; anything
//! else keeps the ops' own kernels.

use super::super::flatten::Def;
use super::{static_shape, Selector};
use crate::rules::check;
use anyhow::{anyhow, Result};
use panguc_ir::kernel::KernelKind;
use panguc_ir::op::{BinaryOp, ReduceOp};
use panguc_ir::{DType, Dim, Op};

/// The dense static experts ending at the `reduce_sum` over experts.
pub(super) struct StaticMoe {
    /// The normalized rows `[T, H]`, the routing weights and expert ids `[T, k]`.
    x: usize,
    weights: usize,
    ids: usize,
    /// Gate and up: input scale, input offset, weight, quant bias, deq
    /// scale each; then the down projection's input scale and offset.
    gate_up: [usize; 12],
    /// Down weight, quant bias, deq scale.
    down: [usize; 3],
    /// The shared expert's output and the residual stream the layer adds
    /// after the routed sum (`moe_combine`'s skip terms), if fused.
    pub(super) skips: Option<(usize, usize)>,
}

impl Selector<'_> {
    /// The node defining `v` if it is an `op` node whose only result is `v`
    /// and `v` is read once.
    fn single_use_def(&self, v: usize, uses: &[usize], op: fn(&Op) -> bool) -> Option<usize> {
        check(uses[v] == 1 && !self.konst[v])?;
        let Def::Node(ni) = self.g.values[v].def else { return None };
        let n = &self.g.nodes[ni];
        (op(&n.op) && n.results == [v]).then_some(ni)
    }

    /// The dense chain of the module docs ending at `reduce_sum` node
    /// `red`: the fused operands and the values it absorbs.
    pub(super) fn match_static_moe(&self, red: usize, uses: &[usize]) -> Option<(StaticMoe, Vec<usize>)> {
        let g = self.g;
        let r = &g.nodes[red];
        check(r.op == Op::Reduce { op: ReduceOp::Sum, axis: 0, keepdim: false })?;
        let mul = |o: &Op| *o == Op::Binary(BinaryOp::Mul);
        // Combine weights: reshape(transpose(reduce_sum(one_hot(ids) * reshape(w)))).
        let weighted = r.args[0];
        let wm = &g.nodes[self.single_use_def(weighted, uses, mul)?];
        let (y, combine_b) = (wm.args[0], wm.args[1]);
        let cb = &g.nodes[self.single_use_def(combine_b, uses, |o| matches!(o, Op::Reshape { .. }))?];
        let ct = cb.args[0];
        let tp = &g.nodes[self.single_use_def(ct, uses, |o| *o == Op::Transpose { perm: vec![1, 0] })?];
        let combine = tp.args[0];
        let sum_slots = |o: &Op| *o == Op::Reduce { op: ReduceOp::Sum, axis: 1, keepdim: false };
        let cs = &g.nodes[self.single_use_def(combine, uses, sum_slots)?];
        let slots = cs.args[0];
        let sm = &g.nodes[self.single_use_def(slots, uses, mul)?];
        let (onehot, w_b) = (sm.args[0], sm.args[1]);
        let oh = &g.nodes[self.single_use_def(onehot, uses, |o| matches!(o, Op::OneHot { .. }))?];
        let wr = &g.nodes[self.single_use_def(w_b, uses, |o| matches!(o, Op::Reshape { .. }))?];
        let (ids, weights) = (oh.args[0], wr.args[0]);
        // Experts: quant_matmul(quantize(swiglu(qmm(quantize(x)), qmm(quantize(x))))).
        let qmm = |o: &Op| *o == Op::QuantMatMul;
        let quant = |o: &Op| *o == Op::Quantize;
        let down = &g.nodes[self.single_use_def(y, uses, qmm)?];
        let dq = &g.nodes[self.single_use_def(down.args[0], uses, quant)?];
        let act = dq.args[0];
        let sw = &g.nodes[self.single_use_def(act, uses, |o| *o == Op::SwiGlu)?];
        let (gate, up) = (sw.args[0], sw.args[1]);
        let (gn, un) = (&g.nodes[self.single_use_def(gate, uses, qmm)?], &g.nodes[self.single_use_def(up, uses, qmm)?]);
        let (gq, uq) = (
            &g.nodes[self.single_use_def(gn.args[0], uses, quant)?],
            &g.nodes[self.single_use_def(un.args[0], uses, quant)?],
        );
        let x = gq.args[0];
        // Shapes: x [T, H], ids and weights [T, k], stacked weights [E, .., ..],
        // one scale and offset per expert, a one-hot over the E experts.
        let e = g.values[gn.args[1]].ty.shape.first()?.as_const()?;
        let per_expert = |v: usize| {
            self.konst[v] && g.values[v].ty.shape.iter().map(|d| d.as_const()).product::<Option<usize>>() == Some(e)
        };
        let gate_up = [
            gq.args[1], gq.args[2], gn.args[1], gn.args[2], gn.args[3], uq.args[1], uq.args[2], un.args[1], un.args[2],
            un.args[3], dq.args[1], dq.args[2],
        ];
        let down_w = [down.args[1], down.args[2], down.args[3]];
        let (t, kdim) = (g.values[ids].ty.shape.first()?.clone(), g.values[ids].ty.shape.get(1)?.clone());
        let weight3 = |v: usize| self.konst[v] && g.values[v].ty.rank() == 3 && g.values[v].ty.shape[0] == Dim::c(e);
        let ok = uq.args[0] == x
            && g.values[x].ty.rank() == 2
            && self.storage[x].is_float()
            && g.values[ids].ty.rank() == 2
            && g.values[weights].ty.shape == g.values[ids].ty.shape
            && oh.op == Op::OneHot { depth: e }
            && wr.op == Op::Reshape { shape: vec![t.clone(), kdim, Dim::c(1)] }
            && cb.op == Op::Reshape { shape: vec![Dim::c(e), t, Dim::c(1)] }
            && [gq, uq, dq].iter().all(|q| per_expert(q.args[1]) && per_expert(q.args[2]))
            && [gn.args[1], un.args[1], down.args[1]].into_iter().all(weight3)
            && [gn, un, down].iter().all(|m| m.args[2..].iter().all(|a| self.konst[*a]))
            && [gn.args[0], un.args[0], down.args[0]].iter().all(|q| self.storage[*q] == DType::I8);
        let inner = vec![
            weighted,
            combine_b,
            ct,
            combine,
            slots,
            onehot,
            w_b,
            y,
            down.args[0],
            act,
            gate,
            up,
            gn.args[0],
            un.args[0],
        ];
        check(ok)?;
        Some((StaticMoe { x, weights, ids, gate_up, down: down_w, skips: None }, inner))
    }

    /// The layer's residual sum after the routed experts' `routed`:
    /// `fused_elementwise((h + o) + (routed + shared))` where `h + o` is
    /// what an `add_rms_norm(h, o)` already wrote as its sum (the same f32
    /// add), so `moe_combine` computes it as `sum + (routed + shared)`:
    /// the elementwise node, `shared` and that sum.
    pub(super) fn match_static_moe_skips(
        &self,
        routed: usize,
        uses: &[usize],
        live: &[bool],
    ) -> Option<(usize, (usize, usize))> {
        use panguc_ir::op::EwToken::{Binary as B, Operand as O};
        let g = self.g;
        let e = self.only_reader(routed, uses, live, |o| matches!(o, Op::FusedElementwise { .. }))?;
        let n = &g.nodes[e];
        let Op::FusedElementwise { expr } = &n.op else { return None };
        let tokens = panguc_ir::op::parse_elementwise(expr, n.args.len()).ok()?;
        let add = B(BinaryOp::Add);
        let [O(a), O(b), ref a1, O(c), O(d), ref a2, ref a3] = tokens[..] else { return None };
        check([a1, a2, a3].iter().all(|t| **t == add) && n.args.get(c) == Some(&routed))?;
        let (h, o, shared) = (n.args[a], n.args[b], n.args[d]);
        let norm = (0..g.nodes.len())
            .find(|m| live[*m] && matches!(g.nodes[*m].op, Op::AddRmsNorm { .. }) && g.nodes[*m].args[..2] == [h, o])?;
        let sum = g.nodes[norm].results[0];
        let ty = &g.values[routed].ty;
        let ok = [sum, shared].iter().all(|v| self.storage[*v] == DType::F32 && g.values[*v].ty == *ty)
            && self.storage[n.results[0]] == DType::F32
            && g.values[n.results[0]].ty == *ty
            && shared != routed;
        ok.then_some((e, (shared, sum)))
    }

    /// The routed static experts at node `at`: their `reduce_sum`, or the
    /// residual sum after it when the skips are fused.
    pub(super) fn static_moe(&mut self, at: usize) -> Result<()> {
        let g = self.g;
        let moe = self.static_moe.remove(&at).ok_or_else(|| anyhow!("no fused static MoE at this node"))?;
        let out_v = g.nodes[at].results[0];
        let name = g.values[out_v].name.clone();
        let (t, h) = (g.values[moe.x].ty.shape[0].clone(), g.values[moe.x].ty.shape[1].clone());
        let k = g.values[moe.weights].ty.shape[1].clone();
        let slots = t.mul(&k).ok_or_else(|| anyhow!("symbolic number of experts per token"))?;
        let gate_shape = static_shape(&g.values[moe.gate_up[2]].ty, "expert gate weights")?;
        let (e, i) = (gate_shape[0], gate_shape[1]);
        let (wb, ib, xb) = (self.rm(moe.weights)?, self.rm(moe.ids)?, self.rm(moe.x)?);
        // The gate and up weights (entries 2 and 7) in int8 dot panels.
        let gate_up = (moe.gate_up.iter().enumerate())
            .map(|(j, v)| if j == 2 || j == 7 { self.int8_weight(*v) } else { self.rm(*v) })
            .collect::<Result<Vec<_>>>()?;
        // The down weight (first) in int8 dot panels, its bias and scale row-major.
        let down = (moe.down.iter().enumerate())
            .map(|(j, v)| if j == 0 { self.int8_weight(*v) } else { self.rm(*v) })
            .collect::<Result<Vec<_>>>()?;
        let offsets = self.scratch(format!("{name}.offsets"), DType::I64, vec![Dim::c(e + 1)]);
        let rows = self.scratch(format!("{name}.rows"), DType::I64, vec![slots.clone()]);
        let row_w = self.scratch(format!("{name}.row_weight"), DType::F32, vec![slots.clone()]);
        let slot_row = self.scratch(format!("{name}.slot_row"), DType::I64, vec![slots.clone()]);
        let aq = self.scratch(format!("{name}.act_q"), DType::I8, vec![slots.clone(), Dim::c(i)]);
        let ys = self.scratch(format!("{name}.ys"), DType::F32, vec![slots, h]);
        self.launch(KernelKind::MoeRoute, vec![wb, ib, offsets, rows, row_w, slot_row])?;
        let mut args = vec![xb, offsets, rows];
        args.extend(gate_up);
        args.push(aq);
        self.launch(KernelKind::MoeGateUpStatic, args)?;
        self.launch(KernelKind::MoeDownStatic, vec![aq, offsets, row_w, down[0], down[1], down[2], ys])?;
        let mut args = vec![ys, slot_row];
        if let Some((shared, sum)) = moe.skips {
            args.extend([self.rm(shared)?, self.rm(sum)?]);
        }
        args.push(self.act(out_v));
        self.launch(KernelKind::MoeCombine { shared_residual: moe.skips.is_some() }, args)
    }
}

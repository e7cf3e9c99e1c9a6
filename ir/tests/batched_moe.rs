//! The MoE over a batch as three ops (init routing, grouped matmul,
//! finalize routing): hand-computed values, and the chain against the fused
//! `moe_ffn` / `grouped_matmul_moe` definitions on random data.

mod common;
use common::*;
use panguc_ir::interp::eval_pure;
use panguc_ir::op::BinaryOp;
use panguc_ir::{Op, Tensor};

/// Three rows, top-2 over 4 experts: pairs p = t*2 + j pick
/// p0 e2, p1 e0 | p2 e0, p3 e3 | p4 e2, p5 e0.
fn routing_example() -> (Tensor, Tensor) {
    let x = f(&[3, 2], &[1., 10., 2., 20., 3., 30.]);
    let ids = i(&[3, 2], &[2, 0, 0, 3, 2, 0]);
    (x, ids)
}

#[test]
fn init_routing_sorts_pairs_by_expert_stably() {
    let (x, ids) = routing_example();
    let out = run(Op::MoeInitRouting { experts: 4 }, &[&x, &ids]);
    // Expert 0 gets p1, p2, p5 (places 0, 1, 2), expert 1 nothing, expert 2
    // p0, p4 (places 3, 4), expert 3 p3 (place 5); each place holds the row
    // of its pair: rows 0, 1, 2, 0, 2, 1.
    close(&out[0], &[6, 2], &[1., 10., 2., 20., 3., 30., 1., 10., 3., 30., 2., 20.]);
    // Place of each pair p0..p5.
    assert_eq!(out[1].as_i64(), &[3, 0, 1, 5, 4, 2]);
    assert_eq!(out[2].as_i64(), &[3, 0, 2, 1]);
    let bad = i(&[3, 2], &[2, 0, 0, 4, 2, 0]);
    let e = eval_pure(&Op::MoeInitRouting { experts: 4 }, &[&x, &bad]).unwrap_err();
    assert!(e.contains("row 1 picks expert 4, outside 0..4"), "{e}");
}

#[test]
fn grouped_matmul_runs_each_expert_on_its_rows() {
    let (x, ids) = routing_example();
    let rows = run(Op::MoeInitRouting { experts: 4 }, &[&x, &ids]);
    // w[e] is [N=1, K=2]: e0 [1, 0], e1 NaN (no rows: must never reach the
    // output), e2 [0, 1], e3 [1, 1].
    let w = f(&[4, 1, 2], &[1., 0., f32::NAN, f32::NAN, 0., 1., 1., 1.]);
    let y = run(Op::GroupedMatmul, &[&rows[0], &w, &rows[2]]).remove(0);
    // Rows 0..3 (e0) keep the first column 1, 2, 3; rows 3, 4 (e2) the
    // second 10, 30; row 5 (e3) sums 2 + 20 = 22.
    close(&y, &[6, 1], &[1., 2., 3., 10., 30., 22.]);
    let e = eval_pure(&Op::GroupedMatmul, &[&rows[0], &w, &i(&[4], &[3, 0, 2, 2])]).unwrap_err();
    assert!(e.contains("expert counts sum to 7 but there are 6 rows"), "{e}");
}

#[test]
fn finalize_routing_combines_each_rows_pairs_and_skips() {
    let y = f(&[6, 1], &[1., 2., 3., 10., 30., 22.]);
    let w = f(&[3, 2], &[0.5, 0.25, 1., 2., 0.1, 0.2]);
    let idx = i(&[6], &[3, 0, 1, 5, 4, 2]);
    // t0 = 0.5*y[3] + 0.25*y[0] = 5 + 0.25; t1 = 1*y[1] + 2*y[5] = 2 + 44;
    // t2 = 0.1*y[4] + 0.2*y[2] = 3 + 0.6.
    close(&run(Op::MoeFinalizeRouting, &[&y, &w, &idx]).remove(0), &[3, 1], &[5.25, 46., 3.6]);
    let (s1, s2) = (f(&[3, 1], &[1., 2., 3.]), f(&[3, 1], &[10., 20., 30.]));
    close(&run(Op::MoeFinalizeRouting, &[&y, &w, &idx, &s1, &s2]).remove(0), &[3, 1], &[16.25, 68., 36.6]);
}

/// init routing -> grouped gate/up matmul -> SwiGLU -> grouped down matmul
/// -> finalize (shared expert, residual) equals the fused `moe_ffn`.
#[test]
fn routing_chain_equals_the_fused_moe_ffn() {
    let (t, h, e, inter, shared_inter, groups) = (7, 16, 8, 4, 6, 4);
    let x = data(1, &[t, h]);
    let logits = data(2, &[t, e]);
    let router_scale = data(3, &[e]);
    // MoGE routing: top-1 in each of 4 groups of 2 experts.
    let gate = run(Op::MoeGatingGroupTopK { groups }, &[&logits, &router_scale]);
    let (weights, ids) = (&gate[0], &gate[1]);
    let (gate_up, down) = (data(4, &[e, 2 * inter, h]), data(5, &[e, h, inter]));
    let (shared_gate_up, shared_down, residual) =
        (data(6, &[2 * shared_inter, h]), data(7, &[h, shared_inter]), data(8, &[t, h]));

    let init = run(Op::MoeInitRouting { experts: e }, &[&x, ids]);
    let (rows, row_idx, counts) = (&init[0], &init[1], &init[2]);
    assert_eq!(counts.as_i64().iter().sum::<i64>(), (t * groups) as i64);
    let gu = run(Op::GroupedMatmul, &[rows, &gate_up, counts]).remove(0);
    let halves = run(Op::Split { axis: 1, sizes: vec![inter, inter] }, &[&gu]);
    let act = run(Op::SwiGlu, &[&halves[0], &halves[1]]).remove(0);
    let y = run(Op::GroupedMatmul, &[&act, &down, counts]).remove(0);

    let routed = run(Op::MoeFinalizeRouting, &[&y, weights, row_idx]).remove(0);
    let want_routed = run(Op::GroupedMatmulMoe, &[&x, weights, ids, &gate_up, &down]).remove(0);
    let d = routed.max_rel_diff(&want_routed, 1e-3);
    assert!(d < 1e-5, "routed experts differ by {d}");

    let shared_act = run(Op::GateUpSwiGlu, &[&x, &shared_gate_up]).remove(0);
    let shared = run(Op::MatMul { transpose_b: true }, &[&shared_act, &shared_down]).remove(0);
    let got = run(Op::MoeFinalizeRouting, &[&y, weights, row_idx, &shared, &residual]).remove(0);
    let want = run(Op::MoeFfn, &[&x, weights, ids, &gate_up, &down, &shared_gate_up, &shared_down, &residual]);
    let d = got.max_rel_diff(&want[0], 1e-3);
    assert!(d < 1e-5, "moe differs from moe_ffn by {d}");
    // The skips are really added (not a coincidence of near-zero terms).
    let no_skips = run(Op::Binary(BinaryOp::Sub), &[&got, &routed]).remove(0);
    let skips = run(Op::Binary(BinaryOp::Add), &[&shared, &residual]).remove(0);
    assert!(no_skips.max_rel_diff(&skips, 1e-3) < 1e-4);
}

/// `moe_grouped_ffn` is the chain above as one op: equal to the chain
/// built from the named ops, to `moe_ffn`, and it reads only the experts
/// that received rows (an unused expert's NaN weights never reach the
/// output).
#[test]
fn moe_grouped_ffn_is_the_chain_and_equals_moe_ffn() {
    let (t, h, e, inter, shared_inter, groups) = (5, 8, 8, 4, 6, 4);
    let x = data(11, &[t, h]);
    let weights = data(12, &[t, groups]);
    // Rows pick experts 0/1, 2/3, 4/5, 6/7 per group; expert 3 is never
    // picked, expert 6 by every row.
    let ids = i(&[t, groups], &[0, 2, 4, 6, 1, 2, 5, 6, 0, 2, 4, 6, 1, 2, 4, 6, 1, 2, 5, 6]);
    let per_expert = 2 * inter * h;
    let mut gu = data(13, &[e, 2 * inter, h]).as_f32().to_vec();
    gu[3 * per_expert..4 * per_expert].fill(f32::NAN);
    let gate_up = Tensor::f32(vec![e, 2 * inter, h], gu);
    let (down, shared_gate_up, shared_down, residual) =
        (data(14, &[e, h, inter]), data(15, &[2 * shared_inter, h]), data(16, &[h, shared_inter]), data(17, &[t, h]));
    let args = [&x, &weights, &ids, &gate_up, &down, &shared_gate_up, &shared_down, &residual];
    let got = run1(Op::MoeGroupedFfn, &args);
    assert!(got.as_f32().iter().all(|v| v.is_finite()), "an unused expert was read");

    let init = run(Op::MoeInitRouting { experts: e }, &[&x, &ids]);
    let (rows, row_idx, counts) = (&init[0], &init[1], &init[2]);
    assert_eq!(counts.as_i64(), &[2, 3, 5, 0, 3, 2, 5, 0]);
    let halves = run(Op::Split { axis: 1, sizes: vec![inter, inter] }, &[&gate_up]);
    let gate = run1(Op::GroupedMatmul, &[rows, &halves[0], counts]);
    let up = run1(Op::GroupedMatmul, &[rows, &halves[1], counts]);
    let act = run1(Op::SwiGlu, &[&gate, &up]);
    let y = run1(Op::GroupedMatmul, &[&act, &down, counts]);
    let shared_act = run1(Op::GateUpSwiGlu, &[&x, &shared_gate_up]);
    let shared = run1(Op::MatMul { transpose_b: true }, &[&shared_act, &shared_down]);
    let chain = run1(Op::MoeFinalizeRouting, &[&y, &weights, row_idx, &shared, &residual]);
    assert_eq!(got.as_f32(), chain.as_f32(), "the op is exactly its chain");

    let want = run1(Op::MoeFfn, &args);
    let d = got.max_rel_diff(&want, 1e-3);
    assert!(d < 1e-5, "moe_grouped_ffn differs from moe_ffn by {d}");
}

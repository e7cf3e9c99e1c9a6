//! Every op of the reference interpreter against values computed by hand.
//! The expected numbers are written out literally, with the arithmetic in
//! comments, so a wrong kernel cannot also produce the expectation.

mod common;
use common::*;
use panguc_ir::interp::eval_pure;
use panguc_ir::op::{BinaryOp, ReduceOp, RopeKind, UnaryOp};
use panguc_ir::{DType, Op};

#[test]
fn gather_rows() {
    let table = f(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
    let out = run1(Op::Gather, &[&table, &i(&[2, 2], &[2, 0, 1, 1])]);
    close(&out, &[2, 2, 2], &[5., 6., 1., 2., 3., 4., 3., 4.]);
    assert!(eval_pure(&Op::Gather, &[&table, &i(&[1], &[3])]).is_err(), "index 3 of 3 rows");
}

#[test]
fn matmul_plain_transposed_and_batched() {
    // [[1,2],[3,4]] x [[5,6],[7,8]] = [[19,22],[43,50]]
    let a = f(&[2, 2], &[1., 2., 3., 4.]);
    let b = f(&[2, 2], &[5., 6., 7., 8.]);
    close(&run1(Op::MatMul { transpose_b: false }, &[&a, &b]), &[2, 2], &[19., 22., 43., 50.]);
    // a x b^T = [[1*5+2*6, 1*7+2*8], [3*5+4*6, 3*7+4*8]] = [[17,23],[39,53]]
    close(&run1(Op::MatMul { transpose_b: true }, &[&a, &b]), &[2, 2], &[17., 23., 39., 53.]);
    // Batch broadcast: [2 experts, 1x2] weights against a shared [1,2] input.
    let x = f(&[1, 2], &[1., 1.]);
    let w = f(&[2, 1, 2], &[2., 3., -1., 4.]);
    // expert 0: 1*2+1*3 = 5; expert 1: -1+4 = 3
    close(&run1(Op::MatMul { transpose_b: true }, &[&x, &w]), &[2, 1, 1], &[5., 3.]);
}

#[test]
fn unary_ops() {
    let x = f(&[3], &[0., 1., 4.]);
    close(&run1(Op::Unary(UnaryOp::Neg), &[&x]), &[3], &[0., -1., -4.]);
    close(&run1(Op::Unary(UnaryOp::Exp), &[&x]), &[3], &[1., std::f32::consts::E, 54.59815]);
    close(&run1(Op::Unary(UnaryOp::Sqrt), &[&x]), &[3], &[0., 1., 2.]);
    let y = f(&[2], &[4., 0.25]);
    close(&run1(Op::Unary(UnaryOp::Rsqrt), &[&y]), &[2], &[0.5, 2.]);
    close(&run1(Op::Unary(UnaryOp::Reciprocal), &[&y]), &[2], &[0.25, 4.]);
    // sigmoid(0) = 0.5; sigmoid(ln 3) = 3/4
    let s = f(&[2], &[0., 3f32.ln()]);
    close(&run1(Op::Unary(UnaryOp::Sigmoid), &[&s]), &[2], &[0.5, 0.75]);
}

#[test]
fn binary_ops_broadcast() {
    let a = f(&[2, 2], &[1., 2., 3., 4.]);
    let row = f(&[2], &[10., 20.]);
    let col = f(&[2, 1], &[2., 4.]);
    close(&run1(Op::Binary(BinaryOp::Add), &[&a, &row]), &[2, 2], &[11., 22., 13., 24.]);
    close(&run1(Op::Binary(BinaryOp::Sub), &[&a, &col]), &[2, 2], &[-1., 0., -1., 0.]);
    close(&run1(Op::Binary(BinaryOp::Mul), &[&a, &col]), &[2, 2], &[2., 4., 12., 16.]);
    close(&run1(Op::Binary(BinaryOp::Div), &[&a, &col]), &[2, 2], &[0.5, 1., 0.75, 1.]);
    close(&run1(Op::Binary(BinaryOp::Max), &[&a, &f(&[], &[2.5])]), &[2, 2], &[2.5, 2.5, 3., 4.]);
    // Integer add with broadcast, as used for group offsets.
    let out = run1(Op::Binary(BinaryOp::Add), &[&i(&[2, 2], &[0, 1, 2, 3]), &i(&[2], &[0, 8])]);
    assert_eq!(out.as_i64(), &[0, 9, 2, 11]);
    assert!(eval_pure(&Op::Binary(BinaryOp::Add), &[&a, &f(&[3], &[1., 2., 3.])]).is_err());
}

#[test]
fn reductions_and_argmax() {
    let x = f(&[2, 3], &[1., 5., 3., 4., 2., 4.]);
    let sum = Op::Reduce { op: ReduceOp::Sum, axis: 1, keepdim: false };
    close(&run1(sum, &[&x]), &[2], &[9., 10.]);
    let mean = Op::Reduce { op: ReduceOp::Mean, axis: 0, keepdim: true };
    close(&run1(mean, &[&x]), &[1, 3], &[2.5, 3.5, 3.5]);
    let max = Op::Reduce { op: ReduceOp::Max, axis: 1, keepdim: true };
    close(&run1(max, &[&x]), &[2, 1], &[5., 4.]);
    // Row 1 has a tie between index 0 and 2: the lowest index wins.
    assert_eq!(run1(Op::ArgMax { axis: 1, keepdim: false }, &[&x]).as_i64(), &[1, 0]);
}

#[test]
fn softmax_including_masked_entries() {
    // softmax([0, ln 3]) = [1/4, 3/4]; -inf gets probability 0.
    let x = f(&[2, 2], &[0., 3f32.ln(), 1., f32::NEG_INFINITY]);
    close(&run1(Op::Softmax { axis: 1 }, &[&x]), &[2, 2], &[0.25, 0.75, 1., 0.]);
}

#[test]
fn layout_ops() {
    let x = f(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    close(&run1(Op::Transpose { perm: vec![1, 0] }, &[&x]), &[3, 2], &[1., 4., 2., 5., 3., 6.]);
    close(&run1(Op::Slice { axis: 1, start: 1, end: 3 }, &[&x]), &[2, 2], &[2., 3., 5., 6.]);
    let y = f(&[2, 1], &[7., 8.]);
    close(&run1(Op::Concat { axis: 1 }, &[&x, &y]), &[2, 4], &[1., 2., 3., 7., 4., 5., 6., 8.]);
    let a = f(&[2], &[1., 2.]);
    let b = f(&[2], &[3., 4.]);
    close(&run1(Op::Stack { axis: 0 }, &[&a, &b]), &[2, 2], &[1., 2., 3., 4.]);
    close(&run1(Op::Stack { axis: 1 }, &[&a, &b]), &[2, 2], &[1., 3., 2., 4.]);
    // KV head h serves query heads 2h and 2h+1.
    let kv = f(&[1, 2, 2], &[1., 2., 3., 4.]);
    close(&run1(Op::RepeatInterleave { axis: 1, repeats: 2 }, &[&kv]), &[1, 4, 2], &[1., 2., 1., 2., 3., 4., 3., 4.]);
    let parts = run(Op::Split { axis: 1, sizes: vec![1, 2] }, &[&x]);
    close(&parts[0], &[2, 1], &[1., 4.]);
    close(&parts[1], &[2, 2], &[2., 3., 5., 6.]);
}

#[test]
fn casts_round_to_the_target_precision() {
    // 1 + 2^-10 is exact in f16 but rounds to 1 in bf16 (7 mantissa bits).
    let x = f(&[2], &[1.0 + 1.0 / 1024.0, 3.7]);
    let bf = run1(Op::Cast { dtype: DType::BF16 }, &[&x]);
    assert_eq!(bf.as_f32()[0], 1.0);
    let h = run1(Op::Cast { dtype: DType::F16 }, &[&x]);
    assert_eq!(h.as_f32()[0], 1.0 + 1.0 / 1024.0);
    assert_eq!(run1(Op::Cast { dtype: DType::I64 }, &[&x]).as_i64(), &[1, 3]);
}

#[test]
fn rope_table_neox_layout() {
    // head_dim 4, theta 100: inv_freq = [1, 100^-0.5 = 0.1]; position 2 gives
    // angles [2, 0.2], repeated: cos = [cos 2, cos .2, cos 2, cos .2].
    let pos = i(&[2], &[0, 2]);
    let cos = run1(Op::RopeTable { kind: RopeKind::Cos, theta: 100.0, head_dim: 4 }, &[&pos]);
    let (c2, c02) = (2f32.cos(), 0.2f32.cos());
    close(&cos, &[2, 4], &[1., 1., 1., 1., c2, c02, c2, c02]);
    let sin = run1(Op::RopeTable { kind: RopeKind::Sin, theta: 100.0, head_dim: 4 }, &[&pos]);
    let (s2, s02) = (2f32.sin(), 0.2f32.sin());
    close(&sin, &[2, 4], &[0., 0., 0., 0., s2, s02, s2, s02]);
}

#[test]
fn causal_mask_uses_absolute_positions() {
    // Two new tokens at positions 1 and 2 over a context of 3 keys.
    let m = run1(Op::CausalMask, &[&i(&[2], &[1, 2]), &f(&[3, 1], &[0., 0., 0.])]);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(m.as_f32(), &[0., 0., ninf, 0., 0., 0.]);
}

#[test]
fn iota_and_one_hot() {
    assert_eq!(run1(Op::Iota { len: 3, step: 8 }, &[]).as_i64(), &[0, 8, 16]);
    let oh = run1(Op::OneHot { depth: 3 }, &[&i(&[2], &[2, 0])]);
    close(&oh, &[2, 3], &[0., 0., 1., 1., 0., 0.]);
    assert!(eval_pure(&Op::OneHot { depth: 3 }, &[&i(&[1], &[3])]).is_err());
}

#[test]
fn rms_norm_and_add_rms_norm() {
    // x = [3, 4]: mean(x^2) = 12.5, eps 0 -> x / sqrt(12.5) * w.
    let x = f(&[1, 2], &[3., 4.]);
    let w = f(&[2], &[1., 2.]);
    let r = 12.5f32.sqrt();
    close(&run1(Op::RmsNorm { eps: 0.0 }, &[&x, &w]), &[1, 2], &[3. / r, 8. / r]);
    // [1, 2] + [2, 2] = [3, 4]: same normalised value, and the sum.
    let outs = run(Op::AddRmsNorm { eps: 0.0 }, &[&f(&[1, 2], &[1., 2.]), &f(&[1, 2], &[2., 2.]), &w]);
    close(&outs[0], &[1, 2], &[3., 4.]);
    close(&outs[1], &[1, 2], &[3. / r, 8. / r]);
}

#[test]
fn matmul_bias_and_swiglu() {
    let a = f(&[1, 2], &[1., 2.]);
    let w = f(&[2, 2], &[1., 0., 0., 1.]);
    let b = f(&[2], &[0.5, -0.5]);
    close(&run1(Op::MatMulBias { transpose_b: true }, &[&a, &w, &b]), &[1, 2], &[1.5, 1.5]);
    // silu(ln 3) = ln3 * 3/4; times up = 2.
    let g = f(&[1], &[3f32.ln()]);
    let u = f(&[1], &[2.]);
    close(&run1(Op::SwiGlu, &[&g, &u]), &[1], &[3f32.ln() * 0.75 * 2.]);
    // gate_up: rows [gate; up] = [[1,0],[0,1]] on x = [ln3, 2] -> silu(ln3) * 2.
    let x = f(&[1, 2], &[3f32.ln(), 2.]);
    close(&run1(Op::GateUpSwiGlu, &[&x, &w]), &[1, 1], &[3f32.ln() * 0.75 * 2.]);
}

#[test]
fn rope_rotates_half() {
    // x = [1, 2, 3, 4] (one token, one head), cos = c, sin = s elementwise:
    // rotate_half(x) = [-3, -4, 1, 2]; out = x*cos + rot*sin.
    let x = f(&[1, 1, 4], &[1., 2., 3., 4.]);
    let cos = f(&[1, 4], &[0.5, 1., 0.5, 1.]);
    let sin = f(&[1, 4], &[2., 0., 2., 0.]);
    close(&run1(Op::Rope, &[&x, &cos, &sin]), &[1, 1, 4], &[0.5 - 6., 2., 1.5 + 2., 4.]);
}

#[test]
fn attention_is_causal_and_grouped() {
    // Two query heads share one KV head; head_dim 1, scale 1.
    // Keys [0, ln 3], values [10, 20].
    let q = f(&[2, 2, 1], &[1., 1., 1., 0.]);
    let k = f(&[2, 1, 1], &[0., 3f32.ln()]);
    let v = f(&[2, 1, 1], &[10., 20.]);
    let pos = i(&[2], &[0, 1]);
    let out = run1(Op::FlashAttention { scale: 1.0 }, &[&q, &k, &v, &pos]);
    // Token 0 sees only key 0 -> 10 for both heads.
    // Token 1, head 0: scores [0, ln3] -> probs [1/4, 3/4] -> 17.5.
    // Token 1, head 1: q = 0 -> uniform -> 15.
    close(&out, &[2, 2, 1], &[10., 10., 17.5, 15.]);
}

#[test]
fn moe_gating_picks_one_expert_per_group_without_renormalising() {
    // 4 experts in 2 groups. Logits [0, ln2, ln3, ln3] -> exp = [1, 2, 3, 3],
    // probs = [1, 2, 3, 3] / 9. Group 0 -> expert 1 (2/9); group 1 tie ->
    // expert 2 (lowest index, 3/9). Scales [1, 0.5, 2, 4].
    let logits = f(&[1, 4], &[0., 2f32.ln(), 3f32.ln(), 3f32.ln()]);
    let scale = f(&[4], &[1., 0.5, 2., 4.]);
    let outs = run(Op::MoeGatingGroupTopK { groups: 2 }, &[&logits, &scale]);
    close(&outs[0], &[1, 2], &[2. / 9. * 0.5, 3. / 9. * 2.]);
    assert_eq!(outs[1].as_i64(), &[1, 2]);
}

#[test]
fn grouped_matmul_moe_computes_selected_experts() {
    // H = 1, I = 1, 2 experts. Expert e: gate_up rows [g_e; u_e], down d_e.
    // x = 2; expert 1: gate = 2*ln3/2 = ln3, up = 2*1 = 2, silu(ln3) = 0.75 ln3,
    // act = 1.5 ln3, down = 2 -> 3 ln3; weight 0.5 -> 1.5 ln3.
    let x = f(&[1, 1], &[2.]);
    let w = f(&[1, 1], &[0.5]);
    let ids = i(&[1, 1], &[1]);
    let gate_up = f(&[2, 2, 1], &[100., 100., 3f32.ln() / 2., 1.]);
    let down = f(&[2, 1, 1], &[100., 2.]);
    let out = run1(Op::GroupedMatmulMoe, &[&x, &w, &ids, &gate_up, &down]);
    close(&out, &[1, 1], &[1.5 * 3f32.ln()]);
}

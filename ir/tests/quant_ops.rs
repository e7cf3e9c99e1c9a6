//! The int8 quantization ops against hand-computed values (arithmetic in
//! the comments), and the W8A8_DYNAMIC linear against a plain-loop
//! implementation of docs/quantization.md's formulas.

mod common;
use common::*;
use panguc_ir::interp::eval_pure;
use panguc_ir::interp::quant::decode_deq_scale;
use panguc_ir::{DType, Dim, Function, Op, Tensor, TensorType};

fn ints(t: &Tensor) -> &[i64] {
    t.as_i64()
}

#[test]
fn quantize_rounds_half_to_even() {
    let x = f(&[8], &[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 2.4999]);
    let one = f(&[1], &[1.0]);
    let zero = f(&[1], &[0.0]);
    let q = run1(Op::Quantize, &[&x, &one, &zero]);
    assert_eq!(q.shape, vec![8]);
    // Ties go to the even neighbour (torch.round): 0.5->0, 1.5->2, 2.5->2, ...
    assert_eq!(ints(&q), &[0, 2, 2, 0, -2, -2, 4, 2]);
}

#[test]
fn quantize_clamps_at_127_and_minus_128() {
    let x = f(&[7], &[200.0, -200.0, 127.4, 127.5, 126.5, -128.5, -128.6]);
    let (one, zero) = (f(&[1], &[1.0]), f(&[1], &[0.0]));
    let q = run1(Op::Quantize, &[&x, &one, &zero]);
    // 127.5 rounds to 128 (even) and clamps to 127; 126.5 -> 126; -128.5 -> -128 (even);
    // -128.6 -> -129 -> clamps to -128.
    assert_eq!(ints(&q), &[127, -128, 127, 127, 126, -128, -128]);
}

#[test]
fn quantize_with_scale_offset_and_per_channel_broadcast() {
    // x / 0.5 + 3: 1 -> 5, -1 -> 1, 0.3 -> 3.6 -> 4
    let x = f(&[3], &[1.0, -1.0, 0.3]);
    let q = run1(Op::Quantize, &[&x, &f(&[1], &[0.5]), &f(&[1], &[3.0])]);
    assert_eq!(ints(&q), &[5, 1, 4]);
    // Per channel: scale [0.5, 2], offset [0, 1] over rows [1, 2] and [3, 4]:
    // [1/0.5+0, 2/2+1] = [2, 2]; [3/0.5+0, 4/2+1] = [6, 3]
    let x = f(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let q = run1(Op::Quantize, &[&x, &f(&[2], &[0.5, 2.0]), &f(&[2], &[0.0, 1.0])]);
    assert_eq!(q.shape, vec![2, 2]);
    assert_eq!(ints(&q), &[2, 2, 6, 3]);
    // Per expert: one activation row [2, -2] against scales [[[1]], [[2]]] -> [[2, -2]], [[1, -1]].
    let q = run1(Op::Quantize, &[&f(&[1, 2], &[2.0, -2.0]), &f(&[2, 1, 1], &[1.0, 2.0]), &f(&[1], &[0.0])]);
    assert_eq!(q.shape, vec![2, 1, 2]);
    assert_eq!(ints(&q), &[2, -2, 1, -1]);
}

#[test]
fn dequantize_subtracts_offset_then_scales() {
    // (q - 2) * 0.5: -128 -> -65, 0 -> -1, 127 -> 62.5
    let q = i(&[3], &[-128, 0, 127]);
    let y = run1(Op::Dequantize, &[&q, &f(&[1], &[0.5]), &f(&[1], &[2.0])]);
    close(&y, &[3], &[-65.0, -1.0, 62.5]);
}

#[test]
fn dynamic_quant_per_token() {
    // Row 0: max|x| = 127 -> s = 1; q = round(x) = [127, -2 (tie -2.5), 4 (tie 3.5), 0 (tie 0.5)].
    // Row 1: max|x| = 254 -> s = 2; q = [-127, 0 (0.5), 2 (1.5), 0].
    // Row 2: all zero -> s = 0, q = 0 (no division by zero).
    let x = f(&[3, 4], &[127.0, -2.5, 3.5, 0.5, -254.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let out = run(Op::DynamicQuant, &[&x]);
    assert_eq!(out[0].shape, vec![3, 4]);
    assert_eq!(ints(&out[0]), &[127, -2, 4, 0, -127, 0, 2, 0, 0, 0, 0, 0]);
    close(&out[1], &[3], &[1.0, 2.0, 0.0]);
}

#[test]
fn int64_deq_scale_decodes_low_32_bits() {
    // 0.5f32 = 0x3F00_0000, 0.25f32 = 0x3E80_0000.
    assert_eq!(decode_deq_scale(0x3F00_0000), 0.5);
    assert_eq!(decode_deq_scale(0x3E80_0000), 0.25);
    // -0.5f32 = 0xBF00_0000; written through an int32 it is sign-extended,
    // and the high word must not matter.
    assert_eq!(decode_deq_scale(0xBF00_0000u32 as i32 as i64), -0.5);
    assert_eq!(decode_deq_scale(0x3F00_0000 | (7 << 32)), 0.5);
}

#[test]
fn static_quant_matmul_with_bias_and_both_deq_encodings() {
    // xq = [2, -3]; w rows [1, 2], [-4, 5]: acc = [2-6, -8-15] = [-4, -23]
    // + quant_bias [10, -1] = [6, -24]; * deq_scale [0.5, 0.25] = [3, -6]
    let xq = i(&[1, 2], &[2, -3]);
    let w = i(&[2, 2], &[1, 2, -4, 5]);
    let bias = i(&[2], &[10, -1]);
    let y = run1(Op::QuantMatMul, &[&xq, &w, &bias, &f(&[2], &[0.5, 0.25])]);
    close(&y, &[1, 2], &[3.0, -6.0]);
    let encoded = i(&[2], &[0x3F00_0000, 0x3E80_0000]);
    let y = run1(Op::QuantMatMul, &[&xq, &w, &bias, &encoded]);
    close(&y, &[1, 2], &[3.0, -6.0]);
    // Per-expert weights (batched): expert 1 has w rows [1, 1], [0, -1], bias [0, 3],
    // deq [1, 2]: acc [-1, 3] + [0, 3] = [-1, 6] -> [-1, 12].
    let w2 = i(&[2, 2, 2], &[1, 2, -4, 5, 1, 1, 0, -1]);
    let bias2 = i(&[2, 2], &[10, -1, 0, 3]);
    let y = run1(Op::QuantMatMul, &[&xq, &w2, &bias2, &f(&[2, 2], &[0.5, 0.25, 1.0, 2.0])]);
    close(&y, &[2, 1, 2], &[3.0, -6.0, -1.0, 12.0]);
}

#[test]
fn int8_matmul_rejects_int32_overflow_and_out_of_range_weights() {
    // 131072 products of (-128)(-128) = 2^14 sum to 2^31, one past i32::MAX.
    let kdim = 131_072;
    let xq = Tensor::i64(vec![1, kdim], vec![-128; kdim]);
    let w = Tensor::i64(vec![1, kdim], vec![-128; kdim]);
    let e = eval_pure(&Op::QuantMatMul, &[&xq, &w, &i(&[1], &[0]), &f(&[1], &[1.0])]).unwrap_err();
    assert!(e.contains("int32"), "{e}");
    // One element fewer fits: 2^31 - 2^14.
    let (xq, w) = (i(&[1, kdim - 1], &vec![-128; kdim - 1]), i(&[1, kdim - 1], &vec![-128; kdim - 1]));
    let y = run1(Op::QuantMatMul, &[&xq, &w, &i(&[1], &[0]), &f(&[1], &[1.0])]);
    assert_eq!(y.as_f32()[0], 2_147_467_264.0);
    let bad = i(&[1, 2], &[1, 200]);
    let e = eval_pure(&Op::QuantMatMul, &[&i(&[1, 2], &[1, 1]), &bad, &i(&[1], &[0]), &f(&[1], &[1.0])]);
    assert!(e.unwrap_err().contains("200"));
}

#[test]
fn per_token_quant_matmul_shared_and_batched() {
    // acc = [[1*5+2*6, 1*7+2*8], [3*5-4*6, 3*7-4*8]] = [[17, 23], [-9, -11]]
    // y[m, n] = acc * w_scale[n] * x_scale[m] with w_scale [0.5, 2], x_scale [0.1, 1]
    let xq = i(&[2, 2], &[1, 2, 3, -4]);
    let w = i(&[2, 2], &[5, 6, 7, 8]);
    let y = run1(Op::QuantMatMulPerToken, &[&xq, &w, &f(&[2], &[0.5, 2.0]), &f(&[2], &[0.1, 1.0])]);
    close(&y, &[2, 2], &[0.85, 4.6, -4.5, -22.0]);
    // Two experts' weights against one shared activation row [1, 2]:
    // expert 0 rows [1, 1], [0, 1] -> acc [3, 2], scales [1, 2] -> [3, 4]
    // expert 1 rows [-1, 0], [2, 2] -> acc [-1, 6], scales [3, 0.5] -> [-3, 3]; x_scale 2 doubles all.
    let xq = i(&[1, 2], &[1, 2]);
    let w = i(&[2, 2, 2], &[1, 1, 0, 1, -1, 0, 2, 2]);
    let ws = f(&[2, 2], &[1.0, 2.0, 3.0, 0.5]);
    let y = run1(Op::QuantMatMulPerToken, &[&xq, &w, &ws, &f(&[1], &[2.0])]);
    close(&y, &[2, 1, 2], &[6.0, 8.0, -6.0, 6.0]);
}

#[test]
fn grouped_quant_matmul_follows_counts() {
    // 3 rows; expert 0 takes row 0, expert 1 none, expert 2 rows 1 and 2.
    // w[0] = [[1, 0]], w[2] = [[1, 1]]; w_scale [0.5], [2]; x_scale [1, 0.5, 0.25]
    // row 0: (2*1 + 3*0) * 0.5 * 1 = 1; row 1: (1 + 1) * 2 * 0.5 = 2; row 2: (-4 + 0) * 2 * 0.25 = -2
    let xq = i(&[3, 2], &[2, 3, 1, 1, -4, 0]);
    let w = i(&[3, 1, 2], &[1, 0, 99, 99, 1, 1]);
    let ws = f(&[3, 1], &[0.5, 100.0, 2.0]);
    let xs = f(&[3], &[1.0, 0.5, 0.25]);
    let y = run1(Op::GroupedQuantMatMul, &[&xq, &w, &ws, &xs, &i(&[3], &[1, 0, 2])]);
    close(&y, &[3, 1], &[1.0, 2.0, -2.0]);
    assert!(eval_pure(&Op::GroupedQuantMatMul, &[&xq, &w, &ws, &xs, &i(&[3], &[1, 1, 2])]).is_err());
}

#[test]
fn int8_kv_cache_write_then_read() {
    // Per-channel scale [0.5, 0.25], offset [0, 0]: k row [1, -1] -> q [2, -4] -> read back [1, -1];
    // row [0.3, 10] -> [0.6 -> 1, 40] -> [0.5, 10].
    let (scale, offset) = (f(&[1, 2], &[0.5, 0.25]), f(&[1, 2], &[0.0, 0.0]));
    let new = f(&[2, 1, 2], &[1.0, -1.0, 0.3, 10.0]);
    let q = run1(Op::Quantize, &[&new, &scale, &offset]);
    assert_eq!(ints(&q), &[2, -4, 1, 40]);
    // Paged cache of 2 blocks x 1 slot, 1 kv head, head_dim 2; the rows go to slots 1 and 0.
    let cache = i(&[2, 1, 1, 2], &[0, 0, 0, 0]);
    let written = run1(Op::KvCacheWrite, &[&cache, &q, &i(&[2], &[1, 0])]);
    assert_eq!(ints(&written), &[1, 40, 2, -4]);
    let read = run1(Op::Dequantize, &[&written, &scale, &offset]);
    close(&read, &[2, 1, 1, 2], &[0.5, 10.0, 1.0, -1.0]);
}

/// docs/quantization.md's W8A8_DYNAMIC linear in plain loops: per token row
/// `s_t = max_k |x[t,k]| / 127`, `xq = round(x / s_t)`,
/// `y[t,n] = (sum_k xq[t,k] * w[n,k]) * weight_scale[n] * s_t`.
fn w8a8_dynamic_linear_loops(x: &[f32], t: usize, k: usize, w: &[i8], w_scale: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; t * n];
    for ti in 0..t {
        let row = &x[ti * k..(ti + 1) * k];
        let mut amax = 0.0f32;
        for v in row {
            amax = amax.max(v.abs());
        }
        let s = amax / 127.0;
        let mut xq = vec![0i32; k];
        for kk in 0..k {
            xq[kk] = if s == 0.0 { 0 } else { (row[kk] / s).round_ties_even().clamp(-128.0, 127.0) as i32 };
        }
        for ni in 0..n {
            let mut acc = 0i32;
            for kk in 0..k {
                acc += xq[kk] * w[ni * k + kk] as i32;
            }
            y[ti * n + ni] = acc as f32 * w_scale[ni] * s;
        }
    }
    y
}

#[test]
fn w8a8_dynamic_linear_matches_plain_loops_and_float_within_quant_error() {
    let (t, k, n) = (5, 48, 7);
    let mut x = data(3, &[t, k]).into_f32();
    x[7] = 9.0; // an outlier widens row 0's scale
    x[k..2 * k].iter_mut().for_each(|v| *v = 0.0); // a zero row
    let wf = data(4, &[n, k]).into_f32();
    // Per-channel symmetric weight quantization as msModelSlim writes it.
    let mut w = vec![0i8; n * k];
    let mut w_scale = vec![0.0f32; n];
    for ni in 0..n {
        let amax = wf[ni * k..(ni + 1) * k].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        w_scale[ni] = amax / 127.0;
        for kk in 0..k {
            w[ni * k + kk] = (wf[ni * k + kk] / w_scale[ni]).round_ties_even() as i8;
        }
    }
    let want = w8a8_dynamic_linear_loops(&x, t, k, &w, &w_scale, n);

    let xt = f(&[t, k], &x);
    let q = run(Op::DynamicQuant, &[&xt]);
    let wt = Tensor::i64(vec![n, k], w.iter().map(|&v| v as i64).collect());
    let got = run1(Op::QuantMatMulPerToken, &[&q[0], &wt, &f(&[n], &w_scale), &q[1]]);
    assert_eq!(got.shape, vec![t, n]);
    // Same formula, same f32 operation order: bit-identical.
    assert_eq!(got.as_f32(), want.as_slice());

    // And close to the float linear with the dequantized weight: per element
    // the activation rounding error is at most s_t/2 per input.
    for ti in 0..t {
        let row = &x[ti * k..(ti + 1) * k];
        let s = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        for ni in 0..n {
            let wd: Vec<f32> = (0..k).map(|kk| w[ni * k + kk] as f32 * w_scale[ni]).collect();
            let exact: f32 = row.iter().zip(&wd).map(|(a, b)| a * b).sum();
            let bound = 0.5 * s * wd.iter().map(|v| v.abs()).sum::<f32>() + 1e-4;
            let err = (got.as_f32()[ti * n + ni] - exact).abs();
            assert!(err <= bound, "row {ti} col {ni}: error {err} > bound {bound}");
        }
    }
}

#[test]
fn type_rules_reject_wrong_dtypes_and_shapes() {
    let ty = |d: DType, s: &[usize]| TensorType::new(d, s.iter().map(|&n| Dim::c(n)).collect());
    let mut fun = Function::new("q");
    let x = fun.add_input("x", ty(DType::F32, &[3, 4]));
    let wf = fun.add_weight("wf", "wf", ty(DType::BF16, &[2, 4]));
    let w = fun.add_weight("w", "w", ty(DType::I8, &[2, 4]));
    let bias_f = fun.add_weight("bias_f", "bias_f", ty(DType::F32, &[2]));
    let bias = fun.add_weight("bias", "bias", ty(DType::I32, &[2]));
    let deq = fun.add_weight("deq", "deq", ty(DType::I64, &[2]));
    let s1 = fun.add_weight("s1", "s1", ty(DType::F32, &[1]));
    let xq = fun.op(Op::Quantize, &[x, s1, s1], "xq").unwrap();
    assert_eq!(fun.ty(xq), &ty(DType::I8, &[3, 4]));
    let y = fun.op(Op::QuantMatMul, &[xq, w, bias, deq], "y").unwrap();
    assert_eq!(fun.ty(y), &ty(DType::F32, &[3, 2]));
    let e = fun.op(Op::QuantMatMul, &[xq, wf, bias, deq], "bad_w").unwrap_err();
    assert!(e.contains("i8"), "{e}");
    let e = fun.op(Op::QuantMatMul, &[xq, w, bias_f, deq], "bad_bias").unwrap_err();
    assert!(e.contains("quant_bias"), "{e}");
    let e = fun.op(Op::QuantMatMul, &[x, w, bias, deq], "bad_x").unwrap_err();
    assert!(e.contains("quantized activation"), "{e}");
    let dq = fun.push_node(None, Op::DynamicQuant, &[x], &["dq", "dq_scale"]).unwrap();
    assert_eq!(fun.ty(dq[1]), &ty(DType::F32, &[3]));
    let ws = fun.add_weight("ws", "ws", ty(DType::F32, &[2]));
    let y = fun.op(Op::QuantMatMulPerToken, &[dq[0], w, ws, dq[1]], "yd").unwrap();
    assert_eq!(fun.ty(y), &ty(DType::F32, &[3, 2]));
    let e = fun.op(Op::QuantMatMulPerToken, &[dq[0], w, dq[1], ws], "swapped").unwrap_err();
    assert!(e.contains("weight_scale"), "{e}");
}

#[test]
fn grouped_quant_matmul_equals_per_expert_quant_matmul() {
    // Random int8 rows and weights; expert blocks of 2, 0, 3 and 1 rows.
    let (rows, k, n, experts) = (6, 5, 3, 4);
    let to_i8 =
        |t: Tensor| Tensor::i64(t.shape.clone(), t.as_f32().iter().map(|v| (v * 127.0).round() as i64).collect());
    let xq = to_i8(data(31, &[rows, k]));
    let w = to_i8(data(32, &[experts, n, k]));
    let ws = data(33, &[experts, n]);
    let xs = data(34, &[rows]);
    let counts = [2usize, 0, 3, 1];
    let got = run1(Op::GroupedQuantMatMul, &[&xq, &w, &ws, &xs, &i(&[experts], &counts.map(|c| c as i64))]);
    let mut start = 0;
    for (e, &c) in counts.iter().enumerate() {
        let block = |t: &Tensor, width: usize| {
            Tensor::i64(vec![c, width], t.as_i64()[start * width..(start + c) * width].to_vec())
        };
        let we = Tensor::i64(vec![n, k], w.as_i64()[e * n * k..(e + 1) * n * k].to_vec());
        let wse = f(&[n], &ws.as_f32()[e * n..(e + 1) * n]);
        let xse = f(&[c], &xs.as_f32()[start..start + c]);
        let want = run1(Op::QuantMatMulPerToken, &[&block(&xq, k), &we, &wse, &xse]);
        assert_eq!(&got.as_f32()[start * n..(start + c) * n], want.as_f32(), "expert {e}");
        start += c;
    }
}

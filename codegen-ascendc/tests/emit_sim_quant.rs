//! The int8 kernels (`emit::quant`) on both targets under the AscendC
//! simulation, against the interpreter's quantization ops
//! (`panguc_ir::interp::quant`). Integer results must be bit-exact; float
//! results too, because the kernels do the reference's f32 operations in
//! the reference's order (an f16/bf16 output is the reference rounded to
//! that dtype, also compared exactly).

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{device_layout, env, targets};
use panguc_codegen_ascendc::data::{
    decode, decode_i32, decode_i8, encode, encode_i32, encode_i64, encode_i8, round_through, run_kernels, run_sim,
};
use panguc_codegen_ascendc::emit::quant::{
    dequantize, dynamic_quant, grouped_quant_matmul, quant_matmul, quantize, rms_norm_dynamic_quant, Dequant,
    Granularity, GroupedQuantMatMulSpec, NormQuant, QuantMatMulSpec,
};
use panguc_codegen_ascendc::emit::{EmitOptions, TExpr};
use panguc_codegen_ascendc::sim::SimArg;
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_ir::interp;
use panguc_ir::interp::quant as q;
use panguc_ir::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F: DevType = DevType::F32;

fn opts(target: Target, act: DevType) -> EmitOptions {
    EmitOptions::new(target, act).unwrap()
}

fn rand_i8(rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(-128i64..=127)).collect()
}

fn rand_f(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0), "{what}: element {i}: got {g}, want {w}");
    }
}

/// (M, N, K): one row, odd rows, several M tiles (baseM 128), several K
/// steps (baseK 256 for int8), several N tiles (baseN 128).
const SHAPES: [(u64, u64, u64); 4] = [(1, 32, 64), (7, 48, 96), (33, 144, 320), (130, 272, 544)];

#[test]
fn int8_cube_accumulates_exactly_in_int32() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // The weight row-major (Nd2Nz per K step) or pre-tiled (one copy).
    for ((target, act), nz) in targets().into_iter().flat_map(|t| [(t, false), (t, true)]) {
        let o = EmitOptions { nz_args: u64::from(nz) << 1, ..opts(target, act) };
        for (m, n, k) in SHAPES.into_iter().chain([(17, 16, 4096)]) {
            let spec = QuantMatMulSpec {
                name: "panguc_k001_quant_matmul".into(),
                m: TExpr::Tokens,
                n,
                k,
                dequant: Dequant::PerToken,
                out: F,
            };
            let dks = quant_matmul(&spec, &o).unwrap();
            let (mu, nu, ku) = (m as usize, n as usize, k as usize);
            // The last shape: every product is (-128)^2 = 16384, K = 4096
            // sums to 2^26, beyond f32's exact integers: only a true int32
            // accumulation gets it right.
            let (a, w) = if k == 4096 {
                (vec![-128; mu * ku], vec![-128; nu * ku])
            } else {
                (rand_i8(&mut rng, mu * ku), rand_i8(&mut rng, nu * ku))
            };
            let w_dev = device_layout(&dks, 1, &[nu, ku], 1, encode_i8(&w), nz);
            let args = vec![SimArg::Input(encode_i8(&a)), SimArg::Input(w_dev), SimArg::Output(mu * nu * 4)];
            let out = run_sim(&dks.kernels[0], target, &env(m, 0), args).unwrap();
            let got = decode_i32(&out[0]);
            for i in 0..mu {
                for j in 0..nu {
                    let want: i64 = (0..ku).map(|kk| a[i * ku + kk] * w[j * ku + kk]).sum();
                    assert_eq!(got[i * nu + j], want, "{target} nz={nz} M={m} N={n} K={k}: acc[{i}, {j}]");
                }
            }
        }
    }
}

/// Runs a quant matmul's device kernels: `xq, w, a, b` as device bytes.
fn run_qmm(
    dks: &panguc_codegen_ascendc::DeviceKernels,
    target: Target,
    m: u64,
    ins: Vec<Vec<u8>>,
    out: usize,
) -> Vec<u8> {
    let mut args = ins;
    args.push(vec![0; out]);
    run_kernels(dks, target, &env(m, 0), &mut args).unwrap();
    args.pop().unwrap()
}

#[test]
fn static_w8a8_matmul_matches_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (target, act) in targets() {
        let o = opts(target, act);
        for deq_t in [F, DevType::I64] {
            for out_t in [F, act] {
                for (m, n, k) in SHAPES {
                    let spec = QuantMatMulSpec {
                        name: "panguc_k002_quant_matmul".into(),
                        m: TExpr::Tokens,
                        n,
                        k,
                        dequant: Dequant::Static { deq: deq_t },
                        out: out_t,
                    };
                    let dks = quant_matmul(&spec, &o).unwrap();
                    let (mu, nu, ku) = (m as usize, n as usize, k as usize);
                    let (a, w) = (rand_i8(&mut rng, mu * ku), rand_i8(&mut rng, nu * ku));
                    let bias: Vec<i64> = (0..nu).map(|_| rng.random_range(-20000i64..20000)).collect();
                    let deq = rand_f(&mut rng, nu, 1e-5, 1e-3);
                    // msModelSlim's int64 form: the f32 bits in the low word,
                    // garbage in the high word must be ignored.
                    let deq_words: Vec<i64> =
                        deq.iter().enumerate().map(|(i, d)| ((i as i64 % 3) << 32) | i64::from(d.to_bits())).collect();
                    let deq_tensor = if deq_t == F {
                        Tensor::f32(vec![nu], deq.clone())
                    } else {
                        Tensor::i64(vec![nu], deq_words.clone())
                    };
                    let want = q::quant_matmul(
                        &Tensor::i64(vec![mu, ku], a.clone()),
                        &Tensor::i64(vec![nu, ku], w.clone()),
                        &Tensor::i64(vec![nu], bias.clone()),
                        &deq_tensor,
                    )
                    .unwrap();
                    let deq_bytes = if deq_t == F { encode(F, &deq) } else { encode_i64(&deq_words) };
                    let bias32: Vec<i32> = bias.iter().map(|&b| b as i32).collect();
                    let ins = vec![encode_i8(&a), encode_i8(&w), encode_i32(&bias32), deq_bytes];
                    let got = run_qmm(&dks, target, m, ins, mu * nu * out_t.size() as usize);
                    let what = format!("{target} deq {deq_t} out {out_t} M={m} N={n} K={k}");
                    exact(&decode(out_t, &got), &round_through(out_t, want.as_f32()), &what);
                }
            }
        }
    }
}

#[test]
fn per_token_w8a8_dynamic_matmul_matches_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (target, act) in targets() {
        let o = opts(target, act);
        for out_t in [F, act] {
            for (m, n, k) in SHAPES {
                let spec = QuantMatMulSpec {
                    name: "panguc_k003_quant_matmul_per_token".into(),
                    m: TExpr::Tokens,
                    n,
                    k,
                    dequant: Dequant::PerToken,
                    out: out_t,
                };
                let dks = quant_matmul(&spec, &o).unwrap();
                let (mu, nu, ku) = (m as usize, n as usize, k as usize);
                let (a, w) = (rand_i8(&mut rng, mu * ku), rand_i8(&mut rng, nu * ku));
                let (ws, xs) = (rand_f(&mut rng, nu, 1e-4, 1e-2), rand_f(&mut rng, mu, 1e-3, 1e-1));
                let want = q::quant_matmul_per_token(
                    &Tensor::i64(vec![mu, ku], a.clone()),
                    &Tensor::i64(vec![nu, ku], w.clone()),
                    &Tensor::f32(vec![nu], ws.clone()),
                    &Tensor::f32(vec![mu], xs.clone()),
                )
                .unwrap();
                let ins = vec![encode_i8(&a), encode_i8(&w), encode(F, &ws), encode(F, &xs)];
                let got = run_qmm(&dks, target, m, ins, mu * nu * out_t.size() as usize);
                let what = format!("{target} out {out_t} M={m} N={n} K={k}");
                exact(&decode(out_t, &got), &round_through(out_t, want.as_f32()), &what);
            }
        }
    }
}

#[test]
fn grouped_int8_expert_gemm_matches_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (experts, n, k) = (8usize, 48usize, 288usize);
    for (target, act) in targets() {
        let o = opts(target, act);
        for counts_t in [DevType::I64, DevType::I32] {
            // Skewed counts with empty experts (first, middle and last) and
            // one expert with more rows than a base tile.
            for counts in
                [vec![0i64, 3, 0, 1, 130, 0, 2, 0], vec![1, 0, 0, 0, 0, 0, 0, 0], vec![5, 4, 3, 2, 1, 7, 9, 2]]
            {
                let rows: usize = counts.iter().sum::<i64>() as usize;
                let spec = GroupedQuantMatMulSpec {
                    name: "panguc_k004_grouped_quant_matmul".into(),
                    rows: TExpr::Tokens,
                    experts: experts as u64,
                    n: n as u64,
                    k: k as u64,
                    counts: counts_t,
                    out: act,
                };
                let dks = grouped_quant_matmul(&spec, &o).unwrap();
                let (a, w) = (rand_i8(&mut rng, rows * k), rand_i8(&mut rng, experts * n * k));
                let (ws, xs) = (rand_f(&mut rng, experts * n, 1e-4, 1e-2), rand_f(&mut rng, rows, 1e-3, 1e-1));
                let want = q::grouped_quant_matmul(
                    &Tensor::i64(vec![rows, k], a.clone()),
                    &Tensor::i64(vec![experts, n, k], w.clone()),
                    &Tensor::f32(vec![experts, n], ws.clone()),
                    &Tensor::f32(vec![rows], xs.clone()),
                    &Tensor::i64(vec![experts], counts.clone()),
                )
                .unwrap();
                let counts_bytes = if counts_t == DevType::I64 {
                    encode_i64(&counts)
                } else {
                    encode_i32(&counts.iter().map(|&c| c as i32).collect::<Vec<_>>())
                };
                let mut args = vec![
                    encode_i8(&a),
                    encode_i8(&w),
                    encode(F, &ws),
                    encode(F, &xs),
                    counts_bytes,
                    vec![0; rows * n * act.size() as usize],
                ];
                run_kernels(&dks, target, &env(rows as u64, 0), &mut args).unwrap();
                let what = format!("{target} counts {counts_t} {counts:?}");
                exact(&decode(act, &args[5]), &round_through(act, want.as_f32()), &what);
            }
        }
    }
}

#[test]
fn dynamic_per_token_quant_matches_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (target, act) in targets() {
        let o = opts(target, act);
        for cols in [64usize, 4096] {
            let dks = dynamic_quant("panguc_k005_dynamic_quant", TExpr::Tokens, cols as u64, act, &o).unwrap();
            for t in [1usize, 7, 33, 257] {
                let mut x = round_through(act, &rand_f(&mut rng, t * cols, -3.0, 3.0));
                // Row 0: max 127 gives scale 1, so x / s ties at .5 and
                // must round half to even; the last row is all zeros.
                let ties = [127.0f32, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 6.5];
                x[..ties.len()].copy_from_slice(&ties);
                if t > 1 {
                    x[(t - 1) * cols..].fill(0.0);
                }
                let mut args = vec![encode(act, &x), vec![0; t * cols], vec![0; t * 4]];
                run_kernels(&dks, target, &env(t as u64, 0), &mut args).unwrap();
                let want = q::dynamic_quant(&Tensor::f32(vec![t, cols], x.clone())).unwrap();
                let what = format!("{target} T={t} K={cols}");
                assert_eq!(decode_i8(&args[1]), want[0].as_i64(), "q {what}");
                assert_eq!(&decode_i8(&args[1])[..ties.len()], &[127, 2, -4, 0, 0, 2, -126, 6], "ties {what}");
                exact(&decode(F, &args[2]), want[1].as_f32(), &format!("scale {what}"));
            }
        }
    }
}

#[test]
fn rms_norm_fused_dynamic_quant_matches_interpreter() {
    // Reference: the interpreter's RmsNorm (f32) then DynamicQuant. The
    // kernel's sum of squares adds in the vector unit's order (pairwise per
    // 256-byte repeat), the reference's sequentially; the classic bound on
    // either f32 sum of K positive terms is a relative error of K * eps, so
    // rstd and with it the scale may differ by up to that, and a quantized
    // value may move by one where x / s lies that close to a rounding
    // boundary (rare: at most 1% of the values here).
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let eps = 1e-6;
    for (target, act) in targets() {
        let o = opts(target, act);
        for cols in [64usize, 2048] {
            let norm = NormQuant { eps, add: false, w: act };
            let dks = rms_norm_dynamic_quant("panguc_k008_rms_norm_quant", TExpr::Tokens, cols as u64, norm, act, &o)
                .unwrap();
            for t in [1usize, 7, 33] {
                let x = round_through(act, &rand_f(&mut rng, t * cols, -3.0, 3.0));
                let w = round_through(act, &rand_f(&mut rng, cols, 0.5, 1.5));
                let norm_out = vec![0; t * cols * act.size() as usize];
                let mut args = vec![encode(act, &x), encode(act, &w), norm_out, vec![0; t * cols], vec![0; t * 4]];
                run_kernels(&dks, target, &env(t as u64, 0), &mut args).unwrap();
                let normed = interp::rms_norm(&Tensor::f32(vec![t, cols], x), &Tensor::f32(vec![cols], w), eps);
                let want = q::dynamic_quant(&normed).unwrap();
                let what = format!("{target} T={t} K={cols}");
                let (gq, gs) = (decode_i8(&args[3]), decode(F, &args[4]));
                for (i, (g, w)) in gs.iter().zip(want[1].as_f32()).enumerate() {
                    let lim = cols as f32 * f32::EPSILON * w.abs();
                    assert!((g - w).abs() <= lim, "scale {what} row {i}: got {g}, want {w}");
                }
                let off: Vec<usize> = (0..gq.len()).filter(|&i| gq[i] != want[0].as_i64()[i]).collect();
                assert!(
                    off.iter().all(|&i| (gq[i] - want[0].as_i64()[i]).abs() == 1),
                    "q {what}: off by more than one"
                );
                assert!(off.len() * 100 <= gq.len(), "q {what}: {} of {} values differ", off.len(), gq.len());
            }
        }
    }
}

#[test]
fn int8_kv_quantize_and_dequantize_match_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // C = kv_heads * head_dim of the tiny model's KV rows.
    let cols = 64usize;
    for (target, act) in targets() {
        let o = opts(target, act);
        for g in [Granularity::PerChannel, Granularity::PerTensor] {
            let np = if g == Granularity::PerChannel { cols } else { 1 };
            let qk = quantize("panguc_k006_quantize", TExpr::Tokens, cols as u64, g, act, &o).unwrap();
            let dk = dequantize("panguc_k007_dequantize", TExpr::Tokens, cols as u64, g, act, &o).unwrap();
            for t in [1usize, 7, 33] {
                // Values that reach past both clamp bounds.
                let x = round_through(act, &rand_f(&mut rng, t * cols, -4.0, 4.0));
                let scale = rand_f(&mut rng, np, 0.01, 0.03);
                let offset: Vec<f32> = (0..np).map(|i| [0.0f32, 3.0, -2.0][i % 3]).collect();
                let (st, ot) = (Tensor::f32(vec![np], scale.clone()), Tensor::f32(vec![np], offset.clone()));
                let want = q::quantize(&Tensor::f32(vec![t, cols], x.clone()), &st, &ot).unwrap();
                assert!(want.as_i64().contains(&127) && want.as_i64().contains(&-128), "test data must clamp");
                let mut args = vec![encode(act, &x), encode(F, &scale), encode(F, &offset), vec![0; t * cols]];
                run_kernels(&qk, target, &env(t as u64, 0), &mut args).unwrap();
                let what = format!("{target} {g:?} T={t}");
                let got_q = decode_i8(&args[3]);
                assert_eq!(got_q, want.as_i64(), "quantize {what}");
                let back = q::dequantize(&want, &st, &ot).unwrap();
                let mut dargs = vec![
                    args[3].clone(),
                    encode(F, &scale),
                    encode(F, &offset),
                    vec![0; t * cols * act.size() as usize],
                ];
                run_kernels(&dk, target, &env(t as u64, 0), &mut dargs).unwrap();
                exact(&decode(act, &dargs[3]), &round_through(act, back.as_f32()), &format!("dequantize {what}"));
            }
        }
    }
}

#[test]
fn untileable_int8_shapes_are_clear_errors() {
    let o = opts(Target::Ascend910B, DevType::BF16);
    let spec = QuantMatMulSpec {
        name: "panguc_k009_quant_matmul".into(),
        m: TExpr::Tokens,
        n: 32,
        k: 48,
        dequant: Dequant::PerToken,
        out: F,
    };
    let e = quant_matmul(&spec, &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k009_quant_matmul") && e.contains("K = 48 a multiple of 32"), "{e}");
    let e = dynamic_quant("panguc_k010_dynamic_quant", TExpr::Tokens, 40, DevType::BF16, &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k010_dynamic_quant") && e.contains("40"), "{e}");
    let o310 = opts(Target::Ascend310P, DevType::F16);
    let spec = QuantMatMulSpec { out: DevType::BF16, k: 64, ..spec };
    let e = quant_matmul(&spec, &o310).unwrap_err().to_string();
    assert!(e.contains("bf16 is not supported on ascend310p"), "{e}");
}

/// The small preset's int8 GEMM shapes (hidden 1024, 8 query and 2 KV
/// heads of 128, 64 experts of intermediate 256, top-8): the QKV
/// projection (static W8A8, int64 deq_scale), the shared expert's
/// gate/up (per token) and the routed experts' gate/up over 7 tokens x 8
/// slots, each against the interpreter, bit-exact.
#[test]
fn small_preset_int8_gemms_match_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (hidden, qkv, shared, experts, inter) = (1024usize, (8 + 2 * 2) * 128, 2 * 1024, 64usize, 256usize);
    for (target, act) in targets() {
        let o = opts(target, act);
        let m = 7usize;
        for (n, dequant) in [(qkv, Dequant::Static { deq: DevType::I64 }), (shared, Dequant::PerToken)] {
            let spec = QuantMatMulSpec {
                name: "panguc_k011_quant_matmul".into(),
                m: TExpr::Tokens,
                n: n as u64,
                k: hidden as u64,
                dequant,
                out: act,
            };
            let dks = quant_matmul(&spec, &o).unwrap();
            let (a, w) = (rand_i8(&mut rng, m * hidden), rand_i8(&mut rng, n * hidden));
            let (ins, want) = match dequant {
                Dequant::Static { .. } => {
                    let bias: Vec<i64> = (0..n).map(|_| rng.random_range(-20000i64..20000)).collect();
                    let deq: Vec<i64> =
                        rand_f(&mut rng, n, 1e-5, 1e-3).iter().map(|d| i64::from(d.to_bits())).collect();
                    let want = q::quant_matmul(
                        &Tensor::i64(vec![m, hidden], a.clone()),
                        &Tensor::i64(vec![n, hidden], w.clone()),
                        &Tensor::i64(vec![n], bias.clone()),
                        &Tensor::i64(vec![n], deq.clone()),
                    )
                    .unwrap();
                    let b32: Vec<i32> = bias.iter().map(|&b| b as i32).collect();
                    (vec![encode_i8(&a), encode_i8(&w), encode_i32(&b32), encode_i64(&deq)], want)
                }
                Dequant::PerToken => {
                    let (ws, xs) = (rand_f(&mut rng, n, 1e-4, 1e-2), rand_f(&mut rng, m, 1e-3, 1e-1));
                    let want = q::quant_matmul_per_token(
                        &Tensor::i64(vec![m, hidden], a.clone()),
                        &Tensor::i64(vec![n, hidden], w.clone()),
                        &Tensor::f32(vec![n], ws.clone()),
                        &Tensor::f32(vec![m], xs.clone()),
                    )
                    .unwrap();
                    (vec![encode_i8(&a), encode_i8(&w), encode(F, &ws), encode(F, &xs)], want)
                }
            };
            let got = run_qmm(&dks, target, m as u64, ins, m * n * act.size() as usize);
            exact(&decode(act, &got), &round_through(act, want.as_f32()), &format!("{target} N={n} {dequant:?}"));
        }
        // Routed experts: 56 slots spread over the 64 experts.
        let rows = m * 8;
        let mut counts = vec![0i64; experts];
        for _ in 0..rows {
            counts[rng.random_range(0..experts)] += 1;
        }
        let n = 2 * inter;
        let spec = GroupedQuantMatMulSpec {
            name: "panguc_k012_grouped_quant_matmul".into(),
            rows: TExpr::Tokens,
            experts: experts as u64,
            n: n as u64,
            k: hidden as u64,
            counts: DevType::I32,
            out: act,
        };
        let dks = grouped_quant_matmul(&spec, &o).unwrap();
        let (a, w) = (rand_i8(&mut rng, rows * hidden), rand_i8(&mut rng, experts * n * hidden));
        let (ws, xs) = (rand_f(&mut rng, experts * n, 1e-4, 1e-2), rand_f(&mut rng, rows, 1e-3, 1e-1));
        let want = q::grouped_quant_matmul(
            &Tensor::i64(vec![rows, hidden], a.clone()),
            &Tensor::i64(vec![experts, n, hidden], w.clone()),
            &Tensor::f32(vec![experts, n], ws.clone()),
            &Tensor::f32(vec![rows], xs.clone()),
            &Tensor::i64(vec![experts], counts.clone()),
        )
        .unwrap();
        let c32: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        let mut args = vec![
            encode_i8(&a),
            encode_i8(&w),
            encode(F, &ws),
            encode(F, &xs),
            encode_i32(&c32),
            vec![0; rows * n * act.size() as usize],
        ];
        run_kernels(&dks, target, &env(rows as u64, 0), &mut args).unwrap();
        exact(&decode(act, &args[5]), &round_through(act, want.as_f32()), &format!("{target} grouped experts"));
    }
}

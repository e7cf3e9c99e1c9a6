//! Every emitted kernel kind, for both targets, compiled with g++ against
//! the AscendC simulation, run over all block indices for the tiny model's
//! shapes and awkward token counts, and compared with the reference
//! interpreter's kernels on the same (dtype-rounded) inputs.
//!
//! Tolerances (relative, with a floor for values near zero): the kernels
//! compute in f32 like the reference and round once when storing, so the
//! error is the output rounding (half an ulp: 2^-9 for bf16's 8-bit
//! significand, 2^-11 for f16) plus f32 summation-order noise. We allow
//! about two ulps: bf16 1/128, f16 1/512, f32 1e-5.

mod common;

use common::{assert_close, c, device_layout, emit, emit_nz, env, kernel, rand_vec, targets, tol, TOKENS};
use panguc_codegen_ascendc::data::{decode, decode_i64, encode, encode_i64, round_through, run_kernels, run_sim};
use panguc_codegen_ascendc::sim::SimArg;
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::interp;
use panguc_ir::kernel::{ElemOp, Epilogue, KernelKind};
use panguc_ir::{Dim, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn rms_norm_and_add_rms_norm() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let h = 64;
    for (target, act) in targets() {
        let norm = kernel(
            "panguc_k001_rms_norm",
            KernelKind::RmsNorm { eps: 1e-5 },
            vec![vec![Dim::tokens(), c(h)], vec![c(h)], vec![Dim::tokens(), c(h)]],
        );
        let dk = emit(&norm, &[act; 3], target, act);
        let add = kernel(
            "panguc_k002_add_rms_norm",
            KernelKind::AddRmsNorm { eps: 1e-5 },
            vec![
                vec![Dim::tokens(), c(h)],
                vec![Dim::tokens(), c(h)],
                vec![c(h)],
                vec![Dim::tokens(), c(h)],
                vec![Dim::tokens(), c(h)],
            ],
        );
        let dka = emit(&add, &[act; 5], target, act);
        for t in TOKENS {
            let n = t as usize * h;
            let x = round_through(act, &rand_vec(&mut rng, n));
            let r = round_through(act, &rand_vec(&mut rng, n));
            let w = round_through(act, &rand_vec(&mut rng, h));
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(t, 0),
                vec![
                    SimArg::Input(encode(act, &x)),
                    SimArg::Input(encode(act, &w)),
                    SimArg::Output(n * act.size() as usize),
                ],
            )
            .unwrap();
            let want =
                interp::rms_norm(&Tensor::f32(vec![t as usize, h], x.clone()), &Tensor::f32(vec![h], w.clone()), 1e-5);
            assert_close(&decode(act, &out[0]), want.as_f32(), tol(act), 0.1, &format!("rms_norm {target} T={t}"));

            let out = run_sim(
                &dka.kernels[0],
                target,
                &env(t, 0),
                vec![
                    SimArg::Input(encode(act, &x)),
                    SimArg::Input(encode(act, &r)),
                    SimArg::Input(encode(act, &w)),
                    SimArg::Output(n * act.size() as usize),
                    SimArg::Output(n * act.size() as usize),
                ],
            )
            .unwrap();
            let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
            let want = interp::rms_norm(
                &Tensor::f32(vec![t as usize, h], sum.clone()),
                &Tensor::f32(vec![h], w.clone()),
                1e-5,
            );
            assert_close(&decode(act, &out[0]), &sum, tol(act), 0.1, &format!("add_rms_norm sum {target} T={t}"));
            assert_close(
                &decode(act, &out[1]),
                want.as_f32(),
                tol(act),
                0.1,
                &format!("add_rms_norm norm {target} T={t}"),
            );
        }
    }
}

#[test]
fn embedding_gather() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (v, h) = (512, 64);
    for (target, act) in targets() {
        let k = kernel(
            "panguc_k000_gather",
            KernelKind::Gather,
            vec![vec![c(v), c(h)], vec![Dim::tokens()], vec![Dim::tokens(), c(h)]],
        );
        let dk = emit(&k, &[act, DevType::I64, act], target, act);
        let table = round_through(act, &rand_vec(&mut rng, v * h));
        for t in TOKENS {
            let ids: Vec<i64> = (0..t).map(|_| rng.random_range(0..v as i64)).collect();
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(t, 0),
                vec![
                    SimArg::Input(encode(act, &table)),
                    SimArg::Input(encode_i64(&ids)),
                    SimArg::Output(t as usize * h * act.size() as usize),
                ],
            )
            .unwrap();
            let want: Vec<f32> =
                ids.iter().flat_map(|&i| table[i as usize * h..(i as usize + 1) * h].to_vec()).collect();
            assert_eq!(decode(act, &out[0]), want, "gather {target} T={t}");
        }
    }
}

/// Width 40 makes `T*40` end inside a 32-byte block for odd T: the tail
/// goes through DataCopyPad on 910B and the scalar path on 310P.
#[test]
fn elementwise_swiglu_and_add_with_tails() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = 40;
    for (target, act) in targets() {
        for (i, op) in [ElemOp::SwiGlu, ElemOp::Binary(panguc_ir::op::BinaryOp::Add)].into_iter().enumerate() {
            let shape = vec![Dim::tokens(), c(w)];
            let k = kernel(
                &format!("panguc_k01{i}_elementwise"),
                KernelKind::Elementwise { op: op.clone() },
                vec![shape.clone(), shape.clone(), shape],
            );
            let dk = emit(&k, &[act; 3], target, act);
            for t in TOKENS {
                let n = t as usize * w;
                let a = round_through(act, &rand_vec(&mut rng, n));
                let b = round_through(act, &rand_vec(&mut rng, n));
                let out = run_sim(
                    &dk.kernels[0],
                    target,
                    &env(t, 0),
                    vec![
                        SimArg::Input(encode(act, &a)),
                        SimArg::Input(encode(act, &b)),
                        SimArg::Output(n * act.size() as usize),
                    ],
                )
                .unwrap();
                let ta = Tensor::f32(vec![n], a.clone());
                let tb = Tensor::f32(vec![n], b.clone());
                let want = match &op {
                    ElemOp::SwiGlu => interp::eval_pure(&panguc_ir::Op::SwiGlu, &[&ta, &tb]).unwrap().remove(0),
                    _ => interp::eval_pure(&panguc_ir::Op::Binary(panguc_ir::op::BinaryOp::Add), &[&ta, &tb])
                        .unwrap()
                        .remove(0),
                };
                assert_close(&decode(act, &out[0]), want.as_f32(), tol(act), 0.1, &format!("{op:?} {target} T={t}"));
            }
        }
    }
}

#[test]
fn rope_neox() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (heads, d) = (4, 16);
    for (target, act) in targets() {
        let k = kernel(
            "panguc_k020_rope",
            KernelKind::Rope,
            vec![
                vec![Dim::tokens(), c(heads), c(d)],
                vec![Dim::tokens(), c(d)],
                vec![Dim::tokens(), c(d)],
                vec![Dim::tokens(), c(heads), c(d)],
            ],
        );
        let dk = emit(&k, &[act; 4], target, act);
        for t in TOKENS {
            let tu = t as usize;
            let x = round_through(act, &rand_vec(&mut rng, tu * heads * d));
            let pos = Tensor::i64(vec![tu], (0..t as i64).map(|p| p + 3).collect());
            let cos = round_through(act, interp::rope_table(&pos, panguc_ir::op::RopeKind::Cos, 10000.0, d).as_f32());
            let sin = round_through(act, interp::rope_table(&pos, panguc_ir::op::RopeKind::Sin, 10000.0, d).as_f32());
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(t, 0),
                vec![
                    SimArg::Input(encode(act, &x)),
                    SimArg::Input(encode(act, &cos)),
                    SimArg::Input(encode(act, &sin)),
                    SimArg::Output(x.len() * act.size() as usize),
                ],
            )
            .unwrap();
            let want = interp::rope(
                &Tensor::f32(vec![tu, heads, d], x),
                &Tensor::f32(vec![tu, d], cos),
                &Tensor::f32(vec![tu, d], sin),
            );
            assert_close(&decode(act, &out[0]), want.as_f32(), tol(act), 0.1, &format!("rope {target} T={t}"));
        }
    }
}

/// Prefill at every token count, plus decode steps over a filled cache.
#[test]
fn flash_attention_prefill_and_decode() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (hq, hkv, d) = (4, 2, 16);
    let scale = 1.0 / (d as f64).sqrt();
    for (target, act) in targets() {
        let k = kernel(
            "panguc_k030_attention",
            KernelKind::Attention { scale },
            vec![
                vec![Dim::tokens(), c(hq), c(d)],
                vec![Dim::kv_len(), c(hkv), c(d)],
                vec![Dim::kv_len(), c(hkv), c(d)],
                vec![Dim::tokens()],
                vec![Dim::tokens(), c(hq), c(d)],
            ],
        );
        let dk = emit(&k, &[act, act, act, DevType::I64, act], target, act);
        let cases: Vec<(u64, u64)> = TOKENS.iter().map(|t| (*t, 0)).chain([(1, 40), (1, 300), (7, 9)]).collect();
        for (t, past) in cases {
            let (tu, kv) = (t as usize, (t + past) as usize);
            let q = round_through(act, &rand_vec(&mut rng, tu * hq * d));
            let kc = round_through(act, &rand_vec(&mut rng, kv * hkv * d));
            let vc = round_through(act, &rand_vec(&mut rng, kv * hkv * d));
            let pos: Vec<i64> = (0..t).map(|i| (past + i) as i64).collect();
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(t, past),
                vec![
                    SimArg::Input(encode(act, &q)),
                    SimArg::Input(encode(act, &kc)),
                    SimArg::Input(encode(act, &vc)),
                    SimArg::Input(encode_i64(&pos)),
                    SimArg::Output(q.len() * act.size() as usize),
                ],
            )
            .unwrap();
            let want = interp::attention(
                &Tensor::f32(vec![tu, hq, d], q),
                &Tensor::f32(vec![kv, hkv, d], kc),
                &Tensor::f32(vec![kv, hkv, d], vc),
                &Tensor::i64(vec![tu], pos),
                scale as f32,
            );
            assert_close(
                &decode(act, &out[0]),
                want.as_f32(),
                tol(act),
                0.1,
                &format!("attention {target} T={t} past={past}"),
            );
        }
    }
}

#[test]
fn moe_gating_group_topk() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (e, g) = (64, 8);
    for (target, act) in targets() {
        let k = kernel(
            "panguc_k040_moe_gating",
            KernelKind::MoeGating { groups: g },
            vec![vec![Dim::tokens(), c(e)], vec![c(e)], vec![Dim::tokens(), c(g)], vec![Dim::tokens(), c(g)]],
        );
        let f = DevType::F32;
        let dk = emit(&k, &[f, f, f, DevType::I64], target, act);
        let scale: Vec<f32> = (0..e).map(|_| rng.random_range(0.5f32..2.0)).collect();
        for t in TOKENS {
            let tu = t as usize;
            let logits: Vec<f32> = (0..tu * e).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(t, 0),
                vec![
                    SimArg::Input(encode(f, &logits)),
                    SimArg::Input(encode(f, &scale)),
                    SimArg::Output(tu * g * 4),
                    SimArg::Output(tu * g * 8),
                ],
            )
            .unwrap();
            let want =
                interp::moe_gating(&Tensor::f32(vec![tu, e], logits), &Tensor::f32(vec![e], scale.clone()), g).unwrap();
            assert_eq!(decode_i64(&out[1]), want[1].as_i64(), "gating ids {target} T={t}");
            assert_close(&decode(f, &out[0]), want[0].as_f32(), 1e-5, 1e-3, &format!("gating weights {target} T={t}"));
        }
    }
}

/// K = 320 and N = 288 exercise the K loop and edge tiles (base tile 128);
/// T = 257 gives three M tiles, the last of one row.
#[test]
fn gemm_with_bias_swiglu_and_plain_epilogues() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (kk, n) = (320, 288);
    for (target, act) in targets() {
        // Weight row-major (Nd2Nz per K step) or pre-tiled (one copy).
        for (ep, nz) in
            [Epilogue::Bias, Epilogue::SwiGlu, Epilogue::None].into_iter().flat_map(|e| [(e, false), (e, true)])
        {
            let n_out = if ep == Epilogue::SwiGlu { n / 2 } else { n };
            let mut shapes = vec![vec![Dim::tokens(), c(kk)], vec![c(n), c(kk)]];
            if ep == Epilogue::Bias {
                shapes.push(vec![c(n)]);
            }
            shapes.push(vec![Dim::tokens(), c(n_out)]);
            let k = kernel("panguc_k050_gemm", KernelKind::Gemm { epilogue: ep }, shapes.clone());
            let dk = emit_nz(&k, &vec![act; shapes.len()], target, act, u64::from(nz) << 1);
            let w = round_through(act, &rand_vec(&mut rng, n * kk));
            let w_dev = device_layout(&dk, 1, &[n, kk], act.size() as usize, encode(act, &w), nz);
            let bias = round_through(act, &rand_vec(&mut rng, n));
            for t in [1u64, 33, 257] {
                let tu = t as usize;
                let a = round_through(act, &rand_vec(&mut rng, tu * kk));
                // The device kernels in order (cube, then any epilogue), the
                // f32 product passing through a temp GM buffer.
                let mut args = vec![encode(act, &a), w_dev.clone()];
                if ep == Epilogue::Bias {
                    args.push(encode(act, &bias));
                }
                args.push(vec![0; tu * n_out * act.size() as usize]);
                run_kernels(&dk, target, &env(t, 0), &mut args).unwrap();
                let result = decode(act, args.last().unwrap());
                let prod = panguc_ir::kernels::matmul(
                    &Tensor::f32(vec![tu, kk], a),
                    &Tensor::f32(vec![n, kk], w.clone()),
                    true,
                )
                .unwrap();
                let p = prod.as_f32();
                let want: Vec<f32> = match ep {
                    Epilogue::Bias => p.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect(),
                    Epilogue::None => p.to_vec(),
                    Epilogue::SwiGlu => (0..tu * n_out)
                        .map(|i| {
                            let (r, j) = (i / n_out, i % n_out);
                            let (g, u) = (p[r * n + j], p[r * n + n_out + j]);
                            g * panguc_ir::kernels::sigmoid(g) * u
                        })
                        .collect(),
                };
                assert_close(&result, &want, tol(act), 2.0, &format!("gemm {ep:?} nz={nz} {target} T={t}"));
            }
        }
    }
}

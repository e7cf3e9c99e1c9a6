//! The fused int8 kernel kinds of the W8A8_DYNAMIC and static W8A8
//! programs (`RmsNormQuant`, `QuantMatMul` with a bias, `DynQuantMatMul`,
//! `KvCacheWriteQuant`), reached through `emit_kernel` as a compiled
//! program reaches them, run under the simulation on both targets and
//! compared with the interpreter's unfused ops. Exact, except where the
//! norm's sum of squares is involved (see `rms_norm_quant_*`).

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{assert_close, c, env, kernel, targets, tol};
use panguc_codegen_ascendc::data::{
    decode, decode_i8, encode, encode_i32, encode_i64, encode_i8, round_through, run_kernels,
};
use panguc_codegen_ascendc::emit::{emit_kernel, EmitOptions};
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::interp;
use panguc_ir::interp::batched::kv_cache_write;
use panguc_ir::interp::quant as q;
use panguc_ir::kernel::KernelKind;
use panguc_ir::{Dim, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F: DevType = DevType::F32;
const I8: DevType = DevType::I8;

fn rand_f(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn rand_i8(rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(-128i64..=127)).collect()
}

fn exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0), "{what}: element {i}: got {g}, want {w}");
    }
}

fn zeros(n: usize, t: DevType) -> Vec<u8> {
    vec![0; n * t.size() as usize]
}

/// `RmsNormQuant { add }` against the interpreter's `rms_norm` (of `x +
/// residual` for `add`) then `dynamic_quant`. The sum is exact; the norm's
/// sum of squares adds in the vector unit's order, the reference's
/// sequentially (the bound of `emit_sim_quant.rs`'s fused test: rstd and
/// the scale within K * eps, a quantized value at most one off, rarely),
/// and `norm_out` is checked with the float rms_norm kernel's tolerance.
#[test]
fn rms_norm_quant_with_and_without_the_residual_add() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let eps = 1e-6;
    let t = Dim::tokens;
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for add in [false, true] {
            for cols in [64usize, 1024] {
                let row = vec![t(), c(cols)];
                let mut shapes = vec![row.clone()];
                let mut dts = vec![act];
                if add {
                    shapes.push(row.clone());
                    dts.push(act);
                }
                shapes.push(vec![c(cols)]);
                dts.push(act);
                if add {
                    shapes.push(row.clone());
                    dts.push(act);
                }
                shapes.extend([row.clone(), row.clone(), vec![t()]]);
                dts.extend([act, I8, F]);
                let k = kernel("panguc_k010_rms_norm_quant", KernelKind::RmsNormQuant { eps, add }, shapes);
                let dks = emit_kernel(&k, &dts, &o).unwrap();
                for m in [1usize, 7, 33] {
                    let x = round_through(act, &rand_f(&mut rng, m * cols, -3.0, 3.0));
                    let r = round_through(act, &rand_f(&mut rng, m * cols, -3.0, 3.0));
                    let w = round_through(act, &rand_f(&mut rng, cols, 0.5, 1.5));
                    let mut args = vec![encode(act, &x)];
                    if add {
                        args.push(encode(act, &r));
                    }
                    args.push(encode(act, &w));
                    if add {
                        args.push(zeros(m * cols, act));
                    }
                    args.extend([zeros(m * cols, act), vec![0; m * cols], vec![0; m * 4]]);
                    run_kernels(&dks, target, &env(m as u64, 0), &mut args).unwrap();
                    let what = format!("{target} add={add} T={m} K={cols}");
                    let src: Vec<f32> = if add { x.iter().zip(&r).map(|(a, b)| a + b).collect() } else { x };
                    if add {
                        exact(&decode(act, &args[3]), &round_through(act, &src), &format!("sum_out {what}"));
                    }
                    let normed = interp::rms_norm(&Tensor::f32(vec![m, cols], src), &Tensor::f32(vec![cols], w), eps);
                    let n = args.len();
                    assert_close(&decode(act, &args[n - 3]), normed.as_f32(), tol(act), 0.1, &format!("norm {what}"));
                    let want = q::dynamic_quant(&normed).unwrap();
                    let (gq, gs) = (decode_i8(&args[n - 2]), decode(F, &args[n - 1]));
                    for (i, (g, w)) in gs.iter().zip(want[1].as_f32()).enumerate() {
                        let lim = cols as f32 * f32::EPSILON * w.abs();
                        assert!((g - w).abs() <= lim, "scale {what} row {i}: got {g}, want {w}");
                    }
                    let wq = want[0].as_i64();
                    let off: Vec<usize> = (0..gq.len()).filter(|&i| gq[i] != wq[i]).collect();
                    assert!(off.iter().all(|&i| (gq[i] - wq[i]).abs() == 1), "q {what}: off by more than one");
                    assert!(off.len() * 100 <= gq.len(), "q {what}: {} of {} values differ", off.len(), gq.len());
                }
            }
        }
    }
}

/// `QuantMatMul { bias: true }`, static (f32 and int64 `deq_scale`) and
/// per token: the float bias added after the dequant, exactly as the
/// interpreter's `add(quant_matmul(..), bias)`.
#[test]
fn quant_matmul_with_fused_bias_is_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (n, k) = (48usize, 96usize);
    let t = Dim::tokens;
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for (per_token, deq_t) in [(true, F), (false, F), (false, DevType::I64)] {
            let col_b = if per_token { vec![t()] } else { vec![c(n)] };
            let kk = kernel(
                "panguc_k011_quant_matmul",
                KernelKind::QuantMatMul { per_token, bias: true },
                vec![vec![t(), c(k)], vec![c(n), c(k)], vec![c(n)], col_b, vec![c(n)], vec![t(), c(n)]],
            );
            let a_t = if per_token { F } else { DevType::I32 };
            let dks = emit_kernel(&kk, &[I8, I8, a_t, deq_t, act, act], &o).unwrap();
            for m in [1usize, 7, 33] {
                let xq = rand_i8(&mut rng, m * k);
                let w = rand_i8(&mut rng, n * k);
                let bias = round_through(act, &rand_f(&mut rng, n, -2.0, 2.0));
                let (xt, wt) = (Tensor::i64(vec![m, k], xq.clone()), Tensor::i64(vec![n, k], w.clone()));
                let (y, a, b) = if per_token {
                    let ws = rand_f(&mut rng, n, 1e-4, 1e-2);
                    let xs = rand_f(&mut rng, m, 1e-3, 1e-1);
                    let y = q::quant_matmul_per_token(
                        &xt,
                        &wt,
                        &Tensor::f32(vec![n], ws.clone()),
                        &Tensor::f32(vec![m], xs.clone()),
                    )
                    .unwrap();
                    (y, encode(F, &ws), encode(F, &xs))
                } else {
                    let qb: Vec<i64> = (0..n).map(|_| rng.random_range(-5000i64..5000)).collect();
                    let deq = rand_f(&mut rng, n, 1e-5, 1e-3);
                    let words: Vec<i64> = deq.iter().map(|d| i64::from(d.to_bits())).collect();
                    let (deq_tensor, deq_bytes) = if deq_t == F {
                        (Tensor::f32(vec![n], deq.clone()), encode(F, &deq))
                    } else {
                        (Tensor::i64(vec![n], words.clone()), encode_i64(&words))
                    };
                    let y = q::quant_matmul(&xt, &wt, &Tensor::i64(vec![n], qb.clone()), &deq_tensor).unwrap();
                    let qb32: Vec<i32> = qb.iter().map(|&v| v as i32).collect();
                    (y, encode_i32(&qb32), deq_bytes)
                };
                let want: Vec<f32> = y.as_f32().iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
                let mut args = vec![encode_i8(&xq), encode_i8(&w), a, b, encode(act, &bias), zeros(m * n, act)];
                run_kernels(&dks, target, &env(m as u64, 0), &mut args).unwrap();
                let what = format!("{target} per_token={per_token} deq {deq_t} M={m}");
                exact(&decode(act, &args[5]), &round_through(act, &want), &what);
            }
        }
    }
}

/// `DynQuantMatMul { bias, residual }`, all four: the interpreter's
/// `dynamic_quant`, `quant_matmul_per_token`, then `(y + bias) + residual`.
#[test]
fn dyn_quant_matmul_all_epilogues_are_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (n, k) = (48usize, 96usize);
    let t = Dim::tokens;
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for (bias, residual) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut shapes = vec![vec![t(), c(k)], vec![c(n), c(k)], vec![c(n)]];
            let mut dts = vec![act, I8, F];
            if bias {
                shapes.push(vec![c(n)]);
                dts.push(act);
            }
            if residual {
                shapes.push(vec![t(), c(n)]);
                dts.push(act);
            }
            shapes.push(vec![t(), c(n)]);
            dts.push(act);
            let kk = kernel("panguc_k012_dyn_quant_matmul", KernelKind::DynQuantMatMul { bias, residual }, shapes);
            let dks = emit_kernel(&kk, &dts, &o).unwrap();
            assert_eq!(dks.kernels.len(), 3, "{target}: dynamic quant, int8 cube GEMM, dequant epilogue");
            for m in [1usize, 7, 33] {
                let x = round_through(act, &rand_f(&mut rng, m * k, -3.0, 3.0));
                let w = rand_i8(&mut rng, n * k);
                let ws = rand_f(&mut rng, n, 1e-4, 1e-2);
                let b = round_through(act, &rand_f(&mut rng, n, -2.0, 2.0));
                let res = round_through(act, &rand_f(&mut rng, m * n, -4.0, 4.0));
                let xq = q::dynamic_quant(&Tensor::f32(vec![m, k], x.clone())).unwrap();
                let y = q::quant_matmul_per_token(
                    &xq[0],
                    &Tensor::i64(vec![n, k], w.clone()),
                    &Tensor::f32(vec![n], ws.clone()),
                    &xq[1],
                )
                .unwrap();
                let want: Vec<f32> = y
                    .as_f32()
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let v = if bias { v + b[i % n] } else { *v };
                        if residual {
                            v + res[i]
                        } else {
                            v
                        }
                    })
                    .collect();
                let mut args = vec![encode(act, &x), encode_i8(&w), encode(F, &ws)];
                if bias {
                    args.push(encode(act, &b));
                }
                if residual {
                    args.push(encode(act, &res));
                }
                args.push(zeros(m * n, act));
                run_kernels(&dks, target, &env(m as u64, 0), &mut args).unwrap();
                let what = format!("{target} bias={bias} residual={residual} M={m}");
                exact(&decode(act, args.last().unwrap()), &round_through(act, &want), &what);
            }
        }
    }
}

/// `KvCacheWriteQuant`: the interpreter's per-channel `quantize` of the new
/// rows, then `kv_cache_write` into the int8 paged cache; every other slot
/// keeps its old bytes. Slot mappings in i32 (a ragged batch's metadata)
/// and i64.
#[test]
fn kv_cache_write_quant_is_exact_and_touches_only_its_slots() {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let (hkv, d, bs, nb) = (2usize, 32usize, 16usize, 5usize);
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for slot_t in [DevType::I32, DevType::I64] {
            let kk = kernel(
                "panguc_k013_kv_cache_write_quant",
                KernelKind::KvCacheWriteQuant,
                vec![
                    vec![Dim::tokens(), c(hkv), c(d)],
                    vec![Dim::tokens()],
                    vec![c(hkv), c(d)],
                    vec![c(hkv), c(d)],
                    vec![Dim::num_blocks(), c(bs), c(hkv), c(d)],
                ],
            );
            let dks = emit_kernel(&kk, &[act, slot_t, F, F, I8], &o).unwrap();
            for m in [1usize, 7, 33] {
                let x = round_through(act, &rand_f(&mut rng, m * hkv * d, -4.0, 4.0));
                let scale = rand_f(&mut rng, hkv * d, 0.01, 0.03);
                let offset: Vec<f32> = (0..hkv * d).map(|i| [0.0f32, 3.0, -2.0][i % 3]).collect();
                // Distinct slots in a scrambled order over the whole cache.
                let mut slots: Vec<i64> = (0..(nb * bs) as i64).collect();
                for i in (1..slots.len()).rev() {
                    slots.swap(i, rng.random_range(0..=i));
                }
                slots.truncate(m);
                let cache = rand_i8(&mut rng, nb * bs * hkv * d);
                let pshape = vec![hkv, d];
                let qrows = q::quantize(
                    &Tensor::f32(vec![m, hkv, d], x.clone()),
                    &Tensor::f32(pshape.clone(), scale.clone()),
                    &Tensor::f32(pshape, offset.clone()),
                )
                .unwrap();
                assert!(qrows.as_i64().contains(&127) && qrows.as_i64().contains(&-128), "test data must clamp");
                let want = kv_cache_write(
                    &Tensor::i64(vec![nb, bs, hkv, d], cache.clone()),
                    &qrows,
                    &Tensor::i64(vec![m], slots.clone()),
                )
                .unwrap();
                let slot_bytes = if slot_t == DevType::I32 {
                    encode_i32(&slots.iter().map(|&s| s as i32).collect::<Vec<_>>())
                } else {
                    encode_i64(&slots)
                };
                let mut args =
                    vec![encode(act, &x), slot_bytes, encode(F, &scale), encode(F, &offset), encode_i8(&cache)];
                let env = panguc_codegen_ascendc::emit::Env { num_blocks: nb as u64, ..env(m as u64, 0) };
                run_kernels(&dks, target, &env, &mut args).unwrap();
                assert_eq!(decode_i8(&args[4]), want.as_i64(), "{target} slots {slot_t} T={m}");
            }
        }
    }
}

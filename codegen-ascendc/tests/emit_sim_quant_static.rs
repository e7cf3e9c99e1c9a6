//! The fused static W8A8 kinds (`static_quant_matmul`, `moe_gate_up_static`,
//! `quant_gate_up_static`, `moe_down_static`), `copy_into` and the float
//! `kv_cache_write` the static program launches, reached
//! through `emit_kernel` from program kernels with symbolic token dims, run
//! under the simulation for both targets and compared bit for bit with the
//! interpreter's unfused static ops they replace: `quantize` with the
//! projection's per-tensor scale and offset, `quant_matmul` (`f32(acc +
//! quant_bias) * deq_scale`), `swiglu`, and for the routed experts each
//! sorted row against its own expert's parameters.

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{c, env, kernel, targets};
use panguc_codegen_ascendc::data::{
    decode, decode_i8, encode, encode_i32, encode_i64, encode_i8, round_through, run_kernels,
};
use panguc_codegen_ascendc::emit::{emit_kernel, EmitOptions};
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::interp::eval_pure;
use panguc_ir::interp::quant as q;
use panguc_ir::kernel::KernelKind;
use panguc_ir::{Dim, Op, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F: DevType = DevType::F32;
const I8: DevType = DevType::I8;
const I32: DevType = DevType::I32;
const I64: DevType = DevType::I64;

fn rand_f(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Int8 weights including the -128 edge.
fn rand_i8(rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
    (0..n).map(|i| if i % 13 == 0 { -128 } else { rng.random_range(-128..=127) }).collect()
}

fn rand_qbias(rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(-5000i64..5000)).collect()
}

fn i32s(v: &[i64]) -> Vec<u8> {
    encode_i32(&v.iter().map(|&x| x as i32).collect::<Vec<_>>())
}

/// Bit-identical floats (either zero matches the other).
fn exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0), "{what}: element {i}: got {g}, want {w}");
    }
}

fn zeros(n: usize, t: DevType) -> Vec<u8> {
    vec![0; n * t.size() as usize]
}

/// One projection's static parameters: input scale and offset (one value),
/// weight `[N, K]`, quant bias and deq scale `[N]`.
struct Proj {
    scale: f32,
    offset: f32,
    w: Vec<i64>,
    qbias: Vec<i64>,
    deq: Vec<f32>,
}

impl Proj {
    /// Scales chosen so that `x / scale` sometimes leaves the int8 range
    /// (the clamp is exercised) and the outputs stay moderate.
    fn random(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Proj {
        Proj {
            scale: rng.random_range(0.012f32..0.03),
            offset: rng.random_range(-4i32..4) as f32,
            w: rand_i8(rng, n * k),
            qbias: rand_qbias(rng, n),
            deq: rand_f(rng, n, 1e-5, 2e-4),
        }
    }

    /// The interpreter's `quant_matmul(quantize(x, scale, offset), w, ..)`
    /// of `x [M, K]`.
    /// `deq_scale` as f32, or as msModelSlim's int64 words (the f32 bits
    /// in the low word).
    fn deq_bytes(&self, t: DevType) -> Vec<u8> {
        match t {
            F => encode(F, &self.deq),
            _ => encode_i64(&self.deq.iter().map(|d| i64::from(d.to_bits())).collect::<Vec<_>>()),
        }
    }

    fn reference(&self, x: &[f32], m: usize, k: usize) -> Tensor {
        let n = self.deq.len();
        let xq = q::quantize(
            &Tensor::f32(vec![m, k], x.to_vec()),
            &Tensor::f32(vec![1], vec![self.scale]),
            &Tensor::f32(vec![1], vec![self.offset]),
        )
        .unwrap();
        let w = Tensor::i64(vec![n, k], self.w.clone());
        q::quant_matmul(&xq, &w, &Tensor::i64(vec![n], self.qbias.clone()), &Tensor::f32(vec![n], self.deq.clone()))
            .unwrap()
    }
}

fn swiglu(g: &Tensor, u: &Tensor) -> Tensor {
    eval_pure(&Op::SwiGlu, &[g, u]).unwrap().remove(0)
}

/// `StaticQuantMatMul` with f32 and msModelSlim's int64 `deq_scale`, the
/// output as f32 and as the activation dtype.
#[test]
fn static_quant_matmul_is_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let (n, k) = (48usize, 96usize);
    let t = Dim::tokens;
    let kk = kernel(
        "panguc_k030_static_quant_matmul",
        KernelKind::StaticQuantMatMul,
        vec![vec![t(), c(k)], vec![c(1)], vec![c(1)], vec![c(n), c(k)], vec![c(n)], vec![c(n)], vec![t(), c(n)]],
    );
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for (deq_t, out) in [(F, F), (I64, act), (F, act)] {
            let dks = emit_kernel(&kk, &[act, F, F, I8, I32, deq_t, out], &o).unwrap();
            for m in [1usize, 7, 33] {
                let p = Proj::random(&mut rng, n, k);
                let x = round_through(act, &rand_f(&mut rng, m * k, -3.0, 3.0));
                let want = p.reference(&x, m, k);
                let mut args = vec![
                    encode(act, &x),
                    encode(F, &[p.scale]),
                    encode(F, &[p.offset]),
                    encode_i8(&p.w),
                    i32s(&p.qbias),
                    p.deq_bytes(deq_t),
                    zeros(m * n, out),
                ];
                run_kernels(&dks, target, &env(m as u64, 0), &mut args).unwrap();
                let what = format!("{target} deq {deq_t} out {out} M={m}");
                exact(&decode(out, &args[6]), &round_through(out, want.as_f32()), &what);
            }
        }
    }
}

/// The shared expert's `quant_gate_up_static`: two static projections of
/// one input, then `swiglu`, stored in the activation dtype (I = 128, the
/// tiny model's shared intermediate size).
#[test]
fn quant_gate_up_static_is_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let (h, i) = (64usize, 128usize);
    let t = Dim::tokens;
    let one = || vec![c(1)];
    let kk = kernel(
        "panguc_k031_quant_gate_up_static",
        KernelKind::QuantGateUpStatic,
        vec![
            vec![t(), c(h)],
            one(),
            one(),
            vec![c(i), c(h)],
            vec![c(i)],
            vec![c(i)],
            one(),
            one(),
            vec![c(i), c(h)],
            vec![c(i)],
            vec![c(i)],
            vec![t(), c(i)],
        ],
    );
    for ((target, act), deq_t) in targets().into_iter().flat_map(|t| [F, I64].map(|d| (t, d))) {
        let o = EmitOptions::new(target, act).unwrap();
        let dks = emit_kernel(&kk, &[act, F, F, I8, I32, deq_t, F, F, I8, I32, deq_t, act], &o).unwrap();
        assert_eq!(dks.kernels.len(), 4, "{target}: input quant, gate GEMM, up GEMM, epilogue");
        for m in [1usize, 7, 33] {
            let (g, u) = (Proj::random(&mut rng, i, h), Proj::random(&mut rng, i, h));
            let x = round_through(act, &rand_f(&mut rng, m * h, -3.0, 3.0));
            let want = swiglu(&g.reference(&x, m, h), &u.reference(&x, m, h));
            let mut args = vec![encode(act, &x)];
            for p in [&g, &u] {
                args.extend([
                    encode(F, &[p.scale]),
                    encode(F, &[p.offset]),
                    encode_i8(&p.w),
                    i32s(&p.qbias),
                    p.deq_bytes(deq_t),
                ]);
            }
            args.push(zeros(m * i, act));
            run_kernels(&dks, target, &env(m as u64, 0), &mut args).unwrap();
            let what = format!("{target} deq {deq_t} T={m}");
            exact(&decode(act, &args[11]), &round_through(act, want.as_f32()), &what);
        }
    }
}

/// A routing as `moe_route` writes it: `s` sorted rows, expert `e` owning
/// `offsets[e]..offsets[e+1]` (some experts empty, one crowded), each row
/// reading a random token.
fn routing(rng: &mut ChaCha8Rng, tokens: usize, s: usize, experts: usize) -> (Vec<i64>, Vec<i64>) {
    let mut of_row: Vec<usize> =
        (0..s).map(|_| rng.random_range(0..experts).min(rng.random_range(0..experts))).collect();
    of_row.sort();
    let mut offsets = vec![0i64; experts + 1];
    for &e in &of_row {
        offsets[e + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    let rows = (0..s).map(|_| rng.random_range(0..tokens) as i64).collect();
    (offsets, rows)
}

fn expert_of(offsets: &[i64], r: usize) -> usize {
    (0..offsets.len() - 1).rfind(|&e| offsets[e] as usize <= r).unwrap()
}

/// Routed experts, both halves: per sorted row, its expert's input
/// quantization, gate and up `quant_matmul`, `swiglu`, the down
/// projection's `quantize` (int8 out, exact), then the down `quant_matmul`
/// times the routing weight (f32 and the activation dtype).
#[test]
fn routed_static_expert_kernels_are_exact() {
    let (e, g, h, i) = (8usize, 2usize, 64usize, 32usize);
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    let t = Dim::tokens;
    let s = || Dim::tokens().scale(g as i64);
    let ev = || vec![c(e)];
    let gate_up = kernel(
        "panguc_k032_moe_gate_up_static",
        KernelKind::MoeGateUpStatic,
        vec![
            vec![t(), c(h)],
            vec![c(e + 1)],
            vec![s()],
            ev(),
            ev(),
            vec![c(e), c(i), c(h)],
            vec![c(e), c(i)],
            vec![c(e), c(i)],
            ev(),
            ev(),
            vec![c(e), c(i), c(h)],
            vec![c(e), c(i)],
            vec![c(e), c(i)],
            ev(),
            ev(),
            vec![s(), c(i)],
        ],
    );
    let down = kernel(
        "panguc_k033_moe_down_static",
        KernelKind::MoeDownStatic,
        vec![
            vec![s(), c(i)],
            vec![c(e + 1)],
            vec![s()],
            vec![c(e), c(h), c(i)],
            vec![c(e), c(h)],
            vec![c(e), c(h)],
            vec![s(), c(h)],
        ],
    );
    // Per expert: gate, up and down projections; the down input scale and offset.
    let gates: Vec<Proj> = (0..e).map(|_| Proj::random(&mut rng, i, h)).collect();
    let ups: Vec<Proj> = (0..e).map(|_| Proj::random(&mut rng, i, h)).collect();
    let downs: Vec<Proj> = (0..e).map(|_| Proj::random(&mut rng, h, i)).collect();
    let down_in: Vec<(f32, f32)> =
        (0..e).map(|_| (rng.random_range(0.02f32..0.06), rng.random_range(-3i32..3) as f32)).collect();
    let cat = |ps: &[Proj], f: &dyn Fn(&Proj) -> Vec<u8>| ps.iter().flat_map(f).collect::<Vec<u8>>();
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        // f32 deq scales with f32 ys, msModelSlim's int64 ones with ys in
        // the activation dtype.
        for (out, deq_t) in [(F, F), (act, I64)] {
            let gdts = [act, I64, I64, F, F, I8, I32, deq_t, F, F, I8, I32, deq_t, F, F, I8];
            let gu = emit_kernel(&gate_up, &gdts, &o).unwrap();
            assert_eq!(gu.kernels.len(), 4, "{target}: input quant, gate GEMM, up GEMM, epilogue");
            let dn = emit_kernel(&down, &[I8, I64, F, I8, I32, deq_t, out], &o).unwrap();
            for tok in [1usize, 7, 33] {
                let sr = tok * g;
                let what = format!("{target} T={tok} deq {deq_t} ys {out}");
                let x = round_through(act, &rand_f(&mut rng, tok * h, -3.0, 3.0));
                let (offsets, rows) = routing(&mut rng, tok, sr, e);
                let row_w = rand_f(&mut rng, sr, 0.1, 1.0);
                // The reference, row by row.
                let (mut want_q, mut want_y) = (Vec::new(), Vec::new());
                for r in 0..sr {
                    let ex = expert_of(&offsets, r);
                    let xr = &x[rows[r] as usize * h..][..h];
                    let a = swiglu(&gates[ex].reference(xr, 1, h), &ups[ex].reference(xr, 1, h));
                    let (ds, dof) = down_in[ex];
                    let aq =
                        q::quantize(&a, &Tensor::f32(vec![1], vec![ds]), &Tensor::f32(vec![1], vec![dof])).unwrap();
                    let dp = &downs[ex];
                    let y = q::quant_matmul(
                        &aq,
                        &Tensor::i64(vec![h, i], dp.w.clone()),
                        &Tensor::i64(vec![h], dp.qbias.clone()),
                        &Tensor::f32(vec![h], dp.deq.clone()),
                    )
                    .unwrap();
                    want_q.extend_from_slice(aq.as_i64());
                    want_y.extend(y.as_f32().iter().map(|v| row_w[r] * v));
                }
                let mut gargs = vec![encode(act, &x), encode_i64(&offsets), encode_i64(&rows)];
                for ps in [&gates, &ups] {
                    gargs.extend([
                        encode(F, &ps.iter().map(|p| p.scale).collect::<Vec<_>>()),
                        encode(F, &ps.iter().map(|p| p.offset).collect::<Vec<_>>()),
                        cat(ps, &|p| encode_i8(&p.w)),
                        cat(ps, &|p| i32s(&p.qbias)),
                        cat(ps, &|p| p.deq_bytes(deq_t)),
                    ]);
                }
                gargs.push(encode(F, &down_in.iter().map(|d| d.0).collect::<Vec<_>>()));
                gargs.push(encode(F, &down_in.iter().map(|d| d.1).collect::<Vec<_>>()));
                gargs.push(zeros(sr * i, I8));
                run_kernels(&gu, target, &env(tok as u64, 0), &mut gargs).unwrap();
                assert_eq!(decode_i8(&gargs[15]), want_q, "{what}: quantized activations");

                let mut dargs = vec![
                    gargs[15].clone(),
                    encode_i64(&offsets),
                    encode(F, &row_w),
                    cat(&downs, &|p| encode_i8(&p.w)),
                    cat(&downs, &|p| i32s(&p.qbias)),
                    cat(&downs, &|p| p.deq_bytes(deq_t)),
                    zeros(sr * h, out),
                ];
                run_kernels(&dn, target, &env(tok as u64, 0), &mut dargs).unwrap();
                exact(&decode(out, &dargs[6]), &round_through(out, &want_y), &what);
            }
        }
    }
}

/// `copy_into` along the token axis at `past` (the contiguous KV cache
/// append: rows before and after stay as they were) and along an inner
/// axis at a constant offset with rows that are not whole 32-byte blocks
/// (a concat part; 310P's block-rounded tail path).
#[test]
fn copy_into_writes_only_its_slice() {
    let mut rng = ChaCha8Rng::seed_from_u64(34);
    let t = Dim::tokens;
    let cases: [(&str, usize, Dim, Vec<Vec<Dim>>); 2] = [
        (
            "kv append",
            0,
            Dim::past(),
            vec![vec![t(), c(2), c(16)], vec![Dim::past().add(&t()).add(&c(3)), c(2), c(16)]],
        ),
        ("concat part", 1, c(40), vec![vec![t(), c(24)], vec![t(), c(72)]]),
    ];
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for (what, axis, offset, shapes) in &cases {
            let kk = kernel(
                "panguc_k034_copy_into",
                KernelKind::CopyInto { axis: *axis, offset: offset.clone() },
                shapes.clone(),
            );
            let dks = emit_kernel(&kk, &[act, act], &o).unwrap();
            for (tok, past) in [(1usize, 5usize), (7, 0), (33, 17)] {
                let (in_rows, out_rows, in_w, out_w, off) = if *axis == 0 {
                    (1, 1, tok * 32, (past + tok + 3) * 32, past * 32)
                } else {
                    (tok, tok, 24, 72, 40)
                };
                let src = round_through(act, &rand_f(&mut rng, in_rows * in_w, -1.0, 1.0));
                let dst = round_through(act, &rand_f(&mut rng, out_rows * out_w, -1.0, 1.0));
                let mut want = dst.clone();
                for r in 0..in_rows {
                    want[r * out_w + off..][..in_w].copy_from_slice(&src[r * in_w..][..in_w]);
                }
                let mut args = vec![encode(act, &src), encode(act, &dst)];
                run_kernels(&dks, target, &env(tok as u64, past as u64), &mut args).unwrap();
                exact(&decode(act, &args[1]), &want, &format!("{target} {what} T={tok} past={past}"));
            }
        }
    }
}

/// `kv_cache_write` (the float paged cache write of the static program,
/// whose q/k/v projections are not merged): against the interpreter's
/// `kv_cache_write`, slots as i64 and i32, every other slot untouched.
#[test]
fn kv_cache_write_matches_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(35);
    let (nb, bs, hkv, d) = (6usize, 4usize, 2usize, 16usize);
    let kk = kernel(
        "panguc_k035_kv_cache_write",
        KernelKind::KvCacheWrite,
        vec![vec![Dim::tokens(), c(hkv), c(d)], vec![Dim::tokens()], vec![c(nb), c(bs), c(hkv), c(d)]],
    );
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        for slot_t in [I64, I32] {
            let dks = emit_kernel(&kk, &[act, slot_t, act], &o).unwrap();
            for tok in [1usize, 7, 13] {
                let new = round_through(act, &rand_f(&mut rng, tok * hkv * d, -2.0, 2.0));
                let cache = round_through(act, &rand_f(&mut rng, nb * bs * hkv * d, -2.0, 2.0));
                // Distinct slots in a scrambled order.
                let mut slots: Vec<i64> = (0..(nb * bs) as i64).collect();
                for i in (1..slots.len()).rev() {
                    slots.swap(i, rng.random_range(0..=i));
                }
                slots.truncate(tok);
                let want = panguc_ir::interp::batched::kv_cache_write(
                    &Tensor::f32(vec![nb, bs, hkv, d], cache.clone()),
                    &Tensor::f32(vec![tok, hkv, d], new.clone()),
                    &Tensor::i64(vec![tok], slots.clone()),
                )
                .unwrap();
                let slot_bytes = if slot_t == I64 { encode_i64(&slots) } else { i32s(&slots) };
                let mut args = vec![encode(act, &new), slot_bytes, encode(act, &cache)];
                run_kernels(&dks, target, &env(tok as u64, 0), &mut args).unwrap();
                exact(&decode(act, &args[2]), want.as_f32(), &format!("{target} slots {slot_t} T={tok}"));
            }
        }
    }
}

/// Arguments the static kernels have no variant for are errors naming the
/// kernel and the argument.
#[test]
fn unmappable_static_kernels_are_clear_errors() {
    let (target, act) = targets()[0];
    let o = EmitOptions::new(target, act).unwrap();
    let t = Dim::tokens;
    let (n, k) = (48usize, 96usize);
    let mk = |scale: Vec<Dim>| {
        kernel(
            "panguc_k030_static_quant_matmul",
            KernelKind::StaticQuantMatMul,
            vec![vec![t(), c(k)], scale.clone(), scale, vec![c(n), c(k)], vec![c(n)], vec![c(n)], vec![t(), c(n)]],
        )
    };
    // A per-channel input scale is not static W8A8's per-tensor one.
    let e = emit_kernel(&mk(vec![c(k)]), &[act, F, F, I8, I32, F, F], &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k030_static_quant_matmul") && e.contains("in_scale (argument 1)"), "{e}");
    // An f32 quant bias: the epilogue adds int32.
    let e = emit_kernel(&mk(vec![c(1)]), &[act, F, F, I8, F, F, F], &o).unwrap_err().to_string();
    assert!(e.contains("quant_bias (argument 4)"), "{e}");
}

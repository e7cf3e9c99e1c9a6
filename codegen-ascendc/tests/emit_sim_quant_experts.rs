//! The fused W8A8_DYNAMIC expert kernels (`moe_gate_up_quant`,
//! `quant_gate_up_quant`, `moe_down_quant`) reached through `emit_kernel`
//! from program kernels with symbolic token dims, run under the simulation
//! for both targets and compared bit for bit with the interpreter's op chain
//! they replace: `moe_init_routing -> dynamic_quant -> grouped_quant_matmul`
//! (gate, up) `-> swiglu -> dynamic_quant -> grouped_quant_matmul` (down)
//! and the finalize's `weight * y`; for the shared expert
//! `quant_matmul_per_token` (gate, up) `-> swiglu -> dynamic_quant`.

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{c, env, kernel, targets};
use panguc_codegen_ascendc::data::{decode, decode_i8, encode, encode_i64, encode_i8, round_through, run_kernels};
use panguc_codegen_ascendc::emit::{emit_kernel, EmitOptions};
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::interp::eval_pure;
use panguc_ir::kernel::KernelKind;
use panguc_ir::{Dim, Op, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F: DevType = DevType::F32;
const I8: DevType = DevType::I8;
const I64: DevType = DevType::I64;

fn eval(op: Op, args: &[&Tensor]) -> Vec<Tensor> {
    eval_pure(&op, args).unwrap_or_else(|e| panic!("{}: {e}", op.mnemonic()))
}

/// Int8 weights including the -128 edge.
fn random_i8(rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
    (0..n).map(|i| if i % 13 == 0 { -128 } else { rng.random_range(-128..=127) }).collect()
}

fn scales(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(0.001f32..0.02)).collect()
}

/// Token rows in [-2, 2) with row 2 (when present) all zeros: scale 0,
/// quantized to zeros, and a zero activation row downstream.
fn tokens_x(rng: &mut ChaCha8Rng, t: usize, h: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..t * h).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    if t > 2 {
        x[2 * h..3 * h].iter_mut().for_each(|v| *v = 0.0);
    }
    x
}

/// Bit-identical floats (either zero matches the other).
fn exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0), "{what}: element {i}: got {g}, want {w}");
    }
}

/// Ids as the gating produces them (one expert per group), skewed so that
/// some experts get many rows and others none.
fn gating_ids(rng: &mut ChaCha8Rng, tokens: usize, experts: usize, groups: usize) -> Vec<i64> {
    let per = experts / groups;
    (0..tokens * groups)
        .map(|s| ((s % groups) * per + rng.random_range(0..per).min(rng.random_range(0..per))) as i64)
        .collect()
}

/// The routed program kernels at the tiny model's MoE sizes:
/// `S = tokens * groups` sorted rows.
fn routed_kernels(e: usize, g: usize, h: usize, i: usize) -> (panguc_ir::kernel::Kernel, panguc_ir::kernel::Kernel) {
    let t = Dim::tokens;
    let s = || Dim::tokens().scale(g as i64);
    let gate_up = kernel(
        "panguc_k020_moe_gate_up_quant",
        KernelKind::MoeGateUpQuant,
        vec![
            vec![t(), c(h)],
            vec![t()],
            vec![c(e + 1)],
            vec![s()],
            vec![c(e), c(i), c(h)],
            vec![c(e), c(i)],
            vec![c(e), c(i), c(h)],
            vec![c(e), c(i)],
            vec![s(), c(i)],
            vec![s()],
        ],
    );
    let down = kernel(
        "panguc_k021_moe_down_quant",
        KernelKind::MoeDownQuant,
        vec![
            vec![s(), c(i)],
            vec![s()],
            vec![c(e + 1)],
            vec![s()],
            vec![c(e), c(h), c(i)],
            vec![c(e), c(h)],
            vec![s(), c(h)],
        ],
    );
    (gate_up, down)
}

/// Routed experts, both halves, at the tiny model's sizes (E = 64, 8 per
/// token, H = 64, I = 32) and token counts with one row, several tiles
/// and a whole-zero token; the down output as f32 and as the activation
/// dtype.
#[test]
fn routed_expert_kernels_match_the_reference_chain_bit_for_bit() {
    let (e, g, h, i) = (64usize, 8usize, 64usize, 32usize);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (wg, wu, wd) = (random_i8(&mut rng, e * i * h), random_i8(&mut rng, e * i * h), random_i8(&mut rng, e * h * i));
    let (sg, su, sd) = (scales(&mut rng, e * i), scales(&mut rng, e * i), scales(&mut rng, e * h));
    let w3 = |v: &[i64], n: usize, k: usize| Tensor::i64(vec![e, n, k], v.to_vec());
    let s2 = |v: &[f32], n: usize| Tensor::f32(vec![e, n], v.to_vec());
    let (gu_k, down_k) = routed_kernels(e, g, h, i);
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        let gu = emit_kernel(&gu_k, &[I8, F, I64, I64, I8, F, I8, F, I8, F], &o).unwrap();
        assert_eq!(gu.kernels.len(), 4, "{target}: gather, gate GEMM, up GEMM, epilogue");
        for out in [F, act] {
            let dn = emit_kernel(&down_k, &[I8, F, I64, F, I8, F, out], &o).unwrap();
            for t in [1usize, 7, 33] {
                let s = t * g;
                let what = format!("{target} T={t} ys {out}");
                let x = tokens_x(&mut rng, t, h);
                let ids = gating_ids(&mut rng, t, e, g);
                let weights: Vec<f32> = (0..s).map(|_| rng.random_range(0.1f32..1.0)).collect();

                // The reference chain.
                let xt = Tensor::f32(vec![t, h], x);
                let init = eval(Op::MoeInitRouting { experts: e }, &[&xt, &Tensor::i64(vec![t, g], ids)]);
                let (expanded, row_idx, counts) = (&init[0], init[1].as_i64(), &init[2]);
                let xq_rows = eval(Op::DynamicQuant, &[expanded]);
                let gqmm = |q: &[Tensor], w: &Tensor, sc: &Tensor| {
                    eval(Op::GroupedQuantMatMul, &[&q[0], w, sc, &q[1], counts]).remove(0)
                };
                let gate = gqmm(&xq_rows, &w3(&wg, i, h), &s2(&sg, i));
                let up = gqmm(&xq_rows, &w3(&wu, i, h), &s2(&su, i));
                let a = eval(Op::SwiGlu, &[&gate, &up]).remove(0);
                let aq = eval(Op::DynamicQuant, &[&a]);
                let y = gqmm(&aq, &w3(&wd, h, i), &s2(&sd, h));
                // The routing as `moe_route` writes it: sorted row r holds
                // slot p = row_idx^-1(r), token p / g, weight weights[p].
                let (mut rows, mut row_w, mut want_ys) = (vec![0i64; s], vec![0f32; s], vec![0f32; s * h]);
                for (p, &r) in row_idx.iter().enumerate() {
                    let r = r as usize;
                    rows[r] = (p / g) as i64;
                    row_w[r] = weights[p];
                    for col in 0..h {
                        want_ys[r * h + col] = weights[p] * y.as_f32()[r * h + col];
                    }
                }
                let mut offsets = vec![0i64];
                for &n in counts.as_i64() {
                    offsets.push(offsets.last().unwrap() + n);
                }
                let xq = eval(Op::DynamicQuant, &[&xt]);

                let mut gargs = vec![
                    encode_i8(xq[0].as_i64()),
                    encode(F, xq[1].as_f32()),
                    encode_i64(&offsets),
                    encode_i64(&rows),
                    encode_i8(&wg),
                    encode(F, &sg),
                    encode_i8(&wu),
                    encode(F, &su),
                    vec![0; s * i],
                    vec![0; s * 4],
                ];
                run_kernels(&gu, target, &env(t as u64, 0), &mut gargs).unwrap();
                assert_eq!(decode_i8(&gargs[8]), aq[0].as_i64(), "{what}: quantized activations");
                exact(&decode(F, &gargs[9]), aq[1].as_f32(), &format!("{what}: activation scales"));

                let mut dargs = vec![
                    gargs[8].clone(),
                    gargs[9].clone(),
                    encode_i64(&offsets),
                    encode(F, &row_w),
                    encode_i8(&wd),
                    encode(F, &sd),
                    vec![0; s * h * out.size() as usize],
                ];
                run_kernels(&dn, target, &env(t as u64, 0), &mut dargs).unwrap();
                exact(&decode(out, &dargs[6]), &round_through(out, &want_ys), &what);
            }
        }
    }
}

/// The shared expert: one expert over every token, no routing; I = 128
/// (the tiny model's shared intermediate size), a zero token row.
#[test]
fn shared_gate_up_quant_matches_the_reference_chain_bit_for_bit() {
    let (h, i) = (64usize, 128usize);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (wg, wu) = (random_i8(&mut rng, i * h), random_i8(&mut rng, i * h));
    let (sg, su) = (scales(&mut rng, i), scales(&mut rng, i));
    let t = Dim::tokens;
    let k = kernel(
        "panguc_k022_quant_gate_up_quant",
        KernelKind::QuantGateUpQuant,
        vec![
            vec![t(), c(h)],
            vec![t()],
            vec![c(i), c(h)],
            vec![c(i)],
            vec![c(i), c(h)],
            vec![c(i)],
            vec![t(), c(i)],
            vec![t()],
        ],
    );
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        let dk = emit_kernel(&k, &[I8, F, I8, F, I8, F, I8, F], &o).unwrap();
        for m in [1usize, 7, 33] {
            let what = format!("{target} T={m}");
            let xq = eval(Op::DynamicQuant, &[&Tensor::f32(vec![m, h], tokens_x(&mut rng, m, h))]);
            let qmm = |w: &[i64], sc: &[f32]| {
                let (w, sc) = (Tensor::i64(vec![i, h], w.to_vec()), Tensor::f32(vec![i], sc.to_vec()));
                eval(Op::QuantMatMulPerToken, &[&xq[0], &w, &sc, &xq[1]]).remove(0)
            };
            let a = eval(Op::SwiGlu, &[&qmm(&wg, &sg), &qmm(&wu, &su)]).remove(0);
            let want = eval(Op::DynamicQuant, &[&a]);
            let mut args = vec![
                encode_i8(xq[0].as_i64()),
                encode(F, xq[1].as_f32()),
                encode_i8(&wg),
                encode(F, &sg),
                encode_i8(&wu),
                encode(F, &su),
                vec![0; m * i],
                vec![0; m * 4],
            ];
            run_kernels(&dk, target, &env(m as u64, 0), &mut args).unwrap();
            assert_eq!(decode_i8(&args[6]), want[0].as_i64(), "{what}: quantized activations");
            exact(&decode(F, &args[7]), want[1].as_f32(), &format!("{what}: activation scales"));
        }
    }
}

/// Arguments the kernels have no variant for are errors naming the kernel
/// and the argument.
#[test]
fn unmappable_expert_kernels_are_clear_errors() {
    let (target, act) = targets()[0];
    let o = EmitOptions::new(target, act).unwrap();
    let (gu, down) = routed_kernels(8, 2, 64, 32);
    // Activation-dtype weights (a float expert program) are not int8 experts.
    let e = emit_kernel(&gu, &[I8, F, I64, I64, act, F, act, F, I8, F], &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k020_moe_gate_up_quant") && e.contains("w_gate (argument 4)"), "{e}");
    // i32 offsets: the grouped GEMM reads i64.
    let e = emit_kernel(&down, &[I8, F, DevType::I32, F, I8, F, F], &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k021_moe_down_quant") && e.contains("offsets (argument 2)"), "{e}");
    // I = 24 cannot be tiled by the int8 cube (N a multiple of 16, rows of
    // whole 32-byte int8 blocks).
    let (gu, _) = routed_kernels(8, 2, 64, 24);
    let e = emit_kernel(&gu, &[I8, F, I64, I64, I8, F, I8, F, I8, F], &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k020_moe_gate_up_quant") && e.contains("cannot be tiled"), "{e}");
}

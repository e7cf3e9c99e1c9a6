//! Kernels compiled for the host and run in-process through the JIT,
//! checked against straightforward Rust, plus the vectorisation check on
//! the emitted assembly.

use panguc_codegen_cpu::{compile, with_jit, KernelFn, BASELINE_TIER, BF16_TIER};
use panguc_ir::kernel::{Epilogue, Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::{DType, Dim};
use rand::{Rng, SeedableRng};

mod common;

use common::{bf16_bytes, bf16_values, bytes_f32, bytes_i64, f32s, kernel, spec, tier};

fn program(kernels: Vec<Kernel>) -> KernelProgram {
    common::program("test", &["tokens", "past"], kernels)
}

/// Run `f` over all its tiles (split as threads would) for `tokens` rows.
fn run(f: KernelFn, bufs: &mut [Vec<u8>], tokens: usize, tiles: u64, scratch: usize) {
    common::run_tiles(f, bufs, &[tokens as i64, 0], tiles, scratch);
}

/// GEMM with a bias epilogue on bf16 weights: a partial last panel (N = 40
/// = 16 + 16 + 8), several register row blocks plus a remainder (M = 13),
/// both the in-register (M <= 6) and widened-panel paths, against the
/// reference order (sequential over k, then + bias) exactly.
#[test]
fn gemm_with_bias_matches_the_reference_exactly() {
    let (k, n) = (37usize, 40usize);
    let t = Dim::tokens();
    let layout = Layout::Panels { nr: 16, kn: false };
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(k)], Layout::RowMajor),
        spec(DType::BF16, vec![Dim::c(n), Dim::c(k)], layout),
        spec(DType::BF16, vec![Dim::c(n)], Layout::RowMajor),
        spec(DType::F32, vec![t, Dim::c(n)], Layout::RowMajor),
    ];
    let kern =
        kernel("gemm_bias", KernelKind::Gemm { epilogue: Epilogue::Bias }, args, Extent::constant((k * 16 * 4) as u64));
    let tiles = kern.tiles.eval(&panguc_ir::shape::bindings(1, 0)).unwrap();
    assert_eq!(tiles, 3);
    let p = program(vec![kern]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let w = bf16_values(&mut rng, n * k);
    let bias = bf16_values(&mut rng, n);
    with_jit(&p, &tier(BASELINE_TIER), |get| {
        let f = get("gemm_bias").expect("kernel symbol");
        for m in [1usize, 5, 13] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut bufs = vec![
                a.iter().flat_map(|x| x.to_le_bytes()).collect(),
                layout.pack(&bf16_bytes(&w), &[n, k], 2),
                bf16_bytes(&bias),
                vec![0u8; m * n * 4],
            ];
            run(f, &mut bufs, m, tiles, k * 16 * 4);
            let got = f32s(&bufs[3]);
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f32;
                    for kk in 0..k {
                        acc += a[i * k + kk] * w[j * k + kk];
                    }
                    let want = acc + bias[j];
                    assert_eq!(got[i * n + j].to_bits(), want.to_bits(), "m={m} row {i} col {j}");
                }
            }
        }
    })
    .unwrap();
}

/// Merged gate/up projection with the SwiGLU epilogue, f16 weights, a
/// partial panel (I = 12 = 8 + 4).
#[test]
fn gate_up_swiglu_matches_the_reference_exactly() {
    let (k, i) = (24usize, 12usize);
    let t = Dim::tokens();
    let layout = Layout::GateUpPanels { nr: 16 };
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(k)], Layout::RowMajor),
        spec(DType::F16, vec![Dim::c(2 * i), Dim::c(k)], layout),
        spec(DType::F32, vec![t, Dim::c(i)], Layout::RowMajor),
    ];
    let kern =
        kernel("gate_up", KernelKind::Gemm { epilogue: Epilogue::SwiGlu }, args, Extent::constant((k * 16 * 4) as u64));
    let tiles = kern.tiles.eval(&panguc_ir::shape::bindings(1, 0)).unwrap();
    assert_eq!(tiles, 2);
    let p = program(vec![kern]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let w: Vec<f32> = (0..2 * i * k).map(|_| half::f16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32()).collect();
    let w16: Vec<u8> = w.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
    let m = 9;
    let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    with_jit(&p, &tier(BASELINE_TIER), |get| {
        let mut bufs = vec![
            a.iter().flat_map(|x| x.to_le_bytes()).collect(),
            layout.pack(&w16, &[2 * i, k], 2),
            vec![0u8; m * i * 4],
        ];
        run(get("gate_up").unwrap(), &mut bufs, m, tiles, k * 16 * 4);
        let got = f32s(&bufs[2]);
        let dot = |r: usize, row: usize| -> f32 {
            let mut acc = 0.0f32;
            for kk in 0..k {
                acc += a[r * k + kk] * w[row * k + kk];
            }
            acc
        };
        for r in 0..m {
            for c in 0..i {
                let (g, u) = (dot(r, c), dot(r, i + c));
                let want = g * (1.0 / (1.0 + (-g).exp())) * u;
                assert_eq!(got[r * i + c].to_bits(), want.to_bits(), "row {r} col {c}");
            }
        }
    })
    .unwrap();
}

/// The assembly of a GEMM uses each tier's vector registers: ymm multiplies
/// on the baseline (AVX2) tier, zmm BF16 dot products (and no separate
/// multiplies) on the AVX-512 BF16 tier; every function carries its tier's
/// target-cpu attribute. Compile only: runs on any x86-64 build machine.
#[test]
fn each_tier_uses_its_own_vector_instructions() {
    let t = Dim::tokens();
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(256)], Layout::RowMajor),
        spec(DType::BF16, vec![Dim::c(64), Dim::c(256)], Layout::Panels { nr: 16, kn: false }),
        spec(DType::F32, vec![t, Dim::c(64)], Layout::RowMajor),
    ];
    let p =
        program(vec![kernel("gemm", KernelKind::Gemm { epilogue: Epilogue::None }, args, Extent::constant(256 * 64))]);
    for (name, op, reg) in [(BASELINE_TIER, "vmulps", "%ymm"), (BF16_TIER, "vdpbf16ps", "%zmm")] {
        let target = tier(name);
        let c = compile(&p, &target).unwrap();
        assert!(c.llvm_ir.contains(&format!("\"target-cpu\"=\"{}\"", target.cpu)), "functions carry target-cpu");
        let count = |op: &str, reg: &str| c.assembly.lines().filter(|l| l.contains(op) && l.contains(reg)).count();
        assert!(count(op, reg) > 0, "tier {name}: no {reg} {op} in the GEMM");
        if name == BF16_TIER {
            assert_eq!(count("vmulps", "%"), 0, "tier {name}: the GEMM still multiplies in f32");
            assert!(count("vcvtne2ps2bf16", "%zmm") > 0, "tier {name}: activations rounded 32 at a time");
        }
        assert!(c.symbols == vec!["gemm".to_string()] && !c.object.is_empty());
    }
}

/// A bf16-weight GEMM on each tier this CPU runs: every row's result is
/// bit-identical whether the row is launched alone or with others (row
/// blocks of 1..6 rows on the baseline and 1..12 on the bf16 tier, several
/// blocks, and more rows than one bf16 row block of 32; at K = 2048 also
/// more panels than one bf16 panel group of 8), and within the tier's
/// tolerance of the exact f32 result.
///
/// Tolerances, per output element with `S = sum_k |a_k| |w_k|`:
/// - x86-64-v3: 0 (the reference's order, f32 multiply then add);
/// - avx512-bf16: A is rounded to bf16 (8 significant bits, nearest even:
///   `|a - bf16(a)| <= 2^-8 |a|`, the products of bf16 values are exact in
///   f32), then accumulated in f32 in a different order (pairs), which
///   adds at most `K * 2^-24 * S` on top of the reference's own rounding
///   (also `<= K * 2^-24 * S`): `|got - ref| <= (2^-8 + 2 K 2^-24) S`.
#[test]
fn gemm_rows_are_independent_and_within_each_tiers_tolerance() {
    // Two 32-wide rounding chunks plus a tail and a partial panel; then two
    // panel groups (8 + 2 panels, the last one partial).
    for (k, n) in [(70usize, 40usize), (2048, 152)] {
        gemm_rows_independent_within_tolerance(k, n);
    }
}

fn gemm_rows_independent_within_tolerance(k: usize, n: usize) {
    let t = Dim::tokens();
    let layout = Layout::Panels { nr: 16, kn: false };
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(k)], Layout::RowMajor),
        spec(DType::BF16, vec![Dim::c(n), Dim::c(k)], layout),
        spec(DType::F32, vec![t, Dim::c(n)], Layout::RowMajor),
    ];
    let scratch = k * 16 * 4;
    let kern = kernel("gemm", KernelKind::Gemm { epilogue: Epilogue::None }, args, Extent::constant(scratch as u64));
    let tiles = kern.tiles.eval(&panguc_ir::shape::bindings(1, 0)).unwrap();
    let p = program(vec![kern]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let w = bf16_values(&mut rng, n * k);
    let m_max = 37;
    let a: Vec<f32> = (0..m_max * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let mut tiers = vec![(BASELINE_TIER, 0.0f64)];
    if common::avx512_tier_runs() {
        tiers.push((BF16_TIER, 2f64.powi(-8) + 2.0 * k as f64 * 2f64.powi(-24)));
    } else {
        eprintln!("this CPU has no AVX-512 BF16: only the baseline tier is run");
    }
    for (name, rel) in tiers {
        with_jit(&p, &tier(name), |get| {
            let f = get("gemm").expect("kernel symbol");
            let launch = |rows: &[f32], m: usize| -> Vec<f32> {
                let mut bufs = vec![
                    rows.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    layout.pack(&bf16_bytes(&w), &[n, k], 2),
                    vec![0u8; m * n * 4],
                ];
                run(f, &mut bufs, m, tiles, scratch);
                f32s(&bufs[2])
            };
            let alone: Vec<Vec<f32>> = (0..m_max).map(|i| launch(&a[i * k..(i + 1) * k], 1)).collect();
            let mut worst = 0f64;
            for m in [1usize, 2, 5, 6, 7, 12, 13, 25, 31, 33, m_max] {
                let got = launch(&a[..m * k], m);
                for i in 0..m {
                    for j in 0..n {
                        let (g, solo) = (got[i * n + j], alone[i][j]);
                        assert_eq!(g.to_bits(), solo.to_bits(), "{name}: m={m} row {i} col {j} depends on other rows");
                        let (mut exact, mut s) = (0.0f32, 0.0f64);
                        for kk in 0..k {
                            exact += a[i * k + kk] * w[j * k + kk];
                            s += (a[i * k + kk] as f64 * w[j * k + kk] as f64).abs();
                        }
                        let err = (g as f64 - exact as f64).abs();
                        assert!(err <= rel * s, "{name}: m={m} row {i} col {j}: |{g} - {exact}| > {rel:e} * {s}");
                        worst = worst.max(err / s);
                    }
                }
            }
            eprintln!("tier {name}: worst |got - ref| / sum|a w| = {worst:e} (bound {rel:e})");
        })
        .unwrap();
    }
}

/// The batched MoE's kernels in launch order (route, gather each sorted
/// row once, grouped gate/up GEMM over the contiguous rows, grouped down
/// GEMM, combine) against the interpreter's named ops (`moe_init_routing`,
/// `grouped_matmul`, `swiglu`, `moe_finalize_routing`): ragged T (1, 3, 7),
/// 8 experts in 4 groups with every row picking one expert per group, and
/// expert 3 never picked (its weights are NaN: a read would show).
#[test]
fn batched_moe_kernels_match_the_interpreters_named_ops() {
    use panguc_ir::interp::eval_pure;
    use panguc_ir::{Op, Tensor};
    let (e, g, h, i) = (8usize, 4usize, 24usize, 12usize);
    let (t, slots) = (Dim::tokens(), Dim::tokens().scale(g as i64));
    let rm = |dtype, shape: Vec<Dim>| spec(dtype, shape, Layout::RowMajor);
    let (gu_layout, down_layout) = (Layout::GateUpPanels { nr: 16 }, Layout::Panels { nr: 16, kn: false });
    let panel_scratch = (h.max(i) * 16 * 4) as u64;
    let kernels = vec![
        kernel(
            "route",
            KernelKind::MoeRoute,
            vec![
                rm(DType::F32, vec![t.clone(), Dim::c(g)]),
                rm(DType::I64, vec![t.clone(), Dim::c(g)]),
                rm(DType::I64, vec![Dim::c(e + 1)]),
                rm(DType::I64, vec![slots.clone()]),
                rm(DType::F32, vec![slots.clone()]),
                rm(DType::I64, vec![slots.clone()]),
            ],
            Extent::constant(0),
        ),
        kernel(
            "gather",
            KernelKind::Gather,
            vec![
                rm(DType::F32, vec![t.clone(), Dim::c(h)]),
                rm(DType::I64, vec![slots.clone()]),
                rm(DType::F32, vec![slots.clone(), Dim::c(h)]),
            ],
            Extent::constant(0),
        ),
        kernel(
            "gate_up",
            KernelKind::MoeGroupedGateUp,
            vec![
                rm(DType::F32, vec![slots.clone(), Dim::c(h)]),
                rm(DType::I64, vec![Dim::c(e + 1)]),
                spec(DType::BF16, vec![Dim::c(e), Dim::c(2 * i), Dim::c(h)], gu_layout),
                rm(DType::F32, vec![slots.clone(), Dim::c(i)]),
            ],
            Extent::constant(panel_scratch),
        ),
        kernel(
            "down",
            KernelKind::MoeDown,
            vec![
                rm(DType::F32, vec![slots.clone(), Dim::c(i)]),
                rm(DType::I64, vec![Dim::c(e + 1)]),
                rm(DType::F32, vec![slots.clone()]),
                spec(DType::BF16, vec![Dim::c(e), Dim::c(h), Dim::c(i)], down_layout),
                rm(DType::F32, vec![slots.clone(), Dim::c(h)]),
            ],
            Extent::constant(panel_scratch),
        ),
        kernel(
            "combine",
            KernelKind::MoeCombine { shared_residual: false },
            vec![
                rm(DType::F32, vec![slots.clone(), Dim::c(h)]),
                rm(DType::I64, vec![slots]),
                rm(DType::F32, vec![t, Dim::c(h)]),
            ],
            Extent::constant(0),
        ),
    ];
    let tiles: Vec<Extent> = kernels.iter().map(|k| k.tiles.clone()).collect();
    let p = program(kernels);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut w_gu = bf16_values(&mut rng, e * 2 * i * h);
    w_gu[3 * 2 * i * h..4 * 2 * i * h].fill(f32::NAN);
    let mut w_dn = bf16_values(&mut rng, e * h * i);
    w_dn[3 * h * i..4 * h * i].fill(f32::NAN);
    let gu_t = Tensor::f32(vec![e, 2 * i, h], w_gu.clone());
    let halves = eval_pure(&Op::Split { axis: 1, sizes: vec![i, i] }, &[&gu_t]).unwrap();
    let dn_t = Tensor::f32(vec![e, h, i], w_dn.clone());
    with_jit(&p, &tier(BASELINE_TIER), |get| {
        for m in [1usize, 3, 7] {
            let n = m * g;
            let at = |k: usize| tiles[k].eval(&panguc_ir::shape::bindings(m, 0)).unwrap();
            // One expert per group of 2; group 1 always picks expert 2, so
            // expert 3 gets no rows.
            let ids: Vec<i64> =
                (0..n).map(|s| (2 * (s % g) + if s % g == 1 { 0 } else { rng.random_range(0..2) }) as i64).collect();
            let weights: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
            let x: Vec<f32> = (0..m * h).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut route = vec![
                bytes_f32(&weights),
                bytes_i64(&ids),
                vec![0; (e + 1) * 8],
                vec![0; n * 8],
                vec![0; n * 4],
                vec![0; n * 8],
            ];
            run(get("route").unwrap(), &mut route, m, at(0), 0);
            let mut gather = vec![bytes_f32(&x), route[3].clone(), vec![0; n * h * 4]];
            run(get("gather").unwrap(), &mut gather, m, at(1), 0);
            let mut gate_up = vec![
                gather[2].clone(),
                route[2].clone(),
                gu_layout.pack(&bf16_bytes(&w_gu), &[e, 2 * i, h], 2),
                vec![0; n * i * 4],
            ];
            run(get("gate_up").unwrap(), &mut gate_up, m, at(2), panel_scratch as usize);
            let mut down = vec![
                gate_up[3].clone(),
                route[2].clone(),
                route[4].clone(),
                down_layout.pack(&bf16_bytes(&w_dn), &[e, h, i], 2),
                vec![0; n * h * 4],
            ];
            run(get("down").unwrap(), &mut down, m, at(3), panel_scratch as usize);
            let mut combine = vec![down[4].clone(), route[5].clone(), vec![0; m * h * 4]];
            run(get("combine").unwrap(), &mut combine, m, at(4), 0);

            let xt = Tensor::f32(vec![m, h], x.clone());
            let init = eval_pure(&Op::MoeInitRouting { experts: e }, &[&xt, &Tensor::i64(vec![m, g], ids)]).unwrap();
            assert_eq!(init[2].as_i64()[3], 0, "expert 3 has no rows");
            assert_eq!(f32s(&gather[2]), init[0].as_f32(), "gathered rows are the expanded rows, T={m}");
            let gate = eval_pure(&Op::GroupedMatmul, &[&init[0], &halves[0], &init[2]]).unwrap();
            let up = eval_pure(&Op::GroupedMatmul, &[&init[0], &halves[1], &init[2]]).unwrap();
            let act = eval_pure(&Op::SwiGlu, &[&gate[0], &up[0]]).unwrap().remove(0);
            let y = eval_pure(&Op::GroupedMatmul, &[&act, &dn_t, &init[2]]).unwrap().remove(0);
            let want = eval_pure(&Op::MoeFinalizeRouting, &[&y, &Tensor::f32(vec![m, g], weights), &init[1]])
                .unwrap()
                .remove(0);
            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len());
                for (k, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-3), "{what} T={m} [{k}]: {a} vs {b}");
                }
            };
            close(&f32s(&gate_up[3]), act.as_f32(), "grouped gate/up");
            close(&f32s(&combine[2]), want.as_f32(), "combined output");
        }
    })
    .unwrap();
}

//! The RoPE-table, QKV-append and grouped-MoE kernels for both targets,
//! run under the AscendC simulation at the tiny model's shapes and awkward
//! token counts, against reference semantics (the interpreter's kernels and
//! the kernel-program docs). Tolerances as in `emit_sim.rs`.

mod common;

use common::{assert_close, c, device_layout, emit, emit_nz, env, kernel, rand_vec, targets, tol, TOKENS};
use panguc_codegen_ascendc::data::{decode, decode_i64, encode, encode_i64, round_through, run_kernels};
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::interp;
use panguc_ir::kernel::KernelKind;
use panguc_ir::op::RopeKind;
use panguc_ir::{Dim, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F: DevType = DevType::F32;
const I: DevType = DevType::I64;

fn slots() -> Dim {
    Dim::tokens().scale(8)
}

#[test]
fn rope_tables_cos_and_sin() {
    let d = 16;
    for (target, act) in targets() {
        for kind in [RopeKind::Cos, RopeKind::Sin] {
            let k = kernel(
                "panguc_k001_rope_table",
                KernelKind::RopeTable { kind, theta: 10000.0, head_dim: d },
                vec![vec![Dim::tokens()], vec![Dim::tokens(), c(d)]],
            );
            let dk = emit(&k, &[I, act], target, act);
            for (t, past) in TOKENS.iter().map(|t| (*t, 0)).chain([(1, 300), (7, 1000)]) {
                let pos: Vec<i64> = (0..t).map(|i| (past + i) as i64).collect();
                let mut args = vec![encode_i64(&pos), vec![0; t as usize * d * act.size() as usize]];
                run_kernels(&dk, target, &env(t, past), &mut args).unwrap();
                let want = interp::rope_table(&Tensor::i64(vec![t as usize], pos), kind, 10000.0, d);
                // f32 angles (as HF computes them) against the reference's f64:
                // |error| <= pos * 2^-24, plus the output rounding.
                let floor = 0.1f32.max((past + t) as f32 * 6e-8 / tol(act));
                assert_close(
                    &decode(act, &args[1]),
                    want.as_f32(),
                    tol(act),
                    floor,
                    &format!("{kind:?} {target} T={t}"),
                );
            }
        }
    }
}

#[test]
fn qkv_rope_append_prefill_and_decode() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (hq, hkv, d) = (4usize, 2usize, 16usize);
    let w = (hq + 2 * hkv) * d;
    for (target, act) in targets() {
        let k = kernel(
            "panguc_k005_qkv_rope_append",
            KernelKind::QkvRopeAppend { q_heads: hq, kv_heads: hkv },
            vec![
                vec![Dim::tokens(), c(w)],
                vec![Dim::tokens(), c(d)],
                vec![Dim::tokens(), c(d)],
                vec![Dim::tokens(), c(hq), c(d)],
                vec![Dim::kv_len(), c(hkv), c(d)],
                vec![Dim::kv_len(), c(hkv), c(d)],
            ],
        );
        let dk = emit(&k, &[act; 6], target, act);
        for (t, past) in TOKENS.iter().map(|t| (*t, 0)).chain([(1, 40), (7, 9)]) {
            let (tu, kv) = (t as usize, (t + past) as usize);
            let y = round_through(act, &rand_vec(&mut rng, tu * w));
            let pos = Tensor::i64(vec![tu], (0..t).map(|i| (past + i) as i64).collect());
            let cos = round_through(act, interp::rope_table(&pos, RopeKind::Cos, 10000.0, d).as_f32());
            let sin = round_through(act, interp::rope_table(&pos, RopeKind::Sin, 10000.0, d).as_f32());
            let kc = round_through(act, &rand_vec(&mut rng, kv * hkv * d));
            let vc = round_through(act, &rand_vec(&mut rng, kv * hkv * d));
            let sz = act.size() as usize;
            let mut args = vec![
                encode(act, &y),
                encode(act, &cos),
                encode(act, &sin),
                vec![0; tu * hq * d * sz],
                encode(act, &kc),
                encode(act, &vc),
            ];
            run_kernels(&dk, target, &env(t, past), &mut args).unwrap();
            // Reference: split heads, interp::rope on q and k, append k and v.
            let heads = |h0: usize, n: usize| -> Vec<f32> {
                (0..tu).flat_map(|r| y[r * w + h0 * d..r * w + (h0 + n) * d].to_vec()).collect()
            };
            let cs = |v: &Vec<f32>| Tensor::f32(vec![tu, d], v.clone());
            let q = interp::rope(&Tensor::f32(vec![tu, hq, d], heads(0, hq)), &cs(&cos), &cs(&sin));
            let kn = interp::rope(&Tensor::f32(vec![tu, hkv, d], heads(hq, hkv)), &cs(&cos), &cs(&sin));
            let what = format!("{target} T={t} past={past}");
            assert_close(&decode(act, &args[3]), q.as_f32(), tol(act), 0.1, &format!("q {what}"));
            let row = hkv * d;
            let (kg, vg) = (decode(act, &args[4]), decode(act, &args[5]));
            assert_eq!(&kg[..past as usize * row], &kc[..past as usize * row], "old k rows {what}");
            assert_eq!(&vg[..past as usize * row], &vc[..past as usize * row], "old v rows {what}");
            assert_close(&kg[past as usize * row..], kn.as_f32(), tol(act), 0.1, &format!("k {what}"));
            assert_eq!(&vg[past as usize * row..], &heads(hq + hkv, hkv)[..], "v {what}");
        }
    }
}

/// Stable counting sort by expert (the `MoeRoute` contract).
fn route_ref(ids: &[i64], weights: &[f32], experts: usize, groups: usize) -> (Vec<i64>, Vec<i64>, Vec<f32>, Vec<i64>) {
    let mut offsets = vec![0i64; experts + 1];
    for &e in ids {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    let mut cursor = offsets.clone();
    let (mut rows, mut rw, mut sr) = (vec![0i64; ids.len()], vec![0f32; ids.len()], vec![0i64; ids.len()]);
    for (s, &e) in ids.iter().enumerate() {
        let r = cursor[e as usize] as usize;
        cursor[e as usize] += 1;
        rows[r] = (s / groups) as i64;
        rw[r] = weights[s];
        sr[s] = r as i64;
    }
    (offsets, rows, rw, sr)
}

/// Ids as the gating produces them (one expert per group of 8), skewed so
/// that some experts get many rows and others none.
fn gating_ids(rng: &mut ChaCha8Rng, tokens: usize, experts: usize, groups: usize) -> Vec<i64> {
    let per = experts / groups;
    (0..tokens * groups)
        .map(|s| ((s % groups) * per + rng.random_range(0..per).min(rng.random_range(0..per))) as i64)
        .collect()
}

/// Ids that leave most experts without rows: expert 0 takes about half the
/// slots, a few others the rest.
fn sparse_ids(rng: &mut ChaCha8Rng, slots: usize) -> Vec<i64> {
    const WARM: [i64; 4] = [1, 2, 40, 63];
    (0..slots).map(|_| if rng.random_bool(0.5) { 0 } else { WARM[rng.random_range(0..WARM.len())] }).collect()
}

/// Runs the route kernel for `groups` on each (tokens, ids) case and checks
/// every output against [`route_ref`].
fn check_route(rng: &mut ChaCha8Rng, groups: usize, cases: &[(u64, Vec<i64>)]) {
    let e = 64usize;
    let slots = Dim::tokens().scale(groups as i64);
    for (target, act) in targets() {
        let k = kernel(
            "panguc_k011_moe_route",
            KernelKind::MoeRoute,
            vec![
                vec![Dim::tokens(), c(groups)],
                vec![Dim::tokens(), c(groups)],
                vec![c(e + 1)],
                vec![slots.clone()],
                vec![slots.clone()],
                vec![slots.clone()],
            ],
        );
        let dk = emit(&k, &[F, I, I, I, F, I], target, act);
        for (t, ids) in cases {
            let n = *t as usize * groups;
            assert_eq!(ids.len(), n);
            let w: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
            let mut args = vec![
                encode(F, &w),
                encode_i64(ids),
                vec![0; (e + 1) * 8],
                vec![0; n * 8],
                vec![0; n * 4],
                vec![0; n * 8],
            ];
            run_kernels(&dk, target, &env(*t, 0), &mut args).unwrap();
            let (off, rows, rw, sr) = route_ref(ids, &w, e, groups);
            let what = format!("{target} G={groups} T={t}");
            assert_eq!(decode_i64(&args[2]), off, "offsets {what}");
            assert_eq!(decode_i64(&args[3]), rows, "rows {what}");
            assert_eq!(decode(F, &args[4]), rw, "row weights {what}");
            assert_eq!(decode_i64(&args[5]), sr, "slot rows {what}");
        }
    }
}

#[test]
fn moe_route_counting_sort() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (e, g) = (64usize, 8usize);
    // 2100 tokens: 16800 slots, more tiles (2048 slots each) than the 8
    // cores, so blocks own two tiles; 1000 tokens with most experts empty.
    let mut cases: Vec<(u64, Vec<i64>)> =
        TOKENS.iter().chain(&[2100]).map(|&t| (t, gating_ids(&mut rng, t as usize, e, g))).collect();
    cases.push((1000, sparse_ids(&mut rng, 1000 * g)));
    check_route(&mut rng, g, &cases);
}

#[test]
fn moe_route_odd_slot_counts() {
    // Three groups: 3 slots (every output shorter than a 32-byte block),
    // 2049 and 4098 slots (a last tile of 1 and 2 slots, shorter than a
    // block), 2001 slots with most experts empty.
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let g = 3usize;
    let mut cases: Vec<(u64, Vec<i64>)> = [1u64, 683, 1366]
        .iter()
        .map(|&t| (t, (0..t as usize * g).map(|_| rng.random_range(0..64i64)).collect()))
        .collect();
    cases.push((667, sparse_ids(&mut rng, 667 * g)));
    check_route(&mut rng, g, &cases);
}

fn expert_of_rows(off: &[i64]) -> Vec<usize> {
    (0..off.len() - 1).flat_map(|e| std::iter::repeat_n(e, (off[e + 1] - off[e]) as usize)).collect()
}

#[test]
fn moe_gate_up_and_down_grouped_gemm() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (e, g, h, inter) = (64usize, 8usize, 64usize, 32usize);
    // Expert weights row-major (Nd2Nz per K step) or pre-tiled (one copy).
    for ((target, act), nz) in targets().into_iter().flat_map(|t| [(t, false), (t, true)]) {
        let gu = kernel(
            "panguc_k012_moe_gate_up",
            KernelKind::MoeGateUp,
            vec![
                vec![Dim::tokens(), c(h)],
                vec![c(e + 1)],
                vec![slots()],
                vec![c(e), c(2 * inter), c(h)],
                vec![slots(), c(inter)],
            ],
        );
        let dn = kernel(
            "panguc_k013_moe_down",
            KernelKind::MoeDown,
            vec![
                vec![slots(), c(inter)],
                vec![c(e + 1)],
                vec![slots()],
                vec![c(e), c(h), c(inter)],
                vec![slots(), c(h)],
            ],
        );
        let dgu = emit_nz(&gu, &[act, I, I, act, act], target, act, u64::from(nz) << 3);
        let ddn = emit_nz(&dn, &[act, I, F, act, act], target, act, u64::from(nz) << 3);
        let wgu = round_through(act, &rand_vec(&mut rng, e * 2 * inter * h));
        let wdn = round_through(act, &rand_vec(&mut rng, e * h * inter));
        let sz = act.size() as usize;
        let wgu_dev = device_layout(&dgu, 3, &[e, 2 * inter, h], sz, encode(act, &wgu), nz);
        let wdn_dev = device_layout(&ddn, 3, &[e, h, inter], sz, encode(act, &wdn), nz);
        for t in TOKENS {
            let (tu, n) = (t as usize, t as usize * g);
            let ids = gating_ids(&mut rng, tu, e, g);
            let rwin: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
            let (off, rows, rw, _) = route_ref(&ids, &rwin, e, g);
            let experts = expert_of_rows(&off);
            let x = round_through(act, &rand_vec(&mut rng, tu * h));
            let mut args =
                vec![encode(act, &x), encode_i64(&off), encode_i64(&rows), wgu_dev.clone(), vec![0; n * inter * sz]];
            run_kernels(&dgu, target, &env(t, 0), &mut args).unwrap();
            let got = decode(act, &args[4]);
            let mut want = vec![];
            for r in 0..n {
                let xr = Tensor::f32(vec![1, h], x[rows[r] as usize * h..(rows[r] as usize + 1) * h].to_vec());
                let we = Tensor::f32(
                    vec![2 * inter, h],
                    wgu[experts[r] * 2 * inter * h..(experts[r] + 1) * 2 * inter * h].to_vec(),
                );
                let p = panguc_ir::kernels::matmul(&xr, &we, true).unwrap();
                let p = p.as_f32();
                want.extend((0..inter).map(|j| p[j] * panguc_ir::kernels::sigmoid(p[j]) * p[inter + j]));
            }
            assert_close(&got, &want, tol(act), 2.0, &format!("moe_gate_up nz={nz} {target} T={t}"));

            let a = round_through(act, &rand_vec(&mut rng, n * inter));
            let mut args =
                vec![encode(act, &a), encode_i64(&off), encode(F, &rw), wdn_dev.clone(), vec![0; n * h * sz]];
            run_kernels(&ddn, target, &env(t, 0), &mut args).unwrap();
            let got = decode(act, &args[4]);
            let mut want = vec![];
            for r in 0..n {
                let ar = Tensor::f32(vec![1, inter], a[r * inter..(r + 1) * inter].to_vec());
                let we =
                    Tensor::f32(vec![h, inter], wdn[experts[r] * h * inter..(experts[r] + 1) * h * inter].to_vec());
                let p = panguc_ir::kernels::matmul(&ar, &we, true).unwrap();
                want.extend(p.as_f32().iter().map(|v| rw[r] * v));
            }
            assert_close(&got, &want, tol(act), 2.0, &format!("moe_down nz={nz} {target} T={t}"));
        }
    }
}

#[test]
fn moe_combine_with_and_without_shared_residual() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let (g, h) = (8usize, 64usize);
    for (target, act) in targets() {
        for shared in [true, false] {
            let mut shapes = vec![vec![slots(), c(h)], vec![slots()]];
            if shared {
                shapes.push(vec![Dim::tokens(), c(h)]);
                shapes.push(vec![Dim::tokens(), c(h)]);
            }
            shapes.push(vec![Dim::tokens(), c(h)]);
            let mut dts = vec![act, I];
            dts.extend(std::iter::repeat_n(act, shapes.len() - 2));
            let k = kernel("panguc_k016_moe_combine", KernelKind::MoeCombine { shared_residual: shared }, shapes);
            let dk = emit(&k, &dts, target, act);
            for t in TOKENS {
                let (tu, n) = (t as usize, t as usize * g);
                let ys = round_through(act, &rand_vec(&mut rng, n * h));
                let mut perm: Vec<i64> = (0..n as i64).collect();
                for i in (1..n).rev() {
                    perm.swap(i, rng.random_range(0..=i));
                }
                let sh = round_through(act, &rand_vec(&mut rng, tu * h));
                let res = round_through(act, &rand_vec(&mut rng, tu * h));
                let mut args = vec![encode(act, &ys), encode_i64(&perm)];
                if shared {
                    args.push(encode(act, &sh));
                    args.push(encode(act, &res));
                }
                args.push(vec![0; tu * h * act.size() as usize]);
                run_kernels(&dk, target, &env(t, 0), &mut args).unwrap();
                let want: Vec<f32> = (0..tu * h)
                    .map(|i| {
                        let (tok, j) = (i / h, i % h);
                        let routed: f32 = (0..g).map(|gg| ys[perm[tok * g + gg] as usize * h + j]).sum();
                        if shared {
                            res[i] + (routed + sh[i])
                        } else {
                            routed
                        }
                    })
                    .collect();
                assert_close(
                    &decode(act, args.last().unwrap()),
                    &want,
                    tol(act),
                    1.0,
                    &format!("combine {shared} {target} T={t}"),
                );
            }
        }
    }
}

/// The batched MoE on the device (`moe_grouped_ffn`'s launches after the
/// route): `Gather` copies each sorted row's token row once into a
/// contiguous block per expert, then `MoeGroupedGateUp` runs the grouped
/// cube GEMM over those blocks with the SwiGLU epilogue; against the
/// interpreter's `moe_init_routing` (expanded rows, counts) and
/// `grouped_matmul` + `swiglu`. Skewed ids leave experts without rows.
#[test]
fn moe_batched_gather_and_grouped_gate_up_match_the_interpreter() {
    use panguc_ir::interp::eval_pure;
    use panguc_ir::Op;
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let (e, g, h, inter) = (64usize, 8usize, 64usize, 32usize);
    for (target, act) in targets() {
        let gather = kernel(
            "panguc_k020_gather",
            KernelKind::Gather,
            vec![vec![Dim::tokens(), c(h)], vec![slots()], vec![slots(), c(h)]],
        );
        let gate_up = kernel(
            "panguc_k021_moe_grouped_gate_up",
            KernelKind::MoeGroupedGateUp,
            vec![vec![slots(), c(h)], vec![c(e + 1)], vec![c(e), c(2 * inter), c(h)], vec![slots(), c(inter)]],
        );
        let dga = emit(&gather, &[act, I, act], target, act);
        let dgu = emit(&gate_up, &[act, I, act, act], target, act);
        let wgu = round_through(act, &rand_vec(&mut rng, e * 2 * inter * h));
        let w = Tensor::f32(vec![e, 2 * inter, h], wgu.clone());
        let halves = eval_pure(&Op::Split { axis: 1, sizes: vec![inter, inter] }, &[&w]).unwrap();
        for t in TOKENS {
            let (tu, n, sz) = (t as usize, t as usize * g, act.size() as usize);
            let ids = gating_ids(&mut rng, tu, e, g);
            let (off, rows, _, _) = route_ref(&ids, &vec![0.0; n], e, g);
            let x = round_through(act, &rand_vec(&mut rng, tu * h));
            let init = eval_pure(
                &Op::MoeInitRouting { experts: e },
                &[&Tensor::f32(vec![tu, h], x.clone()), &Tensor::i64(vec![tu, g], ids.clone())],
            )
            .unwrap();
            let counts: Vec<i64> = off.windows(2).map(|w| w[1] - w[0]).collect();
            assert_eq!(init[2].as_i64(), &counts[..], "the route's offsets are the interpreter's counts");
            // Fewer rows than experts per group: some expert has none.
            assert!(t >= 8 || counts.contains(&0), "some expert gets no rows at T={t}");

            let mut args = vec![encode(act, &x), encode_i64(&rows), vec![0; n * h * sz]];
            run_kernels(&dga, target, &env(t, 0), &mut args).unwrap();
            let sorted = decode(act, &args[2]);
            assert_eq!(sorted, init[0].as_f32(), "gathered rows {target} T={t}");

            let mut args = vec![encode(act, &sorted), encode_i64(&off), encode(act, &wgu), vec![0; n * inter * sz]];
            run_kernels(&dgu, target, &env(t, 0), &mut args).unwrap();
            let gate = eval_pure(&Op::GroupedMatmul, &[&init[0], &halves[0], &init[2]]).unwrap();
            let up = eval_pure(&Op::GroupedMatmul, &[&init[0], &halves[1], &init[2]]).unwrap();
            let want = eval_pure(&Op::SwiGlu, &[&gate[0], &up[0]]).unwrap();
            assert_close(
                &decode(act, &args[3]),
                want[0].as_f32(),
                tol(act),
                2.0,
                &format!("moe_grouped_gate_up {target} T={t}"),
            );
        }
    }
}

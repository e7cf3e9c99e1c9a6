//! The fused W8A8_DYNAMIC expert kernels (`moe_gate_up_quant`,
//! `moe_down_quant`, `quant_gate_up_quant`) compiled through the JIT for
//! each CPU tier and checked bit for bit against the reference
//! interpreter's ops they replace: `moe_init_routing -> dynamic_quant ->
//! grouped_quant_matmul` (gate, up) `-> swiglu -> dynamic_quant ->
//! grouped_quant_matmul` (down) and the finalize's `weight * y`, and for
//! the shared expert `quant_matmul_per_token` (gate, up) `-> swiglu ->
//! dynamic_quant`. The routing (`moe_route`) is the bf16 MoE's kernel.
//! Also the projections that quantize their own input: `dyn_quant_matmul`
//! (W8A8_DYNAMIC) and `static_quant_matmul` (static W8A8).

use panguc_codegen_cpu::with_jit;
use panguc_ir::interp::eval_pure;
use panguc_ir::kernel::{Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::{DType, Dim, Op, Tensor};
use rand::{Rng, SeedableRng};

mod common;
use common::{bits, bytes_f32, bytes_i64, f32s, i8_bytes, i8s, run_tiles, runnable_tiers, tier};

fn spec(dtype: DType, shape: Vec<Dim>) -> panguc_ir::kernel::ArgSpec {
    common::spec(dtype, shape, Layout::RowMajor)
}

/// The expert kernels' int8 weights: in the dense int8 matmul's dot panels.
const DOT_PANELS: Layout = Layout::DotPanels { nr: 16, kg: 4 };

fn panel_spec(shape: &[usize]) -> panguc_ir::kernel::ArgSpec {
    common::spec(DType::I8, shape.iter().map(|d| Dim::c(*d)).collect(), DOT_PANELS)
}

/// `w` (int8 values of `shape`) packed in dot panels.
fn panel_bytes(w: &[i64], shape: &[usize]) -> Vec<u8> {
    DOT_PANELS.pack(&i8_bytes(w), shape, 1)
}

fn kernel(name: &str, kind: KernelKind, args: Vec<panguc_ir::kernel::ArgSpec>) -> Kernel {
    common::kernel(name, kind, args, Extent::constant(0))
}

fn program(kernels: Vec<Kernel>) -> KernelProgram {
    common::program("test", &["tokens", "past"], kernels)
}

fn random_i8(rng: &mut impl Rng, n: usize) -> Vec<i64> {
    (0..n).map(|i| if i % 13 == 0 { -128 } else { rng.random_range(-128..=127) }).collect()
}
fn scales(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(0.001f32..0.02)).collect()
}

fn eval(op: Op, args: &[&Tensor]) -> Vec<Tensor> {
    eval_pure(&op, args).unwrap_or_else(|e| panic!("{}: {e}", op.mnemonic()))
}

/// `moe_route` of `k` experts per token out of `e`.
fn route_kernel(k: usize, e: usize) -> Kernel {
    let (td, sdim) = (Dim::tokens(), Dim::tokens().mul(&Dim::c(k)).unwrap());
    kernel(
        "route",
        KernelKind::MoeRoute,
        vec![
            spec(DType::F32, vec![td.clone(), Dim::c(k)]),
            spec(DType::I64, vec![td, Dim::c(k)]),
            spec(DType::I64, vec![Dim::c(e + 1)]),
            spec(DType::I64, vec![sdim.clone()]),
            spec(DType::F32, vec![sdim.clone()]),
            spec(DType::I64, vec![sdim]),
        ],
    )
}

/// Sizes: H = 72 is one VNNI step plus a tail, I = 6, E = 4 experts of
/// which one receives no row, k = 2 experts per token, T = 5 tokens (one
/// of them all zeros: scale 0, quantized to zeros).
#[test]
fn routed_expert_kernels_match_the_reference_chain_bit_for_bit() {
    let t = 5;
    // Expert 2 is never picked.
    let ids: Vec<i64> = (0..t).flat_map(|r| if r % 2 == 0 { [0, 3] } else { [1, 3] }).collect();
    check_routed((t, 72, 6, 4, 2), &ids, 3);
}

/// Blocks of rows at their edges: experts receiving 0, 1, R - 1, R, R + 1
/// and many (3R + 5) rows, R the rows of one expert block, k = 1 expert per
/// token so the counts are exact, in an order that interleaves the
/// experts' tokens. H = 70 ends on a partial 4-k group; I = 20 is a whole
/// panel of 16 gate/up columns and a partial one (the down projection:
/// 4 whole panels of H and a partial one, K = 20).
#[test]
fn routed_expert_kernels_match_the_reference_at_block_edges() {
    let (ids, experts) = block_edge_ids();
    check_routed((ids.len(), 70, 20, experts, 1), &ids, 11);
}

/// One expert per token, experts receiving 0, 1, R - 1, R, R + 1 and
/// 3R + 5 tokens (R the rows of one expert block), their tokens
/// interleaved; and the expert count.
fn block_edge_ids() -> (Vec<i64>, usize) {
    let r = panguc_codegen_cpu::EXPERT_BLOCK_ROWS;
    let counts = [0, 1, r - 1, r, r + 1, 3 * r + 5];
    let mut ids: Vec<i64> = vec![];
    let mut left = counts;
    while left.iter().any(|c| *c > 0) {
        for (ex, c) in left.iter_mut().enumerate().rev() {
            if *c > 0 {
                ids.push(ex as i64);
                *c -= 1;
            }
        }
    }
    (ids, counts.len())
}

/// The routed W8A8_DYNAMIC kernels after `moe_route` for `t` tokens, `ids`
/// (`[T, k]`) of `e` experts, against the reference chain; token 2 (when
/// there is one) is all zeros.
fn check_routed((t, h, i, e, k): (usize, usize, usize, usize, usize), ids: &[i64], seed: u64) {
    let s = t * k;
    assert_eq!(ids.len(), s);
    let ids = ids.to_vec();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut x: Vec<f32> = (0..t * h).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    if t > 2 {
        x[2 * h..3 * h].iter_mut().for_each(|v| *v = 0.0);
    }
    let weights: Vec<f32> = (0..s).map(|_| rng.random_range(0.1f32..1.0)).collect();
    let (wg, wu, wd) = (random_i8(&mut rng, e * i * h), random_i8(&mut rng, e * i * h), random_i8(&mut rng, e * h * i));
    let (sg, su, sd) = (scales(&mut rng, e * i), scales(&mut rng, e * i), scales(&mut rng, e * h));

    // The reference chain.
    let xt = Tensor::f32(vec![t, h], x.clone());
    let idt = Tensor::i64(vec![t, k], ids.clone());
    let init = eval(Op::MoeInitRouting { experts: e }, &[&xt, &idt]);
    let (rows, row_idx, counts) = (&init[0], &init[1], &init[2]);
    let xq_rows = eval(Op::DynamicQuant, &[rows]);
    let w3 = |v: &[i64], n: usize, kk: usize| Tensor::i64(vec![e, n, kk], v.to_vec());
    let s2 = |v: &[f32], n: usize| Tensor::f32(vec![e, n], v.to_vec());
    let gqmm =
        |q: &[Tensor], w: &Tensor, sc: &Tensor| eval(Op::GroupedQuantMatMul, &[&q[0], w, sc, &q[1], counts]).remove(0);
    let gate = gqmm(&xq_rows, &w3(&wg, i, h), &s2(&sg, i));
    let up = gqmm(&xq_rows, &w3(&wu, i, h), &s2(&su, i));
    let act = eval(Op::SwiGlu, &[&gate, &up]).remove(0);
    let aq = eval(Op::DynamicQuant, &[&act]);
    let y = gqmm(&aq, &w3(&wd, h, i), &s2(&sd, h));
    // The finalize's `weight * y` per sorted row.
    let mut want_ys = vec![0f32; s * h];
    for (p, &r) in row_idx.as_i64().iter().enumerate() {
        let r = r as usize;
        for c in 0..h {
            want_ys[r * h + c] = weights[p] * y.as_f32()[r * h + c];
        }
    }
    let xq_tokens = eval(Op::DynamicQuant, &[&xt]);

    let td = Dim::tokens();
    let sdim = Dim::tokens().mul(&Dim::c(k)).unwrap();
    let route = route_kernel(k, e);
    let gate_up = kernel(
        "gate_up",
        KernelKind::MoeGateUpQuant,
        vec![
            spec(DType::I8, vec![td.clone(), Dim::c(h)]),
            spec(DType::F32, vec![td.clone()]),
            spec(DType::I64, vec![Dim::c(e + 1)]),
            spec(DType::I64, vec![sdim.clone()]),
            panel_spec(&[e, i, h]),
            spec(DType::F32, vec![Dim::c(e), Dim::c(i)]),
            panel_spec(&[e, i, h]),
            spec(DType::F32, vec![Dim::c(e), Dim::c(i)]),
            spec(DType::I8, vec![sdim.clone(), Dim::c(i)]),
            spec(DType::F32, vec![sdim.clone()]),
        ],
    );
    let down = kernel(
        "down",
        KernelKind::MoeDownQuant,
        vec![
            spec(DType::I8, vec![sdim.clone(), Dim::c(i)]),
            spec(DType::F32, vec![sdim.clone()]),
            spec(DType::I64, vec![Dim::c(e + 1)]),
            spec(DType::F32, vec![sdim.clone()]),
            panel_spec(&[e, h, i]),
            spec(DType::F32, vec![Dim::c(e), Dim::c(h)]),
            spec(DType::F32, vec![sdim.clone(), Dim::c(h)]),
        ],
    );
    let syms = [t as i64, 0];
    let b = panguc_ir::shape::bindings(t, 0);
    assert_eq!(gate_up.tiles.eval(&b).unwrap() as usize, s, "one tile per sorted row");
    let p = program(vec![route.clone(), gate_up.clone(), down.clone()]);
    for tier_name in runnable_tiers() {
        with_jit(&p, &tier(tier_name), |get| {
            let mut r = vec![
                bytes_f32(&weights),
                bytes_i64(&ids),
                vec![0u8; (e + 1) * 8],
                vec![0u8; s * 8],
                vec![0u8; s * 4],
                vec![0u8; s * 8],
            ];
            run_tiles(get("route").unwrap(), &mut r, &syms, 1, 0);
            let slot_row: Vec<i64> = r[5].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(slot_row, row_idx.as_i64(), "moe_route sorts as moe_init_routing does");
            let mut g = vec![
                i8_bytes(xq_tokens[0].as_i64()),
                bytes_f32(xq_tokens[1].as_f32()),
                r[2].clone(),
                r[3].clone(),
                panel_bytes(&wg, &[e, i, h]),
                bytes_f32(&sg),
                panel_bytes(&wu, &[e, i, h]),
                bytes_f32(&su),
                vec![0u8; s * i],
                vec![0u8; s * 4],
            ];
            run_tiles(get("gate_up").unwrap(), &mut g, &syms, s as u64, 0);
            assert_eq!(i8s(&g[8]), aq[0].as_i64(), "{tier_name}: quantized activations");
            assert_eq!(bits(&f32s(&g[9])), bits(aq[1].as_f32()), "{tier_name}: activation scales");
            let mut d = vec![
                g[8].clone(),
                g[9].clone(),
                r[2].clone(),
                r[4].clone(),
                panel_bytes(&wd, &[e, h, i]),
                bytes_f32(&sd),
                vec![0u8; s * h * 4],
            ];
            run_tiles(get("down").unwrap(), &mut d, &syms, s as u64, 0);
            assert_eq!(bits(&f32s(&d[6])), bits(&want_ys), "{tier_name}: weighted expert outputs");
        })
        .unwrap();
    }
}

/// The shared expert: one expert, every row, no routing; a zero row too.
/// 4 rows (one partial block of rows) and 2R + 3 (two whole blocks and a
/// partial one); I = 10 (a partial panel of columns), H = 130 (a partial
/// 4-k group).
#[test]
fn shared_gate_up_quant_matches_the_reference_chain_bit_for_bit() {
    for t in [4, 2 * panguc_codegen_cpu::EXPERT_BLOCK_ROWS + 3] {
        check_shared_gate_up(t);
    }
}

fn check_shared_gate_up(t: usize) {
    let (h, i) = (130usize, 10usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let mut x: Vec<f32> = (0..t * h).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    x[h..2 * h].iter_mut().for_each(|v| *v = 0.0);
    let (wg, wu) = (random_i8(&mut rng, i * h), random_i8(&mut rng, i * h));
    let (sg, su) = (scales(&mut rng, i), scales(&mut rng, i));
    let xq = eval(Op::DynamicQuant, &[&Tensor::f32(vec![t, h], x)]);
    let qmm = |w: &[i64], sc: &[f32]| {
        let (w, sc) = (Tensor::i64(vec![i, h], w.to_vec()), Tensor::f32(vec![i], sc.to_vec()));
        eval(Op::QuantMatMulPerToken, &[&xq[0], &w, &sc, &xq[1]]).remove(0)
    };
    let act = eval(Op::SwiGlu, &[&qmm(&wg, &sg), &qmm(&wu, &su)]).remove(0);
    let want = eval(Op::DynamicQuant, &[&act]);

    let td = Dim::tokens();
    let k = kernel(
        "shared",
        KernelKind::QuantGateUpQuant,
        vec![
            spec(DType::I8, vec![td.clone(), Dim::c(h)]),
            spec(DType::F32, vec![td.clone()]),
            panel_spec(&[i, h]),
            spec(DType::F32, vec![Dim::c(i)]),
            panel_spec(&[i, h]),
            spec(DType::F32, vec![Dim::c(i)]),
            spec(DType::I8, vec![td.clone(), Dim::c(i)]),
            spec(DType::F32, vec![td.clone()]),
        ],
    );
    let p = program(vec![k]);
    for tier_name in runnable_tiers() {
        with_jit(&p, &tier(tier_name), |get| {
            let mut b = vec![
                i8_bytes(xq[0].as_i64()),
                bytes_f32(xq[1].as_f32()),
                panel_bytes(&wg, &[i, h]),
                bytes_f32(&sg),
                panel_bytes(&wu, &[i, h]),
                bytes_f32(&su),
                vec![0u8; t * i],
                vec![0u8; t * 4],
            ];
            run_tiles(get("shared").unwrap(), &mut b, &[t as i64, 0], t as u64, 0);
            assert_eq!(i8s(&b[6]), want[0].as_i64(), "{tier_name} t={t}: quantized activations");
            assert_eq!(bits(&f32s(&b[7])), bits(want[1].as_f32()), "{tier_name} t={t}: activation scales");
        })
        .unwrap();
    }
}

/// `dyn_quant_matmul`: `dynamic_quant` then `quant_matmul_per_token`, the
/// bias add and the residual add after it in one kernel, with and without
/// each add; N = 37 (two whole column blocks and a partial one), K = 72 (a
/// VNNI step and a tail), a zero row.
#[test]
fn dyn_quant_matmul_matches_dynamic_quant_then_the_int8_matmul_bit_for_bit() {
    let (t, kd, n) = (3usize, 72usize, 37usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let mut x: Vec<f32> = (0..t * kd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    x[kd..2 * kd].iter_mut().for_each(|v| *v = 0.0);
    let w = random_i8(&mut rng, n * kd);
    let ws = scales(&mut rng, n);
    let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    // A residual stream much larger than the projection, as after attention,
    // so the order of the two adds shows in the bits.
    let residual: Vec<f32> = (0..t * n).map(|_| rng.random_range(-40.0f32..40.0)).collect();
    let xq = eval(Op::DynamicQuant, &[&Tensor::f32(vec![t, kd], x.clone())]);
    let (wt, st) = (Tensor::i64(vec![n, kd], w.clone()), Tensor::f32(vec![n], ws.clone()));
    let y = eval(Op::QuantMatMulPerToken, &[&xq[0], &wt, &st, &xq[1]]).remove(0);
    let add = |a: &Tensor, b: &Tensor| eval(Op::Binary(panguc_ir::op::BinaryOp::Add), &[a, b]).remove(0);
    let (bias_t, res_t) = (Tensor::f32(vec![n], bias.clone()), Tensor::f32(vec![t, n], residual.clone()));

    let td = Dim::tokens();
    for (with_bias, with_residual) in [(true, false), (true, true), (false, true), (false, false)] {
        let mut want = y.clone();
        let mut args = vec![
            spec(DType::F32, vec![td.clone(), Dim::c(kd)]),
            spec(DType::I8, vec![Dim::c(n), Dim::c(kd)]),
            spec(DType::F32, vec![Dim::c(n)]),
        ];
        let mut b = vec![bytes_f32(&x), i8_bytes(&w), bytes_f32(&ws)];
        if with_bias {
            want = add(&want, &bias_t);
            args.push(spec(DType::F32, vec![Dim::c(n)]));
            b.push(bytes_f32(&bias));
        }
        if with_residual {
            want = add(&want, &res_t);
            args.push(spec(DType::F32, vec![td.clone(), Dim::c(n)]));
            b.push(bytes_f32(&residual));
        }
        args.push(spec(DType::F32, vec![td.clone(), Dim::c(n)]));
        b.push(vec![0u8; t * n * 4]);
        let out = b.len() - 1;
        let kind = KernelKind::DynQuantMatMul { bias: with_bias, residual: with_residual };
        let k = kernel("dqmm", kind, args);
        let tiles = k.tiles.eval(&panguc_ir::shape::bindings(t, 0)).unwrap();
        assert_eq!(tiles as usize, n.div_ceil(16));
        let p = program(vec![k]);
        let label = format!("bias {with_bias}, residual {with_residual}");
        if with_bias && with_residual {
            // The other order of the adds gives other bits somewhere: the
            // check below can tell them apart.
            let other = add(&y, &add(&res_t, &bias_t));
            assert_ne!(bits(other.as_f32()), bits(want.as_f32()), "{label}: the data cannot tell the orders apart");
        }
        for tier_name in runnable_tiers() {
            with_jit(&p, &tier(tier_name), |get| {
                let mut b = b.clone();
                run_tiles(get("dqmm").unwrap(), &mut b, &[t as i64, 0], tiles, 0);
                assert_eq!(
                    bits(&f32s(&b[out])),
                    bits(want.as_f32()),
                    "{tier_name} ({label}): int8 matmul of the quantized rows"
                );
            })
            .unwrap();
        }
    }
}

/// `static_quant_matmul`: static W8A8's per-tensor `quantize` (with an
/// offset, and inputs past the int8 range so the clamp shows) then the
/// static `quant_matmul` (int32 quant_bias, deq_scale as i64-encoded f32
/// bits) in one kernel; N = 37 (two whole column blocks and a partial one),
/// K = 72 (a VNNI step and a tail).
#[test]
fn static_quant_matmul_matches_quantize_then_the_static_int8_matmul_bit_for_bit() {
    let (t, kd, n) = (3usize, 72usize, 37usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
    let x: Vec<f32> = (0..t * kd).map(|_| rng.random_range(-4.0f32..6.0)).collect();
    let (s, o) = (0.04f32, 3.0f32);
    let w = random_i8(&mut rng, n * kd);
    let qbias: Vec<i64> = (0..n as i64).map(|i| i * 1000 - 2500).collect();
    let deq: Vec<i64> = (0..n).map(|i| (0.001f32 * (i + 1) as f32).to_bits() as i64 | (7 << 40)).collect();
    let xq = eval(
        Op::Quantize,
        &[&Tensor::f32(vec![t, kd], x.clone()), &Tensor::f32(vec![1], vec![s]), &Tensor::f32(vec![1], vec![o])],
    )
    .remove(0);
    assert!(xq.as_i64().contains(&127), "some inputs clamp");
    let wt = Tensor::i64(vec![n, kd], w.clone());
    let want =
        eval(Op::QuantMatMul, &[&xq, &wt, &Tensor::i64(vec![n], qbias.clone()), &Tensor::i64(vec![n], deq.clone())])
            .remove(0);

    let td = Dim::tokens();
    let args = vec![
        spec(DType::F32, vec![td.clone(), Dim::c(kd)]),
        spec(DType::F32, vec![Dim::c(1)]),
        spec(DType::F32, vec![Dim::c(1)]),
        spec(DType::I8, vec![Dim::c(n), Dim::c(kd)]),
        spec(DType::I32, vec![Dim::c(n)]),
        spec(DType::I64, vec![Dim::c(n)]),
        spec(DType::F32, vec![td.clone(), Dim::c(n)]),
    ];
    let k = kernel("sqmm", KernelKind::StaticQuantMatMul, args);
    let tiles = k.tiles.eval(&panguc_ir::shape::bindings(t, 0)).unwrap();
    assert_eq!(tiles as usize, n.div_ceil(16));
    let qbias_bytes: Vec<u8> = qbias.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect();
    let b = vec![
        bytes_f32(&x),
        bytes_f32(&[s]),
        bytes_f32(&[o]),
        i8_bytes(&w),
        qbias_bytes,
        bytes_i64(&deq),
        vec![0u8; t * n * 4],
    ];
    let p = program(vec![k]);
    for tier_name in runnable_tiers() {
        with_jit(&p, &tier(tier_name), |get| {
            let mut b = b.clone();
            run_tiles(get("sqmm").unwrap(), &mut b, &[t as i64, 0], tiles, 0);
            assert_eq!(
                bits(&f32s(&b[6])),
                bits(want.as_f32()),
                "{tier_name}: static int8 matmul of the quantized rows"
            );
        })
        .unwrap();
    }
}

/// The routed static W8A8 experts (`moe_gate_up_static`, `moe_down_static`
/// after `moe_route`) against the importer's dense form over every expert:
/// per-expert `quantize` (inputs past the int8 range so the clamp shows)
/// and `quant_matmul` of gate and up, `swiglu`, `quantize`, `quant_matmul`
/// down, times the routing weight. Each sorted row must hold its (token,
/// expert) pair's dense values bit for bit. Sizes as the W8A8_DYNAMIC test
/// (expert 2 receives no row).
#[test]
fn routed_static_expert_kernels_match_the_dense_reference_bit_for_bit() {
    let t = 5;
    let ids: Vec<i64> = (0..t).flat_map(|r| if r % 2 == 0 { [0, 3] } else { [1, 3] }).collect();
    check_routed_static((t, 72, 6, 4, 2), &ids, 5);
}

/// The static experts at the block edges of the W8A8_DYNAMIC test.
#[test]
fn routed_static_expert_kernels_match_the_dense_reference_at_block_edges() {
    let (ids, experts) = block_edge_ids();
    check_routed_static((ids.len(), 70, 20, experts, 1), &ids, 12);
}

fn check_routed_static((t, h, i, e, k): (usize, usize, usize, usize, usize), ids: &[i64], seed: u64) {
    let s = t * k;
    assert_eq!(ids.len(), s);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..t * h).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    let weights: Vec<f32> = (0..s).map(|_| rng.random_range(0.1f32..1.0)).collect();
    let (wg, wu, wd) = (random_i8(&mut rng, e * i * h), random_i8(&mut rng, e * i * h), random_i8(&mut rng, e * h * i));
    // Per expert: input scales (gate and up differ), offsets, int32 biases
    // and float deq scales per output channel.
    let mut per_expert = |lo: f32, hi: f32| -> Vec<f32> { (0..e).map(|_| rng.random_range(lo..hi)).collect() };
    let (gs, us, ds) = (per_expert(0.015, 0.03), per_expert(0.015, 0.03), per_expert(0.002, 0.01));
    let (go, uo, dof) = (per_expert(-3.0, 3.0), per_expert(-3.0, 3.0), per_expert(-3.0, 3.0));
    let ints = |rng: &mut rand_chacha::ChaCha8Rng, n: usize| -> Vec<i64> {
        (0..n).map(|_| rng.random_range(-3000..3000)).collect()
    };
    let (qbg, qbu, qbd) = (ints(&mut rng, e * i), ints(&mut rng, e * i), ints(&mut rng, e * h));
    let (dqg, dqu, dqd) = (scales(&mut rng, e * i), scales(&mut rng, e * i), scales(&mut rng, e * h));

    // The dense reference over every expert.
    let col = |v: &[f32]| Tensor::f32(vec![e, 1, 1], v.to_vec());
    let quantize = |a: &Tensor, sc: &[f32], off: &[f32]| eval(Op::Quantize, &[a, &col(sc), &col(off)]).remove(0);
    let qmm = |a: &Tensor, w: &[i64], n: usize, kk: usize, qb: &[i64], dq: &[f32]| {
        let w = Tensor::i64(vec![e, n, kk], w.to_vec());
        let (qb, dq) = (Tensor::i64(vec![e, n], qb.to_vec()), Tensor::f32(vec![e, n], dq.to_vec()));
        eval(Op::QuantMatMul, &[a, &w, &qb, &dq]).remove(0)
    };
    let xt = Tensor::f32(vec![t, h], x.clone());
    let xg = quantize(&xt, &gs, &go);
    assert!(xg.as_i64().iter().any(|v| v.abs() >= 127), "some inputs clamp");
    let gate = qmm(&xg, &wg, i, h, &qbg, &dqg);
    let up = qmm(&quantize(&xt, &us, &uo), &wu, i, h, &qbu, &dqu);
    let act = eval(Op::SwiGlu, &[&gate, &up]).remove(0);
    let aq = quantize(&act, &ds, &dof);
    let y = qmm(&aq, &wd, h, i, &qbd, &dqd);
    // Pair (token, slot p) of expert `ids[p]` -> its dense rows.
    let pair = |p: usize| (ids[p] as usize, p / k);

    let (td, sdim) = (Dim::tokens(), Dim::tokens().mul(&Dim::c(k)).unwrap());
    let vec_e = || spec(DType::F32, vec![Dim::c(e), Dim::c(1), Dim::c(1)]);
    let proj = |n: usize, kk: usize| {
        vec![
            vec_e(),
            vec_e(),
            spec(DType::I8, vec![Dim::c(e), Dim::c(n), Dim::c(kk)]),
            spec(DType::I32, vec![Dim::c(e), Dim::c(n)]),
            spec(DType::F32, vec![Dim::c(e), Dim::c(n)]),
        ]
    };
    let mut gu_args = vec![
        spec(DType::F32, vec![td.clone(), Dim::c(h)]),
        spec(DType::I64, vec![Dim::c(e + 1)]),
        spec(DType::I64, vec![sdim.clone()]),
    ];
    for _ in 0..2 {
        let mut p = proj(i, h);
        p[2] = panel_spec(&[e, i, h]);
        gu_args.extend(p);
    }
    gu_args.extend([vec_e(), vec_e(), spec(DType::I8, vec![sdim.clone(), Dim::c(i)])]);
    let gate_up = kernel("gate_up", KernelKind::MoeGateUpStatic, gu_args);
    let mut down_args = vec![
        spec(DType::I8, vec![sdim.clone(), Dim::c(i)]),
        spec(DType::I64, vec![Dim::c(e + 1)]),
        spec(DType::F32, vec![sdim.clone()]),
    ];
    down_args.push(panel_spec(&[e, h, i]));
    down_args.extend(proj(h, i)[3..].iter().cloned());
    down_args.push(spec(DType::F32, vec![sdim, Dim::c(h)]));
    let down = kernel("down", KernelKind::MoeDownStatic, down_args);
    let b = panguc_ir::shape::bindings(t, 0);
    assert_eq!(gate_up.tiles.eval(&b).unwrap() as usize, s, "one tile per sorted row");
    assert_eq!(down.tiles.eval(&b).unwrap() as usize, s, "one tile per sorted row");
    let syms = [t as i64, 0];
    let i32_bytes = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect() };
    let p = program(vec![route_kernel(k, e), gate_up, down]);
    for tier_name in runnable_tiers() {
        with_jit(&p, &tier(tier_name), |get| {
            let mut r = vec![
                bytes_f32(&weights),
                bytes_i64(ids),
                vec![0u8; (e + 1) * 8],
                vec![0u8; s * 8],
                vec![0u8; s * 4],
                vec![0u8; s * 8],
            ];
            run_tiles(get("route").unwrap(), &mut r, &syms, 1, 0);
            let slot_row: Vec<usize> =
                r[5].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize).collect();
            let mut g = vec![bytes_f32(&x), r[2].clone(), r[3].clone()];
            for (sc, off, w, qb, dq) in [(&gs, &go, &wg, &qbg, &dqg), (&us, &uo, &wu, &qbu, &dqu)] {
                g.extend([bytes_f32(sc), bytes_f32(off), panel_bytes(w, &[e, i, h]), i32_bytes(qb), bytes_f32(dq)]);
            }
            g.extend([bytes_f32(&ds), bytes_f32(&dof), vec![0u8; s * i]]);
            run_tiles(get("gate_up").unwrap(), &mut g, &syms, s as u64, 0);
            let got_aq = i8s(&g[15]);
            for (p, &row) in slot_row.iter().enumerate() {
                let (ex, tok) = pair(p);
                let want = &aq.as_i64()[(ex * t + tok) * i..][..i];
                assert_eq!(&got_aq[row * i..][..i], want, "{tier_name}: quantized activation of slot {p}");
            }
            let mut d = vec![
                g[15].clone(),
                r[2].clone(),
                r[4].clone(),
                panel_bytes(&wd, &[e, h, i]),
                i32_bytes(&qbd),
                bytes_f32(&dqd),
                vec![0u8; s * h * 4],
            ];
            run_tiles(get("down").unwrap(), &mut d, &syms, s as u64, 0);
            let ys = f32s(&d[6]);
            for (p, &row) in slot_row.iter().enumerate() {
                let (ex, tok) = pair(p);
                let want: Vec<f32> = y.as_f32()[(ex * t + tok) * h..][..h].iter().map(|v| v * weights[p]).collect();
                assert_eq!(bits(&ys[row * h..][..h]), bits(&want), "{tier_name}: weighted expert output of slot {p}");
            }
        })
        .unwrap();
    }
}

/// `quant_gate_up_static`: the shared expert's static gate and up (each
/// quantizing the input with its own per-tensor scale and offset) and the
/// SwiGLU, against `quantize -> quant_matmul` twice and `swiglu`.
#[test]
fn shared_static_gate_up_matches_the_reference_chain_bit_for_bit() {
    for t in [4, 2 * panguc_codegen_cpu::EXPERT_BLOCK_ROWS + 3] {
        check_shared_static_gate_up(t);
    }
}

fn check_shared_static_gate_up(t: usize) {
    let (h, i) = (130usize, 10usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let x: Vec<f32> = (0..t * h).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    let (wg, wu) = (random_i8(&mut rng, i * h), random_i8(&mut rng, i * h));
    let ints =
        |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<i64> { (0..i).map(|_| rng.random_range(-3000..3000)).collect() };
    let (qbg, qbu) = (ints(&mut rng), ints(&mut rng));
    let (dqg, dqu) = (scales(&mut rng, i), scales(&mut rng, i));
    let ((gs, go), (us, uo)) = ((0.02f32, -1.0f32), (0.017f32, 2.0f32));
    let xt = Tensor::f32(vec![t, h], x.clone());
    let proj = |sc: f32, off: f32, w: &[i64], qb: &[i64], dq: &[f32]| {
        let one = |v: f32| Tensor::f32(vec![1], vec![v]);
        let xq = eval(Op::Quantize, &[&xt, &one(sc), &one(off)]).remove(0);
        let (w, qb, dq) =
            (Tensor::i64(vec![i, h], w.to_vec()), Tensor::i64(vec![i], qb.to_vec()), Tensor::f32(vec![i], dq.to_vec()));
        eval(Op::QuantMatMul, &[&xq, &w, &qb, &dq]).remove(0)
    };
    let want = eval(Op::SwiGlu, &[&proj(gs, go, &wg, &qbg, &dqg), &proj(us, uo, &wu, &qbu, &dqu)]).remove(0);

    let td = Dim::tokens();
    let one = || spec(DType::F32, vec![Dim::c(1)]);
    let weights = || {
        vec![one(), one(), panel_spec(&[i, h]), spec(DType::I32, vec![Dim::c(i)]), spec(DType::F32, vec![Dim::c(i)])]
    };
    let mut args = vec![spec(DType::F32, vec![td.clone(), Dim::c(h)])];
    args.extend(weights());
    args.extend(weights());
    args.push(spec(DType::F32, vec![td, Dim::c(i)]));
    let k = kernel("shared", KernelKind::QuantGateUpStatic, args);
    assert_eq!(k.tiles.eval(&panguc_ir::shape::bindings(t, 0)).unwrap() as usize, t, "one tile per row");
    let i32_bytes = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect() };
    let p = program(vec![k]);
    for tier_name in runnable_tiers() {
        with_jit(&p, &tier(tier_name), |get| {
            let mut b = vec![bytes_f32(&x)];
            for (sc, off, w, qb, dq) in [(gs, go, &wg, &qbg, &dqg), (us, uo, &wu, &qbu, &dqu)] {
                b.extend([bytes_f32(&[sc]), bytes_f32(&[off]), panel_bytes(w, &[i, h]), i32_bytes(qb), bytes_f32(dq)]);
            }
            b.push(vec![0u8; t * i * 4]);
            run_tiles(get("shared").unwrap(), &mut b, &[t as i64, 0], t as u64, 0);
            assert_eq!(bits(&f32s(&b[11])), bits(want.as_f32()), "{tier_name}: shared expert activation");
        })
        .unwrap();
    }
}

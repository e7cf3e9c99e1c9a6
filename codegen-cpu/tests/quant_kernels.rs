//! The int8 kernels compiled through the JIT for each CPU tier and checked
//! bit for bit against the reference interpreter's quantization ops
//! (`panguc_ir::interp::quant`): the int32 sums are exact, and the float
//! epilogues follow the reference's operation order, so nothing differs.

use panguc_codegen_cpu::{compile, with_jit, KernelFn, BASELINE_TIER, BF16_TIER};
use panguc_ir::interp::quant;
use panguc_ir::kernel::{ArgSpec, Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::{DType, Dim, Tensor};
use rand::{Rng, SeedableRng};

mod common;
use common::{runnable_tiers, tier};

fn spec(dtype: DType, shape: Vec<Dim>) -> ArgSpec {
    common::spec(dtype, shape, Layout::RowMajor)
}

fn kernel(name: &str, kind: KernelKind, args: Vec<ArgSpec>) -> Kernel {
    common::kernel(name, kind, args, Extent::constant(0))
}

fn program(kernels: Vec<Kernel>) -> KernelProgram {
    common::program("test", &["tokens", "past"], kernels)
}

fn run(f: KernelFn, bufs: &mut [Vec<u8>], tokens: usize, tiles: u64) {
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let syms = [tokens as i64, 0];
    let mut s = vec![0u8; 1];
    // SAFETY: buffers match the kernel's argument specs.
    unsafe { f(ptrs.as_ptr(), syms.as_ptr(), 0, tiles as i64, s.as_mut_ptr()) };
}

use common::{bits, bytes_f32 as f32_bytes, f32s, i8_bytes, i8s};

fn random_i8(rng: &mut impl Rng, n: usize) -> Vec<i64> {
    // Include both clamp bounds: they are where the +128 shift matters.
    (0..n)
        .map(|i| {
            if i % 17 == 0 {
                -128
            } else if i % 19 == 0 {
                127
            } else {
                rng.random_range(-128..=127)
            }
        })
        .collect()
}

/// The int8 weight layouts a matmul kernel accepts: row-major, and the
/// dot-product panels the scheduler packs weights in.
const DOT_PANELS: Layout = Layout::DotPanels { nr: 16, kg: 4 };

/// `w` (`[.., N, K]` int8 values) stored in `layout`.
fn weight_bytes(w: &[i64], shape: &[usize], layout: Layout) -> Vec<u8> {
    layout.pack(&i8_bytes(w), shape, 1)
}

/// Dynamic per-token quantization, a zero row included, and the W8A8_DYNAMIC
/// matmul against shared and stacked (per-expert) weights (whole and partial
/// blocks of 16 output columns per tile), row-major and in dot-product
/// panels, for contraction lengths with and without a VNNI tail (64 = one
/// step, 200 = 3 steps + 8, 24 = tail only, 203 = a partial 4-k group) and
/// row counts that fill register blocks or leave a remainder (4, 11).
#[test]
fn dynamic_quant_and_per_token_matmul_match_the_reference_bit_for_bit() {
    let t = Dim::tokens();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for tier_name in runnable_tiers() {
        // N = 37: two full column blocks and a partial one.
        for (k, n, experts, m) in [(64usize, 5usize, 0usize, 4usize), (200, 37, 3, 4), (24, 3, 2, 11), (203, 19, 0, 11)]
        {
            let dq = kernel(
                "dq",
                KernelKind::DynamicQuant,
                vec![
                    spec(DType::F32, vec![t.clone(), Dim::c(k)]),
                    spec(DType::I8, vec![t.clone(), Dim::c(k)]),
                    spec(DType::F32, vec![t.clone()]),
                ],
            );
            let mut wshape = vec![Dim::c(n), Dim::c(k)];
            let mut sshape = vec![Dim::c(n)];
            let mut oshape = vec![t.clone(), Dim::c(n)];
            if experts > 0 {
                wshape.insert(0, Dim::c(experts));
                sshape.insert(0, Dim::c(experts));
                oshape.insert(0, Dim::c(experts));
            }
            let qmm = |name: &str, layout: Layout| {
                kernel(
                    name,
                    KernelKind::QuantMatMul { per_token: true, bias: false },
                    vec![
                        spec(DType::I8, vec![t.clone(), Dim::c(k)]),
                        common::spec(DType::I8, wshape.clone(), layout),
                        spec(DType::F32, sshape.clone()),
                        spec(DType::F32, vec![t.clone()]),
                        spec(DType::F32, oshape.clone()),
                    ],
                )
            };
            let (qmm, qmm_panels) = (qmm("qmm", Layout::RowMajor), qmm("qmm_panels", DOT_PANELS));
            let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            x[k..2 * k].iter_mut().for_each(|v| *v = 0.0);
            // Ties at the rounding boundary: 127 * 0.5 / 127 = 0.5.
            x[2 * k] = 127.0;
            x[2 * k + 1] = 0.5;
            x[2 * k + 2] = -1.5;
            let batches = experts.max(1);
            let w = random_i8(&mut rng, batches * n * k);
            let ws: Vec<f32> = (0..batches * n).map(|_| rng.random_range(0.001f32..0.02)).collect();

            let xt = Tensor::f32(vec![m, k], x.clone());
            let want_q = quant::dynamic_quant(&xt).unwrap();
            let wdims: Vec<usize> = wshape.iter().map(|d| d.as_const().unwrap()).collect();
            let sdims: Vec<usize> = sshape.iter().map(|d| d.as_const().unwrap()).collect();
            let want = quant::quant_matmul_per_token(
                &want_q[0],
                &Tensor::i64(wdims.clone(), w.clone()),
                &Tensor::f32(sdims, ws.clone()),
                &want_q[1],
            )
            .unwrap();

            let p = program(vec![dq.clone(), qmm.clone(), qmm_panels]);
            with_jit(&p, &tier(tier_name), |get| {
                let mut b = vec![f32_bytes(&x), vec![0u8; m * k], vec![0u8; m * 4]];
                run(get("dq").unwrap(), &mut b, m, m as u64);
                assert_eq!(i8s(&b[1]), want_q[0].as_i64(), "{tier_name} k={k}: quantized rows");
                assert_eq!(bits(&f32s(&b[2])), bits(want_q[1].as_f32()), "{tier_name} k={k}: scales");
                let out_len = batches * m * n;
                let tiles = qmm.tiles.eval(&panguc_ir::shape::bindings(m, 0)).unwrap();
                assert_eq!(tiles as usize, batches * n.div_ceil(16));
                for (name, layout) in [("qmm", Layout::RowMajor), ("qmm_panels", DOT_PANELS)] {
                    let wb = weight_bytes(&w, &wdims, layout);
                    let mut c = vec![b[1].clone(), wb, f32_bytes(&ws), b[2].clone(), vec![0u8; out_len * 4]];
                    run(get(name).unwrap(), &mut c, m, tiles);
                    let what = format!("{tier_name} k={k} m={m} experts={experts} {layout:?}: matmul");
                    assert_eq!(bits(&f32s(&c[4])), bits(want.as_f32()), "{what}");
                }
            })
            .unwrap();
        }
    }
}

/// Static W8A8: per-tensor quantize with an offset, then the int8 matmul
/// with an int32 quant_bias and an int64-encoded deq_scale; and the int8 KV
/// round trip (per-channel quantize, dequantize).
#[test]
fn static_quant_matmul_and_kv_quantize_match_the_reference_bit_for_bit() {
    let t = Dim::tokens();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    // N = 22: a whole block of 16 columns and a partial one.
    let (k, n, m) = (136usize, 22usize, 3usize);
    for tier_name in runnable_tiers() {
        let quantize = kernel(
            "quantize",
            KernelKind::Quantize,
            vec![
                spec(DType::F32, vec![t.clone(), Dim::c(k)]),
                spec(DType::F32, vec![Dim::c(1)]),
                spec(DType::F32, vec![Dim::c(1)]),
                spec(DType::I8, vec![t.clone(), Dim::c(k)]),
            ],
        );
        let qmm = |name: &str, layout: Layout| {
            kernel(
                name,
                KernelKind::QuantMatMul { per_token: false, bias: false },
                vec![
                    spec(DType::I8, vec![t.clone(), Dim::c(k)]),
                    common::spec(DType::I8, vec![Dim::c(n), Dim::c(k)], layout),
                    spec(DType::I32, vec![Dim::c(n)]),
                    spec(DType::I64, vec![Dim::c(n)]),
                    spec(DType::F32, vec![t.clone(), Dim::c(n)]),
                ],
            )
        };
        let (qmm, qmm_panels) = (qmm("qmm", Layout::RowMajor), qmm("qmm_panels", DOT_PANELS));
        // Per-channel KV: [T, 2 heads, 4] against scales [2, 4].
        let kvq = kernel(
            "kvq",
            KernelKind::Quantize,
            vec![
                spec(DType::F32, vec![t.clone(), Dim::c(2), Dim::c(4)]),
                spec(DType::BF16, vec![Dim::c(2), Dim::c(4)]),
                spec(DType::BF16, vec![Dim::c(2), Dim::c(4)]),
                spec(DType::I8, vec![t.clone(), Dim::c(2), Dim::c(4)]),
            ],
        );
        let kvd = kernel(
            "kvd",
            KernelKind::Dequantize,
            vec![
                spec(DType::I8, vec![t.clone(), Dim::c(2), Dim::c(4)]),
                spec(DType::BF16, vec![Dim::c(2), Dim::c(4)]),
                spec(DType::BF16, vec![Dim::c(2), Dim::c(4)]),
                spec(DType::F32, vec![t.clone(), Dim::c(2), Dim::c(4)]),
            ],
        );
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4.0f32..6.0)).collect();
        let (s, o) = (0.04f32, 3.0f32);
        let w = random_i8(&mut rng, n * k);
        let bias: Vec<i64> = (0..n as i64).map(|i| i * 1000 - 2500).collect();
        let deq: Vec<i64> = (0..n).map(|i| (0.001f32 * (i + 1) as f32).to_bits() as i64 | (7 << 40)).collect();
        let xq = quant::quantize(
            &Tensor::f32(vec![m, k], x.clone()),
            &Tensor::f32(vec![1], vec![s]),
            &Tensor::f32(vec![1], vec![o]),
        )
        .unwrap();
        let want = quant::quant_matmul(
            &xq,
            &Tensor::i64(vec![n, k], w.clone()),
            &Tensor::i64(vec![n], bias.clone()),
            &Tensor::i64(vec![n], deq.clone()),
        )
        .unwrap();
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let kv: Vec<f32> = (0..m * 8).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let kv_s: Vec<f32> = (0..8).map(|i| bf(0.01 * (i + 1) as f32)).collect();
        let kv_o: Vec<f32> = (0..8).map(|i| bf(i as f32 - 4.0)).collect();
        let sc = Tensor::f32(vec![2, 4], kv_s.clone());
        let oc = Tensor::f32(vec![2, 4], kv_o.clone());
        let kv_q = quant::quantize(&Tensor::f32(vec![m, 2, 4], kv.clone()), &sc, &oc).unwrap();
        let kv_back = quant::dequantize(&kv_q, &sc, &oc).unwrap();
        let bf_bytes =
            |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect() };

        let qmm_tiles = qmm.tiles.eval(&panguc_ir::shape::bindings(m, 0)).unwrap();
        let p = program(vec![quantize, qmm, qmm_panels, kvq, kvd]);
        with_jit(&p, &tier(tier_name), |get| {
            let mut b = vec![f32_bytes(&x), f32_bytes(&[s]), f32_bytes(&[o]), vec![0u8; m * k]];
            run(get("quantize").unwrap(), &mut b, m, m as u64);
            assert_eq!(i8s(&b[3]), xq.as_i64(), "{tier_name}: static quantize");
            let bias_bytes: Vec<u8> = bias.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect();
            let deq_bytes: Vec<u8> = deq.iter().flat_map(|v| v.to_le_bytes()).collect();
            for (name, layout) in [("qmm", Layout::RowMajor), ("qmm_panels", DOT_PANELS)] {
                let wb = weight_bytes(&w, &[n, k], layout);
                let mut c = vec![b[3].clone(), wb, bias_bytes.clone(), deq_bytes.clone(), vec![0u8; m * n * 4]];
                run(get(name).unwrap(), &mut c, m, qmm_tiles);
                assert_eq!(bits(&f32s(&c[4])), bits(want.as_f32()), "{tier_name} {layout:?}: static matmul");
            }
            let mut d = vec![f32_bytes(&kv), bf_bytes(&kv_s), bf_bytes(&kv_o), vec![0u8; m * 8]];
            run(get("kvq").unwrap(), &mut d, m, (m * 2) as u64);
            assert_eq!(i8s(&d[3]), kv_q.as_i64(), "{tier_name}: KV quantize");
            let mut e = vec![d[3].clone(), bf_bytes(&kv_s), bf_bytes(&kv_o), vec![0u8; m * 8 * 4]];
            run(get("kvd").unwrap(), &mut e, m, (m * 2) as u64);
            assert_eq!(bits(&f32s(&e[3])), bits(kv_back.as_f32()), "{tier_name}: KV dequantize");
        })
        .unwrap();
    }
}

/// The AVX-512 tier's int8 dot product is `vpdpbusd`; the baseline tier has
/// no VNNI and must not use it. Compile only: runs on any x86-64 machine.
#[test]
fn the_avx512_tier_uses_vnni_and_the_baseline_does_not() {
    let t = Dim::tokens();
    let qmm = kernel(
        "qmm",
        KernelKind::QuantMatMul { per_token: true, bias: false },
        vec![
            spec(DType::I8, vec![t.clone(), Dim::c(256)]),
            spec(DType::I8, vec![Dim::c(8), Dim::c(256)]),
            spec(DType::F32, vec![Dim::c(8)]),
            spec(DType::F32, vec![t.clone()]),
            spec(DType::F32, vec![t, Dim::c(8)]),
        ],
    );
    let p = program(vec![qmm]);
    let asm = |name: &str| compile(&p, &tier(name)).unwrap().assembly;
    let (base, wide) = (asm(BASELINE_TIER), asm(BF16_TIER));
    assert!(wide.contains("vpdpbusd"), "no vpdpbusd on {BF16_TIER}");
    assert!(!base.contains("vpdpbusd") && !base.contains("zmm"), "VNNI/AVX-512 on {BASELINE_TIER}");
    assert!(base.contains("vpmaddwd"), "the baseline's widening multiply-add is not vectorised");
}

//! Kernels compiled for the host and run in-process through the JIT,
//! checked against straightforward Rust, plus the vectorisation check on
//! the emitted assembly.

use panguc_codegen_cpu::{compile, with_jit, HostTarget, KernelFn};
use panguc_ir::kernel::{tile_extent, ArgSpec, Epilogue, Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::{DType, Dim};
use rand::{Rng, SeedableRng};

fn spec(dtype: DType, shape: Vec<Dim>, layout: Layout) -> ArgSpec {
    ArgSpec { dtype, shape, layout }
}

fn kernel(name: &str, kind: KernelKind, args: Vec<ArgSpec>, scratch: u64) -> Kernel {
    let tiles = tile_extent(&kind, &args).unwrap();
    Kernel { name: name.into(), kind, args, tiles, thread_scratch: Extent::constant(scratch) }
}

fn program(kernels: Vec<Kernel>) -> KernelProgram {
    KernelProgram {
        version: panguc_ir::kernel::KERNEL_PROGRAM_VERSION,
        name: "test".into(),
        symbols: vec!["tokens".into(), "past".into()],
        buffers: vec![],
        weights: vec![],
        kernels,
        launches: vec![],
        inputs: vec![],
        outputs: vec![],
        caches: vec![],
        slots: 0,
    }
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()
}

/// Values exactly representable in bf16, so the reference can use them.
fn bf16_values(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32()).collect()
}

/// Run `f` over all its tiles with the given buffers.
fn run(f: KernelFn, bufs: &mut [Vec<u8>], tokens: usize, tiles: u64, scratch: usize) {
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let syms = [tokens as i64, 0];
    let mut s = vec![0u8; scratch.max(1)];
    // SAFETY: buffers match the kernel's argument specs.
    unsafe { f(ptrs.as_ptr(), syms.as_ptr(), 0, tiles as i64, s.as_mut_ptr()) };
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
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
    let kern = kernel("gemm_bias", KernelKind::Gemm { epilogue: Epilogue::Bias }, args, (k * 16 * 4) as u64);
    let tiles = kern.tiles.eval(&panguc_ir::shape::bindings(1, 0)).unwrap();
    assert_eq!(tiles, 3);
    let p = program(vec![kern]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let w = bf16_values(&mut rng, n * k);
    let bias = bf16_values(&mut rng, n);
    with_jit(&p, &HostTarget::detect().unwrap(), |get| {
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
    let kern = kernel("gate_up", KernelKind::Gemm { epilogue: Epilogue::SwiGlu }, args, (k * 16 * 4) as u64);
    let tiles = kern.tiles.eval(&panguc_ir::shape::bindings(1, 0)).unwrap();
    assert_eq!(tiles, 2);
    let p = program(vec![kern]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let w: Vec<f32> = (0..2 * i * k).map(|_| half::f16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32()).collect();
    let w16: Vec<u8> = w.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
    let m = 9;
    let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    with_jit(&p, &HostTarget::detect().unwrap(), |get| {
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

/// The assembly of a GEMM uses the host's widest vector registers (ymm
/// with AVX2, zmm with AVX-512), and every function carries the host's
/// target-cpu attribute.
#[test]
fn generated_code_uses_the_hosts_wide_vector_registers() {
    let target = HostTarget::detect().unwrap();
    let t = Dim::tokens();
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(256)], Layout::RowMajor),
        spec(DType::BF16, vec![Dim::c(64), Dim::c(256)], Layout::Panels { nr: 16, kn: false }),
        spec(DType::F32, vec![t, Dim::c(64)], Layout::RowMajor),
    ];
    let p = program(vec![kernel("gemm", KernelKind::Gemm { epilogue: Epilogue::None }, args, 256 * 64)]);
    let c = compile(&p, &target).unwrap();
    assert!(c.llvm_ir.contains(&format!("\"target-cpu\"=\"{}\"", target.cpu)), "functions carry target-cpu");
    let reg = match target.vector_lanes() {
        16 => "%zmm",
        8 => "%ymm",
        _ => "%xmm",
    };
    let wide_mul = c.assembly.lines().filter(|l| l.contains("vmulps") && l.contains(reg)).count();
    assert!(wide_mul > 0, "no {reg} multiplies in the GEMM for a {}-lane host", target.vector_lanes());
    assert!(c.symbols == vec!["gemm".to_string()] && !c.object.is_empty());
}

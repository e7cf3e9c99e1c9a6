//! Builders and runners shared by the JIT kernel tests: kernel and
//! program specs, byte conversions, and a runner that splits a launch's
//! tiles into uneven ranges the way the engine's threads claim them.

// Each test binary uses its own subset.
#![allow(dead_code)]

use panguc_codegen_cpu::{HostTarget, KernelFn, Tier, BASELINE_TIER, BF16_TIER};
use panguc_ir::kernel::{tile_extent, ArgSpec, Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::DType;
use rand::Rng;

pub fn spec(dtype: DType, shape: Vec<panguc_ir::Dim>, layout: Layout) -> ArgSpec {
    ArgSpec { dtype, shape, layout }
}

/// A kernel with the tile count the IR prescribes for its kind and args.
pub fn kernel(name: &str, kind: KernelKind, args: Vec<ArgSpec>, scratch: Extent) -> Kernel {
    let tiles = tile_extent(&kind, &args).unwrap();
    Kernel { name: name.into(), kind, args, tiles, thread_scratch: scratch }
}

/// A program of `kernels` alone (no buffers or launches: the tests call
/// the kernels directly), its shape symbols in `symbols` order.
pub fn program(name: &str, symbols: &[&str], kernels: Vec<Kernel>) -> KernelProgram {
    KernelProgram {
        version: panguc_ir::kernel::KERNEL_PROGRAM_VERSION,
        name: name.into(),
        symbols: symbols.iter().map(|s| s.to_string()).collect(),
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

/// The named x86-64 tier for this host's triple.
pub fn tier(name: &str) -> HostTarget {
    Tier::x86(name, &HostTarget::detect().unwrap().triple).expect("known tier").target
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

pub fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Integers in [-128, 127] as the kernels' int8 bytes.
pub fn i8_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().map(|x| *x as i8 as u8).collect()
}

pub fn i8s(b: &[u8]) -> Vec<i64> {
    b.iter().map(|x| *x as i8 as i64).collect()
}

/// Bit patterns, for bit-exact comparisons of floats.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Integers widened to the kernels' i64.
pub fn bytes_i64<T: Copy + Into<i64>>(v: &[T]) -> Vec<u8> {
    v.iter().flat_map(|x| (*x).into().to_le_bytes()).collect()
}

pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()
}

/// Values exactly representable in bf16, so a reference can use them.
pub fn bf16_values(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32()).collect()
}

/// Run `f` over tiles `0..tiles` with shape symbols `syms`, in three
/// uneven ranges (as threads claiming chunks would: a kernel must give the
/// same result however its tiles are split), one scratch buffer of
/// `scratch` bytes reused between them.
pub fn run_tiles(f: KernelFn, bufs: &mut [Vec<u8>], syms: &[i64], tiles: u64, scratch: usize) {
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let mut s = vec![0u8; scratch.max(4)];
    let t = tiles as i64;
    let (a, b) = (t / 3, t / 3 + (t - t / 3 + 1) / 2);
    for (lo, hi) in [(0, a), (a, b), (b, t)] {
        if lo < hi {
            // SAFETY: the buffers match the kernel's argument specs.
            unsafe { f(ptrs.as_ptr(), syms.as_ptr(), lo, hi, s.as_mut_ptr()) };
        }
    }
}

/// The tiers this CPU can run (the AVX-512 one needs VNNI and BW).
pub fn runnable_tiers() -> Vec<&'static str> {
    let mut t = vec![BASELINE_TIER];
    if avx512_tier_runs() {
        t.push(BF16_TIER);
    } else {
        eprintln!("this CPU cannot run the {BF16_TIER} tier: only {BASELINE_TIER} is checked");
    }
    t
}

/// True when this CPU runs the AVX-512 BF16 tier: the runtime loader's
/// check of that tier's features.
pub fn avx512_tier_runs() -> bool {
    let host = HostTarget::detect().expect("host target");
    let tier = Tier::x86(BF16_TIER, &host.triple).expect("known tier");
    panguc_runtime::loader::missing_features(&tier.target.features).is_empty()
}

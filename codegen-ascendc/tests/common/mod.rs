//! Helpers shared by the simulation tests that emit kernels and compare
//! them with the reference interpreter (`emit_sim.rs`, `emit_sim_moe.rs`).

use panguc_codegen_ascendc::emit::{emit_kernel, DeviceKernels, EmitOptions, Env};
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_ir::kernel::{tile_extent, ArgSpec, Extent, Kernel, KernelKind, Layout};
use panguc_ir::{DType, Dim};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Awkward token counts: one, odd, just past a power of two, several tiles.
pub const TOKENS: [u64; 4] = [1, 7, 33, 257];
pub const CORES: u64 = 8;

/// Each target with its activation dtype.
pub fn targets() -> [(Target, DevType); 2] {
    [(Target::Ascend910B, DevType::BF16), (Target::Ascend310P, DevType::F16)]
}

/// Relative tolerance of about two ulps of the stored dtype (see the header
/// of `emit_sim.rs`).
pub fn tol(t: DevType) -> f32 {
    match t {
        DevType::BF16 => 1.0 / 128.0,
        DevType::F16 => 1.0 / 512.0,
        _ => 1e-5,
    }
}

/// A kernel-program kernel with row-major arguments of the given shapes.
pub fn kernel(name: &str, kind: KernelKind, args: Vec<Vec<Dim>>) -> Kernel {
    let args: Vec<ArgSpec> =
        args.into_iter().map(|shape| ArgSpec { dtype: DType::F32, shape, layout: Layout::RowMajor }).collect();
    let tiles = tile_extent(&kind, &args).unwrap_or(Extent::constant(1));
    Kernel { name: name.into(), kind, args, tiles, thread_scratch: Extent::constant(0) }
}

pub fn c(n: usize) -> Dim {
    Dim::c(n)
}

pub fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub fn env(tokens: u64, past: u64) -> Env {
    Env::new(tokens, past, CORES)
}

/// `|got - want| <= rel * max(|want|, floor)` element-wise.
pub fn assert_close(got: &[f32], want: &[f32], rel: f32, floor: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let lim = rel * w.abs().max(floor);
        assert!((g - w).abs() <= lim, "{what}: element {i}: got {g}, want {w} (limit {lim})");
    }
}

pub fn emit(k: &Kernel, dts: &[DevType], target: Target, act: DevType) -> DeviceKernels {
    emit_kernel(k, dts, &EmitOptions::new(target, act).unwrap()).unwrap()
}

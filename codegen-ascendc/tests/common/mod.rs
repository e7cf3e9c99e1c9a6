//! Helpers shared by the simulation tests that emit kernels and compare
//! them with the reference interpreter (`emit_sim.rs`, `emit_sim_moe.rs`).

use panguc_codegen_ascendc::emit::{emit_kernel, ArgRef, DeviceKernels, EmitOptions, Env};
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_codegen_ascendc::weights::tile_nz;
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
    emit_nz(k, dts, target, act, 0)
}

/// [`emit`] allowing the kernel arguments of bit mask `nz_args` to be read
/// pre-tiled (as `emit_program` does for weights only GEMMs read).
pub fn emit_nz(k: &Kernel, dts: &[DevType], target: Target, act: DevType, nz_args: u64) -> DeviceKernels {
    let o = EmitOptions { nz_args, ..EmitOptions::new(target, act).unwrap() };
    emit_kernel(k, dts, &o).unwrap()
}

/// Row-major bytes of kernel argument `arg` (`[.., N, K]` of `elem`-byte
/// elements) as the device kernels read them: pre-tiled if their
/// parameters bound to it say so (they must all agree), else unchanged.
/// `want_nz` checks that the tiled variant was (or was not) emitted.
pub fn device_layout(
    dks: &DeviceKernels,
    arg: usize,
    shape: &[usize],
    elem: usize,
    rm: Vec<u8>,
    want_nz: bool,
) -> Vec<u8> {
    let tiles: Vec<_> =
        dks.kernels.iter().flat_map(|d| &d.params).filter(|p| p.arg == ArgRef::Orig(arg)).map(|p| p.nz).collect();
    assert!(!tiles.is_empty() && tiles.iter().all(|t| *t == tiles[0]), "argument {arg}: {tiles:?}");
    assert_eq!(tiles[0].is_some(), want_nz, "argument {arg}: tiled variant emitted");
    match tiles[0] {
        Some(t) => tile_nz(&rm, shape, elem, t).unwrap(),
        None => rm,
    }
}

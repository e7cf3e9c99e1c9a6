//! The per-token int8 matmul kernel on row-major weights (one dot product
//! per output) against the same kernel on dot-product panels (the
//! register-blocked micro-kernels the scheduler selects), compiled through
//! the JIT for every tier this CPU runs, on one thread, for a decode GEMV
//! and a prefill GEMM of the small preset's hidden size. Prints rates and
//! their ratio; asserts nothing about speed (the outputs must agree).
//!
//! `cargo run -p panguc-codegen-cpu --example int8_matmul_bench` (the kernels are
//! LLVM-optimised whatever the Rust profile)

use panguc_codegen_cpu::{with_jit, HostTarget, KernelFn, Tier, BASELINE_TIER, BF16_TIER};
use panguc_ir::kernel::{tile_extent, ArgSpec, Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::{DType, Dim};
use std::time::Instant;

fn spec(dtype: DType, shape: Vec<Dim>, layout: Layout) -> ArgSpec {
    ArgSpec { dtype, shape, layout }
}

fn qmm(name: &str, k: usize, n: usize, layout: Layout) -> Kernel {
    let t = Dim::tokens();
    let args = vec![
        spec(DType::I8, vec![t.clone(), Dim::c(k)], Layout::RowMajor),
        spec(DType::I8, vec![Dim::c(n), Dim::c(k)], layout),
        spec(DType::F32, vec![Dim::c(n)], Layout::RowMajor),
        spec(DType::F32, vec![t.clone()], Layout::RowMajor),
        spec(DType::F32, vec![t, Dim::c(n)], Layout::RowMajor),
    ];
    let kind = KernelKind::QuantMatMul { per_token: true, bias: false };
    let tiles = tile_extent(&kind, &args).expect("tiles");
    Kernel { name: name.into(), kind, args, tiles, thread_scratch: Extent::constant(0) }
}

/// Best seconds of `reps` runs of all `tiles` tiles on one thread.
fn time(f: KernelFn, bufs: &mut [Vec<u8>], m: usize, tiles: i64, reps: usize) -> f64 {
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let syms = [m as i64, 0];
    let mut scratch = vec![0u8; 64];
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t0 = Instant::now();
        // SAFETY: the buffers have the kernel's argument sizes.
        unsafe { f(ptrs.as_ptr(), syms.as_ptr(), 0, tiles, scratch.as_mut_ptr()) };
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}

fn main() -> anyhow::Result<()> {
    let host = HostTarget::detect()?;
    let (k, n) = (1024usize, 1024usize);
    let layouts = [("row-major", Layout::RowMajor), ("dot panels", Layout::DotPanels { nr: 16, kg: 4 })];
    let program = KernelProgram {
        version: panguc_ir::kernel::KERNEL_PROGRAM_VERSION,
        name: "int8-bench".into(),
        symbols: vec!["tokens".into(), "past".into()],
        buffers: vec![],
        weights: vec![],
        kernels: layouts.iter().enumerate().map(|(i, (_, l))| qmm(&format!("qmm{i}"), k, n, *l)).collect(),
        launches: vec![],
        inputs: vec![],
        outputs: vec![],
        caches: vec![],
        slots: 0,
    };
    // Weights far larger than the caches for the GEMV: many copies, one per rep.
    let w: Vec<u8> = (0..n * k).map(|i| (i * 7919 % 251) as u8).collect();
    let ws: Vec<u8> = (0..n).flat_map(|i| (0.001f32 + i as f32 * 1e-6).to_le_bytes()).collect();
    for tier_name in [BASELINE_TIER, BF16_TIER] {
        let Some(tier) = Tier::x86(tier_name, &host.triple) else { continue };
        let missing = panguc_runtime::loader::missing_features(&tier.target.features);
        if !missing.is_empty() {
            println!("{tier_name}: not runnable here (lacks {})", missing.join(", "));
            continue;
        }
        with_jit(&program, &tier.target, |get| {
            for m in [1usize, 512] {
                let x: Vec<u8> = (0..m * k).map(|i| (i * 31 % 255) as u8).collect();
                let xs: Vec<u8> = (0..m).flat_map(|i| (0.01f32 + i as f32 * 1e-4).to_le_bytes()).collect();
                let tiles = n.div_ceil(16) as i64;
                let mut rates = vec![];
                let mut outs = vec![];
                for (i, (name, layout)) in layouts.iter().enumerate() {
                    let packed = layout.pack(&w, &[n, k], 1);
                    let mut bufs = vec![x.clone(), packed, ws.clone(), xs.clone(), vec![0u8; m * n * 4]];
                    let f = get(&format!("qmm{i}")).expect("kernel");
                    let s = time(f, &mut bufs, m, tiles, if m == 1 { 50 } else { 3 });
                    let ops = 2.0 * (m * n * k) as f64;
                    println!(
                        "{tier_name} {m:>3} x {n} x {k} {name:<10}: {:8.1} us, {:7.2} GOP/s, weights at {:6.2} GB/s",
                        s * 1e6,
                        ops / s / 1e9,
                        (n * k) as f64 / s / 1e9
                    );
                    rates.push(ops / s);
                    outs.push(bufs.pop().expect("out"));
                }
                assert_eq!(outs[0], outs[1], "{tier_name} m={m}: the layouts disagree");
                println!("{tier_name} {m:>3} x {n} x {k}: dot panels / row-major = {:.2}x", rates[1] / rates[0]);
            }
        })?;
    }
    Ok(())
}

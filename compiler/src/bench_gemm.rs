//! The focused GEMM micro-benchmark of `panguc bench`: one packed GEMM
//! kernel of the model (its largest dense one) compiled alone through the
//! JIT for the tier in use and run over a prefill's rows, its tiles split
//! evenly between threads, with nothing else in the step. Against the
//! whole prefill's GEMM rate it separates the micro-kernel's own speed
//! from what the engine adds (the pool's chunking, the other kernels).

use anyhow::{anyhow, Result};
use panguc_codegen_cpu::{with_jit, HostTarget, KernelFn, Tier};
use panguc_ir::kernel::{Epilogue, Kernel, KernelKind, KernelProgram};
use panguc_ir::shape::bindings;
use std::time::Instant;

/// What the micro-benchmark measured.
#[derive(Debug, Clone)]
pub struct GemmMicro {
    /// `M x N x K` of the GEMM.
    pub shape: (usize, usize, usize),
    /// Best FLOP/s on 1 thread and on `threads` threads.
    pub flops_1t: f64,
    pub flops: f64,
}

/// The decoder layers' largest dense GEMM without an epilogue in
/// `program` (among the most launched, so not the LM head), run for `rows`
/// rows on the tier named `tier` (`None` when the program has no such GEMM
/// or the tier is not an x86-64 one).
pub fn gemm_micro(program: &KernelProgram, tier: &str, rows: usize, threads: usize) -> Result<Option<GemmMicro>> {
    let launches = |i: usize| program.launches.iter().filter(|l| l.kernel == i).count();
    let size = |k: &Kernel| k.args[1].layout.stored_len(&static_dims(&k.args[1].shape));
    let Some((_, kernel)) = program
        .kernels
        .iter()
        .enumerate()
        .filter(|(_, k)| k.kind == KernelKind::Gemm { epilogue: Epilogue::None } && k.args[0].shape.len() == 2)
        .max_by_key(|(i, k)| (launches(*i), size(k)))
    else {
        return Ok(None);
    };
    let Some(tier) = Tier::x86(tier, &HostTarget::detect()?.triple) else { return Ok(None) };
    let (a, w, out) = (&kernel.args[0], &kernel.args[1], &kernel.args[2]);
    let b = bindings(rows, 0);
    let k = a.shape[1].as_const().ok_or_else(|| anyhow!("GEMM K is not static"))?;
    let n = out.shape[1].as_const().ok_or_else(|| anyhow!("GEMM N is not static"))?;
    let tiles = kernel.tiles.eval(&b).map_err(|e| anyhow!("{e}"))? as i64;
    let scratch = kernel.thread_scratch.eval(&b).map_err(|e| anyhow!("{e}"))? as usize;
    let one = KernelProgram {
        version: program.version,
        name: "gemm-micro".into(),
        symbols: vec!["tokens".into(), "past".into()],
        buffers: vec![],
        weights: vec![],
        kernels: vec![kernel.clone()],
        launches: vec![],
        inputs: vec![],
        outputs: vec![],
        caches: vec![],
        slots: 0,
    };
    // Deterministic values of a realistic size (all finite, no denormals).
    let mut a_buf: Vec<u8> = (0..rows * k).flat_map(|i| ((i % 251) as f32 / 251.0 - 0.5).to_le_bytes()).collect();
    let w_len = w.layout.stored_len(&static_dims(&w.shape)) * w.dtype.size_bytes();
    let mut w_buf: Vec<u8> = (0..w_len).map(|i| if i % 2 == 1 { 0x3c } else { (i % 253) as u8 }).collect();
    let mut out_buf = vec![0u8; rows * n * 4];
    let syms = [rows as i64, 0i64];
    let ptrs: Vec<usize> = [&mut a_buf, &mut w_buf, &mut out_buf].iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
    let run = |f: KernelFn, threads: usize| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads as i64 {
                    let (lo, hi) = (tiles * t / threads as i64, tiles * (t + 1) / threads as i64);
                    let ptrs = &ptrs;
                    s.spawn(move || {
                        let args: Vec<*mut u8> = ptrs.iter().map(|p| *p as *mut u8).collect();
                        let mut scratch = vec![0u8; scratch.max(64)];
                        // SAFETY: the buffers have the kernel's argument
                        // sizes; threads write disjoint tiles of `out`.
                        unsafe { f(args.as_ptr(), syms.as_ptr(), lo, hi, scratch.as_mut_ptr()) };
                    });
                }
            });
            best = best.min(t0.elapsed().as_secs_f64());
        }
        2.0 * (rows * n * k) as f64 / best
    };
    let (flops_1t, flops) = with_jit(&one, &tier.target, |get| {
        let f = get(&kernel.name).ok_or_else(|| anyhow!("the JIT has no `{}`", kernel.name))?;
        Ok::<_, anyhow::Error>((run(f, 1), run(f, threads.max(1))))
    })??;
    Ok(Some(GemmMicro { shape: (rows, n, k), flops_1t, flops }))
}

fn static_dims(shape: &[panguc_ir::Dim]) -> Vec<usize> {
    shape.iter().map(|d| d.as_const().unwrap_or(0)).collect()
}

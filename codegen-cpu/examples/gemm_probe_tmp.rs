use panguc_codegen_cpu::{with_jit, HostTarget};
use panguc_ir::kernel::*;
use panguc_ir::{DType, Dim};
fn cpu() -> f64 { std::fs::read_to_string("/proc/thread-self/schedstat").unwrap().split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e9 }
fn main() {
    let (m, k, n) = (512usize, 1024usize, 1024usize);
    let t = Dim::tokens();
    for (name, dt) in [("bf16", DType::BF16), ("f32", DType::F32)] {
        let layout = Layout::Panels { nr: 16, kn: false };
        let args = vec![
            ArgSpec { dtype: DType::F32, shape: vec![t.clone(), Dim::c(k)], layout: Layout::RowMajor },
            ArgSpec { dtype: dt, shape: vec![Dim::c(n), Dim::c(k)], layout },
            ArgSpec { dtype: DType::F32, shape: vec![t.clone(), Dim::c(n)], layout: Layout::RowMajor },
        ];
        let kind = KernelKind::Gemm { epilogue: Epilogue::None };
        let tiles = tile_extent(&kind, &args).unwrap();
        let p = KernelProgram { version: KERNEL_PROGRAM_VERSION, name: "p".into(), symbols: vec!["tokens".into(), "past".into()], buffers: vec![], weights: vec![],
            kernels: vec![Kernel { name: "g".into(), kind, args, tiles: tiles.clone(), thread_scratch: Extent::constant(0) }], launches: vec![], inputs: vec![], outputs: vec![], caches: vec![], slots: 0 };
        with_jit(&p, &HostTarget::detect().unwrap(), |get| {
            let f = get("g").unwrap();
            let mut a = vec![0.5f32; m * k];
            let mut w = vec![0u8; n * k * dt.size_bytes()];
            let mut o = vec![0f32; m * n];
            let mut s = vec![0u8; k * 16 * 4];
            let ptrs = [a.as_mut_ptr() as *mut u8, w.as_mut_ptr(), o.as_mut_ptr() as *mut u8];
            for mm in [512i64, 64, 1] {
                let syms = [mm, 0];
                let nt = tiles.eval(&panguc_ir::shape::bindings(mm as usize, 0)).unwrap() as i64;
                let reps = if mm == 1 { 200 } else { 3 };
                let (c0, t0) = (cpu(), std::time::Instant::now());
                for _ in 0..reps { unsafe { f(ptrs.as_ptr(), syms.as_ptr(), 0, nt, s.as_mut_ptr()) }; }
                let (c, w) = (cpu() - c0, t0.elapsed().as_secs_f64());
                let flops = 2.0 * (mm as f64) * (n * k) as f64 * reps as f64;
                let bytes = (n * k * dt.size_bytes()) as f64 * reps as f64;
                println!("{name} M={mm}: {:.1} GFLOP/cpu-s ({:.1} wall), weight stream {:.1} GB/cpu-s", flops / c / 1e9, flops / w / 1e9, bytes / c / 1e9);
            }
        }).unwrap();
    }
}

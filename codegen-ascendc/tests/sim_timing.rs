//! The simulation's per-pipe timing model on kernels whose schedule can be
//! worked out by hand (tests/kernels/timing_cases.cpp, matmul_custom.cpp).
//! The parameters are round numbers (1 GHz, no fixed overheads unless a case
//! needs one) so every expected time below is a short sum.

use std::time::Duration;

use panguc_codegen_ascendc::sim::{SimArg, SimKernel, Soc};
use panguc_codegen_ascendc::timing::{SimTiming, TimingParams};

const CASES: &str = include_str!("kernels/timing_cases.cpp");
const MATMUL: &str = include_str!("kernels/matmul_custom.cpp");

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// 1 GHz, `gm` GB/s for the chip, `cap` GB/s per core, 2 vector cores and
/// 1 cube core, no overheads.
fn params(gm: f64, cap: f64) -> TimingParams {
    TimingParams {
        clock_ghz: 1.0,
        gm_gbps: gm,
        core_gm_cap_gbps: cap,
        dma_overhead_cycles: 0.0,
        vec_overhead_cycles: 0.0,
        cube_overhead_cycles: 0.0,
        local_overhead_cycles: 0.0,
        issue_cycles: 0.0,
        cube_cores: 1,
        vec_cores: 2,
        ..TimingParams::for_soc(Soc::Ascend910B)
    }
}

fn run(k: &SimKernel, args: Vec<SimArg>, p: &TimingParams) -> SimTiming {
    let named: Vec<(String, SimArg)> = args.into_iter().enumerate().map(|(i, a)| (format!("arg{i}"), a)).collect();
    let refs: Vec<(&str, SimArg)> = named.iter().map(|(n, a)| (n.as_str(), a.clone())).collect();
    k.run_timed(&refs, p, Duration::from_secs(120)).unwrap().1
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-6 * want.max(1.0), "{what}: got {got}, want {want}");
}

#[test]
fn pure_mte2_copy_costs_burst_overhead_plus_bytes_over_the_core_share() {
    let len = 16384u32; // 64 KiB of f32 per block
    let p = TimingParams { dma_overhead_cycles: 100.0, ..params(128.0, 100.0) };
    let args = |blocks: u32| {
        vec![
            SimArg::Input(vec![0u8; (len * 4 * blocks) as usize]),
            SimArg::Workspace(0),
            SimArg::Tiling(u32s(&[len, 0])),
        ]
    };
    // One block alone gets min(cap 100, chip 128) GB/s: 100 + 65536/100 ns.
    let t1 = run(&SimKernel::new(CASES, "timing_copy", Soc::Ascend910B, 1), args(1), &p);
    close(t1.launch_ns, 100.0 + 655.36, "1 block");
    close(t1.busy_ns["MTE2"], t1.launch_ns, "MTE2 busy");
    assert_eq!(t1.busy_ns["V"], 0.0);
    assert_eq!(t1.compulsory_bytes, 65536.0);
    // Four blocks on two vector cores: each core gets 128/2 = 64 GB/s, and
    // runs two blocks one after the other: 2 * (100 + 1024) ns.
    let t4 = run(&SimKernel::new(CASES, "timing_copy", Soc::Ascend910B, 4), args(4), &p);
    assert_eq!(t4.cores, 2);
    close(t4.launch_ns, 2.0 * 1124.0, "4 blocks");
    assert_eq!(t4.gm_bytes, 4.0 * 65536.0);
    // Roofline: 256 KiB at 128 GB/s = 2048 ns.
    close(t4.roofline_ns(&p), 2048.0, "roofline");
    close(t4.efficiency(&p), 2048.0 / 2248.0, "efficiency");
}

#[test]
fn cube_matmul_tile_runs_its_stages_in_queue_order() {
    // One 32x32x32 half tile (matmul_custom, 1 block, one k step), 64 GB/s:
    //   MTE2: A and B by Nd2Nz, 32 rows of 64 B each: 2048/64 + 2048/64 = 64
    //   MTE1: A1->A2 2 x 1024 B, B1->B2 2 x 1024 B at 256 B/cycle = 8 + 8
    //   M:    32*32*32 MACs / 4096 per cycle = 8
    //   FIX:  4096 B of f32 to GM at 64 GB/s = 64 (L0C drain 4096/128 = 32 is shorter)
    // Every stage waits for the previous one through its queue: 64+16+8+64.
    let p = params(64.0, 64.0);
    let one = 0x3c00u16.to_le_bytes(); // 1.0 in half
    let mat: Vec<u8> = one.iter().copied().cycle().take(32 * 32 * 2).collect();
    let k = SimKernel::new(MATMUL, "matmul_custom", Soc::Ascend910B, 1);
    let t = run(
        &k,
        vec![
            SimArg::Input(mat.clone()),
            SimArg::Input(mat),
            SimArg::Output(32 * 32 * 4),
            SimArg::Workspace(0),
            SimArg::Tiling(u32s(&[32, 32, 32, 32, 32, 32])),
        ],
        &p,
    );
    assert!(t.cube);
    close(t.busy_ns["MTE2"], 64.0, "MTE2");
    close(t.busy_ns["MTE1"], 16.0, "MTE1");
    close(t.busy_ns["M"], 8.0, "M");
    close(t.busy_ns["FIX"], 64.0, "FIX");
    close(t.launch_ns, 152.0, "launch");
    assert_eq!(t.cube_flops, 2.0 * 32.0 * 32.0 * 32.0);
    assert_eq!(t.compulsory_bytes, 2048.0 + 2048.0 + 4096.0);
}

#[test]
fn ping_pong_overlaps_pipes_and_a_barrier_serialises_them() {
    // 8 tiles of 2048 f32 (8 KiB), 8 Adds per tile, 64 GB/s:
    //   MTE2 per tile 8192/64 = 128, V 8 x 8192/256 = 256, MTE3 128.
    // With a full barrier after every tile nothing overlaps: 8 x 512.
    // Double-buffered, V is the bottleneck: the first load (128), 8 x 256 of
    // vector work back to back, and the last store (128).
    let (tile, tiles) = (2048u32, 8u32);
    let p = params(64.0, 64.0);
    let k = SimKernel::new(CASES, "timing_pingpong", Soc::Ascend910B, 1);
    let args = |serialize: u32| {
        vec![
            SimArg::Input(vec![0u8; (tile * tiles * 4) as usize]),
            SimArg::Output((tile * tiles * 4) as usize),
            SimArg::Workspace(0),
            SimArg::Tiling(u32s(&[tile, tiles, 8, serialize])),
        ]
    };
    let serial = run(&k, args(1), &p);
    let overlapped = run(&k, args(0), &p);
    close(serial.launch_ns, 8.0 * 512.0, "serialised");
    close(overlapped.launch_ns, 128.0 + 8.0 * 256.0 + 128.0, "ping-pong");
    for t in [&serial, &overlapped] {
        close(t.busy_ns["MTE2"], 1024.0, "MTE2 busy");
        close(t.busy_ns["V"], 2048.0, "V busy");
        close(t.busy_ns["MTE3"], 1024.0, "MTE3 busy");
    }
}

#[test]
fn default_tables_are_consistent_with_the_documented_chips() {
    let b = TimingParams::for_soc(Soc::Ascend910B);
    // 24 cube cores x 4096 MACs x 2 x 1.85 GHz = ~364 TFLOPS fp16.
    close(b.cube_peak_flops_per_ns() / 1e3, 363.724_8, "910B1 peak TFLOPS");
    let p = TimingParams::for_soc(Soc::Ascend310P);
    // 8 AI cores x 4096 x 2 x 1.06 GHz = ~69.5 TFLOPS fp16.
    close(p.cube_peak_flops_per_ns() / 1e3, 69.468_16, "310P3 peak TFLOPS");
}

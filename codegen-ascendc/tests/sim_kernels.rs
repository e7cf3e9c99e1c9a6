//! Hand-written AscendC kernels in the canonical style, run under the CPU
//! simulation and compared with values computed here.

use half::f16;
use panguc_codegen_ascendc::sim::{SimArg, SimError, SimKernel, Soc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ADD_SRC: &str = include_str!("kernels/add_custom.cpp");
const RMS_SRC: &str = include_str!("kernels/rms_norm_custom.cpp");
const MATMUL_SRC: &str = include_str!("kernels/matmul_custom.cpp");
const VECTOR_SRC: &str = include_str!("kernels/vector_ops.cpp");

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn to_f16(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap())).collect()
}
fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn rand_f32(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// AddTiling { totalLength, tileLength, dtype, reserved } by value.
fn add_args(x: Vec<u8>, y: Vec<u8>, out_bytes: usize, total: u32, tile: u32, dtype: u32) -> Vec<SimArg> {
    vec![
        SimArg::Input(x),
        SimArg::Input(y),
        SimArg::Output(out_bytes),
        SimArg::Workspace(0),
        SimArg::Tiling(u32s(&[total, tile, dtype, 0])),
    ]
}

#[test]
fn add_f32_and_f16_with_unaligned_tail_on_910b() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 3 blocks of 336 elements, the last one 329: its last tile is 73
    // elements, not a 32-byte multiple, so it goes through DataCopyPad.
    let n = 1001usize;
    let k = SimKernel::new(ADD_SRC, "add_custom", Soc::Ascend910B, 3);

    let x = rand_f32(&mut rng, n);
    let y = rand_f32(&mut rng, n);
    let out = k.run(&add_args(f32_bytes(&x), f32_bytes(&y), n * 4, n as u32, 128, 1)).unwrap();
    let z = to_f32(&out[0]);
    for i in 0..n {
        assert_eq!(z[i], x[i] + y[i], "f32 element {i}");
    }

    let xh: Vec<f16> = rand_f32(&mut rng, n).into_iter().map(f16::from_f32).collect();
    let yh: Vec<f16> = rand_f32(&mut rng, n).into_iter().map(f16::from_f32).collect();
    let out = k.run(&add_args(f16_bytes(&xh), f16_bytes(&yh), n * 2, n as u32, 128, 0)).unwrap();
    let z = to_f16(&out[0]);
    for i in 0..n {
        // The vector unit adds in f16 with round-to-nearest-even: the same as
        // rounding the exact f32 sum.
        assert_eq!(z[i], f16::from_f32(xh[i].to_f32() + yh[i].to_f32()), "f16 element {i}");
    }
}

#[test]
fn add_f16_on_310p_aligned_and_rejects_unaligned_tail() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let k = SimKernel::new(ADD_SRC, "add_custom", Soc::Ascend310P, 4);
    let n = 2048usize;
    let xh: Vec<f16> = rand_f32(&mut rng, n).into_iter().map(f16::from_f32).collect();
    let yh: Vec<f16> = rand_f32(&mut rng, n).into_iter().map(f16::from_f32).collect();
    let out = k.run(&add_args(f16_bytes(&xh), f16_bytes(&yh), n * 2, n as u32, 96, 0)).unwrap();
    let z = to_f16(&out[0]);
    for i in 0..n {
        assert_eq!(z[i], f16::from_f32(xh[i].to_f32() + yh[i].to_f32()), "element {i}");
    }

    // 310P has no DataCopyPad: the same kernel with an unaligned tail is rejected.
    let n = 1001usize;
    let err = k.run(&add_args(f16_bytes(&xh[..n]), f16_bytes(&yh[..n]), n * 2, n as u32, 128, 0)).unwrap_err();
    let msg = err.message();
    assert!(matches!(err, SimError::Kernel { block: Some(3), .. }), "{err}");
    assert!(msg.contains("not a multiple of 32 bytes"), "{msg}");
    assert!(msg.contains("add_custom.cpp:"), "{msg}");
}

#[test]
fn rms_norm_f32_rows_on_910b() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, cols, eps) = (13usize, 200usize, 1e-6f32);
    let x = rand_f32(&mut rng, rows * cols);
    let gamma: Vec<f32> = (0..cols).map(|_| rng.random_range(0.5f32..1.5)).collect();
    let mut tiling = u32s(&[rows as u32, cols as u32]);
    tiling.extend_from_slice(&eps.to_le_bytes());
    tiling.extend_from_slice(&0u32.to_le_bytes());
    let k = SimKernel::new(RMS_SRC, "rms_norm_custom", Soc::Ascend910B, 4);
    let out = k
        .run(&[
            SimArg::Input(f32_bytes(&x)),
            SimArg::Input(f32_bytes(&gamma)),
            SimArg::Output(rows * cols * 4),
            SimArg::Workspace(0),
            SimArg::Tiling(tiling),
        ])
        .unwrap();
    let y = to_f32(&out[0]);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (ms + eps as f64).sqrt();
        for c in 0..cols {
            let want = row[c] as f64 * rstd * gamma[c] as f64;
            let got = y[r * cols + c] as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "row {r} col {c}: {got} vs {want}");
        }
    }
}

fn check_matmul(soc: Soc) {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // 2 x 2 tiles of 32 x 32 with ragged edges (M = 40, N = 48) and three
    // K steps (32, 32, 16) accumulated in L0C.
    let (m, n, kk) = (40usize, 48usize, 80usize);
    let a: Vec<f16> = rand_f32(&mut rng, m * kk).into_iter().map(f16::from_f32).collect();
    let b: Vec<f16> = rand_f32(&mut rng, kk * n).into_iter().map(f16::from_f32).collect();
    let tiling = u32s(&[m as u32, n as u32, kk as u32, 32, 32, 32]);
    let k = SimKernel::new(MATMUL_SRC, "matmul_custom", soc, 4);
    let out = k
        .run(&[
            SimArg::Input(f16_bytes(&a)),
            SimArg::Input(f16_bytes(&b)),
            SimArg::Output(m * n * 4),
            SimArg::Workspace(0),
            SimArg::Tiling(tiling),
        ])
        .unwrap();
    let c = to_f32(&out[0]);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..kk).map(|p| a[i * kk + p].to_f64() * b[p * n + j].to_f64()).sum();
            let got = c[i * n + j] as f64;
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{soc} C[{i}][{j}] = {got}, want {want}");
        }
    }
}

#[test]
fn tiled_matmul_f16_f32_accumulate_on_910b_fixpipe() {
    check_matmul(Soc::Ascend910B);
}

#[test]
fn tiled_matmul_f16_f32_accumulate_on_310p_via_ub() {
    check_matmul(Soc::Ascend310P);
}

#[test]
fn vector_api_tour_and_atomic_add() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = 256usize;
    let x = rand_f32(&mut rng, n);
    let y = rand_f32(&mut rng, n);
    let acc0: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let k = SimKernel::new(VECTOR_SRC, "vector_ops", Soc::Ascend910B, 3);
    let out = k
        .run(&[
            SimArg::Input(f32_bytes(&x)),
            SimArg::Input(f32_bytes(&y)),
            SimArg::Output(1680 * 4),
            SimArg::InOut(f32_bytes(&acc0)),
            SimArg::Workspace(0),
            SimArg::Tiling(vec![0u8; 32]),
        ])
        .unwrap();
    let o = to_f32(&out[0]);
    let close = |got: f32, want: f32, what: &str, i: usize| {
        assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{what}[{i}]: {got} vs {want}");
    };
    for i in 0..n {
        close(o[i], x[i].exp(), "exp", i);
        let h = f16::from_le_bytes(out[0][1024 + 2 * i..1026 + 2 * i].try_into().unwrap());
        assert_eq!(h, f16::from_f32(x[i]), "cast to half [{i}]");
        let fl = i32::from_le_bytes(out[0][1536 + 4 * i..1540 + 4 * i].try_into().unwrap());
        assert_eq!(fl, (x[i] * 10.0).floor() as i32, "floor cast [{i}]");
        assert_eq!(o[640 + i], x[i].min(y[i]), "select [{i}]");
        let lane = i % 64;
        let want = if lane < 32 { x[i].max(y[i]) } else { 7.0 };
        assert_eq!(o[904 + i], want, "repeat-form max [{i}]");
        close(o[1160 + i], x[i] / (1.0 + (-x[i]).exp()), "silu", i);
        close(o[1416 + i], (x[i].max(0.0).sqrt() + 0.5) / (y[i] * y[i] + 1.0), "sqrt/div", i);
    }
    let (imax, vmax) = x.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    assert_eq!(o[896], vmax);
    assert_eq!(u32::from_le_bytes(out[0][897 * 4..898 * 4].try_into().unwrap()), imax as u32);
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((o[1672] as f64 - sum).abs() < 1e-4, "sum {} vs {sum}", o[1672]);
    // Three blocks each added x atomically.
    let acc = to_f32(&out[1]);
    for i in 0..n {
        close(acc[i], acc0[i] + 3.0 * x[i], "atomic acc", i);
    }
}

//! Helpers shared by the interpreter's op tests.
#![allow(dead_code)] // each test binary uses its own subset

use panguc_ir::interp::eval_pure;
use panguc_ir::{Op, Tensor};

pub fn f(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), v.to_vec())
}

pub fn i(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::i64(shape.to_vec(), v.to_vec())
}

pub fn run(op: Op, args: &[&Tensor]) -> Vec<Tensor> {
    eval_pure(&op, args).expect("op evaluates")
}

pub fn run1(op: Op, args: &[&Tensor]) -> Tensor {
    run(op, args).remove(0)
}

/// `got` has `want_shape` and equals `want` within 1e-5 relative.
pub fn close(got: &Tensor, want_shape: &[usize], want: &[f32]) {
    assert_eq!(got.shape, want_shape);
    assert_eq!(got.numel(), want.len());
    for (k, (g, w)) in got.as_f32().iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "element {k}: got {g}, want {w}");
    }
}

/// Deterministic pseudo-random values in [-1, 1) (no rand dependency).
pub fn data(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::f32(shape.to_vec(), v)
}

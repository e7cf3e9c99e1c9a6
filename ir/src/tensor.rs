//! Host tensors used by the reference interpreter and by tests.
//!
//! Every floating-point tensor is held in f32 (the interpreter's working
//! precision); integer tensors (indices, positions) are held in i64.

use std::fmt;

/// Element storage of a host tensor.
#[derive(Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A dense row-major host tensor.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data length does not match shape {shape:?}");
        Tensor { shape, data: TensorData::F32(data) }
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data length does not match shape {shape:?}");
        Tensor { shape, data: TensorData::I64(data) }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor::f32(shape, vec![0.0; n])
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_f32(&self) -> bool {
        matches!(self.data, TensorData::F32(_))
    }

    /// The f32 elements; panics on an integer tensor (a verifier bug if it happens).
    pub fn as_f32(&self) -> &[f32] {
        match &self.data {
            TensorData::F32(v) => v,
            TensorData::I64(_) => panic!("expected a float tensor, found an integer tensor"),
        }
    }

    pub fn as_i64(&self) -> &[i64] {
        match &self.data {
            TensorData::I64(v) => v,
            TensorData::F32(_) => panic!("expected an integer tensor, found a float tensor"),
        }
    }

    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            TensorData::F32(v) => v,
            TensorData::I64(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }

    /// Largest relative difference `|a-b| / max(|a|,|b|, floor)` over all elements.
    pub fn max_rel_diff(&self, other: &Tensor, floor: f32) -> f32 {
        assert_eq!(self.shape, other.shape, "comparing tensors of different shapes");
        let a = self.as_f32();
        let b = other.as_f32();
        a.iter()
            .zip(b)
            .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() / x.abs().max(y.abs()).max(floor) })
            .fold(0.0, f32::max)
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_f32() { "f32" } else { "i64" };
        write!(f, "Tensor<{kind}>{:?}", self.shape)?;
        match &self.data {
            TensorData::F32(v) if v.len() <= 16 => write!(f, " {v:?}"),
            TensorData::I64(v) if v.len() <= 16 => write!(f, " {v:?}"),
            _ => Ok(()),
        }
    }
}

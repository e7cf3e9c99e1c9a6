//! Plain f32 tensor kernels behind the reference interpreter. Written for
//! clarity first: they define the meaning of each op.

use crate::tensor::Tensor;

pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Numpy broadcast of concrete shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            match (da, db) {
                _ if da == db => Ok(da),
                (1, _) => Ok(db),
                (_, 1) => Ok(da),
                _ => Err(format!("cannot broadcast {a:?} with {b:?}")),
            }
        })
        .collect()
}

/// Strides of `shape` viewed as broadcast to `out` (0 on broadcast axes).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { 0 } else { s[i - off] }).collect()
}

/// Iterate the flat source offsets of a broadcast view, in output order.
fn broadcast_offsets(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let bs = broadcast_strides(shape, out);
    let n: usize = out.iter().product();
    let mut offs = Vec::with_capacity(n);
    let mut idx = vec![0usize; out.len()];
    let mut cur = 0usize;
    for _ in 0..n {
        offs.push(cur);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            cur += bs[d];
            if idx[d] < out[d] {
                break;
            }
            cur -= bs[d] * idx[d];
            idx[d] = 0;
        }
    }
    offs
}

pub fn binary(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Result<Tensor, String> {
    let out = broadcast(&a.shape, &b.shape)?;
    let (x, y) = (a.as_f32(), b.as_f32());
    let data = if a.shape == b.shape {
        x.iter().zip(y).map(|(p, q)| f(*p, *q)).collect()
    } else {
        let oa = broadcast_offsets(&a.shape, &out);
        let ob = broadcast_offsets(&b.shape, &out);
        oa.iter().zip(&ob).map(|(i, j)| f(x[*i], y[*j])).collect()
    };
    Ok(Tensor::f32(out, data))
}

pub fn binary_i64(a: &Tensor, b: &Tensor, f: impl Fn(i64, i64) -> i64) -> Result<Tensor, String> {
    let out = broadcast(&a.shape, &b.shape)?;
    let (x, y) = (a.as_i64(), b.as_i64());
    let oa = broadcast_offsets(&a.shape, &out);
    let ob = broadcast_offsets(&b.shape, &out);
    Ok(Tensor::i64(out, oa.iter().zip(&ob).map(|(i, j)| f(x[*i], y[*j])).collect()))
}

pub fn unary(a: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::f32(a.shape.clone(), a.as_f32().iter().map(|x| f(*x)).collect())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Split a shape around `axis` into (outer, len, inner) extents.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn reduced(shape: &[usize], axis: usize, keepdim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keepdim {
        s[axis] = 1;
    } else {
        s.remove(axis);
    }
    s
}

/// Fold along `axis`; `init` and `f` are applied per output element.
pub fn reduce(
    a: &Tensor,
    axis: usize,
    keepdim: bool,
    init: f32,
    f: impl Fn(f32, f32) -> f32,
    finish: impl Fn(f32, usize) -> f32,
) -> Tensor {
    let (outer, len, inner) = around(&a.shape, axis);
    let x = a.as_f32();
    let mut out = vec![init; outer * inner];
    for o in 0..outer {
        for l in 0..len {
            let row = &x[(o * len + l) * inner..(o * len + l + 1) * inner];
            for (acc, v) in out[o * inner..(o + 1) * inner].iter_mut().zip(row) {
                *acc = f(*acc, *v);
            }
        }
    }
    for v in &mut out {
        *v = finish(*v, len);
    }
    Tensor::f32(reduced(&a.shape, axis, keepdim), out)
}

pub fn argmax(a: &Tensor, axis: usize, keepdim: bool) -> Tensor {
    let (outer, len, inner) = around(&a.shape, axis);
    let x = a.as_f32();
    let mut out = vec![0i64; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for l in 1..len {
                // Strictly greater: ties keep the lowest index.
                if x[(o * len + l) * inner + i] > x[(o * len + best) * inner + i] {
                    best = l;
                }
            }
            out[o * inner + i] = best as i64;
        }
    }
    Tensor::i64(reduced(&a.shape, axis, keepdim), out)
}

pub fn softmax(a: &Tensor, axis: usize) -> Tensor {
    let (outer, len, inner) = around(&a.shape, axis);
    let mut y = a.as_f32().to_vec();
    for o in 0..outer {
        for i in 0..inner {
            let at = |l: usize| (o * len + l) * inner + i;
            let m = (0..len).map(|l| y[at(l)]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for l in 0..len {
                let e = if m == f32::NEG_INFINITY { 0.0 } else { (y[at(l)] - m).exp() };
                y[at(l)] = e;
                sum += e;
            }
            for l in 0..len {
                y[at(l)] = if sum > 0.0 { y[at(l)] / sum } else { 0.0 };
            }
        }
    }
    Tensor::f32(a.shape.clone(), y)
}

/// Generic element permutation helper for transpose.
pub fn transpose(a: &Tensor, perm: &[usize]) -> Tensor {
    let out_shape: Vec<usize> = perm.iter().map(|&p| a.shape[p]).collect();
    let s = strides(&a.shape);
    let permuted: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let n = a.numel();
    let mut offs = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_shape.len()];
    let mut cur = 0usize;
    for _ in 0..n {
        offs.push(cur);
        for d in (0..out_shape.len()).rev() {
            idx[d] += 1;
            cur += permuted[d];
            if idx[d] < out_shape[d] {
                break;
            }
            cur -= permuted[d] * idx[d];
            idx[d] = 0;
        }
    }
    match &a.data {
        crate::TensorData::F32(x) => Tensor::f32(out_shape, offs.iter().map(|o| x[*o]).collect()),
        crate::TensorData::I64(x) => Tensor::i64(out_shape, offs.iter().map(|o| x[*o]).collect()),
    }
}

pub fn slice(a: &Tensor, axis: usize, start: usize, end: usize) -> Tensor {
    let (outer, len, inner) = around(&a.shape, axis);
    let mut shape = a.shape.clone();
    shape[axis] = end - start;
    let pick = |o: usize| (o * len + start) * inner..(o * len + end) * inner;
    match &a.data {
        crate::TensorData::F32(x) => Tensor::f32(shape, (0..outer).flat_map(|o| x[pick(o)].to_vec()).collect()),
        crate::TensorData::I64(x) => Tensor::i64(shape, (0..outer).flat_map(|o| x[pick(o)].to_vec()).collect()),
    }
}

pub fn concat(parts: &[&Tensor], axis: usize) -> Tensor {
    let first = parts[0];
    let outer: usize = first.shape[..axis].iter().product();
    let mut shape = first.shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    if first.is_f32() {
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for p in parts {
                let chunk = p.shape[axis..].iter().product::<usize>();
                out.extend_from_slice(&p.as_f32()[o * chunk..(o + 1) * chunk]);
            }
        }
        Tensor::f32(shape, out)
    } else {
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for p in parts {
                let chunk = p.shape[axis..].iter().product::<usize>();
                out.extend_from_slice(&p.as_i64()[o * chunk..(o + 1) * chunk]);
            }
        }
        Tensor::i64(shape, out)
    }
}

pub fn repeat_interleave(a: &Tensor, axis: usize, repeats: usize) -> Tensor {
    let (outer, len, inner) = around(&a.shape, axis);
    let x = a.as_f32();
    let mut out = Vec::with_capacity(a.numel() * repeats);
    for o in 0..outer {
        for l in 0..len {
            let row = &x[(o * len + l) * inner..(o * len + l + 1) * inner];
            for _ in 0..repeats {
                out.extend_from_slice(row);
            }
        }
    }
    let mut shape = a.shape.clone();
    shape[axis] *= repeats;
    Tensor::f32(shape, out)
}

/// Batched matmul with numpy batch broadcasting, f32 accumulation.
pub fn matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor, String> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (kb, n) = if transpose_b { (b.shape[rb - 1], b.shape[rb - 2]) } else { (b.shape[rb - 2], b.shape[rb - 1]) };
    if k != kb {
        return Err(format!("matmul contraction mismatch {:?} x {:?}", a.shape, b.shape));
    }
    let batch = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
    let oa = broadcast_offsets(&a.shape[..ra - 2], &batch);
    let ob = broadcast_offsets(&b.shape[..rb - 2], &batch);
    let (x, y) = (a.as_f32(), b.as_f32());
    let mut out = vec![0f32; oa.len() * m * n];
    for (bi, (pa, pb)) in oa.iter().zip(&ob).enumerate() {
        let am = &x[pa * m * k..(pa + 1) * m * k];
        let bm = &y[pb * k * n..(pb + 1) * k * n];
        let om = &mut out[bi * m * n..(bi + 1) * m * n];
        matmul_2d(am, bm, om, m, k, n, transpose_b);
    }
    let mut shape = batch;
    shape.extend([m, n]);
    Ok(Tensor::f32(shape, out))
}

fn matmul_2d(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, transpose_b: bool) {
    use rayon::prelude::*;
    let row = |(i, orow): (usize, &mut [f32])| {
        let arow = &a[i * k..(i + 1) * k];
        if transpose_b {
            for (j, o) in orow.iter_mut().enumerate() {
                *o = arow.iter().zip(&b[j * k..(j + 1) * k]).map(|(p, q)| p * q).sum();
            }
        } else {
            for (kk, av) in arow.iter().enumerate() {
                for (o, bv) in orow.iter_mut().zip(&b[kk * n..(kk + 1) * n]) {
                    *o += av * bv;
                }
            }
        }
    };
    if m * k * n > 1 << 16 {
        out.par_chunks_mut(n).enumerate().for_each(row);
    } else {
        out.chunks_mut(n).enumerate().for_each(row);
    }
}

/// Round an f32 to the nearest value representable in `dtype`.
pub fn round_to(dtype: crate::DType, x: f32) -> f32 {
    match dtype {
        crate::DType::BF16 => half::bf16::from_f32(x).to_f32(),
        crate::DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

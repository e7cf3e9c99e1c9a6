//! Int8 quantization ops (W8A8, W8A8_DYNAMIC, int8 KV cache), exactly as
//! docs/quantization.md writes the formulas.
//!
//! Conventions every implementation must reproduce:
//! - integer tensors (int8 values, int32 accumulators and biases, the int64
//!   words of an encoded `deq_scale`) are held as i64;
//! - float arithmetic is f32, in the order the formulas are written;
//! - `round` is round-half-to-even (torch.round, the NPU's RINT), and every
//!   quantized value is clamped to `[-128, 127]`;
//! - an int8 x int8 dot product is exact; an accumulator that leaves the
//!   int32 range is an error (a real kernel would wrap silently);
//! - an int64 `deq_scale` holds the f32 bit pattern in its low 32 bits
//!   (msModelSlim's encoding for fp16 models); a float one is used as is.

use crate::kernels as k;
use crate::tensor::{Tensor, TensorData};

type R<T> = Result<T, String>;

pub const I8_MIN: f32 = -128.0;
pub const I8_MAX: f32 = 127.0;

/// `clamp(round_half_even(v), -128, 127)` as an integer.
pub fn quantize_value(v: f32) -> i64 {
    // NaN (a 0/0 scale) maps to 0, not to an arbitrary clamp bound.
    if v.is_nan() {
        return 0;
    }
    v.round_ties_even().clamp(I8_MIN, I8_MAX) as i64
}

/// The f32 whose bits are the low 32 bits of `word` (msModelSlim's int64
/// `deq_scale` encoding).
pub fn decode_deq_scale(word: i64) -> f32 {
    f32::from_bits(word as u64 as u32)
}

/// Per-channel scale values as f32, decoding an int64-encoded `deq_scale`.
fn scale_values(t: &Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::F32(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|&w| decode_deq_scale(w)).collect(),
    }
}

/// `quantize(x, scale, offset) = clamp(round(x / scale + offset), -128, 127)`
/// with numpy broadcasting: per tensor (`[1]`), per channel (the int8 KV
/// cache), or per expert (`[E, 1, 1]` against a shared activation).
pub fn quantize(x: &Tensor, scale: &Tensor, offset: &Tensor) -> R<Tensor> {
    let scaled = k::binary(x, scale, |x, s| x / s)?;
    let shifted = k::binary(&scaled, offset, |y, o| y + o)?;
    Ok(Tensor::i64(shifted.shape.clone(), shifted.as_f32().iter().map(|&v| quantize_value(v)).collect()))
}

/// `dequantize(q, scale, offset) = (q - offset) * scale`, in f32, broadcast
/// like [`quantize`].
pub fn dequantize(q: &Tensor, scale: &Tensor, offset: &Tensor) -> R<Tensor> {
    let qf = Tensor::f32(q.shape.clone(), q.as_i64().iter().map(|&v| v as f32).collect());
    let centred = k::binary(&qf, offset, |q, o| q - o)?;
    k::binary(&centred, scale, |c, s| c * s)
}

/// Dynamic per-token quantization over the last axis: `s = max|x| / 127`,
/// `q = clamp(round(x / s), -128, 127)`; a row of zeros has `s = 0` and
/// quantizes to zeros. Returns `(q, s)` with `s` shaped like x without its
/// last axis.
pub fn dynamic_quant(x: &Tensor) -> R<Vec<Tensor>> {
    let kdim = *x.shape.last().ok_or("dynamic_quant of a scalar")?;
    let rows = x.numel().checked_div(kdim).unwrap_or(0);
    let xv = x.as_f32();
    let mut q = Vec::with_capacity(xv.len());
    let mut scales = Vec::with_capacity(rows);
    for row in xv.chunks(kdim.max(1)).take(rows) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = amax / I8_MAX;
        scales.push(s);
        if s == 0.0 {
            q.extend(std::iter::repeat_n(0, row.len()));
        } else {
            q.extend(row.iter().map(|&v| quantize_value(v / s)));
        }
    }
    let scale_shape = x.shape[..x.shape.len() - 1].to_vec();
    Ok(vec![Tensor::i64(x.shape.clone(), q), Tensor::f32(scale_shape, scales)])
}

/// Exact `sum_k a[k] * b[k]` of int8 rows, as an int32 value.
fn int_dot(a: &[i64], b: &[i64]) -> R<i64> {
    let acc: i64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    if i32::try_from(acc).is_err() {
        return Err(format!("int8 matmul accumulator {acc} leaves the int32 range"));
    }
    Ok(acc)
}

/// Checks that an int8 operand holds int8 values (a weight outside the
/// range means a corrupt checkpoint or a wrong dtype binding).
fn check_int8(t: &Tensor, what: &str) -> R<()> {
    if let Some(v) = t.as_i64().iter().find(|v| !(-128..=127).contains(*v)) {
        return Err(format!("{what} holds {v}, outside the int8 range"));
    }
    Ok(())
}

/// Leading (batch) element count of a `[..., rows, cols]` operand.
fn batch_of(t: &Tensor) -> usize {
    t.shape[..t.shape.len() - 2].iter().product()
}

/// `y[b, m, n] = epilogue(b, m, n, sum_k xq[b, m, k] * w[b, n, k])` where an
/// operand without batch dims is shared by every batch entry.
fn int_matmul(xq: &Tensor, w: &Tensor, mut epilogue: impl FnMut(usize, usize, usize, i64) -> R<f32>) -> R<Tensor> {
    check_int8(xq, "quantized activation")?;
    check_int8(w, "int8 weight")?;
    let (xr, wr) = (xq.shape.len(), w.shape.len());
    let (m, kd) = (xq.shape[xr - 2], xq.shape[xr - 1]);
    let (n, kw) = (w.shape[wr - 2], w.shape[wr - 1]);
    if kd != kw {
        return Err(format!("contraction dims differ: {kd} vs {kw}"));
    }
    let (bx, bw) = (batch_of(xq), batch_of(w));
    let batch_shape = if xr > 2 { &xq.shape[..xr - 2] } else { &w.shape[..wr - 2] };
    let batches: usize = batch_shape.iter().product();
    if (xr > 2 && bx != batches) || (wr > 2 && bw != batches) {
        return Err(format!("batch dims of {:?} and {:?} differ", xq.shape, w.shape));
    }
    let (xv, wv) = (xq.as_i64(), w.as_i64());
    let mut out = Vec::with_capacity(batches * m * n);
    for b in 0..batches {
        let xb = if xr > 2 { b } else { 0 };
        let wb = if wr > 2 { b } else { 0 };
        for mi in 0..m {
            let xrow = &xv[(xb * m + mi) * kd..(xb * m + mi + 1) * kd];
            for ni in 0..n {
                let wrow = &wv[(wb * n + ni) * kd..(wb * n + ni + 1) * kd];
                out.push(epilogue(b, mi, ni, int_dot(xrow, wrow)?)?);
            }
        }
    }
    let mut shape = batch_shape.to_vec();
    shape.extend([m, n]);
    Ok(Tensor::f32(shape, out))
}

/// Static W8A8: `y[.., m, n] = f32(xq @ w^T + quant_bias[.., n]) * deq_scale[.., n]`;
/// `quant_bias` and `deq_scale` are shaped like `w` without its last axis.
pub fn quant_matmul(xq: &Tensor, w: &Tensor, quant_bias: &Tensor, deq_scale: &Tensor) -> R<Tensor> {
    let bias = quant_bias.as_i64();
    let deq = scale_values(deq_scale);
    let n = w.shape[w.shape.len() - 2];
    let w_batched = w.shape.len() > 2;
    int_matmul(xq, w, |b, _, ni, acc| {
        let c = if w_batched { b * n } else { 0 } + ni;
        let with_bias = acc + bias[c];
        if i32::try_from(with_bias).is_err() {
            return Err(format!("int8 matmul accumulator plus quant_bias {with_bias} leaves the int32 range"));
        }
        Ok(with_bias as f32 * deq[c])
    })
}

/// W8A8_DYNAMIC: `y[.., m, n] = f32(xq @ w^T) * w_scale[.., n] * x_scale[.., m]`
/// (in that order); `w_scale` is shaped like `w` without its last axis,
/// `x_scale` like `xq` without its last axis.
pub fn quant_matmul_per_token(xq: &Tensor, w: &Tensor, w_scale: &Tensor, x_scale: &Tensor) -> R<Tensor> {
    let (ws, xs) = (scale_values(w_scale), x_scale.as_f32());
    let (m, n) = (xq.shape[xq.shape.len() - 2], w.shape[w.shape.len() - 2]);
    let (x_batched, w_batched) = (xq.shape.len() > 2, w.shape.len() > 2);
    int_matmul(xq, w, |b, mi, ni, acc| {
        let wsc = ws[if w_batched { b * n } else { 0 } + ni];
        let xsc = xs[if x_batched { b * m } else { 0 } + mi];
        Ok(acc as f32 * wsc * xsc)
    })
}

/// Grouped W8A8_DYNAMIC matmul for routed experts: rows of expert `e` form
/// the contiguous block after the counts of experts `< e`, and row `r` of
/// expert `e` gives `y[r, n] = f32(xq[r] . w[e, n]) * w_scale[e, n] * x_scale[r]`.
pub fn grouped_quant_matmul(xq: &Tensor, w: &Tensor, w_scale: &Tensor, x_scale: &Tensor, counts: &Tensor) -> R<Tensor> {
    check_int8(xq, "quantized activation")?;
    check_int8(w, "int8 weight")?;
    let (rows, kd) = (xq.shape[0], xq.shape[1]);
    let (experts, n) = (w.shape[0], w.shape[1]);
    let (xv, wv, ws, xs) = (xq.as_i64(), w.as_i64(), scale_values(w_scale), x_scale.as_f32());
    let counts = counts.as_i64();
    if counts.iter().any(|&c| c < 0) || counts.iter().sum::<i64>() != rows as i64 {
        return Err(format!("expert counts {counts:?} do not partition the {rows} rows"));
    }
    let mut out = Vec::with_capacity(rows * n);
    let mut r = 0;
    for (e, &count) in counts.iter().enumerate().take(experts) {
        for _ in 0..count {
            let xrow = &xv[r * kd..(r + 1) * kd];
            for ni in 0..n {
                let wrow = &wv[(e * n + ni) * kd..(e * n + ni + 1) * kd];
                out.push(int_dot(xrow, wrow)? as f32 * ws[e * n + ni] * xs[r]);
            }
            r += 1;
        }
    }
    Ok(Tensor::f32(vec![rows, n], out))
}

//! Type rules of the int8 quantization ops (see `interp::quant`).

use super::{broadcast_shapes, expect_arity, expect_dim_eq, expect_float, expect_int, expect_rank, R};
use crate::op::Op;
use crate::shape::{Dim, TensorType};
use crate::DType;

fn expect_i8(t: &TensorType, what: &str) -> R<()> {
    if t.dtype != DType::I8 {
        return Err(format!("{what} must be an i8 tensor, found {t}"));
    }
    Ok(())
}

/// A dequant scale: float, or an i64 word holding f32 bits (static W8A8's
/// `deq_scale` of fp16 models).
fn expect_scale(t: &TensorType, what: &str) -> R<()> {
    if !(t.dtype.is_float() || t.dtype == DType::I64) {
        return Err(format!("{what} must be a float (or int64-encoded f32) tensor, found {t}"));
    }
    Ok(())
}

/// `shape` without its last axis.
fn drop_last(shape: &[Dim]) -> Vec<Dim> {
    shape[..shape.len() - 1].to_vec()
}

/// Types of `xq [..., M, K] x w [..., N, K]^T`: the result shape, where the
/// batch dims come from whichever operand has them (both must agree).
fn int_matmul_shape(xq: &TensorType, w: &TensorType) -> R<Vec<Dim>> {
    expect_i8(xq, "quantized activation")?;
    expect_i8(w, "int8 weight")?;
    if xq.rank() < 2 || w.rank() < 2 {
        return Err(format!("quant matmul operands must have rank >= 2, found {xq} and {w}"));
    }
    let (xr, wr) = (xq.rank(), w.rank());
    expect_dim_eq(&xq.shape[xr - 1], &w.shape[wr - 1], "quant matmul contraction dims differ")?;
    let (xb, wb) = (&xq.shape[..xr - 2], &w.shape[..wr - 2]);
    if !xb.is_empty() && !wb.is_empty() && xb != wb {
        return Err(format!("quant matmul batch dims differ: {xq} vs {w}"));
    }
    let mut shape = if xb.is_empty() { wb.to_vec() } else { xb.to_vec() };
    shape.push(xq.shape[xr - 2].clone());
    shape.push(w.shape[wr - 2].clone());
    Ok(shape)
}

pub(super) fn infer(op: &Op, args: &[&TensorType]) -> R<Vec<TensorType>> {
    match op {
        Op::Quantize | Op::Dequantize => {
            expect_arity(op, args, 3)?;
            let (x, scale, offset) = (args[0], args[1], args[2]);
            if *op == Op::Quantize {
                expect_float(x, "quantize input")?;
            } else {
                expect_i8(x, "dequantize input")?;
            }
            expect_float(scale, "quant scale")?;
            expect_float(offset, "quant offset")?;
            let shape = broadcast_shapes(&broadcast_shapes(&x.shape, &scale.shape)?, &offset.shape)?;
            let dtype = if *op == Op::Quantize { DType::I8 } else { DType::F32 };
            Ok(vec![TensorType::new(dtype, shape)])
        }
        Op::DynamicQuant => {
            expect_arity(op, args, 1)?;
            let x = args[0];
            expect_float(x, "dynamic_quant input")?;
            if x.rank() < 1 {
                return Err("dynamic_quant input must have rank >= 1".into());
            }
            Ok(vec![TensorType::new(DType::I8, x.shape.clone()), TensorType::new(DType::F32, drop_last(&x.shape))])
        }
        Op::QuantMatMul => {
            expect_arity(op, args, 4)?;
            let (xq, w, bias, deq) = (args[0], args[1], args[2], args[3]);
            let shape = int_matmul_shape(xq, w)?;
            let per_channel = drop_last(&w.shape);
            if bias.dtype != DType::I32 || bias.shape != per_channel {
                return Err(format!("quant_bias {bias} must be i32 shaped like the weight {w} without its last axis"));
            }
            expect_scale(deq, "deq_scale")?;
            if deq.shape != per_channel {
                return Err(format!("deq_scale {deq} must be shaped like the weight {w} without its last axis"));
            }
            Ok(vec![TensorType::new(DType::F32, shape)])
        }
        Op::QuantMatMulPerToken => {
            expect_arity(op, args, 4)?;
            let (xq, w, w_scale, x_scale) = (args[0], args[1], args[2], args[3]);
            let shape = int_matmul_shape(xq, w)?;
            expect_scale(w_scale, "weight_scale")?;
            if w_scale.shape != drop_last(&w.shape) {
                return Err(format!("weight_scale {w_scale} must be shaped like the weight {w} without its last axis"));
            }
            if x_scale.dtype != DType::F32 || x_scale.shape != drop_last(&xq.shape) {
                return Err(format!(
                    "per-token scale {x_scale} must be f32 shaped like the activation {xq} without its last axis"
                ));
            }
            Ok(vec![TensorType::new(DType::F32, shape)])
        }
        Op::GroupedQuantMatMul => {
            expect_arity(op, args, 5)?;
            let (xq, w, w_scale, x_scale, counts) = (args[0], args[1], args[2], args[3], args[4]);
            expect_i8(xq, "quantized rows")?;
            expect_rank(xq, 2, "quantized rows")?;
            expect_i8(w, "int8 expert weights")?;
            expect_rank(w, 3, "int8 expert weights [experts, N, K]")?;
            expect_dim_eq(&w.shape[2], &xq.shape[1], "grouped quant matmul contraction dims differ")?;
            expect_scale(w_scale, "weight_scale")?;
            if w_scale.shape != drop_last(&w.shape) {
                return Err(format!("weight_scale {w_scale} must be [experts, N] for weights {w}"));
            }
            if x_scale.dtype != DType::F32 || x_scale.shape != drop_last(&xq.shape) {
                return Err(format!("per-token scale {x_scale} must be f32 [rows] for rows {xq}"));
            }
            expect_int(counts, "expert counts")?;
            expect_rank(counts, 1, "expert counts")?;
            expect_dim_eq(&counts.shape[0], &w.shape[0], "expert counts vs weight experts")?;
            Ok(vec![TensorType::new(DType::F32, vec![xq.shape[0].clone(), w.shape[1].clone()])])
        }
        _ => unreachable!("not a quantization op: {}", op.mnemonic()),
    }
}

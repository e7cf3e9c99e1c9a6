//! Element-type mapping between safetensors and the IR, and conversion of
//! raw little-endian tensor bytes to f32.

use anyhow::{bail, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use panguc_ir::DType;
use safetensors::Dtype;
use std::borrow::Cow;

// safetensors stores little-endian data and we reinterpret mmapped bytes in
// place; a big-endian host would need byte swapping everywhere.
#[cfg(not(target_endian = "little"))]
compile_error!("panguc reads safetensors data in place and supports little-endian hosts only");

/// The IR dtype of a safetensors dtype, if the IR has one.
pub fn ir_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I8 => DType::I8,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The safetensors dtype used to store an IR dtype.
pub fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I8 => Dtype::I8,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::Bool => Dtype::BOOL,
    }
}

/// Dtypes a model weight may have (what the interpreter and codegen accept).
pub fn is_weight_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// Lower-case dtype name: the IR's name when it has one ("bf16"), else the
/// safetensors name lower-cased ("f64", "u8").
pub fn dtype_name(d: Dtype) -> String {
    match ir_dtype(d) {
        Some(x) => x.name().to_string(),
        None => d.to_string().to_ascii_lowercase(),
    }
}

/// Views `bytes` as `[T]` without copying when aligned (the usual case: the
/// safetensors writer pads the header to 8 bytes and the mmap is page
/// aligned), or copies into an aligned buffer when some other writer left
/// the data misaligned.
fn cast_or_copy<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => {
            // Callers check that the length is a whole number of elements.
            let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            Cow::Owned(v)
        }
    }
}

/// Converts raw little-endian elements of a float dtype to f32.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    let elem = dtype.bitsize() / 8;
    if elem == 0 || !bytes.len().is_multiple_of(elem) {
        bail!("{} bytes is not a whole number of {dtype} elements", bytes.len());
    }
    Ok(match dtype {
        Dtype::F32 => cast_or_copy::<f32>(bytes).into_owned(),
        Dtype::BF16 => cast_or_copy::<bf16>(bytes).to_f32_vec(),
        Dtype::F16 => cast_or_copy::<f16>(bytes).to_f32_vec(),
        other => bail!("cannot convert dtype {other} to f32 (expected BF16, F16 or F32)"),
    })
}

/// Converts raw little-endian elements of an integer dtype to i64, exactly.
pub fn to_i64(bytes: &[u8], dtype: Dtype) -> Result<Vec<i64>> {
    let elem = dtype.bitsize() / 8;
    if elem == 0 || !bytes.len().is_multiple_of(elem) {
        bail!("{} bytes is not a whole number of {dtype} elements", bytes.len());
    }
    Ok(match dtype {
        Dtype::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
        Dtype::I32 => cast_or_copy::<i32>(bytes).iter().map(|&v| v as i64).collect(),
        Dtype::I64 => cast_or_copy::<i64>(bytes).into_owned(),
        other => bail!("cannot read dtype {other} as integers (expected I8, I32 or I64)"),
    })
}

/// Little-endian bytes of integer values stored as `dtype` (I8, I32, I64);
/// a value outside the dtype's range is an error.
pub fn from_i64(values: &[i64], dtype: DType) -> Result<Vec<u8>> {
    let narrow = |v: i64, lo: i64, hi: i64| -> Result<i64> {
        anyhow::ensure!((lo..=hi).contains(&v), "value {v} does not fit {dtype}");
        Ok(v)
    };
    let mut out = Vec::with_capacity(values.len() * dtype.size_bytes());
    for &v in values {
        match dtype {
            DType::I8 => out.push(narrow(v, -128, 127)? as i8 as u8),
            DType::I32 => out.extend_from_slice(&(narrow(v, i32::MIN as i64, i32::MAX as i64)? as i32).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&v.to_le_bytes()),
            other => bail!("cannot store integers as {other} (expected i8, i32 or i64)"),
        }
    }
    Ok(out)
}

/// Converts f32 values to the little-endian bytes of `dtype` (BF16/F16/F32),
/// rounding to nearest even.
pub fn from_f32(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice::<f32, u8>(values).to_vec(),
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            bytemuck::cast_slice::<bf16, u8>(&out).to_vec()
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            bytemuck::cast_slice::<f16, u8>(&out).to_vec()
        }
        other => bail!("cannot store weights as {other} (expected bf16, f16 or f32)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exact_values() {
        let vals = [0.0f32, 1.0, -2.5, 0.15625, 65504.0, -1.0e-3];
        for d in [DType::F32, DType::BF16, DType::F16] {
            let bytes = from_f32(&vals, d).unwrap();
            assert_eq!(bytes.len(), vals.len() * d.size_bytes());
            let back = to_f32(&bytes, st_dtype(d)).unwrap();
            for (a, b) in vals.iter().zip(&back) {
                let tol = match d {
                    DType::F32 => 0.0,
                    DType::F16 => 1e-3 * a.abs(),
                    _ => 4e-3 * a.abs(),
                };
                assert!((a - b).abs() <= tol, "{d}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn known_bit_patterns() {
        // bf16 0x3F80 = 1.0, 0xC000 = -2.0; f16 0x3C00 = 1.0.
        assert_eq!(to_f32(&[0x80, 0x3F, 0x00, 0xC0], Dtype::BF16).unwrap(), vec![1.0, -2.0]);
        assert_eq!(to_f32(&[0x00, 0x3C], Dtype::F16).unwrap(), vec![1.0]);
    }

    #[test]
    fn misaligned_input_is_copied_not_rejected() {
        let bytes = from_f32(&[1.0, 2.0, 3.0], DType::F32).unwrap();
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(to_f32(&shifted[1..], Dtype::F32).unwrap(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(to_f32(&[0, 0, 0], Dtype::BF16).is_err());
        assert!(to_f32(&[0; 4], Dtype::I32).unwrap_err().to_string().contains("I32"));
        assert!(from_f32(&[1.0], DType::I8).is_err());
    }

    #[test]
    fn integer_round_trip_and_range() {
        let vals = [-128i64, -1, 0, 127];
        for d in [DType::I8, DType::I32, DType::I64] {
            let bytes = from_i64(&vals, d).unwrap();
            assert_eq!(bytes.len(), vals.len() * d.size_bytes());
            assert_eq!(to_i64(&bytes, st_dtype(d)).unwrap(), vals);
        }
        assert!(from_i64(&[128], DType::I8).is_err());
        assert!(from_i64(&[1 << 31], DType::I32).is_err());
        assert!(to_i64(&[0; 4], Dtype::F32).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(dtype_name(Dtype::BF16), "bf16");
        assert_eq!(dtype_name(Dtype::F64), "f64");
        assert_eq!(ir_dtype(Dtype::U8), None);
    }
}

//! Prepared weights in the device layout the AscendC kernels and the host
//! program expect: row-major over the logical shape (matmul weights `[N, K]`
//! like HF Linear, merged gate/up `[.., 2I, K]` gate rows first, experts
//! stacked), in the buffer's device dtype (the activation dtype, f32 for
//! the routing scales). The CPU packages store the same weights in packed
//! panels ([`Layout`]); [`device_weight_bytes`] undoes that packing.

use crate::data::{decode, encode};
use crate::target::DevType;
use anyhow::{bail, Result};
use panguc_ir::kernel::{Layout, PreparedWeight};
use panguc_ir::DType;

/// Row-major (`[.., N, K]`) elements of `packed`, the inverse of
/// [`Layout::pack`]; `Panels { kn: true }` (logical `[.., K, N]`) comes
/// out transposed to `[.., N, K]`.
pub fn unpack(layout: Layout, packed: &[u8], shape: &[usize], elem: usize) -> Result<Vec<u8>> {
    let want = layout.stored_len(shape) * elem;
    if packed.len() != want {
        bail!("packed weight has {} bytes, its layout {layout:?} of {shape:?} needs {want}", packed.len());
    }
    let r = shape.len();
    let mut out = vec![0u8; shape.iter().product::<usize>() * elem];
    let mut put = |d: usize, s: usize| out[d * elem..(d + 1) * elem].copy_from_slice(&packed[s * elem..(s + 1) * elem]);
    match layout {
        Layout::RowMajor => return Ok(packed.to_vec()),
        Layout::Panels { nr, kn } => {
            let nr = nr as usize;
            let (n, k) = if kn { (shape[r - 1], shape[r - 2]) } else { (shape[r - 2], shape[r - 1]) };
            let batch: usize = shape[..r - 2].iter().product();
            let panels = n.div_ceil(nr);
            for b in 0..batch {
                for col in 0..n {
                    for kk in 0..k {
                        put(b * n * k + col * k + kk, ((b * panels + col / nr) * k + kk) * nr + col % nr);
                    }
                }
            }
        }
        Layout::GateUpPanels { nr } => {
            let (nr, half) = (nr as usize, nr as usize / 2);
            let (two_i, k) = (shape[r - 2], shape[r - 1]);
            let i = two_i / 2;
            let batch: usize = shape[..r - 2].iter().product();
            let panels = i.div_ceil(half);
            for b in 0..batch {
                for row in 0..two_i {
                    let (c, up) = if row < i { (row, 0) } else { (row - i, half) };
                    for kk in 0..k {
                        put((b * two_i + row) * k + kk, ((b * panels + c / half) * k + kk) * nr + up + c % half);
                    }
                }
            }
        }
        Layout::DotPanels { nr, kg } => {
            let (nr, kg) = (nr as usize, kg as usize);
            let (n, k) = (shape[r - 2], shape[r - 1]);
            let batch: usize = shape[..r - 2].iter().product();
            let (panels, groups) = (n.div_ceil(nr), k.div_ceil(kg));
            for b in 0..batch {
                for col in 0..n {
                    for kk in 0..k {
                        let panel = b * panels + col / nr;
                        put(b * n * k + col * k + kk, ((panel * groups + kk / kg) * nr + col % nr) * kg + kk % kg);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Storage dtype of a prepared weight as a device type.
fn storage(d: DType) -> Result<DevType> {
    Ok(match d {
        DType::F32 => DevType::F32,
        DType::F16 => DevType::F16,
        DType::BF16 => DevType::BF16,
        DType::I64 => DevType::I64,
        DType::I32 => DevType::I32,
        DType::I8 => DevType::I8,
        other => bail!("weights of dtype {other} have no device encoding"),
    })
}

/// Device bytes of `w` from its prepared bytes (storage dtype and layout,
/// as `package_build::prepared_bytes` returns them and CPU packages store
/// them), converted to `dev` (RNE rounding when narrowing).
pub fn device_weight_bytes(w: &PreparedWeight, prepared: &[u8], dev: DevType) -> Result<Vec<u8>> {
    let st = storage(w.dtype)?;
    let rm = unpack(w.layout, prepared, &w.shape, st.size() as usize)?;
    if st == dev {
        return Ok(rm);
    }
    // Integers (int64 indices, int8 weights, int32 quant biases) are
    // stored as they are: a conversion would change their meaning.
    let integer = |t: DevType| matches!(t, DevType::I64 | DevType::I32 | DevType::I8);
    if integer(st) || integer(dev) {
        bail!("weight `{}`: cannot convert {st} to {dev}", w.name);
    }
    Ok(encode(dev, &decode(st, &rm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_inverts_every_layout() {
        let shape = [2usize, 6, 5];
        let src: Vec<u8> = (0..60u8).collect();
        for l in [
            Layout::RowMajor,
            Layout::Panels { nr: 4, kn: false },
            Layout::GateUpPanels { nr: 4 },
            Layout::DotPanels { nr: 4, kg: 4 },
        ] {
            assert_eq!(unpack(l, &l.pack(&src, &shape, 1), &shape, 1).unwrap(), src, "{l:?}");
        }
        // kn panels of a logical [K=2, N=3] come out as [N, K].
        let kn = [1u8, 3, 5, 2, 4, 6];
        let l = Layout::Panels { nr: 2, kn: true };
        assert_eq!(unpack(l, &l.pack(&kn, &[2, 3], 1), &[2, 3], 1).unwrap(), vec![1, 2, 3, 4, 5, 6]);
        let e = unpack(l, &[0u8; 3], &[2, 3], 1).unwrap_err().to_string();
        assert!(e.contains("needs 8"), "{e}");
    }
}

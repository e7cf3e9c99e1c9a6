//! Prepared weights in the device layout the AscendC kernels and the host
//! program expect: row-major over the logical shape (matmul weights `[N, K]`
//! like HF Linear, merged gate/up `[.., 2I, K]` gate rows first, experts
//! stacked), in the buffer's device dtype (the activation dtype, f32 for
//! the routing scales). The CPU packages store the same weights in packed
//! panels ([`Layout`]); [`device_weight_bytes`] undoes that packing.
//!
//! A weight read only by cube GEMMs that asked for it ([`NzTile`], see
//! `program::emit_program`) is stored instead in the order the kernel's L1
//! B tiles need ([`tile_nz`]), so each K step fetches its tile with one
//! contiguous DMA rather than one ND->NZ burst per row.

use crate::data::{decode, encode};
use crate::target::DevType;
use anyhow::{bail, Context, Result};
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

/// A cube GEMM weight `[.., N, K]` stored tile by tile in the L1 image that
/// `DataCopy(.., Nd2NzParams)` of the kernel's B tile would produce: per
/// matrix (expert), per `base_n`-row tile, per `base_k` K step, the step's
/// K blocks of `c0` columns, each block `ceil16(rows)` rows of `c0`
/// elements (rows past N and columns past K zero). With `base_n` a
/// multiple of 16 and `base_k` one of `c0`, the step at row `n0` and column
/// `k0` of a matrix starts at element `n0 * kpad + ceil16(nLen) * k0`,
/// `kpad` = K rounded up to `c0`; the kernels compute exactly that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NzTile {
    /// Rows of one L1 B tile (the kernel's `baseN`).
    pub base_n: u64,
    /// K elements of one step (the kernel's `baseK`).
    pub base_k: u64,
    /// Fractal width in elements: 32 bytes over the element size.
    pub c0: u64,
}

impl NzTile {
    /// Elements of one `[n, k]` matrix stored tiled.
    pub fn stored_elems(&self, n: u64, k: u64) -> u64 {
        n.div_ceil(16) * 16 * k.div_ceil(self.c0) * self.c0
    }
}

/// Row-major `[.., N, K]` elements of `elem` bytes (`rm`) in the tile order
/// of `t` (see [`NzTile`]).
pub fn tile_nz(rm: &[u8], shape: &[usize], elem: usize, t: NzTile) -> Result<Vec<u8>> {
    let r = shape.len();
    if r < 2 {
        bail!("an NZ-tiled weight needs [.., N, K], got shape {shape:?}");
    }
    if t.c0 == 0 || t.base_n == 0 || !t.base_n.is_multiple_of(16) || !t.base_k.is_multiple_of(t.c0) || t.base_k == 0 {
        bail!("NZ tile {t:?}: base_n must be a multiple of 16 and base_k one of c0");
    }
    let (n, k) = (shape[r - 2], shape[r - 1]);
    let batch: usize = shape[..r - 2].iter().product();
    if rm.len() != batch * n * k * elem {
        bail!("weight of shape {shape:?} has {} bytes, expected {}", rm.len(), batch * n * k * elem);
    }
    let (bn, bk, c0) = (t.base_n as usize, t.base_k as usize, t.c0 as usize);
    let mut out = Vec::with_capacity(batch * t.stored_elems(n as u64, k as u64) as usize * elem);
    let zero = vec![0u8; c0 * elem];
    for b in 0..batch {
        for n0 in (0..n).step_by(bn) {
            let rows = bn.min(n - n0);
            for k0 in (0..k).step_by(bk) {
                let k_len = bk.min(k - k0);
                for kb in (k0..k0 + k_len).step_by(c0) {
                    let cols = c0.min(k - kb);
                    for row in 0..rows.div_ceil(16) * 16 {
                        if row < rows {
                            let s = ((b * n + n0 + row) * k + kb) * elem;
                            out.extend_from_slice(&rm[s..s + cols * elem]);
                            out.extend_from_slice(&zero[cols * elem..]);
                        } else {
                            out.extend_from_slice(&zero);
                        }
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
/// them), converted to `dev` (RNE rounding when narrowing), row-major or,
/// with `nz`, in that tile order (the buffer's `AscendProgram::buffer_nz`).
pub fn device_weight_bytes(w: &PreparedWeight, prepared: &[u8], dev: DevType, nz: Option<NzTile>) -> Result<Vec<u8>> {
    let st = storage(w.dtype)?;
    let rm = unpack(w.layout, prepared, &w.shape, st.size() as usize)?;
    let rm = if st == dev {
        rm
    } else {
        // Integers (int64 indices, int8 weights, int32 quant biases) are
        // stored as they are: a conversion would change their meaning.
        let integer = |t: DevType| matches!(t, DevType::I64 | DevType::I32 | DevType::I8);
        if integer(st) || integer(dev) {
            bail!("weight `{}`: cannot convert {st} to {dev}", w.name);
        }
        encode(dev, &decode(st, &rm))
    };
    match nz {
        Some(t) => tile_nz(&rm, &w.shape, dev.size() as usize, t).with_context(|| format!("weight `{}`", w.name)),
        None => Ok(rm),
    }
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

    /// A hand-computed case with an N tail (20 rows: a 16-row tile padded
    /// from 4 to 16 rows) and a K tail (K = 6 with c0 = 4: the second block
    /// has 2 columns then zeros), two matrices, base tile 16 x 4.
    #[test]
    fn tile_nz_matches_the_nd2nz_image_with_tails() {
        let (batch, n, k) = (2usize, 20usize, 6usize);
        let t = NzTile { base_n: 16, base_k: 4, c0: 4 };
        let v = |b: usize, r: usize, c: usize| (b * 1000 + r * 10 + c + 1) as u16;
        let rm: Vec<u8> = (0..batch * n * k).flat_map(|i| v(i / (n * k), i / k % n, i % k).to_le_bytes()).collect();
        let got: Vec<u16> =
            tile_nz(&rm, &[batch, n, k], 2, t).unwrap().chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let kpad = 8;
        assert_eq!(got.len(), batch * t.stored_elems(n as u64, k as u64) as usize);
        assert_eq!(t.stored_elems(20, 6), 32 * kpad as u64);
        let mut want = Vec::new();
        for b in 0..batch {
            // (n0, rows): the full tile, then the 4-row tail padded to 16.
            for (n0, rows) in [(0, 16), (16, 4)] {
                // One K block per step here (base_k = c0): k0 = 0, then 4.
                for k0 in [0, 4] {
                    let start = want.len();
                    for row in 0..16 {
                        for j in 0..4 {
                            let c = k0 + j;
                            want.push(if row < rows && c < k { v(b, n0 + row, c) } else { 0 });
                        }
                    }
                    // The kernel's offset formula for this step.
                    assert_eq!(start, b * 32 * kpad + n0 * kpad + 16 * k0);
                }
            }
        }
        assert_eq!(got, want);
        assert!(tile_nz(&rm[1..], &[batch, n, k], 2, t).unwrap_err().to_string().contains("expected"));
        assert!(tile_nz(&rm, &[batch, n, k], 2, NzTile { base_n: 8, ..t }).is_err());
    }

    /// Several K blocks per step: block order within the step is K-major
    /// over rows (what one contiguous copy into L1 must reproduce).
    #[test]
    fn tile_nz_orders_k_blocks_within_a_step() {
        let (n, k) = (16usize, 8usize);
        let t = NzTile { base_n: 16, base_k: 8, c0: 4 };
        let rm: Vec<u8> = (0..(n * k) as u8).collect();
        let got = tile_nz(&rm, &[n, k], 1, t).unwrap();
        for row in 0..n {
            for c in 0..k {
                assert_eq!(got[(c / 4) * 16 * 4 + row * 4 + c % 4], rm[row * k + c], "row {row} col {c}");
            }
        }
    }
}

//! The int8 matmul on weights packed in dot-product panels
//! ([`Layout::DotPanels`] with 16 columns x 4 k: one 64-byte load holds
//! 4 consecutive k of 16 output columns). One tile is one panel (16
//! output columns) over every row, as for row-major weights.
//!
//! Rows go through register-blocked micro-kernels (helper functions,
//! `mr` rows at a time) that leave each row's 16 exact int32 sums in the
//! tile buffer; the epilogue then dequantizes 16 columns at once.
//!
//! - AVX-512 VNNI: per 4-k group, one panel load and per row one
//!   `vpdpbusd` of the row's 4 bytes broadcast to every lane: 8 rows x 16
//!   columns in 8 zmm accumulators. `vpdpbusd` multiplies unsigned bytes by
//!   signed ones, so the activation bytes are shifted to unsigned (`x ^
//!   0x80` = `x + 128`) and `128 * sum_k w` is subtracted per column; those
//!   column sums are one `vpdpbusd` of ones per panel load, computed once
//!   per tile (the pass that streams the panel from memory, with software
//!   prefetch; the row blocks then read it from cache). The integer sums
//!   wrap in i32 like the reference's, so the result is exact.
//! - AVX2 (the baseline tier): bytes widened to i16 and `vpmaddwd` (exact
//!   products, pairs added in i32): 3 rows x 16 columns in 12 ymm
//!   accumulators of column pairs, folded at the end.
//! - Elsewhere: the same sums in plain vector IR.

use super::quant::{matmul_epilogue, OutputRow, QuantMatMulArgs};
use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, Result};
use inkwell::intrinsics::Intrinsic;
use inkwell::types::{BasicType, VectorType};
use inkwell::values::{BasicValue, BasicValueEnum, FunctionValue, IntValue, PointerValue, VectorValue};
use inkwell::AddressSpace;
use panguc_ir::kernel::QUANT_MATMUL_COLS;

/// Output columns per panel (lanes of a zmm of i32) and k per group.
const NR: usize = QUANT_MATMUL_COLS;
const KG: usize = 4;
/// Bytes of one panel row group (`NR * KG`).
const GROUP_BYTES: usize = NR * KG;
/// Software prefetch distance of the panel stream.
const PREFETCH_BYTES: i64 = 2048;

/// Rows per micro-kernel call: the accumulators a tier's registers hold.
fn max_rows(vnni: bool) -> usize {
    if vnni {
        8
    } else {
        3
    }
}

/// Load a value of type `ty` from byte `off` of `p` (any alignment).
fn load_at<'c>(cg: &Cg<'c>, p: PointerValue<'c>, off: IntValue<'c>, ty: impl BasicType<'c>) -> BasicValueEnum<'c> {
    let vp = cg.b.build_pointer_cast(cg.gep(p, off), ty.ptr_type(AddressSpace::default()), "").ok_();
    let v = cg.b.build_load(vp, "").ok_();
    v.as_instruction_value().expect("load").set_alignment(1).ok_();
    v
}

fn intrinsic<'c>(cg: &Cg<'c>, name: &str) -> Result<FunctionValue<'c>> {
    Intrinsic::find(name)
        .and_then(|i| i.get_declaration(&cg.module, &[]))
        .ok_or_else(|| anyhow!("LLVM has no {name} intrinsic"))
}

fn call<'c>(cg: &Cg<'c>, f: FunctionValue<'c>, args: &[BasicValueEnum<'c>]) -> BasicValueEnum<'c> {
    let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
    cg.b.build_call(f, &args, "").ok_().try_as_basic_value().basic().expect("intrinsic returns a value")
}

fn i32x<'c>(cg: &Cg<'c>, n: u32) -> VectorType<'c> {
    cg.i32t().vec_type(n)
}

/// `<n x i32>` shuffle mask constant.
fn mask<'c>(cg: &Cg<'c>, idx: impl IntoIterator<Item = u32>) -> VectorValue<'c> {
    let c: Vec<IntValue> = idx.into_iter().map(|i| cg.i32t().const_int(i as u64, false)).collect();
    VectorType::const_vector(&c)
}

/// Activation bytes `4g..4g+4` of the row at `x` as an i32 word; a
/// partial last group (`tail` bytes) is completed with zeros (the packed
/// weights there are zero too).
fn x_word<'c>(cg: &Cg<'c>, x: PointerValue<'c>, g: IntValue<'c>, tail: usize) -> IntValue<'c> {
    let at = cg.mul(g, cg.i64c(KG as i64));
    if tail == 0 {
        return load_at(cg, x, at, cg.i32t()).into_int_value();
    }
    let mut word = cg.i32t().const_zero();
    for t in 0..tail {
        let byte = cg.load_i(x, cg.add(at, cg.i64c(t as i64)));
        let wide = cg.b.build_int_z_extend(byte, cg.i32t(), "").ok_();
        let shifted = cg.b.build_left_shift(wide, cg.i32t().const_int(8 * t as u64, false), "").ok_();
        word = cg.b.build_or(word, shifted, "").ok_();
    }
    word
}

/// The panel's 4-k group `g` as `<16 x i32>`, prefetching ahead.
fn panel_group<'c>(cg: &Cg<'c>, panel: PointerValue<'c>, g: IntValue<'c>) -> VectorValue<'c> {
    let at = cg.mul(g, cg.i64c(GROUP_BYTES as i64));
    cg.prefetch(cg.gep(panel, cg.add(at, cg.i64c(PREFETCH_BYTES))));
    load_at(cg, panel, at, i32x(cg, NR as u32)).into_vector_value()
}

/// `for g in 0..groups` over the whole groups, then the partial one.
fn for_groups<'c>(
    cg: &mut Cg<'c>,
    k: usize,
    mut body: impl FnMut(&mut Cg<'c>, IntValue<'c>, usize) -> Result<()>,
) -> Result<()> {
    let whole = k / KG;
    cg.for_range(cg.i64c(0), cg.i64c(whole as i64), 1, |cg, g| body(cg, g, 0))?;
    if !k.is_multiple_of(KG) {
        body(cg, cg.i64c(whole as i64), k % KG)?;
    }
    Ok(())
}

/// The micro-kernel for `mr` rows: `(x: i8*, stride: i64, panel: i8*,
/// out: i32*)` writes row r's 16 sums at `out[16 r..]` (VNNI: of the
/// shifted activations, before the column-sum correction).
fn microkernel<'c>(cg: &mut Cg<'c>, name: &str, k: usize, mr: usize) -> Result<FunctionValue<'c>> {
    let i32p = cg.i32t().ptr_type(AddressSpace::default());
    let f = cg.begin_helper(name, &[cg.i8p().into(), cg.i64t().into(), cg.i8p().into(), i32p.into()]);
    let p = f.get_params();
    let (x, stride, panel, out) =
        (p[0].into_pointer_value(), p[1].into_int_value(), p[2].into_pointer_value(), p[3].into_pointer_value());
    let rows: Vec<PointerValue> = (0..mr).map(|r| cg.gep(x, cg.mul(stride, cg.i64c(r as i64)))).collect();
    let sums: Vec<VectorValue> = if cg.vnni {
        vnni_rows(cg, k, &rows, panel)?
    } else if cg.has_feature("avx2") {
        pmaddwd_rows(cg, k, &rows, panel)?
    } else {
        plain_rows(cg, k, &rows, panel)?
    };
    for (r, s) in sums.iter().enumerate() {
        let vp =
            cg.b.build_pointer_cast(
                cg.gep(out, cg.i64c((r * NR) as i64)),
                s.get_type().ptr_type(AddressSpace::default()),
                "",
            )
            .ok_();
        cg.b.build_store(vp, *s).ok_().set_alignment(4).ok_();
    }
    cg.b.build_return(None).ok_();
    Ok(f)
}

fn vnni_rows<'c>(
    cg: &mut Cg<'c>,
    k: usize,
    rows: &[PointerValue<'c>],
    panel: PointerValue<'c>,
) -> Result<Vec<VectorValue<'c>>> {
    let dp = intrinsic(cg, "llvm.x86.avx512.vpdpbusd.512")?;
    let v16 = i32x(cg, NR as u32);
    let acc: Vec<PointerValue> = rows.iter().map(|_| cg.alloca(v16, "acc")).collect();
    for a in &acc {
        cg.store_v(*a, v16.const_zero());
    }
    for_groups(cg, k, |cg, g, tail| {
        let w = panel_group(cg, panel, g);
        for (x, a) in rows.iter().zip(&acc) {
            // x + 128 as unsigned bytes, in every lane.
            let word = cg.b.build_xor(x_word(cg, *x, g, tail), cg.i32t().const_int(0x8080_8080, false), "").ok_();
            let xb = splat_i32(cg, word, NR as u32);
            let s = call(cg, dp, &[cg.load_v(*a), xb.into(), w.into()]);
            cg.store_v(*a, s);
        }
        Ok(())
    })?;
    Ok(acc.iter().map(|a| cg.load_v(*a).into_vector_value()).collect())
}

/// Per row, 4 accumulators of 8 i32: lane 2c + h of accumulator q holds
/// column 4q + c's products of k pair h of each group.
fn pmaddwd_rows<'c>(
    cg: &mut Cg<'c>,
    k: usize,
    rows: &[PointerValue<'c>],
    panel: PointerValue<'c>,
) -> Result<Vec<VectorValue<'c>>> {
    let madd = intrinsic(cg, "llvm.x86.avx2.pmadd.wd")?;
    let (v8, i16x16, i8x16) = (i32x(cg, 8), cg.ctx.i16_type().vec_type(16), cg.ctx.i8_type().vec_type(16));
    let acc: Vec<[PointerValue; 4]> = rows.iter().map(|_| [(); 4].map(|_| cg.alloca(v8, "acc"))).collect();
    for a in acc.iter().flatten() {
        cg.store_v(*a, v8.const_zero());
    }
    for_groups(cg, k, |cg, g, tail| {
        let at = cg.mul(g, cg.i64c(GROUP_BYTES as i64));
        cg.prefetch(cg.gep(panel, cg.add(at, cg.i64c(PREFETCH_BYTES))));
        // Each row's 4 bytes as i16, repeated for the 4 columns of a load.
        let xs: Vec<VectorValue> = rows
            .iter()
            .map(|x| {
                let word = x_word(cg, *x, g, tail);
                let bytes = cg.b.build_bit_cast(word, cg.ctx.i8_type().vec_type(4), "").ok_().into_vector_value();
                let wide = cg.b.build_int_s_extend(bytes, cg.ctx.i16_type().vec_type(4), "").ok_();
                cg.b.build_shuffle_vector(wide, wide, mask(cg, (0..16).map(|i| i % 4)), "").ok_()
            })
            .collect();
        for q in 0..4 {
            let off = cg.add(at, cg.i64c((q * 16) as i64));
            let w8 = load_at(cg, panel, off, i8x16).into_vector_value();
            let w = cg.b.build_int_s_extend(w8, i16x16, "").ok_();
            for (xv, a) in xs.iter().zip(&acc) {
                let prod = call(cg, madd, &[w.into(), (*xv).into()]).into_vector_value();
                let s = cg.b.build_int_add(cg.load_v(a[q]).into_vector_value(), prod, "").ok_();
                cg.store_v(a[q], s);
            }
        }
        Ok(())
    })?;
    Ok(acc
        .iter()
        .map(|a| {
            let v: Vec<VectorValue> = a.iter().map(|p| cg.load_v(*p).into_vector_value()).collect();
            let lo = cg.b.build_shuffle_vector(v[0], v[1], mask(cg, 0..16), "").ok_();
            let hi = cg.b.build_shuffle_vector(v[2], v[3], mask(cg, 0..16), "").ok_();
            let even = cg.b.build_shuffle_vector(lo, hi, mask(cg, (0..16).map(|c| 2 * c)), "").ok_();
            let odd = cg.b.build_shuffle_vector(lo, hi, mask(cg, (0..16).map(|c| 2 * c + 1)), "").ok_();
            cg.b.build_int_add(even, odd, "").ok_()
        })
        .collect())
}

/// Widening multiplies of whole groups in plain vector IR (no x86 dot
/// instructions): lane 4c + t holds column c's products of k offset t.
fn plain_rows<'c>(
    cg: &mut Cg<'c>,
    k: usize,
    rows: &[PointerValue<'c>],
    panel: PointerValue<'c>,
) -> Result<Vec<VectorValue<'c>>> {
    let v64 = i32x(cg, GROUP_BYTES as u32);
    let acc: Vec<PointerValue> = rows.iter().map(|_| cg.alloca(v64, "acc")).collect();
    for a in &acc {
        cg.store_v(*a, v64.const_zero());
    }
    for_groups(cg, k, |cg, g, tail| {
        let at = cg.mul(g, cg.i64c(GROUP_BYTES as i64));
        let w8 = load_at(cg, panel, at, cg.ctx.i8_type().vec_type(GROUP_BYTES as u32)).into_vector_value();
        let w = cg.b.build_int_s_extend(w8, v64, "").ok_();
        for (x, a) in rows.iter().zip(&acc) {
            let bytes = cg.b.build_bit_cast(x_word(cg, *x, g, tail), cg.ctx.i8_type().vec_type(4), "").ok_();
            let wide = cg.b.build_int_s_extend(bytes.into_vector_value(), i32x(cg, 4), "").ok_();
            let xv = cg.b.build_shuffle_vector(wide, wide, mask(cg, (0..GROUP_BYTES as u32).map(|i| i % 4)), "").ok_();
            let s =
                cg.b.build_int_add(cg.load_v(*a).into_vector_value(), cg.b.build_int_mul(w, xv, "").ok_(), "").ok_();
            cg.store_v(*a, s);
        }
        Ok(())
    })?;
    Ok(acc
        .iter()
        .map(|a| {
            let v = cg.load_v(*a).into_vector_value();
            let part = |t: u32| cg.b.build_shuffle_vector(v, v, mask(cg, (0..NR as u32).map(|c| 4 * c + t)), "").ok_();
            let (s01, s23) =
                (cg.b.build_int_add(part(0), part(1), "").ok_(), cg.b.build_int_add(part(2), part(3), "").ok_());
            cg.b.build_int_add(s01, s23, "").ok_()
        })
        .collect())
}

fn splat_i32<'c>(cg: &Cg<'c>, x: IntValue<'c>, n: u32) -> VectorValue<'c> {
    let undef = i32x(cg, n).get_undef();
    let one = cg.b.build_insert_element(undef, x, cg.i32t().const_zero(), "").ok_();
    cg.b.build_shuffle_vector(one, undef, i32x(cg, n).const_zero(), "").ok_()
}

/// The register-blocked int8 dot products of rows with one dot-product
/// panel (16 weight rows), shared by the dense int8 matmul and the expert
/// kernels: the micro-kernels are emitted once per kernel (before it),
/// then a kernel computes, per panel, any number of rows' exact int32
/// sums (row r's 16 columns at `tile[16 r..]`), each row's independent of
/// the other rows it shares a call with.
pub(crate) struct PanelDots<'c> {
    helpers: Vec<FunctionValue<'c>>,
    /// `vpdpbusd` on the VNNI tier (the column sums' correction).
    dp: Option<FunctionValue<'c>>,
    k: usize,
    groups: usize,
}

impl<'c> PanelDots<'c> {
    /// Emit the micro-kernels for contraction length `k`, named after the
    /// kernel `name`; call before the kernel's `begin_kernel`.
    pub fn declare(cg: &mut Cg<'c>, name: &str, k: usize) -> Result<Self> {
        let helpers = (1..=max_rows(cg.vnni))
            .map(|mr| microkernel(cg, &format!("{name}.mk{mr}"), k, mr))
            .collect::<Result<_>>()?;
        let dp = if cg.vnni { Some(intrinsic(cg, "llvm.x86.avx512.vpdpbusd.512")?) } else { None };
        Ok(PanelDots { helpers, dp, k, groups: k.div_ceil(KG) })
    }

    /// The contraction length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows per micro-kernel call.
    pub fn max_rows(&self) -> usize {
        self.helpers.len()
    }

    /// Bytes of one panel (16 weight rows, zero-padded groups).
    pub fn panel_bytes(&self) -> usize {
        self.groups * GROUP_BYTES
    }

    /// The stack buffers of a kernel computing up to `rows` rows per
    /// call: the sums tile (`rows x 16` i32) and the column sums.
    pub fn buffers(&self, cg: &Cg<'c>, rows: usize) -> (PointerValue<'c>, PointerValue<'c>) {
        let tile = cg.alloca(cg.i32t().array_type((rows * NR) as u32), "tile");
        let tile = cg.b.build_pointer_cast(tile, cg.i32t().ptr_type(AddressSpace::default()), "").ok_();
        (tile, cg.alloca(i32x(cg, NR as u32), "csum"))
    }

    /// VNNI: `128 * sum_k w` per column of `panel` into `csum`, the
    /// correction of the shifted rows (this pass streams the panel from
    /// memory, with software prefetch; the rows then read it from cache).
    /// Nothing on the other tiers.
    pub fn column_sums(&self, cg: &mut Cg<'c>, panel: PointerValue<'c>, csum: PointerValue<'c>) -> Result<()> {
        let Some(dp) = self.dp else { return Ok(()) };
        let v16 = i32x(cg, NR as u32);
        cg.store_v(csum, v16.const_zero());
        let ones = VectorType::const_vector(&[cg.i32t().const_int(0x0101_0101, false); NR]);
        cg.for_range(cg.i64c(0), cg.i64c(self.groups as i64), 1, |cg, g| {
            let w = panel_group(cg, panel, g);
            let s = call(cg, dp, &[cg.load_v(csum), ones.into(), w.into()]);
            cg.store_v(csum, s);
            Ok(())
        })?;
        let shifted = cg.b.build_left_shift(cg.load_v(csum).into_vector_value(), cg.splat_i32(7, NR as u32), "").ok_();
        cg.store_v(csum, shifted);
        Ok(())
    }

    /// The raw sums of `rows` rows (at most the tile's rows) from `x`, `stride`
    /// bytes apart, with `panel`: micro-kernel calls of up to
    /// [`PanelDots::max_rows`] rows each.
    pub fn sums(
        &self,
        cg: &mut Cg<'c>,
        (x, stride): (PointerValue<'c>, IntValue<'c>),
        rows: IntValue<'c>,
        panel: PointerValue<'c>,
        tile: PointerValue<'c>,
    ) -> Result<()> {
        let mr = self.max_rows() as i64;
        let calls = cg.div(cg.add(rows, cg.i64c(mr - 1)), cg.i64c(mr));
        cg.for_range(cg.i64c(0), calls, 1, |cg, c| {
            let row0 = cg.mul(c, cg.i64c(mr));
            let n = cg.min(cg.i64c(mr), cg.sub(rows, row0));
            let xc = cg.gep(x, cg.mul(row0, stride));
            let out = cg.gep(tile, cg.mul(row0, cg.i64c(NR as i64)));
            for (i, h) in self.helpers.iter().enumerate() {
                cg.if_then(cg.eq(n, cg.i64c(i as i64 + 1)), |cg| {
                    cg.b.build_call(*h, &[xc.into(), stride.into(), panel.into(), out.into()], "").ok_();
                    Ok(())
                })?;
            }
            Ok(())
        })
    }

    /// Row `r`'s exact 16 sums from the tile (corrected on VNNI).
    pub fn row(
        &self,
        cg: &Cg<'c>,
        (tile, csum): (PointerValue<'c>, PointerValue<'c>),
        r: IntValue<'c>,
    ) -> VectorValue<'c> {
        let v16 = i32x(cg, NR as u32);
        let vp = cg
            .b
            .build_pointer_cast(cg.gep(tile, cg.mul(r, cg.i64c(NR as i64))), v16.ptr_type(AddressSpace::default()), "")
            .ok_();
        let raw = cg.b.build_load(vp, "").ok_();
        // The tile buffer is an i32 array: only element-aligned.
        raw.as_instruction_value().expect("load").set_alignment(4).ok_();
        let sums = raw.into_vector_value();
        if self.dp.is_some() {
            return cg.b.build_int_sub(sums, cg.load_v(csum).into_vector_value(), "").ok_();
        }
        sums
    }
}

/// The int8 matmul kernel on dot-product panels (see the module docs).
pub(crate) fn quant_matmul_panels(cg: &mut Cg, k: &panguc_ir::kernel::Kernel, q: &QuantMatMulArgs) -> Result<()> {
    let dots = PanelDots::declare(cg, &k.name, q.k)?;
    let mr_max = dots.max_rows();
    cg.begin_kernel(&k.name);
    let panel_bytes = cg.i64c(dots.panel_bytes() as i64);
    let ops = q.pointers(cg);
    let (m, kv, n) = (q.m(cg)?, cg.i64c(q.k as i64), cg.i64c(q.n as i64));
    let blocks = cg.i64c(q.n.div_ceil(NR) as i64);
    let bufs = dots.buffers(cg, mr_max);
    cg.for_tiles(|cg, t| {
        let (batch, blk) = (cg.div(t, blocks), cg.rem(t, blocks));
        let panel = cg.gep(ops.w, cg.mul(t, panel_bytes));
        let j0 = cg.mul(blk, cg.i64c(NR as i64));
        let j1 = cg.min(cg.add(j0, cg.i64c(NR as i64)), n);
        let c0 = if q.w_batched { cg.add(cg.mul(batch, n), j0) } else { j0 };
        dots.column_sums(cg, panel, bufs.1)?;
        let row_blocks = cg.div(cg.add(m, cg.i64c(mr_max as i64 - 1)), cg.i64c(mr_max as i64));
        cg.for_range(cg.i64c(0), row_blocks, 1, |cg, rb| {
            let row0 = cg.mul(rb, cg.i64c(mr_max as i64));
            let rows = cg.min(cg.i64c(mr_max as i64), cg.sub(m, row0));
            let x_row0 = if q.x_batched { cg.add(cg.mul(batch, m), row0) } else { row0 };
            let x = cg.gep(ops.x, cg.mul(x_row0, kv));
            dots.sums(cg, (x, kv), rows, panel, bufs.0)?;
            cg.for_range(cg.i64c(0), rows, 1, |cg, r| {
                let at = OutputRow::new(cg, q, batch, cg.add(row0, r), m).with_scale(cg, q, &ops);
                let sums = dots.row(cg, bufs, r);
                matmul_epilogue(cg, q, &ops, &at, (j0, j1, c0), sums)
            })
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

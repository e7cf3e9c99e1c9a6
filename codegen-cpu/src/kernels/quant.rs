//! Int8 kernels (docs/quantization.md): static and dynamic quantization,
//! dequantization, and the int8 matmul with its dequant epilogue, all with
//! the reference's exact semantics (`panguc_ir::interp::quant`): float math
//! in f32 in the formulas' order, round-half-to-even, clamping to
//! [-128, 127], and int8 x int8 products summed exactly in i32.
//!
//! The int8 dot product is [`dot_i8`]: 4-byte groups of the row are
//! multiplied and summed into i32 lanes. On the AVX-512 tier (which has
//! VNNI) it is one `vpdpbusd` per 64 bytes; `vpdpbusd` multiplies
//! *unsigned* bytes by signed ones, so the activation row is shifted to
//! unsigned (`x + 128`, an xor of the sign bit) and the result corrected by
//! `128 * sum_k w[k]`, computed in the same pass with a second `vpdpbusd`
//! of the weight bytes against a vector of ones (cheaper than a packed
//! per-column sum, and the weights stay in the checkpoint's layout). The
//! correction is exact, so the sum is the reference's. Other tiers use the
//! plain widening multiply-add the loop vectoriser turns into
//! `vpmaddwd` (AVX2).

use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, bail, Result};
use inkwell::intrinsics::Intrinsic;

use inkwell::values::{BasicValue, BasicValueEnum, FloatValue, IntValue, PointerValue, VectorValue};
use inkwell::FloatPredicate;
use panguc_ir::kernel::{ArgSpec, Kernel, Layout, QUANT_MATMUL_COLS};
use panguc_ir::{DType, Dim};

/// `clamp(round_half_even(v), -128, 127)` as an i8; NaN gives 0.
pub(crate) fn quantize_value<'c>(cg: &Cg<'c>, v: FloatValue<'c>) -> IntValue<'c> {
    let r = cg.intrinsic("llvm.roundeven", &[v.into()]);
    let lo = cg.fmax(r, cg.f32c(-128.0).into());
    let hi = cg.intrinsic("llvm.minnum", &[lo, cg.f32c(127.0).into()]).into_float_value();
    let nan = cg.fcmp(FloatPredicate::UNO, v, v);
    let safe = cg.select_f(nan, cg.f32c(0.0), hi);
    cg.b.build_float_to_signed_int(safe, cg.ctx.i8_type(), "").ok_()
}

/// Element `i` of a scale operand as f32: a float buffer, or an i64 word
/// holding the f32 bits in its low half (msModelSlim's `deq_scale`).
pub(crate) fn load_scale<'c>(cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>, dtype: DType) -> FloatValue<'c> {
    if dtype.is_float() {
        return cg.load_f(p, i, dtype);
    }
    let word = cg.load_i(p, i);
    let low = cg.b.build_int_truncate_or_bit_cast(word, cg.i32t(), "").ok_();
    cg.b.build_bit_cast(low, cg.f32t(), "").ok_().into_float_value()
}

/// Element `i` of an integer buffer of any width as i32 (sign-extended or
/// truncated; quant biases are int32 values).
pub(crate) fn load_i32<'c>(cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>) -> IntValue<'c> {
    let v = cg.load_i(p, i);
    cg.b.build_int_cast_sign_flag(v, cg.i32t(), true, "").ok_()
}

/// Per operand: its stride along each output dim (0 where broadcast).
fn broadcast_strides<'c>(cg: &Cg<'c>, a: &ArgSpec, od: usize) -> Result<Vec<IntValue<'c>>> {
    let ri = a.shape.len();
    if ri > od {
        bail!("operand of rank {ri} exceeds output rank {od}");
    }
    let idims = cg.dims(&a.shape)?;
    let istr = cg.strides(&idims);
    Ok((0..od)
        .map(|d| if d < od - ri || a.shape[d - (od - ri)] == Dim::c(1) { cg.i64c(0) } else { istr[d - (od - ri)] })
        .collect())
}

/// Quantize (`dequantize` false) or dequantize: three broadcast operands
/// `(x, scale, offset)` and the output; one tile per output row.
pub(crate) fn quantize(cg: &mut Cg, k: &Kernel, dequantize: bool) -> Result<()> {
    let out = &k.args[3];
    cg.begin_kernel(&k.name);
    let od = cg.dims(&out.shape)?;
    let r = od.len();
    let inner = if r == 0 { cg.i64c(1) } else { od[r - 1] };
    let outer = od[..r.saturating_sub(1)].to_vec();
    let strides = k.args[..3].iter().map(|a| broadcast_strides(cg, a, r)).collect::<Result<Vec<_>>>()?;
    let ins: Vec<PointerValue> = (0..3).map(|i| cg.arg(i, k.args[i].dtype)).collect();
    let outp = cg.arg(3, out.dtype);
    cg.for_tiles(|cg, t| {
        let idx = cg.unravel(t, &outer);
        let bases: Vec<IntValue> = strides
            .iter()
            .map(|s| idx.iter().zip(s).fold(cg.i64c(0), |acc, (i, st)| cg.add(acc, cg.mul(*i, *st))))
            .collect();
        let steps: Vec<IntValue> = strides.iter().map(|s| if r == 0 { cg.i64c(0) } else { s[r - 1] }).collect();
        let obase = cg.mul(t, inner);
        cg.for_range(cg.i64c(0), inner, 1, |cg, j| {
            let at = |i: usize| cg.add(bases[i], cg.mul(j, steps[i]));
            let s = cg.load_f(ins[1], at(1), k.args[1].dtype);
            let o = cg.load_f(ins[2], at(2), k.args[2].dtype);
            let dst = cg.add(obase, j);
            if dequantize {
                let q = load_i32(cg, ins[0], at(0));
                let qf = cg.b.build_signed_int_to_float(q, cg.f32t(), "").ok_();
                let y = cg.fmul(cg.fsub(qf.into(), o.into()), s.into());
                cg.store_f(outp, dst, out.dtype, y.into_float_value());
            } else {
                let x = cg.load_f(ins[0], at(0), k.args[0].dtype);
                let y = cg.fadd(cg.fdiv(x.into(), s.into()), o.into());
                cg.store_i(outp, dst, quantize_value(cg, y.into_float_value()));
            }
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Per-token dynamic quantization of one row per tile.
pub(crate) fn dynamic_quant(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (x, q, s) = (&k.args[0], &k.args[1], &k.args[2]);
    cg.begin_kernel(&k.name);
    let kd = cg.dim(x.shape.last().expect("rank >= 1"))?;
    let (xp, qp, sp) = (cg.arg(0, x.dtype), cg.arg(1, q.dtype), cg.arg(2, s.dtype));
    cg.for_tiles(|cg, t| {
        let base = cg.mul(t, kd);
        quantize_row(cg, (xp, x.dtype), (qp, q.dtype), (sp, s.dtype), t, base, kd)
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Static `quantize` of elements `base..base + len` of `x` into `q[0..len]`
/// with one scale and offset: `x / scale + offset` in f32, as the
/// reference.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_row_static<'c>(
    cg: &mut Cg<'c>,
    x: (PointerValue<'c>, DType),
    base: IntValue<'c>,
    len: IntValue<'c>,
    scale: FloatValue<'c>,
    offset: FloatValue<'c>,
    q: PointerValue<'c>,
) -> Result<()> {
    cg.for_range(cg.i64c(0), len, 1, |cg, i| {
        let v = cg.load_f(x.0, cg.add(base, i), x.1);
        let y = cg.fadd(cg.fdiv(v.into(), scale.into()), offset.into());
        cg.store_i(q, i, quantize_value(cg, y.into_float_value()));
        Ok(())
    })
}

/// `dynamic_quant` of row `row` (elements `base..base + len` of `x` and
/// `q`): `s = max|x| / 127` stored at `s[row]`, `q = quantize(x / s)`, and
/// zeros for a zero row.
pub(crate) fn quantize_row<'c>(
    cg: &mut Cg<'c>,
    x: (PointerValue<'c>, DType),
    q: (PointerValue<'c>, DType),
    s: (PointerValue<'c>, DType),
    row: IntValue<'c>,
    base: IntValue<'c>,
    len: IntValue<'c>,
) -> Result<()> {
    let amax = cg.alloca(cg.f32t(), "amax");
    cg.store_v(amax, cg.f32c(0.0));
    cg.for_range(cg.i64c(0), len, 1, |cg, i| {
        let v = cg.load_f(x.0, cg.add(base, i), x.1);
        let a = cg.intrinsic("llvm.fabs", &[v.into()]);
        let m = cg.fmax(cg.load_v(amax), a);
        cg.store_v(amax, m);
        Ok(())
    })?;
    let scale = cg.fdiv(cg.load_v(amax), cg.f32c(127.0).into()).into_float_value();
    cg.store_f(s.0, row, s.1, scale);
    let zero_row = cg.fcmp(FloatPredicate::OEQ, scale, cg.f32c(0.0));
    cg.for_range(cg.i64c(0), len, 1, |cg, i| {
        let v = cg.load_f(x.0, cg.add(base, i), x.1);
        let qv = quantize_value(cg, cg.fdiv(v.into(), scale.into()).into_float_value());
        let zero = cg.ctx.i8_type().const_zero();
        let qv = cg.b.build_select(zero_row, zero, qv, "").ok_().into_int_value();
        cg.store_i(q.0, cg.add(base, i), qv);
        Ok(())
    })
}

/// Rows, columns and batch entries of a `[.., rows, cols]` operand.
fn matrix(a: &ArgSpec) -> (Dim, Dim, bool) {
    let r = a.shape.len();
    (a.shape[r - 2].clone(), a.shape[r - 1].clone(), r > 2)
}

/// An int8 matmul kernel's operands: `(x, w, scale_a, scale_b[, bias],
/// out)`; per token, `scale_a` is the weight scale and `scale_b` the
/// token scale; static, the int32 quant bias and the dequant scale.
pub(crate) struct QuantMatMulArgs {
    pub per_token: bool,
    pub bias: bool,
    /// Contraction length and output columns (static).
    pub k: usize,
    pub n: usize,
    m: Dim,
    pub x_batched: bool,
    pub w_batched: bool,
    dtypes: [DType; 6],
    out_at: usize,
}

/// The kernel's buffers, typed.
pub(crate) struct QuantPtrs<'c> {
    pub x: PointerValue<'c>,
    pub w: PointerValue<'c>,
    a: PointerValue<'c>,
    b: PointerValue<'c>,
    bias: Option<PointerValue<'c>>,
    out: PointerValue<'c>,
}

impl QuantMatMulArgs {
    fn of(k: &Kernel, per_token: bool, bias: bool) -> Result<QuantMatMulArgs> {
        let out_at = if bias { 5 } else { 4 };
        let (x, w) = (&k.args[0], &k.args[1]);
        if x.dtype != DType::I8 || w.dtype != DType::I8 {
            bail!("int8 matmul operands are stored as {} and {}, expected i8", x.dtype, w.dtype);
        }
        let (m, kd, x_batched) = matrix(x);
        let (n, _, w_batched) = matrix(w);
        let k_len = kd.as_const().ok_or_else(|| anyhow!("int8 matmul contraction dim must be static, found {kd}"))?;
        let n = n.as_const().ok_or_else(|| anyhow!("int8 matmul N must be static, found {n}"))?;
        let dtype = |i: usize| k.args.get(i).map_or(DType::F32, |a| a.dtype);
        let dtypes = [dtype(0), dtype(1), dtype(2), dtype(3), if bias { dtype(4) } else { DType::F32 }, dtype(out_at)];
        Ok(QuantMatMulArgs { per_token, bias, k: k_len, n, m, x_batched, w_batched, dtypes, out_at })
    }

    pub fn m<'c>(&self, cg: &Cg<'c>) -> Result<IntValue<'c>> {
        cg.dim(&self.m)
    }

    pub fn pointers<'c>(&self, cg: &Cg<'c>) -> QuantPtrs<'c> {
        let d = &self.dtypes;
        QuantPtrs {
            x: cg.arg(0, d[0]),
            w: cg.arg(1, d[1]),
            a: cg.arg(2, d[2]),
            b: cg.arg(3, d[3]),
            bias: self.bias.then(|| cg.arg(4, d[4])),
            out: cg.arg(self.out_at, d[5]),
        }
    }
}

/// The int8 matmul with its dequant epilogue (and the linear's bias added
/// last when `bias`); one tile per block of [`QUANT_MATMUL_COLS`] output
/// columns over every row. Weights packed in dot-product panels take the
/// register-blocked kernels of `quant_gemm`; row-major ones one dot
/// product per output.
pub(crate) fn quant_matmul(cg: &mut Cg, k: &Kernel, per_token: bool, bias: bool) -> Result<()> {
    let q = QuantMatMulArgs::of(k, per_token, bias)?;
    match k.args[1].layout {
        Layout::DotPanels { nr, kg: 4 } if nr as usize == QUANT_MATMUL_COLS => {
            return super::quant_gemm::quant_matmul_panels(cg, k, &q)
        }
        Layout::RowMajor => {}
        other => bail!("int8 matmul weights packed as {other:?}: expected row-major or 16 x 4 dot panels"),
    }
    let kc = q.k;
    cg.begin_kernel(&k.name);
    let blocks = cg.i64c(q.n.div_ceil(QUANT_MATMUL_COLS) as i64);
    let (m, kv, n) = (q.m(cg)?, cg.i64c(kc as i64), cg.i64c(q.n as i64));
    let ops = q.pointers(cg);
    let vnni = cg.vnni;
    // A tile: one batch entry's block of columns, for every row in turn
    // (the block's weight rows are reused from cache by each row).
    cg.for_tiles(|cg, t| {
        let (batch, blk) = (cg.div(t, blocks), cg.rem(t, blocks));
        let j0 = cg.mul(blk, cg.i64c(QUANT_MATMUL_COLS as i64));
        let j1 = cg.min(cg.add(j0, cg.i64c(QUANT_MATMUL_COLS as i64)), n);
        // First weight row / per-channel element of this batch entry.
        let wrow0 = if q.w_batched { cg.mul(batch, n) } else { cg.i64c(0) };
        cg.for_range(cg.i64c(0), m, 1, |cg, row| {
            let at = OutputRow::new(cg, &q, batch, row, m).with_scale(cg, &q, &ops);
            let xbase = cg.mul(at.x_row, kv);
            cg.for_range(j0, j1, 1, |cg, j| {
                let c = cg.add(wrow0, j);
                let acc = dot_i8(cg, cg.gep(ops.x, xbase), cg.gep(ops.w, cg.mul(c, kv)), kc, vnni)?;
                scalar_epilogue(cg, &q, &ops, &at, j, c, acc);
                Ok(())
            })
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Where one row of the int8 matmul reads its token scale and writes.
pub(crate) struct OutputRow<'c> {
    x_row: IntValue<'c>,
    out_base: IntValue<'c>,
    /// The per-token scale (per-token kernels).
    x_scale: Option<FloatValue<'c>>,
}

impl<'c> OutputRow<'c> {
    pub fn new(cg: &Cg<'c>, q: &QuantMatMulArgs, batch: IntValue<'c>, row: IntValue<'c>, m: IntValue<'c>) -> Self {
        let out_row = cg.add(cg.mul(batch, m), row);
        let x_row = if q.x_batched { out_row } else { row };
        let out_base = cg.mul(out_row, cg.i64c(q.n as i64));
        OutputRow { x_row, out_base, x_scale: None }
    }

    /// [`OutputRow::new`] with its token scale loaded (once per row).
    pub fn with_scale(mut self, cg: &Cg<'c>, q: &QuantMatMulArgs, ops: &QuantPtrs<'c>) -> Self {
        self.x_scale = q.per_token.then(|| cg.load_f(ops.b, self.x_row, q.dtypes[3]));
        self
    }
}

/// Output `j` (weight row / channel `c`) of a row from its exact int32 sum:
/// the reference's float operations in its order.
fn scalar_epilogue<'c>(
    cg: &Cg<'c>,
    q: &QuantMatMulArgs,
    ops: &QuantPtrs<'c>,
    at: &OutputRow<'c>,
    j: IntValue<'c>,
    c: IntValue<'c>,
    acc: IntValue<'c>,
) {
    let d = &q.dtypes;
    let y = if q.per_token {
        let xs = at.x_scale.unwrap_or_else(|| cg.load_f(ops.b, at.x_row, d[3]));
        let f = cg.b.build_signed_int_to_float(acc, cg.f32t(), "").ok_();
        let ws = load_scale(cg, ops.a, c, d[2]);
        cg.fmul(cg.fmul(f.into(), ws.into()), xs.into())
    } else {
        let with_bias = cg.b.build_int_add(acc, load_i32(cg, ops.a, c), "").ok_();
        let f = cg.b.build_signed_int_to_float(with_bias, cg.f32t(), "").ok_();
        cg.fmul(f.into(), load_scale(cg, ops.b, c, d[3]).into())
    };
    let y = match ops.bias {
        Some(p) => cg.fadd(y, cg.load_f(p, j, d[4]).into()),
        None => y,
    };
    cg.store_f(ops.out, cg.add(at.out_base, j), d[5], y.into_float_value());
}

/// The epilogue of one row's block of columns `j0..j1` (weight rows /
/// channels from `c0`) from their exact sums (`<16 x i32>`): 16 columns at
/// once for a whole block, else column by column; the same float
/// operations in the same order either way.
pub(crate) fn matmul_epilogue<'c>(
    cg: &mut Cg<'c>,
    q: &QuantMatMulArgs,
    ops: &QuantPtrs<'c>,
    at: &OutputRow<'c>,
    (j0, j1, c0): (IntValue<'c>, IntValue<'c>, IntValue<'c>),
    sums: VectorValue<'c>,
) -> Result<()> {
    const W: u32 = QUANT_MATMUL_COLS as u32;
    let whole = cg.eq(cg.sub(j1, j0), cg.i64c(W as i64));
    let lanes = cg.alloca(cg.i32t().vec_type(W), "sums");
    cg.store_v(lanes, sums);
    cg.if_else(
        whole,
        |cg| {
            let d = &q.dtypes;
            let y = if q.per_token {
                let f = cg.b.build_signed_int_to_float(sums, cg.vec_f32(W), "").ok_();
                let ws = load_scale_vec(cg, ops.a, c0, d[2], W);
                let xs = at.x_scale.unwrap_or_else(|| cg.load_f(ops.b, at.x_row, d[3]));
                cg.fmul(cg.fmul(f.into(), ws.into()), cg.splat(xs, W).into())
            } else {
                let with_bias = cg.b.build_int_add(sums, load_i32_vec(cg, ops.a, c0, W), "").ok_();
                let f = cg.b.build_signed_int_to_float(with_bias, cg.vec_f32(W), "").ok_();
                cg.fmul(f.into(), load_scale_vec(cg, ops.b, c0, d[3], W).into())
            };
            let y = match ops.bias {
                Some(p) => cg.fadd(y, cg.load_vec(p, j0, d[4], W).into()),
                None => y,
            };
            cg.store_vec(ops.out, cg.add(at.out_base, j0), d[5], y.into_vector_value());
            Ok(())
        },
        |cg| {
            let lane_p = cg.b.build_pointer_cast(lanes, cg.i32t().ptr_type(Default::default()), "").ok_();
            cg.for_range(j0, j1, 1, |cg, j| {
                let i = cg.sub(j, j0);
                let acc = cg.load_i(lane_p, i);
                scalar_epilogue(cg, q, ops, at, j, cg.add(c0, i), acc);
                Ok(())
            })
        },
    )
}

/// `n` scale operands from element `i` as f32 lanes (see [`load_scale`]).
pub(crate) fn load_scale_vec<'c>(
    cg: &Cg<'c>,
    p: PointerValue<'c>,
    i: IntValue<'c>,
    dtype: DType,
    n: u32,
) -> VectorValue<'c> {
    if dtype.is_float() {
        return cg.load_vec(p, i, dtype, n);
    }
    let words = load_int_vec(cg, p, i, n);
    let low = cg.b.build_int_truncate_or_bit_cast(words, cg.i32t().vec_type(n), "").ok_();
    cg.b.build_bit_cast(low, cg.vec_f32(n), "").ok_().into_vector_value()
}

/// `n` elements of an integer buffer from element `i` as i32 lanes (see
/// [`load_i32`]).
pub(crate) fn load_i32_vec<'c>(cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>, n: u32) -> VectorValue<'c> {
    let v = load_int_vec(cg, p, i, n);
    cg.b.build_int_cast_sign_flag(v, cg.i32t().vec_type(n), true, "").ok_()
}

/// `n` consecutive elements of an integer buffer in its own width.
fn load_int_vec<'c>(cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>, n: u32) -> VectorValue<'c> {
    let elem = p.get_type().get_element_type().into_int_type();
    let vp = cg.b.build_pointer_cast(cg.gep(p, i), elem.vec_type(n).ptr_type(Default::default()), "").ok_();
    let v = cg.b.build_load(vp, "").ok_();
    v.as_instruction_value().expect("load").set_alignment(elem.get_bit_width().div_ceil(8)).ok_();
    v.into_vector_value()
}

/// Bytes per `vpdpbusd` step (one 512-bit register).
const VNNI_BYTES: usize = 64;

/// Exact `sum_k x[k] * w[k]` of two int8 rows of static length `len`, as
/// an i32 (see the module docs for the VNNI form).
pub(crate) fn dot_i8<'c>(
    cg: &mut Cg<'c>,
    x: PointerValue<'c>,
    w: PointerValue<'c>,
    len: usize,
    vnni: bool,
) -> Result<IntValue<'c>> {
    let acc = cg.alloca(cg.i32t(), "dot");
    cg.store_v(acc, cg.i32t().const_zero());
    let main = if vnni { len / VNNI_BYTES * VNNI_BYTES } else { 0 };
    if main > 0 {
        let v16 = cg.i32t().vec_type(16);
        let (dots, wsum) = (cg.alloca(v16, "vdot"), cg.alloca(v16, "vwsum"));
        cg.store_v(dots, v16.const_zero());
        cg.store_v(wsum, v16.const_zero());
        let i8x64 = cg.ctx.i8_type().vec_type(VNNI_BYTES as u32);
        let f = Intrinsic::find("llvm.x86.avx512.vpdpbusd.512")
            .and_then(|i| i.get_declaration(&cg.module, &[]))
            .ok_or_else(|| anyhow::anyhow!("LLVM has no vpdpbusd intrinsic"))?;
        let sign = cg.ctx.i8_type().const_int(0x80, false);
        let signs = inkwell::types::VectorType::const_vector(&[sign; VNNI_BYTES]);
        let one = cg.ctx.i8_type().const_int(1, false);
        let ones = inkwell::types::VectorType::const_vector(&[one; VNNI_BYTES]);
        let ones32 = cg.b.build_bit_cast(ones, v16, "").ok_();
        cg.for_range(cg.i64c(0), cg.i64c(main as i64), VNNI_BYTES as i64, |cg, i| {
            let load = |cg: &Cg<'c>, p: PointerValue<'c>| -> BasicValueEnum<'c> {
                let vp = cg.b.build_pointer_cast(cg.gep(p, i), i8x64.ptr_type(Default::default()), "").ok_();
                let v = cg.b.build_load(vp, "").ok_();
                v.as_instruction_value().expect("load").set_alignment(1).ok_();
                v
            };
            let (xv, wv) = (load(cg, x).into_vector_value(), load(cg, w).into_vector_value());
            // x + 128 as unsigned bytes.
            let xu = cg.b.build_xor(xv, signs, "").ok_();
            let xu32 = cg.b.build_bit_cast(xu, v16, "").ok_();
            let w32 = cg.b.build_bit_cast(wv, v16, "").ok_();
            let d = cg.b.build_call(f, &[cg.load_v(dots).into(), xu32.into(), w32.into()], "").ok_();
            cg.store_v(dots, d.try_as_basic_value().basic().expect("value"));
            let s = cg.b.build_call(f, &[cg.load_v(wsum).into(), ones32.into(), w32.into()], "").ok_();
            cg.store_v(wsum, s.try_as_basic_value().basic().expect("value"));
            Ok(())
        })?;
        // sum (x + 128) w - 128 sum w, lane by lane then across lanes.
        let shift = inkwell::types::VectorType::const_vector(&[cg.i32t().const_int(7, false); 16]);
        let corr = cg.b.build_left_shift(cg.load_v(wsum).into_vector_value(), shift, "").ok_();
        let exact = cg.b.build_int_sub(cg.load_v(dots).into_vector_value(), corr, "").ok_();
        let red = Intrinsic::find("llvm.vector.reduce.add")
            .and_then(|i| i.get_declaration(&cg.module, &[v16.into()]))
            .ok_or_else(|| anyhow::anyhow!("LLVM has no vector.reduce.add"))?;
        let total = cg.b.build_call(red, &[exact.into()], "").ok_().try_as_basic_value().basic().expect("value");
        cg.store_v(acc, total);
    }
    // The tail (the whole row without VNNI): widening multiply-add.
    cg.for_range(cg.i64c(main as i64), cg.i64c(len as i64), 1, |cg, i| {
        let xi = load_i32(cg, x, i);
        let wi = load_i32(cg, w, i);
        let s = cg.b.build_int_add(cg.load_v(acc).into_int_value(), cg.b.build_int_mul(xi, wi, "").ok_(), "").ok_();
        cg.store_v(acc, s);
        Ok(())
    })?;
    Ok(cg.load_v(acc).into_int_value())
}

/// `(new f32[T, Hkv, D], slots, scale[Hkv, D], offset[Hkv, D], cache i8)`:
/// each new row quantized per channel (`quantize` semantics) and stored at
/// its slot of the paged int8 cache. One tile per token.
pub(crate) fn kv_cache_write_quant(cg: &mut Cg, k: &Kernel) -> Result<()> {
    let (new, scale, offset, cache) = (&k.args[0], &k.args[2], &k.args[3], &k.args[4]);
    if cache.dtype != DType::I8 {
        bail!("int8 KV write into a {} cache", cache.dtype);
    }
    let row: usize = new.shape[1..]
        .iter()
        .map(|d| d.as_const().ok_or_else(|| anyhow::anyhow!("KV row dims must be static, found {d}")))
        .product::<Result<usize>>()?;
    cg.begin_kernel(&k.name);
    let (np, sp) = (cg.arg(0, new.dtype), cg.arg(1, DType::I64));
    let (scp, ofp, cp) = (cg.arg(2, scale.dtype), cg.arg(3, offset.dtype), cg.arg(4, cache.dtype));
    let rc = cg.i64c(row as i64);
    cg.for_tiles(|cg, t| {
        let slot = cg.load_i(sp, t);
        let (src, dst) = (cg.mul(t, rc), cg.mul(slot, rc));
        cg.for_range(cg.i64c(0), rc, 1, |cg, i| {
            let x = cg.load_f(np, cg.add(src, i), new.dtype);
            let s = cg.load_f(scp, i, scale.dtype);
            let o = cg.load_f(ofp, i, offset.dtype);
            let y = cg.fadd(cg.fdiv(x.into(), s.into()), o.into());
            cg.store_i(cp, cg.add(dst, i), quantize_value(cg, y.into_float_value()));
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

//! Matmul kernels.
//!
//! Packed GEMM (`Gemm`, `MoeGateUp`, `MoeGroupedGateUp`, `MoeDown`): the weight is stored in
//! column panels of `nr` (16) columns, K-major inside a panel
//! ([`Layout::Panels`]). One tile is one panel; a register-blocked
//! micro-kernel computes `MR x nr` outputs (6 rows x 16 lanes = 12 AVX2
//! accumulators) with one broadcast of `a[i][k]` and one `nr`-wide load of
//! the panel row per k, in f32. A thread's tile range is walked as runs of
//! consecutive panels: for one register block of rows (decode) each panel
//! streams once, widened from bf16/f16 in registers, so the weight is read
//! sequentially at memory speed; for more rows (batched decode, prefill)
//! the run's panels are taken in groups that fit in L2 and every block of
//! rows (that fits in L2 too) sweeps a group before the next, so the weight
//! still streams from memory once; each panel is widened once per block
//! into the thread's scratch.
//!
//! On the AVX-512 BF16 tier ([`Cg::bf16_dot`]), GEMMs on bf16 weights use
//! the BF16 dot product instead (`vdpbf16ps`: per f32 lane, the products of
//! one pair of consecutive k are added to the accumulator). The rows of A
//! are rounded to bf16 (nearest even) into the thread's scratch once per
//! row block of `2 * nr` rows, which then sweeps the thread's panels (they
//! stay in L2 between blocks). The micro-kernel computes 12 rows x 16
//! columns in 12 zmm accumulators: per pair `k, k+1` one 64-byte load of
//! the two panel rows, one permute into (k, k+1) pairs per column, and 12
//! dot products, each broadcasting its row's pair straight from memory
//! (`{1to16}`), so the weights keep the one panel layout of every tier.
//! The result differs from the reference by the activation rounding (at
//! most 2^-8 relative per element of A) and the pairwise order; each row
//! has its own accumulator and the same order whatever block it is in, so
//! a row's result does not depend on which rows share the launch.
//!
//! Generic `MatMul` (activation x activation, e.g. attention in unfused
//! graphs) accumulates in the reference's order and matches it exactly.

use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, bail, Result};
use inkwell::values::{BasicValue, FunctionValue, IntValue, PointerValue, VectorValue};
use inkwell::AddressSpace;
use panguc_ir::kernel::{ArgSpec, Epilogue, Kernel, Layout};
use panguc_ir::{DType, Dim};

/// Rows per register block.
const MR: usize = 6;

/// Software prefetch distance of the streaming (decode) micro-kernels.
const PREFETCH_BYTES: usize = 4096;

fn st(d: &Dim, what: &str) -> Result<usize> {
    d.as_const().ok_or_else(|| anyhow!("{what} must be static, found {d}"))
}

/// `mk(rows: i8**, panel: i8*, tile: f32*)` for `mr = 1..=MR`: `tile[i] =
/// sum_k a_i[k] * panel[k][0..nr]`. Each lane accumulates its output
/// column over k in order with a separate multiply and add, which is the
/// reference's order, so results match the interpreter bit for bit. (On
/// this target's Zen-style cores FADD has its own pipes, so a multiply and
/// an add sustain the same rate as an FMA.)
fn microkernels<'c>(
    cg: &mut Cg<'c>,
    prefix: &str,
    k: usize,
    (a_dtype, b_dtype): (DType, DType),
    nr: u32,
    prefetch: bool,
) -> Vec<FunctionValue<'c>> {
    let mut out = vec![];
    for mr in 1..=MR {
        let name = format!("{prefix}.mk{mr}.{b_dtype}");
        let f = cg.begin_helper(
            &name,
            &[
                cg.i8p().ptr_type(AddressSpace::default()).into(),
                cg.i8p().into(),
                cg.f32t().ptr_type(AddressSpace::default()).into(),
            ],
        );
        let p = f.get_params();
        let rows = p[0].into_pointer_value();
        let panel = cg.cast_ptr(p[1].into_pointer_value(), b_dtype);
        let tile = p[2].into_pointer_value();
        let a: Vec<PointerValue> = (0..mr)
            .map(|i| {
                let raw = cg.b.build_load(cg.gep(rows, cg.i64c(i as i64)), "").ok_().into_pointer_value();
                cg.cast_ptr(raw, a_dtype)
            })
            .collect();
        let acc: Vec<PointerValue> = (0..mr).map(|_| cg.alloca(cg.vec_f32(nr), "acc")).collect();
        for x in &acc {
            cg.store_v(*x, cg.zeros(nr));
        }
        // Panel rows this far ahead are prefetched when streaming from
        // memory: the hardware prefetcher alone leaves ~20% of DRAM
        // bandwidth unused on a single stream.
        let ahead = (PREFETCH_BYTES / (nr as usize * b_dtype.size_bytes())) as i64;
        cg.for_range(cg.i64c(0), cg.i64c(k as i64), 1, |cg, kk| {
            if prefetch {
                let at = cg.gep(panel, cg.mul(cg.add(kk, cg.i64c(ahead)), cg.i64c(nr as i64)));
                cg.prefetch(at);
            }
            let bv = cg.load_vec(panel, cg.mul(kk, cg.i64c(nr as i64)), b_dtype, nr);
            for (ai, acc) in a.iter().zip(&acc) {
                let av = cg.splat(cg.load_f(*ai, kk, a_dtype), nr);
                let s = cg.fadd(cg.load_v(*acc), cg.fmul(av.into(), bv.into()));
                cg.store_v(*acc, s);
            }
            Ok(())
        })
        .expect("no fallible steps");
        for (i, x) in acc.iter().enumerate() {
            cg.store_vec(tile, cg.i64c((i * nr as usize) as i64), DType::F32, cg.load_v(*x).into_vector_value());
        }
        cg.b.build_return(None).ok_();
        out.push(f);
    }
    out
}

/// Micro-kernels for one packed-weight kernel: native-dtype panels, and
/// (for narrow weights) f32 panels widened into scratch.
struct Micro<'c> {
    native: Vec<FunctionValue<'c>>,
    widened: Option<Vec<FunctionValue<'c>>>,
    /// BF16 dot-product micro-kernels (bf16 tier, bf16 weights, even K).
    dot: Option<Vec<FunctionValue<'c>>>,
    k: usize,
    nr: u32,
    b_dtype: DType,
}

impl<'c> Micro<'c> {
    fn new(cg: &mut Cg<'c>, prefix: &str, k: usize, a_dtype: DType, b_dtype: DType, nr: u32) -> Self {
        let use_dot = cg.bf16_dot && a_dtype == DType::F32 && b_dtype == DType::BF16 && k.is_multiple_of(2) && nr == 16;
        if use_dot {
            let dot = dot_microkernels(cg, prefix, k, nr);
            return Micro { native: vec![], widened: None, dot: Some(dot), k, nr, b_dtype };
        }
        let native = microkernels(cg, prefix, k, (a_dtype, b_dtype), nr, true);
        let widened = (b_dtype != DType::F32).then(|| microkernels(cg, prefix, k, (a_dtype, DType::F32), nr, false));
        Micro { native, widened, dot: None, k, nr, b_dtype }
    }
}

/// Call a non-overloaded x86 intrinsic.
fn x86_intrinsic<'c>(
    cg: &Cg<'c>,
    name: &str,
    args: &[inkwell::values::BasicMetadataValueEnum<'c>],
) -> inkwell::values::BasicValueEnum<'c> {
    let f = inkwell::intrinsics::Intrinsic::find(name)
        .and_then(|i| i.get_declaration(&cg.module, &[]))
        .unwrap_or_else(|| panic!("LLVM intrinsic {name}"));
    cg.b.build_call(f, args, "").ok_().try_as_basic_value().basic().expect("intrinsic returns a value")
}

/// Rows per register block of the BF16 dot-product micro-kernel: 12
/// independent accumulators (12 rows x 16 lanes) keep `vdpbf16ps` busy
/// through its latency, and each pair of panel rows, loaded once, feeds
/// 12 dot products.
const MR_DOT: usize = 12;

/// `dot{mr}(a: i8*, panel: i8*, tile: f32*)` for `mr = 1..=MR_DOT`: `tile[i]
/// = sum_k a_i[k] * panel[k][0..nr]` with `a` pointing at `mr` bf16 rows of
/// `k` elements one after the other (the rounded rows in scratch). Per
/// pair `k, k+1`: the two panel rows are one 64-byte load, interleaved
/// into (k, k+1) pairs per column by one permute, and each row's pair,
/// read as one i32, is broadcast into `vdpbf16ps`. Every row has its own
/// accumulator and the same order over k whatever `mr` is, so a row's
/// result never depends on the rows beside it.
fn dot_microkernels<'c>(cg: &mut Cg<'c>, prefix: &str, k: usize, nr: u32) -> Vec<FunctionValue<'c>> {
    let i16t = cg.ctx.i16_type();
    let i32v = cg.i32t().vec_type(nr);
    let pair_ty = i16t.vec_type(2 * nr).ptr_type(AddressSpace::default());
    let mut out = vec![];
    for mr in 1..=MR_DOT {
        let f = cg.begin_helper(
            &format!("{prefix}.dot{mr}.bf16"),
            &[cg.i8p().into(), cg.i8p().into(), cg.f32t().ptr_type(AddressSpace::default()).into()],
        );
        let p = f.get_params();
        let a =
            cg.b.build_pointer_cast(p[0].into_pointer_value(), cg.i32t().ptr_type(AddressSpace::default()), "").ok_();
        let panel = cg.cast_ptr(p[1].into_pointer_value(), DType::BF16);
        let tile = p[2].into_pointer_value();
        let acc: Vec<PointerValue> = (0..mr).map(|_| cg.alloca(cg.vec_f32(nr), "acc")).collect();
        for x in &acc {
            cg.store_v(*x, cg.zeros(nr));
        }
        // Lane j of the pair vector holds (k, k+1) of column j.
        let mask: Vec<IntValue> =
            (0..nr).flat_map(|j| [j, nr + j]).map(|x| cg.i32t().const_int(x as u64, false)).collect();
        let mask = inkwell::types::VectorType::const_vector(&mask);
        // Panel rows this far ahead are prefetched, for a decode step's few
        // rows (each panel streams once) and a prefill block alike.
        let ahead = (PREFETCH_BYTES / (nr as usize * 2)) as i64;
        let row_pairs = (k / 2) as i64;
        cg.for_range(cg.i64c(0), cg.i64c(row_pairs), 1, |cg, kp| {
            let k0 = cg.mul(kp, cg.i64c(2));
            cg.prefetch(cg.gep(panel, cg.mul(cg.add(k0, cg.i64c(ahead)), cg.i64c(nr as i64))));
            let at = cg.b.build_pointer_cast(cg.gep(panel, cg.mul(k0, cg.i64c(nr as i64))), pair_ty, "").ok_();
            let rows = cg.b.build_load(at, "").ok_();
            rows.as_instruction_value().expect("load").set_alignment(2).ok_();
            let rows = rows.into_vector_value();
            let both = cg.b.build_shuffle_vector(rows, rows, mask, "pairs").ok_();
            let b = cg.b.build_bit_cast(both, i32v, "").ok_();
            for (i, acc) in acc.iter().enumerate() {
                let x = cg.b.build_load(cg.gep(a, cg.add(kp, cg.i64c(i as i64 * row_pairs))), "").ok_();
                x.as_instruction_value().expect("load").set_alignment(2).ok_();
                let undef = i32v.get_undef();
                let one = cg.b.build_insert_element(undef, x.into_int_value(), cg.i32t().const_zero(), "").ok_();
                let splat = cg.b.build_shuffle_vector(one, undef, i32v.const_zero(), "").ok_();
                // The broadcast goes in the operand that may come from
                // memory, so it folds into the dot product as `{1to16}`
                // (a separate broadcast would cost a vector uop per row).
                // The products of bf16 values are exact, so the operand
                // order does not change the result.
                let s = x86_intrinsic(
                    cg,
                    "llvm.x86.avx512bf16.dpbf16ps.512",
                    &[cg.load_v(*acc).into(), b.into(), splat.into()],
                );
                cg.store_v(*acc, s);
            }
            Ok(())
        })
        .expect("no fallible steps");
        for (i, x) in acc.iter().enumerate() {
            cg.store_vec(tile, cg.i64c((i * nr as usize) as i64), DType::F32, cg.load_v(*x).into_vector_value());
        }
        cg.b.build_return(None).ok_();
        out.push(f);
    }
    out
}

/// Round rows `m0..m1` of A (f32, `k` wide) to bf16 (nearest even) into
/// `dst`, row `r` at `dst[(r - m0) * k]`: 32 elements at a time with
/// `vcvtne2ps2bf16`, the tail one by one.
fn rows_to_bf16<'c>(
    cg: &mut Cg<'c>,
    a_row: RowPtr<'_, 'c>,
    (m0, m1): (IntValue<'c>, IntValue<'c>),
    k: usize,
    dst: PointerValue<'c>,
) -> Result<()> {
    let kc = cg.i64c(k as i64);
    let chunks = k / 32;
    let out_ty = cg.ctx.i16_type().vec_type(32).ptr_type(AddressSpace::default());
    cg.for_range(m0, m1, 1, |cg, r| {
        let src = cg.cast_ptr(a_row(cg, r), DType::F32);
        let d = cg.gep(dst, cg.mul(cg.sub(r, m0), kc));
        cg.for_range(cg.i64c(0), cg.i64c(chunks as i64), 1, |cg, c| {
            let at = cg.mul(c, cg.i64c(32));
            let lo = cg.load_vec(src, at, DType::F32, 16);
            let hi = cg.load_vec(src, cg.add(at, cg.i64c(16)), DType::F32, 16);
            // The intrinsic puts its second operand in the low half.
            let v = x86_intrinsic(cg, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", &[hi.into(), lo.into()]);
            let p = cg.b.build_pointer_cast(cg.gep(d, at), out_ty, "").ok_();
            cg.b.build_store(p, v).ok_().set_alignment(2).ok_();
            Ok(())
        })?;
        cg.for_range(cg.i64c((chunks * 32) as i64), kc, 1, |cg, kk| {
            let x = cg.load_f(src, kk, DType::F32);
            cg.store_f(d, kk, DType::BF16, x);
            Ok(())
        })
    })
}

/// Rows of A per row block on the dot-product path: the bf16 rows fill
/// the thread scratch the schedule reserves for packed GEMMs on narrow
/// weights (`4 * nr * k` bytes, i.e. `2 * nr` rows). A block sweeps the
/// panels of the thread's run while they stay in L2.
fn dot_rows_per_block(nr: u32) -> usize {
    2 * nr as usize
}

/// Bytes of weight panels the row blocks sweep before the next group of
/// panels: half of a 1 MB L2, the rest left to A and C. Every row block
/// of a step reads a group while it stays in L2, so the weight streams
/// from memory once per launch whatever the number of rows.
const B_BLOCK_BYTES: usize = 512 * 1024;

/// Panels per group: stored panels of `k x nr` elements of `b_dtype`.
fn panels_per_group(k: usize, nr: u32, b_dtype: DType) -> usize {
    (B_BLOCK_BYTES / (k * nr as usize * b_dtype.size_bytes()).max(1)).max(1)
}

/// Per-row output callback: `(cg, panel, row, tile vector)`.
type RowStore<'a, 'c> = &'a dyn Fn(&mut Cg<'c>, IntValue<'c>, IntValue<'c>, VectorValue<'c>) -> Result<()>;
/// Row pointer callback (pointer to the row's first element, any type).
type RowPtr<'a, 'c> = &'a dyn Fn(&Cg<'c>, IntValue<'c>) -> PointerValue<'c>;
/// Panel pointer callback (first element of panel `p`, weight dtype).
type PanelPtr<'a, 'c> = &'a dyn Fn(&Cg<'c>, IntValue<'c>) -> PointerValue<'c>;

/// Bytes of A rows kept in L2 while a row block sweeps several panels.
const A_BLOCK_BYTES: usize = 256 * 1024;

/// Rows per M block: as many whole register blocks as fit `A_BLOCK_BYTES`.
fn rows_per_block(k: usize, a_dtype: DType) -> usize {
    let rows = A_BLOCK_BYTES / (k * a_dtype.size_bytes()).max(1);
    (rows / MR).clamp(1, 32) * MR
}

/// `rows` rows of A against panels `p_lo..p_hi`, each output tile handed
/// to `store`. With a single register block (decode) each panel streams
/// once in its stored dtype. With more rows, M blocks that fit in L2 sweep
/// groups of panels that fit in L2, so A is reused from L2 and each panel,
/// read from memory once, from L1/L2; narrow
/// panels are widened once per (M block, panel) into scratch.
#[allow(clippy::too_many_arguments)]
fn panel_run<'c>(
    cg: &mut Cg<'c>,
    mk: &Micro<'c>,
    a_dtype: DType,
    m: IntValue<'c>,
    (p_lo, p_hi): (IntValue<'c>, IntValue<'c>),
    panel: PanelPtr<'_, 'c>,
    a_row: RowPtr<'_, 'c>,
    store: RowStore<'_, 'c>,
) -> Result<()> {
    let rows = cg.alloca(cg.i8p().array_type(MR as u32), "rows");
    let rows = cg.b.build_pointer_cast(rows, cg.i8p().ptr_type(AddressSpace::default()), "").ok_();
    let tile = cg.alloca(cg.f32t().array_type(MR.max(MR_DOT) as u32 * mk.nr), "tile");
    let tile = cg.b.build_pointer_cast(tile, cg.f32t().ptr_type(AddressSpace::default()), "").ok_();
    // Row blocks m0..m1 of one panel through the micro-kernels, row `r` of
    // A at `a_row(r)`.
    let blocks = |cg: &mut Cg<'c>,
                  fns: &[FunctionValue<'c>],
                  p: IntValue<'c>,
                  src: PointerValue<'c>,
                  m0: IntValue<'c>,
                  m1: IntValue<'c>,
                  a_row: RowPtr<'_, 'c>|
     -> Result<()> {
        let src8 = cg.b.build_pointer_cast(src, cg.i8p(), "").ok_();
        cg.for_range(m0, m1, MR as i64, |cg, r0| {
            let mr = cg.min(cg.i64c(MR as i64), cg.sub(m1, r0));
            for i in 0..MR {
                // Rows past the end repeat the last valid row (never stored).
                let r = cg.min(cg.add(r0, cg.i64c(i as i64)), cg.sub(m1, cg.i64c(1)));
                let ptr = cg.b.build_pointer_cast(a_row(cg, r), cg.i8p(), "").ok_();
                cg.store_v(cg.gep(rows, cg.i64c(i as i64)), ptr);
            }
            for (c, f) in fns.iter().enumerate() {
                let is = cg.eq(mr, cg.i64c(c as i64 + 1));
                cg.if_then(is, |cg| {
                    cg.b.build_call(*f, &[rows.into(), src8.into(), tile.into()], "").ok_();
                    Ok(())
                })?;
            }
            cg.for_range(cg.i64c(0), mr, 1, |cg, i| {
                let v = cg.load_vec(tile, cg.mul(i, cg.i64c(mk.nr as i64)), DType::F32, mk.nr);
                store(cg, p, cg.add(r0, i), v)
            })
        })
    };
    if let Some(dot) = &mk.dot {
        // Each row block is rounded to bf16 once, then sweeps the panels
        // (a decode step's few rows are one block: panels stream once).
        let mc = dot_rows_per_block(mk.nr);
        let nc = panels_per_group(mk.k, mk.nr, DType::BF16);
        let scratch = cg.cast_ptr(cg.scratch.expect("kernel"), DType::BF16);
        let kc = cg.i64c(mk.k as i64);
        // Panel groups that fit in L2 (a wide output such as the LM head
        // would otherwise stream its panels from L3 once per row block).
        return cg.for_range(p_lo, p_hi, nc as i64, |cg, g0| {
            let g1 = cg.min(p_hi, cg.add(g0, cg.i64c(nc as i64)));
            cg.for_range(cg.i64c(0), m, mc as i64, |cg, m0| {
                let m1 = cg.min(m, cg.add(m0, cg.i64c(mc as i64)));
                rows_to_bf16(cg, a_row, (m0, m1), mk.k, scratch)?;
                cg.for_range(g0, g1, 1, |cg, p| {
                    let src = cg.b.build_pointer_cast(panel(cg, p), cg.i8p(), "").ok_();
                    cg.for_range(m0, m1, MR_DOT as i64, |cg, r0| {
                        let mr = cg.min(cg.i64c(MR_DOT as i64), cg.sub(m1, r0));
                        let a = cg.gep(scratch, cg.mul(cg.sub(r0, m0), kc));
                        let a = cg.b.build_pointer_cast(a, cg.i8p(), "").ok_();
                        for (c, f) in dot.iter().enumerate() {
                            cg.if_then(cg.eq(mr, cg.i64c(c as i64 + 1)), |cg| {
                                cg.b.build_call(*f, &[a.into(), src.into(), tile.into()], "").ok_();
                                Ok(())
                            })?;
                        }
                        cg.for_range(cg.i64c(0), mr, 1, |cg, i| {
                            let v = cg.load_vec(tile, cg.mul(i, cg.i64c(mk.nr as i64)), DType::F32, mk.nr);
                            store(cg, p, cg.add(r0, i), v)
                        })
                    })
                })
            })
        });
    }
    let single = cg.le(m, cg.i64c(MR as i64));
    cg.if_else(
        single,
        |cg| {
            cg.for_range(p_lo, p_hi, 1, |cg, p| {
                let src = panel(cg, p);
                blocks(cg, &mk.native, p, src, cg.i64c(0), m, a_row)
            })
        },
        |cg| {
            let mc = cg.i64c(rows_per_block(mk.k, a_dtype) as i64);
            let nc = panels_per_group(mk.k, mk.nr, mk.b_dtype) as i64;
            // Panel groups outermost (see B_BLOCK_BYTES): with M blocks
            // outermost a launch with more rows than one block (e.g. a
            // 64-sequence decode step) would stream its weights from memory
            // once per block.
            cg.for_range(p_lo, p_hi, nc, |cg, g0| {
                let g1 = cg.min(p_hi, cg.add(g0, cg.i64c(nc)));
                cg.for_range(cg.i64c(0), m, rows_per_block(mk.k, a_dtype) as i64, |cg, m0| {
                    let m1 = cg.min(m, cg.add(m0, mc));
                    cg.for_range(g0, g1, 1, |cg, p| {
                        let src = panel(cg, p);
                        match &mk.widened {
                            None => blocks(cg, &mk.native, p, src, m0, m1, a_row),
                            Some(wide) => {
                                let scratch = cg.cast_ptr(cg.scratch.expect("kernel"), DType::F32);
                                let nr = cg.i64c(mk.nr as i64);
                                cg.for_range(cg.i64c(0), cg.i64c(mk.k as i64), 1, |cg, kk| {
                                    let at = cg.mul(kk, nr);
                                    let v = cg.load_vec(src, at, mk.b_dtype, mk.nr);
                                    cg.store_vec(scratch, at, DType::F32, v);
                                    Ok(())
                                })?;
                                blocks(cg, wide, p, scratch, m0, m1, a_row)
                            }
                        }
                    })
                })
            })
        },
    )
}

/// Split the tile range `begin..end` of a kernel with `panels` panels per
/// batch entry into runs of consecutive panels of one batch entry:
/// `body(batch, p_lo, p_hi)`.
fn panel_runs<'c>(
    cg: &mut Cg<'c>,
    panels: usize,
    body: impl Fn(&mut Cg<'c>, IntValue<'c>, IntValue<'c>, IntValue<'c>) -> Result<()>,
) -> Result<()> {
    let (begin, end) = (cg.begin.expect("kernel"), cg.end.expect("kernel"));
    let pc = cg.i64c(panels as i64);
    // Runs start at `begin` and at every batch boundary after it.
    let first = cg.div(begin, pc);
    let last = cg.div(cg.sub(end, cg.i64c(1)), pc);
    cg.for_range(first, cg.add(last, cg.i64c(1)), 1, |cg, bi| {
        let base = cg.mul(bi, pc);
        let lo = cg.sub(cg.max(begin, base), base);
        let hi = cg.sub(cg.min(end, cg.add(base, pc)), base);
        body(cg, bi, lo, hi)
    })
}

/// Store lanes `0..width` of `v` at `out[at..]`, only those below `valid`
/// (the last panel may be partial).
fn store_lanes<'c>(
    cg: &mut Cg<'c>,
    out: (PointerValue<'c>, DType),
    at: IntValue<'c>,
    v: VectorValue<'c>,
    width: u32,
    valid: IntValue<'c>,
) -> Result<()> {
    let full = cg.le(cg.i64c(width as i64), valid);
    cg.if_else(
        full,
        |cg| {
            if out.1 == DType::F32 {
                cg.store_vec(out.0, at, out.1, v);
            } else {
                for l in 0..width {
                    cg.store_f(out.0, cg.add(at, cg.i64c(l as i64)), out.1, cg.lane(v, l));
                }
            }
            Ok(())
        },
        |cg| {
            for l in 0..width {
                let ok = cg.lt(cg.i64c(l as i64), valid);
                cg.if_then(ok, |cg| {
                    cg.store_f(out.0, cg.add(at, cg.i64c(l as i64)), out.1, cg.lane(v, l));
                    Ok(())
                })?;
            }
            Ok(())
        },
    )
}

/// `silu(gate) * up` of an interleaved gate/up tile row.
fn swiglu<'c>(cg: &Cg<'c>, v: VectorValue<'c>, nr: u32) -> VectorValue<'c> {
    let half = nr / 2;
    let (g, u) = (cg.lanes(v, 0, half), cg.lanes(v, half, half));
    let silu = cg.fmul(g.into(), cg.sigmoid(g.into()));
    cg.fmul(silu, u.into()).into_vector_value()
}

/// Matrix index of an operand with batch dims `shape` broadcast against the
/// output batch multi-index `idx`.
fn batch_index<'c>(cg: &Cg<'c>, shape: &[Dim], idx: &[IntValue<'c>]) -> Result<IntValue<'c>> {
    let r = idx.len();
    let ri = shape.len();
    let dims = cg.dims(shape)?;
    let strides = cg.strides(&dims);
    let mut acc = cg.i64c(0);
    for d in 0..ri {
        if shape[d] != Dim::c(1) {
            acc = cg.add(acc, cg.mul(idx[d + r - ri], strides[d]));
        }
    }
    Ok(acc)
}

fn panel_geometry(w: &ArgSpec) -> Result<(u32, u32)> {
    match w.layout {
        Layout::Panels { nr, .. } => Ok((nr, nr)),
        Layout::GateUpPanels { nr } => Ok((nr, nr / 2)),
        Layout::RowMajor | Layout::DotPanels { .. } => bail!("packed GEMM needs a float-panel weight"),
    }
}

pub(crate) fn gemm<'c>(cg: &mut Cg<'c>, k: &Kernel, epilogue: Epilogue) -> Result<()> {
    let (a, w) = (&k.args[0], &k.args[1]);
    let out = k.args.last().expect("out");
    let bias = (epilogue == Epilogue::Bias).then(|| &k.args[2]);
    let (nr, width) = panel_geometry(w)?;
    let ra = a.shape.len();
    let r = out.shape.len();
    let kdim = st(&a.shape[ra - 1], "gemm K")?;
    let n = st(&out.shape[r - 1], "gemm N")?;
    let panels = n.div_ceil(width as usize);
    let w_batch = &w.shape[..w.shape.len() - 2];
    let mk = Micro::new(cg, &k.name, kdim, a.dtype, w.dtype, nr);
    cg.begin_kernel(&k.name);
    let od = cg.dims(&out.shape)?;
    let m = od[r - 2];
    let (ap, wp, op) = (cg.arg(0, a.dtype), cg.arg(1, w.dtype), cg.arg(k.args.len() - 1, out.dtype));
    let bp = bias.map(|b| cg.arg(2, b.dtype));
    let (pc, kc, nc) = (cg.i64c(panels as i64), cg.i64c(kdim as i64), cg.i64c(n as i64));
    panel_runs(cg, panels, |cg, bi, p_lo, p_hi| {
        let idx = cg.unravel(bi, &od[..r - 2]);
        let a_mat = batch_index(cg, &a.shape[..ra - 2], &idx)?;
        let w_mat = batch_index(cg, w_batch, &idx)?;
        let a_base = cg.mul(cg.mul(a_mat, m), kc);
        let o_base = cg.mul(cg.mul(bi, m), nc);
        let panel = |cg: &Cg<'c>, p: IntValue<'c>| {
            cg.gep(wp, cg.mul(cg.add(cg.mul(w_mat, pc), p), cg.i64c((kdim * nr as usize) as i64)))
        };
        let a_row = |cg: &Cg<'c>, row: IntValue<'c>| cg.gep(ap, cg.add(a_base, cg.mul(row, kc)));
        let store = |cg: &mut Cg<'c>, p: IntValue<'c>, row: IntValue<'c>, v: VectorValue<'c>| -> Result<()> {
            let col = cg.mul(p, cg.i64c(width as i64));
            let v = match epilogue {
                Epilogue::None => v,
                Epilogue::SwiGlu => swiglu(cg, v, nr),
                Epilogue::Bias => {
                    let (bp, bd) = (bp.expect("bias"), bias.expect("bias").dtype);
                    // Bias lanes past N would read outside the buffer: load
                    // the valid ones only.
                    let mut bv = cg.zeros(nr);
                    for l in 0..nr {
                        let at = cg.add(col, cg.i64c(l as i64));
                        let safe = cg.min(at, cg.sub(nc, cg.i64c(1)));
                        let x = cg.load_f(bp, safe, bd);
                        bv = cg.b.build_insert_element(bv, x, cg.i32t().const_int(l as u64, false), "").ok_();
                    }
                    cg.fadd(v.into(), bv.into()).into_vector_value()
                }
            };
            let at = cg.add(cg.add(o_base, cg.mul(row, nc)), col);
            store_lanes(cg, (op, out.dtype), at, v, width, cg.sub(nc, col))
        };
        panel_run(cg, &mk, a.dtype, m, (p_lo, p_hi), &panel, &a_row, &store)
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Shared shape of the two grouped (per-expert) GEMMs.
struct Grouped {
    kdim: usize,
    n: usize,
    nr: u32,
    width: u32,
}

fn grouped_geometry(w: &ArgSpec) -> Result<Grouped> {
    let (nr, width) = panel_geometry(w)?;
    let kdim = st(&w.shape[2], "expert K")?;
    let n = match w.layout {
        Layout::GateUpPanels { .. } => st(&w.shape[1], "gate_up rows")? / 2,
        _ => st(&w.shape[1], "down rows")?,
    };
    Ok(Grouped { kdim, n, nr, width })
}

/// The three grouped expert GEMMs; all take `offsets[E+1]` as argument 1
/// and end with (packed expert weight, output).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum GroupedGemm {
    /// `MoeGateUp`: A rows read through `rows` (argument 2), SwiGLU.
    GateUpIndexed,
    /// `MoeGroupedGateUp`: A rows already sorted and contiguous, SwiGLU.
    GateUpSorted,
    /// `MoeDown`: A rows contiguous, output scaled by `row_weight` (argument 2).
    Down,
}

/// One tile per (expert, panel) over the expert's sorted rows.
pub(crate) fn grouped<'c>(cg: &mut Cg<'c>, k: &Kernel, kind: GroupedGemm) -> Result<()> {
    let nargs = k.args.len();
    let (wi, oi) = (nargs - 2, nargs - 1);
    let (a, w, out) = (&k.args[0], &k.args[wi], &k.args[oi]);
    let g = grouped_geometry(w)?;
    let panels = g.n.div_ceil(g.width as usize);
    let mk = Micro::new(cg, &k.name, g.kdim, a.dtype, w.dtype, g.nr);
    cg.begin_kernel(&k.name);
    let (ap, offp, wp, op) = (cg.arg(0, a.dtype), cg.arg(1, DType::I64), cg.arg(wi, w.dtype), cg.arg(oi, out.dtype));
    let aux = match kind {
        GroupedGemm::GateUpIndexed => Some(cg.arg(2, DType::I64)),
        GroupedGemm::Down => Some(cg.arg(2, DType::F32)),
        GroupedGemm::GateUpSorted => None,
    };
    let (pc, kc, nc) = (cg.i64c(panels as i64), cg.i64c(g.kdim as i64), cg.i64c(g.n as i64));
    panel_runs(cg, panels, |cg, e, p_lo, p_hi| {
        let r0 = cg.load_i(offp, e);
        let count = cg.sub(cg.load_i(offp, cg.add(e, cg.i64c(1))), r0);
        cg.if_then(cg.lt(cg.i64c(0), count), |cg| {
            let panel = |cg: &Cg<'c>, p: IntValue<'c>| {
                cg.gep(wp, cg.mul(cg.add(cg.mul(e, pc), p), cg.i64c((g.kdim * g.nr as usize) as i64)))
            };
            let a_row = |cg: &Cg<'c>, m: IntValue<'c>| {
                let src = match (kind, aux) {
                    (GroupedGemm::GateUpIndexed, Some(rows)) => cg.load_i(rows, cg.add(r0, m)),
                    _ => cg.add(r0, m),
                };
                cg.gep(ap, cg.mul(src, kc))
            };
            let store = |cg: &mut Cg<'c>, p: IntValue<'c>, m: IntValue<'c>, v: VectorValue<'c>| -> Result<()> {
                let col = cg.mul(p, cg.i64c(g.width as i64));
                let row = cg.add(r0, m);
                let v = match (kind, aux) {
                    (GroupedGemm::Down, Some(row_w)) => {
                        let s = cg.splat(cg.load_f(row_w, row, DType::F32), g.nr);
                        cg.fmul(v.into(), s.into()).into_vector_value()
                    }
                    _ => swiglu(cg, v, g.nr),
                };
                let at = cg.add(cg.mul(row, nc), col);
                store_lanes(cg, (op, out.dtype), at, v, g.width, cg.sub(nc, col))
            };
            panel_run(cg, &mk, a.dtype, count, (p_lo, p_hi), &panel, &a_row, &store)
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Generic batched matmul in the reference's accumulation order.
pub(crate) fn matmul(cg: &mut Cg, k: &Kernel, transpose_b: bool, has_bias: bool) -> Result<()> {
    let (a, b) = (&k.args[0], &k.args[1]);
    let out = k.args.last().expect("out");
    let (ra, rb, r) = (a.shape.len(), b.shape.len(), out.shape.len());
    cg.begin_kernel(&k.name);
    let od = cg.dims(&out.shape)?;
    let (m, n) = (od[r - 2], od[r - 1]);
    let kdim = cg.dim(&a.shape[ra - 1])?;
    let (ap, bp, op) = (cg.arg(0, a.dtype), cg.arg(1, b.dtype), cg.arg(k.args.len() - 1, out.dtype));
    let biasp = has_bias.then(|| cg.arg(2, k.args[2].dtype));
    cg.for_tiles(|cg, t| {
        let (bi, mi) = (cg.div(t, m), cg.rem(t, m));
        let idx = cg.unravel(bi, &od[..r - 2]);
        let a_mat = batch_index(cg, &a.shape[..ra - 2], &idx)?;
        let b_mat = batch_index(cg, &b.shape[..rb - 2], &idx)?;
        let arow = cg.mul(cg.add(cg.mul(a_mat, m), mi), kdim);
        let bbase = cg.mul(cg.mul(b_mat, kdim), n);
        let orow = cg.mul(t, n);
        if transpose_b {
            cg.for_range(cg.i64c(0), n, 1, |cg, j| {
                let acc = cg.alloca(cg.f32t(), "acc");
                cg.store_v(acc, cg.f32c(0.0));
                let brow = cg.add(bbase, cg.mul(j, kdim));
                cg.for_range(cg.i64c(0), kdim, 1, |cg, kk| {
                    let x = cg.load_f(ap, cg.add(arow, kk), a.dtype);
                    let y = cg.load_f(bp, cg.add(brow, kk), b.dtype);
                    let s = cg.fadd(cg.load_v(acc), cg.fmul(x.into(), y.into()));
                    cg.store_v(acc, s);
                    Ok(())
                })?;
                cg.store_f(op, cg.add(orow, j), DType::F32, cg.load_v(acc).into_float_value());
                Ok(())
            })?;
        } else {
            cg.for_range(cg.i64c(0), n, 1, |cg, j| {
                cg.store_f(op, cg.add(orow, j), DType::F32, cg.f32c(0.0));
                Ok(())
            })?;
            cg.for_range(cg.i64c(0), kdim, 1, |cg, kk| {
                let x = cg.load_f(ap, cg.add(arow, kk), a.dtype);
                let brow = cg.add(bbase, cg.mul(kk, n));
                cg.for_range(cg.i64c(0), n, 1, |cg, j| {
                    let at = cg.add(orow, j);
                    let y = cg.load_f(bp, cg.add(brow, j), b.dtype);
                    let s = cg.fadd(cg.load_f(op, at, DType::F32).into(), cg.fmul(x.into(), y.into()));
                    cg.store_f(op, at, DType::F32, s.into_float_value());
                    Ok(())
                })
            })?;
        }
        if let Some(bp) = biasp {
            let bd = k.args[2].dtype;
            cg.for_range(cg.i64c(0), n, 1, |cg, j| {
                let at = cg.add(orow, j);
                let s = cg.fadd(cg.load_f(op, at, DType::F32).into(), cg.load_f(bp, j, bd).into());
                cg.store_f(op, at, DType::F32, s.into_float_value());
                Ok(())
            })?;
        }
        Ok(())
    })?;
    cg.finish_kernel();
    Ok(())
}

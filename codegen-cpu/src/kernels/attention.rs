//! Causal grouped-query attention for prefill and for decode over the KV
//! cache, contiguous (one sequence) or paged (each row of a ragged batch
//! reads its own sequence's blocks through the block table; the two differ
//! only in where key `j` of a tile lives). One tile is one (token, KV
//! head) and serves all the query heads
//! that read that KV head, so each key and value row is loaded once for the
//! whole group. Scores for the visible keys go to the thread's scratch (one
//! row per query head), then a softmax in the reference's order, then the
//! probability-weighted sum of value rows, vectorised over the head dim
//! (one chunk of it at a time, each head's chunk accumulated in a register
//! over the keys in order).
//! The q.k dot products run `KEYS` keys at a time, one key per lane, each
//! accumulated over the head dim in order (the keys' rows are loaded
//! `KEYS` elements at a time and transposed in registers), so every step
//! matches the reference bit for bit.

use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, Result};
use inkwell::values::{BasicValue, FloatValue, IntValue, PointerValue, VectorValue};
use inkwell::AddressSpace;
use panguc_ir::kernel::Kernel;
use panguc_ir::DType;

/// Keys scored per vector of the q.k loop.
const KEYS: u32 = 8;

/// Keys per step of the run-wise loops (see [`TileKeys::linear_stride`]):
/// q.k scores two vectors of [`KEYS`] keys at once on AVX-512 (twice the
/// independent accumulators, so the adds' latency is hidden), and p.v
/// computes one address per run.
const STEP_KEYS: usize = 16;

/// Bytes of a cache line (prefetches are issued once per line).
const LINE: usize = 64;

/// Widest of 16/8/4 lanes dividing `d` (1 = scalar).
pub(crate) fn lanes_for(d: usize) -> u32 {
    [16u32, 8, 4].into_iter().find(|l| d.is_multiple_of(*l as usize)).unwrap_or(1)
}

fn load_lanes<'c>(cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>, dt: DType, n: u32) -> VectorValue<'c> {
    if n == 1 {
        let x = cg.load_f(p, i, dt);
        let undef = cg.vec_f32(1).get_undef();
        cg.b.build_insert_element(undef, x, cg.i32t().const_zero(), "").ok_()
    } else {
        cg.load_vec(p, i, dt, n)
    }
}

/// Where the keys of one tile are: how many it sees, and the element
/// offset of key (and value) row `j` of its KV head.
struct TileKeys<'c, 'a> {
    visible: IntValue<'c>,
    row: &'a dyn Fn(&Cg<'c>, IntValue<'c>) -> IntValue<'c>,
    /// When every aligned run of [`STEP_KEYS`] keys lies in consecutive
    /// slots (a contiguous cache, or cache blocks a multiple of
    /// `STEP_KEYS` long), the element stride between consecutive keys'
    /// rows: a run's rows are then `row(j0) + l * stride`, one address
    /// computation (one block-table read) per run instead of per key.
    linear_stride: Option<i64>,
}

/// Per-channel dequantization of an int8 cache: `(q - offset) * scale`
/// with `[Hkv, D]` scale and offset (element `kh * D + d`).
struct Dequant<'c> {
    scale: (PointerValue<'c>, DType),
    offset: (PointerValue<'c>, DType),
}

impl<'c> Dequant<'c> {
    /// Element `i` of an int8 cache, channel `ch`, as f32 (scalar).
    fn scalar(&self, cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>, ch: IntValue<'c>) -> FloatValue<'c> {
        let q = cg.load_i(p, i);
        let qf = cg.b.build_signed_int_to_float(q, cg.f32t(), "").ok_();
        let o = cg.load_f(self.offset.0, ch, self.offset.1);
        let s = cg.load_f(self.scale.0, ch, self.scale.1);
        cg.fmul(cg.fsub(qf.into(), o.into()), s.into()).into_float_value()
    }

    /// `n` consecutive elements from `i` (channels from `ch`) as f32 lanes.
    fn lanes(&self, cg: &Cg<'c>, p: PointerValue<'c>, i: IntValue<'c>, ch: IntValue<'c>, n: u32) -> VectorValue<'c> {
        let vty = cg.ctx.i8_type().vec_type(n);
        let vp = cg.b.build_pointer_cast(cg.gep(p, i), vty.ptr_type(AddressSpace::default()), "").ok_();
        let raw = cg.b.build_load(vp, "").ok_();
        raw.as_instruction_value().expect("load").set_alignment(1).ok_();
        let qf = cg.b.build_signed_int_to_float(raw.into_vector_value(), cg.vec_f32(n), "").ok_();
        let o = cg.load_vec(self.offset.0, ch, self.offset.1, n);
        let s = cg.load_vec(self.scale.0, ch, self.scale.1, n);
        cg.fmul(cg.fsub(qf.into(), o.into()), s.into()).into_vector_value()
    }
}

/// Buffers and sizes shared by both attention kernels.
struct AttnArgs<'c> {
    q: (PointerValue<'c>, DType),
    k: (PointerValue<'c>, DType),
    v: (PointerValue<'c>, DType),
    /// Int8 caches: how to dequantize K and V (the cache dtypes are i8).
    kv_dequant: Option<[Dequant<'c>; 2]>,
    out: (PointerValue<'c>, DType),
    hq: usize,
    d: usize,
    group: usize,
    /// Stride between the score rows of a group's heads in the scratch.
    score_stride: IntValue<'c>,
    scale: f64,
}

/// Contiguous caches: `(q[T, Hq, D], k[K, Hkv, D], v[K, Hkv, D],
/// positions[T] i64, out[T, Hq, D])`.
pub(crate) fn attention<'c>(cg: &mut Cg<'c>, k: &Kernel, scale: f64) -> Result<()> {
    let (q, kk, v, out) = (&k.args[0], &k.args[1], &k.args[2], &k.args[4]);
    let (hq, d, hkv) = (static_dim(&q.shape[1])?, static_dim(&q.shape[2])?, static_dim(&kk.shape[1])?);
    cg.begin_kernel(&k.name);
    let keys = cg.dim(&kk.shape[0])?;
    let pp = cg.arg(3, DType::I64);
    let a = AttnArgs {
        q: (cg.arg(0, q.dtype), q.dtype),
        k: (cg.arg(1, kk.dtype), kk.dtype),
        v: (cg.arg(2, v.dtype), v.dtype),
        kv_dequant: None,
        out: (cg.arg(4, out.dtype), out.dtype),
        hq,
        d,
        group: hq / hkv,
        score_stride: keys,
        scale,
    };
    let (dc, hkvc) = (cg.i64c(d as i64), cg.i64c(hkv as i64));
    cg.for_tiles(|cg, t| {
        let (ti, kh) = (cg.div(t, hkvc), cg.rem(t, hkvc));
        let p = cg.load_i(pp, ti);
        let visible = cg.min(cg.max(cg.add(p, cg.i64c(1)), cg.i64c(0)), keys);
        let row = |cg: &Cg<'c>, j: IntValue<'c>| cg.mul(cg.add(cg.mul(j, hkvc), kh), dc);
        attend(cg, &a, ti, kh, TileKeys { visible, row: &row, linear_stride: Some((hkv * d) as i64) })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// Paged caches: `(q[T, Hq, D], k_cache[NB, BS, Hkv, D], v_cache[same],
/// block_table[S, MB] i64, query_start_loc[S+1] i64, context_lens[S] i64,
/// out[T, Hq, D])`. A tile finds its row's sequence from the query offsets
/// (the number of later sequence starts at or before it), its position
/// from the sequence's context length, and key `j` at slot
/// `block_table[s][j / BS] * BS + j % BS`. The runtime validates the
/// metadata (`StepMetadata::validate`) before a step, so every slot read is
/// inside the cache.
///
/// With `int8` (`PagedAttentionInt8`) the caches are int8 and four more
/// operands before `out` give the K and V per-channel scales and offsets:
/// each element is dequantized as it is loaded, with the arithmetic of the
/// reference's `dequantize`, so the scores match the unfused ops exactly.
pub(crate) fn paged_attention<'c>(cg: &mut Cg<'c>, k: &Kernel, scale: f64, int8: bool) -> Result<()> {
    let out_at = if int8 { 10 } else { 6 };
    let (q, kc, v, table, out) = (&k.args[0], &k.args[1], &k.args[2], &k.args[3], &k.args[out_at]);
    if int8 && (kc.dtype != DType::I8 || v.dtype != DType::I8) {
        anyhow::bail!("int8 paged attention over {} and {} caches", kc.dtype, v.dtype);
    }
    let (hq, d) = (static_dim(&q.shape[1])?, static_dim(&q.shape[2])?);
    let (bs, hkv) = (static_dim(&kc.shape[1])?, static_dim(&kc.shape[2])?);
    cg.begin_kernel(&k.name);
    let max_blocks = cg.dim(&table.shape[1])?;
    let seqs = cg.dim(&k.args[5].shape[0])?;
    let (tp, qslp, ctxp) = (cg.arg(3, DType::I64), cg.arg(4, DType::I64), cg.arg(5, DType::I64));
    let capacity = cg.mul(max_blocks, cg.i64c(bs as i64));
    let a = AttnArgs {
        q: (cg.arg(0, q.dtype), q.dtype),
        k: (cg.arg(1, kc.dtype), kc.dtype),
        v: (cg.arg(2, v.dtype), v.dtype),
        kv_dequant: int8.then(|| {
            let d = |i: usize| {
                let a = &k.args[i];
                (cg.arg(i, a.dtype), a.dtype)
            };
            [Dequant { scale: d(6), offset: d(7) }, Dequant { scale: d(8), offset: d(9) }]
        }),
        out: (cg.arg(out_at, out.dtype), out.dtype),
        hq,
        d,
        group: hq / hkv,
        score_stride: capacity,
        scale,
    };
    let (dc, hkvc, bsc) = (cg.i64c(d as i64), cg.i64c(hkv as i64), cg.i64c(bs as i64));
    cg.for_tiles(|cg, t| {
        let (ti, kh) = (cg.div(t, hkvc), cg.rem(t, hkvc));
        // Sequence of row `ti`: query offsets increase, so it is the count
        // of sequences 1.. that start at or before the row.
        let seq = cg.alloca(cg.i64t(), "seq");
        cg.store_v(seq, cg.i64c(0));
        cg.for_range(cg.i64c(1), seqs, 1, |cg, s| {
            let starts_before = cg.le(cg.load_i(qslp, s), ti);
            let inc = cg.b.build_int_z_extend(starts_before, cg.i64t(), "").ok_();
            let n = cg.add(cg.load_v(seq).into_int_value(), inc);
            cg.store_v(seq, n);
            Ok(())
        })?;
        let s = cg.load_v(seq).into_int_value();
        let (start, end) = (cg.load_i(qslp, s), cg.load_i(qslp, cg.add(s, cg.i64c(1))));
        let ctx = cg.load_i(ctxp, s);
        // Position of the row: its sequence's new tokens end the context.
        let pos = cg.add(cg.sub(ctx, cg.sub(end, start)), cg.sub(ti, start));
        let visible = cg.min(cg.min(cg.max(cg.add(pos, cg.i64c(1)), cg.i64c(0)), ctx), capacity);
        let table_row = cg.mul(s, max_blocks);
        let row = |cg: &Cg<'c>, j: IntValue<'c>| {
            let block = cg.load_i(tp, cg.add(table_row, cg.div(j, bsc)));
            let slot = cg.add(cg.mul(block, bsc), cg.rem(j, bsc));
            cg.mul(cg.add(cg.mul(slot, hkvc), kh), dc)
        };
        let linear_stride = bs.is_multiple_of(STEP_KEYS).then_some((hkv * d) as i64);
        attend(cg, &a, ti, kh, TileKeys { visible, row: &row, linear_stride })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// The 8 x 8 transpose of `v` (eight 8-lane rows): lane `l` of result
/// `i` is lane `i` of row `l`. Three rounds of two-source shuffles
/// (interleave pairs of lanes, then pairs of pairs, then 128-bit halves),
/// which the backend lowers to `vunpck*ps`, `vshufps` and `vperm2f128`.
fn transpose8<'c>(cg: &Cg<'c>, v: &[VectorValue<'c>]) -> Vec<VectorValue<'c>> {
    assert_eq!((v.len(), KEYS), (8, 8), "an 8 x 8 transpose");
    let shuffle = |a: VectorValue<'c>, b: VectorValue<'c>, mask: [u64; 8]| {
        let m: Vec<IntValue> = mask.iter().map(|&i| cg.i32t().const_int(i, false)).collect();
        cg.b.build_shuffle_vector(a, b, inkwell::types::VectorType::const_vector(&m), "").ok_()
    };
    const LO: [u64; 8] = [0, 8, 1, 9, 4, 12, 5, 13];
    const HI: [u64; 8] = [2, 10, 3, 11, 6, 14, 7, 15];
    const LO2: [u64; 8] = [0, 1, 8, 9, 4, 5, 12, 13];
    const HI2: [u64; 8] = [2, 3, 10, 11, 6, 7, 14, 15];
    const LO4: [u64; 8] = [0, 1, 2, 3, 8, 9, 10, 11];
    const HI4: [u64; 8] = [4, 5, 6, 7, 12, 13, 14, 15];
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (lanes 0,1,4,5 / 2,3,6,7).
    let t: Vec<VectorValue> =
        (0..4).flat_map(|i| [shuffle(v[2 * i], v[2 * i + 1], LO), shuffle(v[2 * i], v[2 * i + 1], HI)]).collect();
    // u[j] (j < 4) holds lanes j and j+4 of rows 0..4; u[4 + j] of rows 4..8.
    let mut u = vec![];
    for base in [0, 4] {
        let (a0, a1, b0, b1) = (t[base], t[base + 1], t[base + 2], t[base + 3]);
        u.extend([shuffle(a0, b0, LO2), shuffle(a0, b0, HI2), shuffle(a1, b1, LO2), shuffle(a1, b1, HI2)]);
    }
    let mut out: Vec<Option<VectorValue>> = vec![None; 8];
    for j in 0..4 {
        out[j] = Some(shuffle(u[j], u[4 + j], LO4));
        out[j + 4] = Some(shuffle(u[j], u[4 + j], HI4));
    }
    out.into_iter().map(|x| x.expect("every lane")).collect()
}

fn static_dim(d: &panguc_ir::Dim) -> Result<usize> {
    d.as_const().ok_or_else(|| anyhow!("attention dim {d} must be static"))
}

/// One tile: row `ti`'s query heads of KV head `kh` over the tile's keys.
fn attend<'c>(
    cg: &mut Cg<'c>,
    a: &AttnArgs<'c>,
    ti: IntValue<'c>,
    kh: IntValue<'c>,
    keys: TileKeys<'c, '_>,
) -> Result<()> {
    let (qp, kp, vp) = (a.q.0, a.k.0, a.v.0);
    let (d, group) = (a.d, a.group);
    let scratch = cg.cast_ptr(cg.scratch.expect("kernel"), DType::F32);
    let (dc, hqc) = (cg.i64c(d as i64), cg.i64c(a.hq as i64));
    let scale_v = cg.f32c(a.scale as f32);
    let (visible, kv_row) = (keys.visible, keys.row);
    // AVX-512 has the registers for twice the accumulators.
    let wide = cg.has_feature("avx512f");
    // First per-channel scale element of this KV head (int8 caches).
    let chan0 = cg.mul(kh, dc);
    // Per query head of the group: its q/out row and its score row.
    let heads: Vec<(IntValue<'c>, PointerValue<'c>)> = (0..group)
        .map(|g| {
            let h = cg.add(cg.mul(kh, cg.i64c(group as i64)), cg.i64c(g as i64));
            let row = cg.mul(cg.add(cg.mul(ti, hqc), h), dc);
            (row, cg.gep(scratch, cg.mul(cg.i64c(g as i64), a.score_stride)))
        })
        .collect();

    // Scores: whole runs of keys first where their rows are linear, then
    // KEYS keys per step (one per lane) for every head, then one by one.
    let transposed = d.is_multiple_of(KEYS as usize) && a.kv_dequant.is_none();
    let first = match keys.linear_stride {
        Some(stride) if transposed => score_runs(cg, a, &heads, visible, kv_row, stride, wide)?,
        _ => cg.i64c(0),
    };
    let kblocks = cg.div(cg.sub(visible, first), cg.i64c(KEYS as i64));
    cg.for_range(cg.i64c(0), kblocks, 1, |cg, blk| {
        let j0 = cg.add(first, cg.mul(blk, cg.i64c(KEYS as i64)));
        let rows: Vec<IntValue> = (0..KEYS).map(|l| kv_row(cg, cg.add(j0, cg.i64c(l as i64)))).collect();
        let accs: Vec<PointerValue> = (0..group).map(|_| cg.alloca(cg.vec_f32(KEYS), "dot")).collect();
        for acc in &accs {
            cg.store_v(*acc, cg.zeros(KEYS));
        }
        if transposed {
            // KEYS contiguous elements of each key row, transposed in
            // registers into one vector per dd (one vector load per key
            // and a few shuffles, not one scalar load per element).
            // The rows are scattered over the paged cache, beyond what the
            // hardware prefetcher follows: fetch the next block's keys, and
            // this block's values for the p.v pass, while this block computes.
            let last = cg.sub(visible, cg.i64c(1));
            let next: Vec<IntValue> =
                (0..KEYS).map(|l| kv_row(cg, cg.min(cg.add(j0, cg.i64c((KEYS + l) as i64)), last))).collect();
            cg.for_range(cg.i64c(0), cg.i64c((d / KEYS as usize) as i64), 1, |cg, c| {
                let d0 = cg.mul(c, cg.i64c(KEYS as i64));
                for (r, n) in rows.iter().zip(&next) {
                    cg.prefetch_with(cg.gep(kp, cg.add(*n, d0)), 3);
                    cg.prefetch_with(cg.gep(vp, cg.add(*r, d0)), 3);
                }
                let rows_v: Vec<VectorValue> =
                    rows.iter().map(|r| cg.load_vec(kp, cg.add(*r, d0), a.k.1, KEYS)).collect();
                for (i, kv) in transpose8(cg, &rows_v).into_iter().enumerate() {
                    accumulate_scores(cg, a, &heads, &accs, cg.add(d0, cg.i64c(i as i64)), kv);
                }
                Ok(())
            })?;
        } else {
            cg.for_range(cg.i64c(0), dc, 1, |cg, dd| {
                let mut kv = cg.zeros(KEYS);
                for (l, r) in rows.iter().enumerate() {
                    let x = load_key(cg, a, kp, cg.add(*r, dd), cg.add(chan0, dd));
                    kv = cg.b.build_insert_element(kv, x, cg.i32t().const_int(l as u64, false), "").ok_();
                }
                accumulate_scores(cg, a, &heads, &accs, dd, kv);
                Ok(())
            })?;
        }
        for ((_, srow), acc) in heads.iter().zip(&accs) {
            let sc = cg.fmul(cg.load_v(*acc), cg.splat(scale_v, KEYS).into());
            cg.store_vec(*srow, j0, DType::F32, sc.into_vector_value());
        }
        Ok(())
    })?;
    cg.for_range(cg.add(first, cg.mul(kblocks, cg.i64c(KEYS as i64))), visible, 1, |cg, j| {
        let krow = kv_row(cg, j);
        for (qrow, srow) in &heads {
            let acc = cg.alloca(cg.f32t(), "dot1");
            cg.store_v(acc, cg.f32c(0.0));
            cg.for_range(cg.i64c(0), dc, 1, |cg, dd| {
                let x = cg.load_f(qp, cg.add(*qrow, dd), a.q.1);
                let y = load_key(cg, a, kp, cg.add(krow, dd), cg.add(chan0, dd));
                let s = cg.fadd(cg.load_v(acc), cg.fmul(x.into(), y.into()));
                cg.store_v(acc, s);
                Ok(())
            })?;
            let s = cg.fmul(cg.load_v(acc), scale_v.into());
            cg.store_f(*srow, j, DType::F32, s.into_float_value());
        }
        Ok(())
    })?;

    // Softmax of each head's scores: max, exp(s - max) and their sum (in
    // key order, as the reference adds them), then the probabilities
    // e_j / sum in place of the scores.
    for (_, srow) in &heads {
        let mv = max_of(cg, *srow, visible)?;
        let sum = cg.alloca(cg.f32t(), "sum");
        cg.store_v(sum, cg.f32c(0.0));
        cg.for_range(cg.i64c(0), visible, 1, |cg, j| {
            let e = cg.exp(cg.fsub(cg.load_f(*srow, j, DType::F32).into(), mv.into()));
            cg.store_f(*srow, j, DType::F32, e.into_float_value());
            let s = cg.fadd(cg.load_v(sum), e);
            cg.store_v(sum, s);
            Ok(())
        })?;
        let sum = cg.load_v(sum).into_float_value();
        divide_by(cg, *srow, visible, sum)?;
    }
    weighted_values(cg, a, &heads, keys, chan0, wide)
}

/// `acc[h] += q[h][dd] * kv` for every head of the group (lane l of `kv`
/// holds element `dd` of key l, so each lane accumulates its key's dot
/// product over dd in order).
fn accumulate_scores<'c>(
    cg: &Cg<'c>,
    a: &AttnArgs<'c>,
    heads: &[(IntValue<'c>, PointerValue<'c>)],
    accs: &[PointerValue<'c>],
    dd: IntValue<'c>,
    kv: VectorValue<'c>,
) {
    for ((qrow, _), acc) in heads.iter().zip(accs) {
        let qv = cg.splat(cg.load_f(a.q.0, cg.add(*qrow, dd), a.q.1), KEYS);
        let s = cg.fadd(cg.load_v(*acc), cg.fmul(qv.into(), kv.into()));
        cg.store_v(*acc, s);
    }
}

/// q.k over the whole runs of [`STEP_KEYS`] keys below `visible`, whose
/// rows are `row(j0) + l * stride`; returns the first key left to score.
/// Each step transposes [`KEYS`] keys at a time as the per-block loop does
/// (so every score is computed by the same operations in the same order)
/// but scores two such vectors together on AVX-512, and issues one
/// prefetch per cache line: the keys of the run two ahead, and this run's
/// values for the p.v pass.
#[allow(clippy::too_many_arguments)]
fn score_runs<'c>(
    cg: &mut Cg<'c>,
    a: &AttnArgs<'c>,
    heads: &[(IntValue<'c>, PointerValue<'c>)],
    visible: IntValue<'c>,
    kv_row: &dyn Fn(&Cg<'c>, IntValue<'c>) -> IntValue<'c>,
    stride: i64,
    wide: bool,
) -> Result<IntValue<'c>> {
    let (kp, vp, d) = (a.k.0, a.v.0, a.d);
    let keys = KEYS as usize;
    // Elements per iteration: whole cache lines when the head dim allows.
    let per_line = (LINE / (keys * a.k.1.size_bytes())).max(1);
    let sub = if d.is_multiple_of(keys * per_line) { per_line } else { 1 };
    let span = keys * sub;
    let vectors = STEP_KEYS / keys;
    let together = if wide { vectors } else { 1 };
    let scale_v = cg.f32c(a.scale as f32);
    let runs = cg.div(visible, cg.i64c(STEP_KEYS as i64));
    let last_run = cg.sub(runs, cg.i64c(1));
    cg.for_range(cg.i64c(0), runs, 1, |cg, r| {
        let j0 = cg.mul(r, cg.i64c(STEP_KEYS as i64));
        let base = kv_row(cg, j0);
        let ahead = kv_row(cg, cg.mul(cg.min(cg.add(r, cg.i64c(2)), last_run), cg.i64c(STEP_KEYS as i64)));
        for g0 in (0..vectors).step_by(together) {
            let accs: Vec<Vec<PointerValue>> = (0..together)
                .map(|_| {
                    heads
                        .iter()
                        .map(|_| {
                            let acc = cg.alloca(cg.vec_f32(KEYS), "dot");
                            cg.store_v(acc, cg.zeros(KEYS));
                            acc
                        })
                        .collect()
                })
                .collect();
            cg.for_range(cg.i64c(0), cg.i64c((d / span) as i64), 1, |cg, c| {
                let d0 = cg.mul(c, cg.i64c(span as i64));
                if g0 == 0 {
                    for l in 0..STEP_KEYS as i64 {
                        let off = cg.add(d0, cg.i64c(l * stride));
                        cg.prefetch_with(cg.gep(kp, cg.add(ahead, off)), 3);
                        // Values wait for the p.v pass in L2 (the tile's
                        // values outgrow L1, where they would evict keys
                        // prefetched for the next runs).
                        cg.prefetch_with(cg.gep(vp, cg.add(base, off)), 2);
                    }
                }
                for u in 0..sub {
                    let dd0 = cg.add(d0, cg.i64c((u * keys) as i64));
                    for (gi, acc) in accs.iter().enumerate() {
                        let first = ((g0 + gi) * keys) as i64;
                        let rows_v: Vec<VectorValue> = (0..keys as i64)
                            .map(|i| {
                                let at = cg.add(base, cg.add(dd0, cg.i64c((first + i) * stride)));
                                cg.load_vec(kp, at, a.k.1, KEYS)
                            })
                            .collect();
                        for (i, kv) in transpose8(cg, &rows_v).into_iter().enumerate() {
                            accumulate_scores(cg, a, heads, acc, cg.add(dd0, cg.i64c(i as i64)), kv);
                        }
                    }
                }
                Ok(())
            })?;
            for (gi, acc) in accs.iter().enumerate() {
                let at = cg.add(j0, cg.i64c(((g0 + gi) * keys) as i64));
                for ((_, srow), x) in heads.iter().zip(acc) {
                    let sc = cg.fmul(cg.load_v(*x), cg.splat(scale_v, KEYS).into());
                    cg.store_vec(*srow, at, DType::F32, sc.into_vector_value());
                }
            }
        }
        Ok(())
    })?;
    Ok(cg.mul(runs, cg.i64c(STEP_KEYS as i64)))
}

/// Lanes of the vectorised softmax passes.
const SOFTMAX_LANES: u32 = 16;

/// The largest of the `n` scores at `p` (NaNs ignored, -inf when none),
/// 16 lanes at a time. The maximum of a set does not depend on the order
/// it is taken in (except which of +0 and -0 wins a tie, and `s - m` is
/// the same for either), so this equals the reference's sequential fold.
fn max_of<'c>(cg: &mut Cg<'c>, p: PointerValue<'c>, n: IntValue<'c>) -> Result<FloatValue<'c>> {
    let w = SOFTMAX_LANES;
    let lanes = cg.alloca(cg.vec_f32(w), "maxv");
    cg.store_v(lanes, cg.splat(cg.f32c(f32::NEG_INFINITY), w));
    let full = cg.div(n, cg.i64c(w as i64));
    cg.for_range(cg.i64c(0), full, 1, |cg, c| {
        let x = cg.load_vec(p, cg.mul(c, cg.i64c(w as i64)), DType::F32, w);
        let m = cg.fmax(cg.load_v(lanes), x.into());
        cg.store_v(lanes, m);
        Ok(())
    })?;
    let v = cg.load_v(lanes).into_vector_value();
    let mut folded: FloatValue = cg.f32c(f32::NEG_INFINITY);
    for l in 0..w {
        folded = cg.fmax(folded.into(), cg.lane(v, l).into()).into_float_value();
    }
    let m = cg.alloca(cg.f32t(), "m");
    cg.store_v(m, folded);
    cg.for_range(cg.mul(full, cg.i64c(w as i64)), n, 1, |cg, j| {
        let mx = cg.fmax(cg.load_v(m), cg.load_f(p, j, DType::F32).into());
        cg.store_v(m, mx);
        Ok(())
    })?;
    Ok(cg.load_v(m).into_float_value())
}

/// `p[j] /= sum` for `j < n`, 16 lanes at a time (each quotient is the
/// one IEEE division, in any order).
fn divide_by<'c>(cg: &mut Cg<'c>, p: PointerValue<'c>, n: IntValue<'c>, sum: FloatValue<'c>) -> Result<()> {
    let w = SOFTMAX_LANES;
    let full = cg.div(n, cg.i64c(w as i64));
    let sv = cg.splat(sum, w);
    cg.for_range(cg.i64c(0), full, 1, |cg, c| {
        let at = cg.mul(c, cg.i64c(w as i64));
        let q = cg.fdiv(cg.load_vec(p, at, DType::F32, w).into(), sv.into());
        cg.store_vec(p, at, DType::F32, q.into_vector_value());
        Ok(())
    })?;
    cg.for_range(cg.mul(full, cg.i64c(w as i64)), n, 1, |cg, j| {
        let q = cg.fdiv(cg.load_f(p, j, DType::F32).into(), sum.into()).into_float_value();
        cg.store_f(p, j, DType::F32, q);
        Ok(())
    })
}

/// out = sum_j p_j * v_j, accumulated in j order per element from 0: a
/// few `lanes`-wide chunks of the head dim per pass over the keys, every
/// head of the group accumulating each chunk in a register (each value
/// chunk is loaded once for the group, and a key's row address is found
/// once per pass, once per run of keys where they are linear).
fn weighted_values<'c>(
    cg: &mut Cg<'c>,
    a: &AttnArgs<'c>,
    heads: &[(IntValue<'c>, PointerValue<'c>)],
    keys: TileKeys<'c, '_>,
    chan0: IntValue<'c>,
    wide: bool,
) -> Result<()> {
    let (vp, op) = (a.v.0, a.out.0);
    let lanes = lanes_for(a.d);
    let chunks = a.d / lanes as usize;
    // Accumulators per pass: heads x chunks of the 32 (16) vector registers.
    let per_pass = [if wide { 4 } else { 2 }, 2, 1].into_iter().find(|c| chunks.is_multiple_of(*c)).unwrap_or(1);
    let (visible, kv_row) = (keys.visible, keys.row);
    cg.for_range(cg.i64c(0), cg.i64c((chunks / per_pass) as i64), 1, |cg, pass| {
        let off0 = cg.mul(pass, cg.i64c((per_pass * lanes as usize) as i64));
        let accs: Vec<Vec<PointerValue>> = heads
            .iter()
            .map(|_| {
                (0..per_pass)
                    .map(|_| {
                        let acc = cg.alloca(cg.vec_f32(lanes), "pv");
                        cg.store_v(acc, cg.zeros(lanes));
                        acc
                    })
                    .collect()
            })
            .collect();
        // Key `j` with its value row at `vrow`.
        let key = |cg: &mut Cg<'c>, j: IntValue<'c>, vrow: IntValue<'c>| {
            for c in 0..per_pass {
                let off = cg.add(off0, cg.i64c((c * lanes as usize) as i64));
                let x = match &a.kv_dequant {
                    Some([_, dv]) if lanes > 1 => dv.lanes(cg, vp, cg.add(vrow, off), cg.add(chan0, off), lanes),
                    Some([_, dv]) => {
                        let x = dv.scalar(cg, vp, cg.add(vrow, off), cg.add(chan0, off));
                        let undef = cg.vec_f32(1).get_undef();
                        cg.b.build_insert_element(undef, x, cg.i32t().const_zero(), "").ok_()
                    }
                    None => load_lanes(cg, vp, cg.add(vrow, off), a.v.1, lanes),
                };
                for ((_, srow), acc) in heads.iter().zip(&accs) {
                    let pv = cg.splat(cg.load_f(*srow, j, DType::F32), lanes);
                    let y = cg.fadd(cg.load_v(acc[c]), cg.fmul(pv.into(), x.into()));
                    cg.store_v(acc[c], y);
                }
            }
        };
        let first = match keys.linear_stride {
            Some(stride) => {
                let runs = cg.div(visible, cg.i64c(STEP_KEYS as i64));
                cg.for_range(cg.i64c(0), runs, 1, |cg, r| {
                    let j0 = cg.mul(r, cg.i64c(STEP_KEYS as i64));
                    let base = kv_row(cg, j0);
                    for l in 0..STEP_KEYS as i64 {
                        key(cg, cg.add(j0, cg.i64c(l)), cg.add(base, cg.i64c(l * stride)));
                    }
                    Ok(())
                })?;
                cg.mul(runs, cg.i64c(STEP_KEYS as i64))
            }
            None => cg.i64c(0),
        };
        cg.for_range(first, visible, 1, |cg, j| {
            let vrow = kv_row(cg, j);
            key(cg, j, vrow);
            Ok(())
        })?;
        for ((qrow, _), acc) in heads.iter().zip(&accs) {
            for (c, x) in acc.iter().enumerate() {
                let off = cg.add(off0, cg.i64c((c * lanes as usize) as i64));
                cg.store_vec(op, cg.add(*qrow, off), a.out.1, cg.load_v(*x).into_vector_value());
            }
        }
        Ok(())
    })
}

/// Key element `i` (channel `ch`) as f32: dequantized from an int8 cache.
fn load_key<'c>(
    cg: &Cg<'c>,
    a: &AttnArgs<'c>,
    kp: PointerValue<'c>,
    i: IntValue<'c>,
    ch: IntValue<'c>,
) -> FloatValue<'c> {
    match &a.kv_dequant {
        Some([dk, _]) => dk.scalar(cg, kp, i, ch),
        None => cg.load_f(kp, i, a.k.1),
    }
}

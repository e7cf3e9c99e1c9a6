//! Causal grouped-query attention for prefill and for decode over the KV
//! cache. One tile is one (token, KV head) and serves all the query heads
//! that read that KV head, so each key and value row is loaded once for the
//! whole group. Scores for the visible keys go to the thread's scratch (one
//! row per query head), then a softmax in the reference's order, then the
//! probability-weighted sum of value rows, vectorised over the head dim.
//! The q.k dot products run `KEYS` keys at a time, one key per lane, each
//! accumulated over the head dim in order, so every step matches the
//! reference bit for bit.

use crate::cg::{Cg, Ok_};
use anyhow::{anyhow, Result};
use inkwell::values::{IntValue, PointerValue, VectorValue};
use panguc_ir::kernel::Kernel;
use panguc_ir::DType;

/// Keys scored per step of the q.k loop.
const KEYS: u32 = 8;

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

pub(crate) fn attention<'c>(cg: &mut Cg<'c>, k: &Kernel, scale: f64) -> Result<()> {
    let (q, kk, v, out) = (&k.args[0], &k.args[1], &k.args[2], &k.args[4]);
    let st = |d: &panguc_ir::Dim| d.as_const().ok_or_else(|| anyhow!("attention dim {d} must be static"));
    let (hq, d, hkv) = (st(&q.shape[1])?, st(&q.shape[2])?, st(&kk.shape[1])?);
    let group = hq / hkv;
    let lanes = lanes_for(d);
    let chunks = (d / lanes as usize) as i64;
    cg.begin_kernel(&k.name);
    let keys = cg.dim(&kk.shape[0])?;
    let (qp, kp, vp) = (cg.arg(0, q.dtype), cg.arg(1, kk.dtype), cg.arg(2, v.dtype));
    let (pp, op) = (cg.arg(3, DType::I64), cg.arg(4, out.dtype));
    let scratch = cg.cast_ptr(cg.scratch.expect("kernel"), DType::F32);
    let (dc, hqc, hkvc, lc) = (cg.i64c(d as i64), cg.i64c(hq as i64), cg.i64c(hkv as i64), cg.i64c(lanes as i64));
    let scale_v = cg.f32c(scale as f32);
    cg.for_tiles(|cg, t| {
        let (ti, kh) = (cg.div(t, hkvc), cg.rem(t, hkvc));
        let p = cg.load_i(pp, ti);
        let visible = cg.min(cg.max(cg.add(p, cg.i64c(1)), cg.i64c(0)), keys);
        // Per query head of the group: its q/out row and its score row.
        let heads: Vec<(IntValue<'c>, PointerValue<'c>)> = (0..group)
            .map(|g| {
                let h = cg.add(cg.mul(kh, cg.i64c(group as i64)), cg.i64c(g as i64));
                let row = cg.mul(cg.add(cg.mul(ti, hqc), h), dc);
                (row, cg.gep(scratch, cg.mul(cg.i64c(g as i64), keys)))
            })
            .collect();
        let kv_row = |cg: &Cg<'c>, j: IntValue<'c>| cg.mul(cg.add(cg.mul(j, hkvc), kh), dc);

        // Scores, KEYS keys per step (one per lane) for every head.
        let kblocks = cg.div(visible, cg.i64c(KEYS as i64));
        cg.for_range(cg.i64c(0), kblocks, 1, |cg, blk| {
            let j0 = cg.mul(blk, cg.i64c(KEYS as i64));
            let rows: Vec<IntValue> = (0..KEYS).map(|l| kv_row(cg, cg.add(j0, cg.i64c(l as i64)))).collect();
            let accs: Vec<PointerValue> = (0..group).map(|_| cg.alloca(cg.vec_f32(KEYS), "dot")).collect();
            for a in &accs {
                cg.store_v(*a, cg.zeros(KEYS));
            }
            cg.for_range(cg.i64c(0), dc, 1, |cg, dd| {
                let mut kv = cg.zeros(KEYS);
                for (l, r) in rows.iter().enumerate() {
                    let x = cg.load_f(kp, cg.add(*r, dd), kk.dtype);
                    kv = cg.b.build_insert_element(kv, x, cg.i32t().const_int(l as u64, false), "").ok_();
                }
                for ((qrow, _), acc) in heads.iter().zip(&accs) {
                    let qv = cg.splat(cg.load_f(qp, cg.add(*qrow, dd), q.dtype), KEYS);
                    let s = cg.fadd(cg.load_v(*acc), cg.fmul(qv.into(), kv.into()));
                    cg.store_v(*acc, s);
                }
                Ok(())
            })?;
            for ((_, srow), acc) in heads.iter().zip(&accs) {
                let sc = cg.fmul(cg.load_v(*acc), cg.splat(scale_v, KEYS).into());
                cg.store_vec(*srow, j0, DType::F32, sc.into_vector_value());
            }
            Ok(())
        })?;
        cg.for_range(cg.mul(kblocks, cg.i64c(KEYS as i64)), visible, 1, |cg, j| {
            let krow = kv_row(cg, j);
            for (qrow, srow) in &heads {
                let acc = cg.alloca(cg.f32t(), "dot1");
                cg.store_v(acc, cg.f32c(0.0));
                cg.for_range(cg.i64c(0), dc, 1, |cg, dd| {
                    let x = cg.load_f(qp, cg.add(*qrow, dd), q.dtype);
                    let y = cg.load_f(kp, cg.add(krow, dd), kk.dtype);
                    let s = cg.fadd(cg.load_v(acc), cg.fmul(x.into(), y.into()));
                    cg.store_v(acc, s);
                    Ok(())
                })?;
                let s = cg.fmul(cg.load_v(acc), scale_v.into());
                cg.store_f(*srow, j, DType::F32, s.into_float_value());
            }
            Ok(())
        })?;

        // Softmax of each head's scores: max, exp(s - max) and their sum.
        let mut sums = vec![];
        for (_, srow) in &heads {
            let m = cg.alloca(cg.f32t(), "m");
            cg.store_v(m, cg.f32c(f32::NEG_INFINITY));
            cg.for_range(cg.i64c(0), visible, 1, |cg, j| {
                let mx = cg.fmax(cg.load_v(m), cg.load_f(*srow, j, DType::F32).into());
                cg.store_v(m, mx);
                Ok(())
            })?;
            let mv = cg.load_v(m);
            let sum = cg.alloca(cg.f32t(), "sum");
            cg.store_v(sum, cg.f32c(0.0));
            cg.for_range(cg.i64c(0), visible, 1, |cg, j| {
                let e = cg.exp(cg.fsub(cg.load_f(*srow, j, DType::F32).into(), mv));
                cg.store_f(*srow, j, DType::F32, e.into_float_value());
                let s = cg.fadd(cg.load_v(sum), e);
                cg.store_v(sum, s);
                Ok(())
            })?;
            sums.push(cg.load_v(sum));
        }

        // out = sum_j (e_j / sum) * v_j, accumulated in j order per element;
        // each value row is loaded once for the whole group.
        for (qrow, _) in &heads {
            cg.for_range(cg.i64c(0), cg.i64c(chunks), 1, |cg, c| {
                cg.store_vec(op, cg.add(*qrow, cg.mul(c, lc)), out.dtype, cg.zeros(lanes));
                Ok(())
            })?;
        }
        cg.for_range(cg.i64c(0), visible, 1, |cg, j| {
            let ps: Vec<VectorValue> = heads
                .iter()
                .zip(&sums)
                .map(|((_, srow), sum)| {
                    let pj = cg.fdiv(cg.load_f(*srow, j, DType::F32).into(), *sum).into_float_value();
                    cg.splat(pj, lanes)
                })
                .collect();
            let vrow = kv_row(cg, j);
            cg.for_range(cg.i64c(0), cg.i64c(chunks), 1, |cg, c| {
                let off = cg.mul(c, lc);
                let x = load_lanes(cg, vp, cg.add(vrow, off), v.dtype, lanes);
                for ((qrow, _), pv) in heads.iter().zip(&ps) {
                    let o = cg.load_vec(op, cg.add(*qrow, off), out.dtype, lanes);
                    let y = cg.fadd(o.into(), cg.fmul((*pv).into(), x.into()));
                    cg.store_vec(op, cg.add(*qrow, off), out.dtype, y.into_vector_value());
                }
                Ok(())
            })
        })?;
        Ok(())
    })?;
    cg.finish_kernel();
    Ok(())
}

//! Flash-attention scaffolding shared by the contiguous (`vector.rs`) and
//! the paged (`paged.rs`, float and int8 cache) attention kernels: one
//! implementation of the online softmax (running max `m`, sum `l`, rescaled
//! f32 accumulator), the UB buffers and members it needs, the UB plan that
//! picks the KV chunk, and the head checks and tiling fields every
//! attention kernel starts with. The kernels differ only in how a tile
//! finds its query position and where its K/V rows live.

use super::vector::reduce_work_bytes;
use super::{r32, TExpr, TilingField};
use crate::target::{DevType, Target};
use anyhow::{bail, Result};

/// `Init`'s buffers (K/V chunks of `{{KVT}}`; scores and reduce work sized
/// by the [`FlashTile`] plan).
const FLASH_BUFFERS: &str = r#"        pipe.InitBuffer(inQ, 1, d * sizeof(T));
        pipe.InitBuffer(inK, 2, kvTile * d * sizeof({{KVT}}));
        pipe.InitBuffer(inV, 2, kvTile * d * sizeof({{KVT}}));
        pipe.InitBuffer(outO, 2, d * sizeof(T));
        pipe.InitBuffer(qRepBuf, kvTile * d * sizeof(float));
        pipe.InitBuffer(kvfBuf, kvTile * d * sizeof(float));
        pipe.InitBuffer(accBuf, d * sizeof(float));
        pipe.InitBuffer(scBuf, {{SC_BYTES}});
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(redBuf, 32);
"#;

/// The pipe, queues and buffers of [`FLASH_BUFFERS`].
const FLASH_MEMBERS: &str = r#"    TPipe pipe;
    TQue<TPosition::VECIN, 1> inQ;
    TQue<TPosition::VECIN, 2> inK, inV;
    TQue<TPosition::VECOUT, 2> outO;
    TBuf<TPosition::VECCALC> qRepBuf, kvfBuf, accBuf, scBuf, workBuf, redBuf;
"#;

/// The DMA helpers: loading rows of one KV head.
pub(crate) const FLASH_HELPERS: &str = r#"    __aicore__ inline void Sync()
    {
        event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(e);
        WaitFlag<HardEvent::V_S>(e);
    }
    // Rows j0..j0+n of key/value head kh: n blocks of d elements, kvHeads*d apart.
    __aicore__ inline void LoadRows(TQue<TPosition::VECIN, 2>& que, const GlobalTensor<T>& g, uint32_t j0, uint32_t n, uint32_t kh)
    {
        LocalTensor<T> x = que.AllocTensor<T>();
        DataCopyParams cp;
        cp.blockCount = n;
        cp.blockLen = d * sizeof(T) / 32;
        cp.srcStride = (kvHeads - 1) * d * sizeof(T) / 32;
        cp.dstStride = 0;
        DataCopy(x, g[(j0 * kvHeads + kh) * d], cp);
        que.EnQue(x);
    }
"#;
pub(crate) const FLASH_ROW_BEGIN: &str = r#"        LocalTensor<T> qt = inQ.AllocTensor<T>();
        DataCopy(qt, qGm[tile * d], d);
        inQ.EnQue(qt);
        qt = inQ.DeQue<T>();
        LocalTensor<float> qRep = qRepBuf.Get<float>();
        ToFloat(qRep, qt, d);
        inQ.FreeTensor(qt);
        PipeBarrier<PIPE_V>();
        Muls(qRep, qRep, scale, d);
        PipeBarrier<PIPE_V>();
        for (uint32_t r = 1; r < kvTile; r++) DataCopy(qRep[r * d], qRep, d);
        LocalTensor<float> acc = accBuf.Get<float>();
        LocalTensor<float> kvf = kvfBuf.Get<float>();
        LocalTensor<float> sc = scBuf.Get<float>();
        LocalTensor<float> work = workBuf.Get<float>();
        LocalTensor<float> red = redBuf.Get<float>();
        Duplicate(acc, 0.0f, d);
        float m = -3.0e38f, l = 0.0f;
"#;
pub(crate) const FLASH_STEP: &str = r#"            // Scores s_j = (scale*q) . k_j.
            LocalTensor<T> kt = inK.DeQue<T>();
            ToFloat(kvf, kt, n * d);
            inK.FreeTensor(kt);
            PipeBarrier<PIPE_V>();
            Mul(kvf, kvf, qRep, n * d);
            PipeBarrier<PIPE_V>();
            float mc = m;
            for (uint32_t j = 0; j < n; j++) {
                ReduceSum(red, kvf[j * d], work, d);
                Sync();
                const float s = red.GetValue(0);
                sc.SetValue(j, s);
                mc = s > mc ? s : mc;
            }
            // p_j = exp(s_j - m_new); alpha = exp(m_old - m_new) rescales l and acc.
            sc.SetValue(n, m - mc);
            event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
            SetFlag<HardEvent::S_V>(e);
            WaitFlag<HardEvent::S_V>(e);
            Adds(sc, sc, -mc, n);
            PipeBarrier<PIPE_V>();
            Exp(sc, sc, n + 1);
            PipeBarrier<PIPE_V>();
            ReduceSum(red, sc, work, n);
            Sync();
            const float alpha = sc.GetValue(n);
            l = l * alpha + red.GetValue(0);
            m = mc;
            Muls(acc, acc, alpha, d);
            LocalTensor<T> vt = inV.DeQue<T>();
            ToFloat(kvf, vt, n * d);
            inV.FreeTensor(vt);
            PipeBarrier<PIPE_V>();
            for (uint32_t j = 0; j < n; j++) {
                Axpy(acc, kvf[j * d], sc.GetValue(j), d);
                PipeBarrier<PIPE_V>();
            }
"#;
pub(crate) const FLASH_ROW_END: &str = r#"        LocalTensor<T> o = outO.AllocTensor<T>();
        Muls(acc, acc, l > 0.0f ? 1.0f / l : 0.0f, d);
        PipeBarrier<PIPE_V>();
        FromFloat(o, acc, d);
        outO.EnQue(o);
        o = outO.DeQue<T>();
        DataCopy(oGm[tile * d], o, d);
        outO.FreeTensor(o);
"#;

/// The flash pieces as template variables: `FLASH_BUFFERS` and
/// `FLASH_MEMBERS` (K/V chunks of C++ type `kvt`), `FLASH_HELPERS`
/// (`LoadRows`, `Sync`), then in `Row`: `FLASH_ROW_BEGIN` (load and scale
/// the query row), `FLASH_STEP` (one chunk of `n` rows queued in `inK` /
/// `inV`) and `FLASH_ROW_END` (normalise and store).
pub(crate) fn flash_vars(kvt: &str, plan: &FlashTile) -> Vec<(&'static str, String)> {
    let buffers = super::fill(
        FLASH_BUFFERS,
        &[("KVT", kvt.into()), ("SC_BYTES", plan.sc.to_string()), ("WORK", plan.work.to_string())],
    );
    vec![
        ("FLASH_BUFFERS", buffers),
        ("FLASH_MEMBERS", FLASH_MEMBERS.into()),
        ("FLASH_HELPERS", FLASH_HELPERS.into()),
        ("FLASH_ROW_BEGIN", FLASH_ROW_BEGIN.into()),
        ("FLASH_STEP", FLASH_STEP.into()),
        ("FLASH_ROW_END", FLASH_ROW_END.into()),
    ]
}

/// Grouped-query heads: `hq` a positive multiple of `hkv`, and a head of
/// `d` elements whole 32-byte blocks in `t` and in f32.
pub(crate) fn check_heads(name: &str, hq: u64, hkv: u64, d: u64, t: DevType) -> Result<()> {
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        bail!("{name}: {hq} query heads are not a multiple of {hkv} kv heads");
    }
    super::vector::need_aligned_for(name, "a head", d, t)?;
    super::vector::need_aligned_for(name, "a head in f32", d, DevType::F32)
}

/// The tiling fields of an attention kernel: the tile count, the head
/// sizes, the kernel's own `sizes` (KV length or paged-cache sizes), the
/// KV chunk and the softmax scale, in that order.
pub(crate) fn flash_fields(
    tiles: &TExpr,
    (hq, hkv, d): (u64, u64, u64),
    sizes: Vec<TilingField>,
    plan: &FlashTile,
    scale: f64,
) -> Vec<TilingField> {
    let mut fields = super::vector::tiles_fields(tiles);
    fields.push(TilingField::u32("qHeads", TExpr::c(hq)));
    fields.push(TilingField::u32("kvHeads", TExpr::c(hkv)));
    fields.push(TilingField::u32("headDim", TExpr::c(d)));
    fields.extend(sizes);
    fields.push(TilingField::u32("kvTile", TExpr::c(plan.kv_tile)));
    fields.push(TilingField::f32("scale", scale));
    fields
}

/// UB plan of a flash-attention kernel: KV rows per chunk and the bytes of
/// its buffers.
pub(crate) struct FlashTile {
    pub kv_tile: u64,
    pub ub: u64,
    /// Scores buffer (one f32 per chunk row plus the rescale factor).
    pub sc: u64,
    /// ReduceSum work buffer.
    pub work: u64,
}

/// The largest KV chunk of at most `max_rows` rows (tried from 128 down to
/// 8) whose buffers fit the UB, for heads of `d` elements of `t`.
/// K/V chunks are of dtype `kv_t`; `extra(kv_rows)` adds a variant's own
/// buffers (the int8 cache's antiquant staging).
pub(crate) fn flash_tile(
    name: &str,
    target: Target,
    d: u64,
    t: DevType,
    kv_t: DevType,
    extra: impl Fn(u64) -> u64,
    max_rows: u64,
) -> Result<FlashTile> {
    let cap = target.capacity().ub;
    let plan = |kv: u64| {
        let sc = r32((kv + 1) * 4).max(64);
        let work = reduce_work_bytes(kv.max(d));
        let ub = r32(d * t.size())
            + 4 * r32(kv * d * kv_t.size())
            + 2 * r32(d * t.size())
            + 2 * r32(kv * d * 4)
            + r32(d * 4)
            + sc
            + work
            + 32
            + extra(kv);
        FlashTile { kv_tile: kv, ub, sc, work }
    };
    [128u64, 64, 32, 16, 8]
        .into_iter()
        .filter(|kv| *kv <= max_rows)
        .map(plan)
        .find(|p| p.ub <= cap)
        .ok_or_else(|| anyhow::anyhow!("{name}: cannot be tiled for {target}: head_dim {d} is too large for the UB"))
}

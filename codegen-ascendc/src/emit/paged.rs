//! Paged attention over a ragged batch (the IR op `paged_attention`).
//!
//! The contiguous attention kernel's online softmax (the `FLASH_*` pieces of
//! [`super::vector`]) over a paged KV cache `[num_blocks, block_size,
//! kv_heads, head_dim]`: each (token, query head) tile finds its sequence in
//! `query_start_loc`, its position from the sequence's context length, and
//! reads the keys and values it may see block by block through the
//! sequence's block-table row. One strided DMA moves the rows of one KV head
//! inside one block (at most `kvTile` rows; a chunk never crosses a block),
//! so the block size is a tiling parameter and blocks may lie anywhere.

use super::vector::{flash_tile, flash_vars, need_aligned, tiles_fields, vector_kernel, vector_source, FlashTile};
use super::{Ctx, DeviceKernels, Role, TExpr, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};

const PAGED_ATTENTION: &str = r#"
using T = {{T}};
using M = {{M}};

// Paged causal GQA attention, FlashAttention style: one (token, query head)
// per tile. Rows qsl[s]..qsl[s+1] belong to sequence s, whose ctx[s] cached
// tokens (this step's included) live in blocks table[s, 0..]; row i of the
// sequence sits at position ctx[s] - (qsl[s+1] - qsl[s]) + i and sees keys
// 0..=position. Keys and values stream through UB one block chunk (at most
// kvTile rows, never crossing a block) at a time with an online softmax.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR table, GM_ADDR qsl, GM_ADDR ctxLens, GM_ADDR out, const {{TILING}}& t)
    {
        d = t.headDim;
        qHeads = t.qHeads;
        kvHeads = t.kvHeads;
        blockSize = t.blockSize;
        numBlocks = t.numBlocks;
        maxBlocks = t.maxBlocks;
        seqs = t.seqs;
        kvTile = t.kvTile;
        scale = t.scale;
{{RANGE}}
        qGm.SetGlobalBuffer((__gm__ T*)q, t.tiles * d);
        oGm.SetGlobalBuffer((__gm__ T*)out, t.tiles * d);
        kGm.SetGlobalBuffer((__gm__ T*)k, numBlocks * blockSize * kvHeads * d);
        vGm.SetGlobalBuffer((__gm__ T*)v, numBlocks * blockSize * kvHeads * d);
        tableGm.SetGlobalBuffer((__gm__ M*)table, seqs * maxBlocks);
        qslGm.SetGlobalBuffer((__gm__ M*)qsl, seqs + 1);
        ctxGm.SetGlobalBuffer((__gm__ M*)ctxLens, seqs);
        pipe.InitBuffer(inQ, 1, d * sizeof(T));
        pipe.InitBuffer(inK, 2, kvTile * d * sizeof(T));
        pipe.InitBuffer(inV, 2, kvTile * d * sizeof(T));
        pipe.InitBuffer(outO, 2, d * sizeof(T));
        pipe.InitBuffer(qRepBuf, kvTile * d * sizeof(float));
        pipe.InitBuffer(kvfBuf, kvTile * d * sizeof(float));
        pipe.InitBuffer(accBuf, d * sizeof(float));
        pipe.InitBuffer(scBuf, {{SC_BYTES}});
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(redBuf, 32);
    }
    __aicore__ inline void Process()
    {
        // Tiles ascend, so this block's sequence index only moves forward.
        uint32_t s = 0;
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t tok = tile / qHeads;
            while (s + 1 < seqs && static_cast<uint32_t>(qslGm.GetValue(s + 1)) <= tok) s++;
            const uint32_t kh = (tile % qHeads) / (qHeads / kvHeads);
            // visible = position + 1 = ctx - (rows of the sequence after this one).
            const int64_t rowsAfter = static_cast<int64_t>(qslGm.GetValue(s + 1)) - static_cast<int64_t>(tok);
            const int64_t p = static_cast<int64_t>(ctxGm.GetValue(s)) - rowsAfter + 1;
            const int64_t cap = static_cast<int64_t>(maxBlocks) * blockSize;
            const uint32_t visible = p < 0 ? 0 : static_cast<uint32_t>(p < cap ? p : cap);
            Row(tile, kh, s, visible);
        }
    }

private:
{{FLASH_HELPERS}}    __aicore__ inline void Row(uint32_t tile, uint32_t kh, uint32_t seq, uint32_t visible)
    {
{{FLASH_ROW_BEGIN}}        uint32_t j0 = 0;
        while (j0 < visible) {
            // Context rows j0.. live in block table[seq, j0 / blockSize] from
            // offset j0 % blockSize on: one DMA per (block, KV head) chunk.
            const uint32_t off = j0 % blockSize;
            const uint32_t n = MinU(MinU(kvTile, blockSize - off), visible - j0);
            int64_t blk = static_cast<int64_t>(tableGm.GetValue(seq * maxBlocks + j0 / blockSize));
            // A block outside the cache (the runtime never sends one) reads block 0.
            if (blk < 0 || blk >= static_cast<int64_t>(numBlocks)) blk = 0;
            const uint32_t row = static_cast<uint32_t>(blk) * blockSize + off;
            LoadRows(inK, kGm, row, n, kh);
            LoadRows(inV, vGm, row, n, kh);
{{FLASH_STEP}}            j0 += n;
        }
{{FLASH_ROW_END}}    }

    TPipe pipe;
    TQue<TPosition::VECIN, 1> inQ;
    TQue<TPosition::VECIN, 2> inK, inV;
    TQue<TPosition::VECOUT, 2> outO;
    TBuf<TPosition::VECCALC> qRepBuf, kvfBuf, accBuf, scBuf, workBuf, redBuf;
    GlobalTensor<T> qGm, kGm, vGm, oGm;
    GlobalTensor<M> tableGm, qslGm, ctxGm;
    uint32_t d = 0, qHeads = 0, kvHeads = 0, blockSize = 0, numBlocks = 0, maxBlocks = 0, seqs = 0;
    uint32_t kvTile = 0, start = 0, end = 0;
    float scale = 0.0f;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR table, GM_ADDR qsl, GM_ADDR ctxLens, GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(q, k, v, table, qsl, ctxLens, out, t);
    op.Process();
}
"#;

/// `PagedAttention (q[T, Hq, D], k_cache[NB, BS, Hkv, D], v_cache[same],
/// block_table[S, MB], query_start_loc[S+1], context_lens[S], out[T, Hq, D])`;
/// the metadata are i32 (Ascend's convention) or i64 on the device.
pub(crate) fn paged_attention(ctx: &Ctx, scale: f64) -> Result<DeviceKernels> {
    let (hq, d) = (ctx.cdim(0, 1, "query heads")?, ctx.cdim(0, 2, "head_dim")?);
    if ctx.rank(1) != 4 || ctx.rank(2) != 4 {
        bail!("{}: the paged caches must be [num_blocks, block_size, kv_heads, head_dim]", ctx.k.name);
    }
    let block_size = ctx.cdim(1, 1, "block size")?;
    let hkv = ctx.cdim(1, 2, "kv heads")?;
    if ctx.cdim(1, 3, "cache head_dim")? != d {
        bail!("{}: the cache head_dim differs from the query's {d}", ctx.k.name);
    }
    let t = ctx.dt[0];
    if hkv == 0 || hq % hkv != 0 {
        bail!("{}: {hq} query heads are not a multiple of {hkv} kv heads", ctx.k.name);
    }
    if ctx.dt[1] != t || ctx.dt[2] != t || ctx.dt[6] != t {
        bail!("{}: q, the caches and out must share one dtype", ctx.k.name);
    }
    let meta = ctx.dt[3];
    for (i, name) in [(3, "block_table"), (4, "query_start_loc"), (5, "context_lens")] {
        if !matches!(ctx.dt[i], DevType::I32 | DevType::I64) || ctx.dt[i] != meta {
            bail!("{}: {name} must be i32 or i64 like the block table on the device, found {}", ctx.k.name, ctx.dt[i]);
        }
    }
    if block_size == 0 {
        bail!("{}: the block size must be positive", ctx.k.name);
    }
    need_aligned(ctx, "a head", d, t)?;
    need_aligned(ctx, "a head in f32", d, DevType::F32)?;
    let FlashTile { kv_tile, ub, sc, work } = flash_tile(ctx, d, t, 128)?;
    let tiles = ctx.dims(0, 0, 2)?;
    let entry = ctx.entry("");
    let src = vector_source(
        &entry,
        "PagedAttention (ragged batch, paged KV cache, flash online softmax, GQA), in f32.",
        PAGED_ATTENTION,
        &[
            &[
                ("T", t.cpp().into()),
                ("M", meta.cpp().into()),
                ("SC_BYTES", sc.to_string()),
                ("WORK", work.to_string()),
            ][..],
            &flash_vars(),
        ]
        .concat(),
    );
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("qHeads", TExpr::c(hq)));
    fields.push(TilingField::u32("kvHeads", TExpr::c(hkv)));
    fields.push(TilingField::u32("headDim", TExpr::c(d)));
    fields.push(TilingField::u32("blockSize", TExpr::c(block_size)));
    fields.push(TilingField::u32("numBlocks", ctx.dim(1, 0)?));
    fields.push(TilingField::u32("maxBlocks", ctx.dim(3, 1)?));
    fields.push(TilingField::u32("seqs", ctx.dim(5, 0)?));
    fields.push(TilingField::u32("kvTile", TExpr::c(kv_tile)));
    fields.push(TilingField::f32("scale", scale));
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = vec![
        ctx.param("q", 0, Role::Input),
        ctx.param("k", 1, Role::Input),
        ctx.param("v", 2, Role::Input),
        ctx.param("table", 3, Role::Input),
        ctx.param("qsl", 4, Role::Input),
        ctx.param("ctxLens", 5, Role::Input),
        ctx.param("out", 6, Role::Output),
    ];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

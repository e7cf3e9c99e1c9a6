//! Paged attention over a ragged batch (the IR op `paged_attention`).
//!
//! The contiguous attention kernel's online softmax (the `FLASH_*` pieces of
//! [`super::flash`]) over a paged KV cache `[num_blocks, block_size,
//! kv_heads, head_dim]`: each (token, query head) tile finds its sequence in
//! `query_start_loc`, its position from the sequence's context length, and
//! reads the keys and values it may see block by block through the
//! sequence's block-table row. One strided DMA moves the rows of one KV head
//! inside one block (at most `kvTile` rows; a chunk never crosses a block),
//! so the block size is a tiling parameter and blocks may lie anywhere.

use super::flash::{check_heads, flash_fields, flash_tile, flash_vars, FlashTile};
use super::vector::{need_aligned_for, vector_kernel, vector_source};
use super::{r32, ArgRef, Ctx, DeviceKernels, Param, Role, TExpr, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};

const PAGED_ATTENTION: &str = r#"
using T = {{T}};
using M = {{M}};{{KV_USING}}

// Paged causal GQA attention, FlashAttention style: one (token, query head)
// per tile. Rows qsl[s]..qsl[s+1] belong to sequence s, whose ctx[s] cached
// tokens (this step's included) live in blocks table[s, 0..]; row i of the
// sequence sits at position ctx[s] - (qsl[s+1] - qsl[s]) + i and sees keys
// 0..=position. Keys and values stream through UB one block chunk (at most
// kvTile rows, never crossing a block) at a time with an online softmax.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR table, GM_ADDR qsl, GM_ADDR ctxLens, {{AQ_PARAM}}GM_ADDR out, const {{TILING}}& t)
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
        kGm.SetGlobalBuffer((__gm__ {{KVT}}*)k, numBlocks * blockSize * kvHeads * d);
        vGm.SetGlobalBuffer((__gm__ {{KVT}}*)v, numBlocks * blockSize * kvHeads * d);
        tableGm.SetGlobalBuffer((__gm__ M*)table, seqs * maxBlocks);
        qslGm.SetGlobalBuffer((__gm__ M*)qsl, seqs + 1);
        ctxGm.SetGlobalBuffer((__gm__ M*)ctxLens, seqs);
{{FLASH_BUFFERS}}{{AQ_INIT}}    }
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

{{FLASH_MEMBERS}}    GlobalTensor<T> qGm, {{KV_GM}}oGm;
{{AQ_MEMBERS}}    GlobalTensor<M> tableGm, qslGm, ctxGm;
    uint32_t d = 0, qHeads = 0, kvHeads = 0, blockSize = 0, numBlocks = 0, maxBlocks = 0, seqs = 0;
    uint32_t kvTile = 0, start = 0, end = 0;
    float scale = 0.0f;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR table, GM_ADDR qsl, GM_ADDR ctxLens, {{AQ_PARAM}}GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(q, k, v, table, qsl, ctxLens, {{AQ_ARG}}out, t);
    op.Process();
}
"#;

/// The sizes of one paged attention kernel.
#[derive(Debug, Clone)]
pub struct PagedDims {
    pub q_heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub block_size: u64,
    /// Rows of q and out (`tokens`).
    pub tokens: TExpr,
    pub num_blocks: TExpr,
    pub max_blocks: TExpr,
    pub seqs: TExpr,
}

impl PagedDims {
    /// The sizes of a paged attention program kernel, whose arguments are
    /// q, k_cache, v_cache, block_table, query_start_loc, context_lens, ...
    pub(crate) fn of(ctx: &Ctx, q_heads: u64, kv_heads: u64, head_dim: u64, block_size: u64) -> Result<PagedDims> {
        Ok(PagedDims {
            q_heads,
            kv_heads,
            head_dim,
            block_size,
            tokens: ctx.dim(0, 0)?,
            num_blocks: ctx.dim(1, 0)?,
            max_blocks: ctx.dim(3, 1)?,
            seqs: ctx.dim(5, 0)?,
        })
    }
}

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
    if ctx.dt[1] != t || ctx.dt[2] != t || ctx.dt[6] != t {
        bail!("{}: q, the caches and out must share one dtype", ctx.k.name);
    }
    let meta = ctx.dt[3];
    for (i, name) in [(3, "block_table"), (4, "query_start_loc"), (5, "context_lens")] {
        if ctx.dt[i] != meta {
            bail!("{}: {name} must be i32 or i64 like the block table on the device, found {}", ctx.k.name, ctx.dt[i]);
        }
    }
    let dims = PagedDims::of(ctx, hq, hkv, d, block_size)?;
    let dk = paged_kernel(&ctx.k.name, ctx.target(), &dims, t, meta, scale, false)?;
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

/// Paged decode/prefill attention over an int8 KV cache with the
/// antiquant inside the kernel: `(q[T, Hq, D], k_cache i8[NB, BS, Hkv, D],
/// v_cache i8[same], block_table, query_start_loc, context_lens,
/// k_scale f32[Hkv*D], k_offset f32[Hkv*D], v_scale, v_offset, out[T, Hq, D])`.
/// Each K/V chunk is dequantised in f32 as `(q - offset) * scale` per
/// channel (the `Dequantize` op's arithmetic) right after its DMA, so the
/// cache moves half the bytes of the f16/bf16 one; the rest is the float
/// kernel's online softmax. Argument `i` is `ArgRef::Orig(i)`.
pub fn paged_attention_int8(
    name: &str,
    dims: &PagedDims,
    act: DevType,
    meta: DevType,
    scale: f64,
    o: &super::EmitOptions,
) -> Result<DeviceKernels> {
    o.target.check_act(act).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let dk = paged_kernel(name, o.target, dims, act, meta, scale, true)?;
    dk.mem.check(o.target, &format!("kernel `{name}` ({})", dk.entry))?;
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

/// Antiquant of one int8 K or V chunk of `n` rows of KV head `kh` into
/// f32 `dst`: int8 -> half -> f32 (exact), then per channel
/// `(x - offset) * scale` with the head's slice of the parameters.
const ANTIQUANT: &str = r#"    __aicore__ inline void Antiquant(const LocalTensor<float>& dst, const LocalTensor<KV>& src, uint32_t n, uint32_t kh,
                                     const LocalTensor<float>& sc, const LocalTensor<float>& of)
    {
        LocalTensor<half> h = aqHalfBuf.Get<half>();
        Cast(h, src, RoundMode::CAST_NONE, n * d);
        PipeBarrier<PIPE_V>();
        Cast(dst, h, RoundMode::CAST_NONE, n * d);
        PipeBarrier<PIPE_V>();
        for (uint32_t j = 0; j < n; j++) {
            Sub(dst[j * d], dst[j * d], of[kh * d], d);
            PipeBarrier<PIPE_V>();
            Mul(dst[j * d], dst[j * d], sc[kh * d], d);
            PipeBarrier<PIPE_V>();
        }
    }
"#;

/// [`ANTIQUANT`] for heads shorter than a 32-byte int8 block: the chunk
/// holds whole slot rows (every KV head, `kvHeads * d` bytes each); all of
/// it is widened, then head `kh`'s part of each row is dequantised into
/// row `j` of `dst`.
const ANTIQUANT_ROWS: &str = r#"    __aicore__ inline void Antiquant(const LocalTensor<float>& dst, const LocalTensor<KV>& src, uint32_t n, uint32_t kh,
                                     const LocalTensor<float>& sc, const LocalTensor<float>& of)
    {
        const uint32_t row = kvHeads * d;
        LocalTensor<half> h = aqHalfBuf.Get<half>();
        LocalTensor<float> wide = aqWideBuf.Get<float>();
        Cast(h, src, RoundMode::CAST_NONE, n * row);
        PipeBarrier<PIPE_V>();
        Cast(wide, h, RoundMode::CAST_NONE, n * row);
        PipeBarrier<PIPE_V>();
        for (uint32_t j = 0; j < n; j++) {
            Sub(dst[j * d], wide[j * row + kh * d], of[kh * d], d);
            PipeBarrier<PIPE_V>();
            Mul(dst[j * d], dst[j * d], sc[kh * d], d);
            PipeBarrier<PIPE_V>();
        }
    }
"#;

const AQ_INIT: &str = r#"        // Per-channel K/V antiquant parameters, [kvHeads * d] each, loaded once.
{{AQ_STAGE}}        pipe.InitBuffer(inAq, 1, kvHeads * d * sizeof(float));
        pipe.InitBuffer(aqBuf, 4 * kvHeads * d * sizeof(float));
        GM_ADDR aq[4] = {kS, kO, vS, vO};
        LocalTensor<float> all = aqBuf.Get<float>();
        for (uint32_t i = 0; i < 4; i++) {
            GlobalTensor<float> g;
            g.SetGlobalBuffer((__gm__ float*)aq[i], kvHeads * d);
            LocalTensor<float> p = inAq.AllocTensor<float>();
            DataCopy(p, g, kvHeads * d);
            inAq.EnQue(p);
            p = inAq.DeQue<float>();
            DataCopy(all[i * kvHeads * d], p, kvHeads * d);
            inAq.FreeTensor(p);
        }
        PipeBarrier<PIPE_V>();
        kSc = all;
        kOf = all[kvHeads * d];
        vSc = all[2 * kvHeads * d];
        vOf = all[3 * kvHeads * d];
"#;

const AQ_MEMBERS: &str = "    GlobalTensor<KV> kGm, vGm;
    TQue<TPosition::VECIN, 1> inAq;
    TBuf<TPosition::VECCALC> aqHalfBuf, aqBuf{{AQ_WIDE}};
    LocalTensor<float> kSc, kOf, vSc, vOf;
";

/// The flash pieces for an int8 cache: K/V chunks move as int8 and are
/// dequantised by [`ANTIQUANT`] instead of widened by `ToFloat`.
/// With `whole_rows` (int8 heads shorter than a 32-byte block) each chunk
/// moves whole slot rows in one DMA and [`ANTIQUANT_ROWS`] picks the head.
fn flash_vars_int8(plan: &FlashTile, whole_rows: bool) -> Vec<(&'static str, String)> {
    let swap = |s: &str, reps: &[(&str, &str)]| {
        let mut s = s.to_string();
        for (a, b) in reps {
            assert_eq!(s.matches(a).count(), 1, "flash template changed: `{a}`");
            s = s.replace(a, b);
        }
        s
    };
    flash_vars("KV", plan)
        .into_iter()
        .map(|(k, v)| {
            let v = match k {
                "FLASH_HELPERS" if whole_rows => {
                    swap(
                        &v,
                        &[
                            ("const GlobalTensor<T>& g", "const GlobalTensor<KV>& g"),
                            ("LocalTensor<T> x = que.AllocTensor<T>();", "LocalTensor<KV> x = que.AllocTensor<KV>();"),
                            ("cp.blockCount = n;", "cp.blockCount = 1;"),
                            ("cp.blockLen = d * sizeof(T) / 32;", "cp.blockLen = n * kvHeads * d * sizeof(KV) / 32;"),
                            ("cp.srcStride = (kvHeads - 1) * d * sizeof(T) / 32;", "cp.srcStride = 0;"),
                            ("g[(j0 * kvHeads + kh) * d]", "g[j0 * kvHeads * d]"),
                        ],
                    ) + ANTIQUANT_ROWS
                }
                "FLASH_HELPERS" => {
                    swap(
                        &v,
                        &[
                            ("const GlobalTensor<T>& g", "const GlobalTensor<KV>& g"),
                            ("LocalTensor<T> x = que.AllocTensor<T>();", "LocalTensor<KV> x = que.AllocTensor<KV>();"),
                            ("cp.blockLen = d * sizeof(T) / 32;", "cp.blockLen = d * sizeof(KV) / 32;"),
                            (
                                "cp.srcStride = (kvHeads - 1) * d * sizeof(T) / 32;",
                                "cp.srcStride = (kvHeads - 1) * d * sizeof(KV) / 32;",
                            ),
                        ],
                    ) + ANTIQUANT
                }
                "FLASH_BUFFERS" if whole_rows => swap(
                    &v,
                    &[
                        ("inK, 2, kvTile * d * sizeof(KV)", "inK, 2, kvTile * kvHeads * d * sizeof(KV)"),
                        ("inV, 2, kvTile * d * sizeof(KV)", "inV, 2, kvTile * kvHeads * d * sizeof(KV)"),
                    ],
                ),
                "FLASH_STEP" => swap(
                    &v,
                    &[
                        (
                            "LocalTensor<T> kt = inK.DeQue<T>();\n            ToFloat(kvf, kt, n * d);",
                            "LocalTensor<KV> kt = inK.DeQue<KV>();\n            Antiquant(kvf, kt, n, kh, kSc, kOf);",
                        ),
                        (
                            "LocalTensor<T> vt = inV.DeQue<T>();\n            ToFloat(kvf, vt, n * d);",
                            "LocalTensor<KV> vt = inV.DeQue<KV>();\n            Antiquant(kvf, vt, n, kh, vSc, vOf);",
                        ),
                    ],
                ),
                _ => v,
            };
            (k, v)
        })
        .collect()
}

fn paged_kernel(
    name: &str,
    target: crate::target::Target,
    dims: &PagedDims,
    t: DevType,
    meta: DevType,
    scale: f64,
    int8: bool,
) -> Result<super::DeviceKernel> {
    let PagedDims { q_heads: hq, kv_heads: hkv, head_dim: d, block_size, .. } = *dims;
    check_heads(name, hq, hkv, d, t)?;
    if !matches!(meta, DevType::I32 | DevType::I64) {
        bail!("{name}: block_table must be i32 or i64 on the device, found {meta}");
    }
    if block_size == 0 {
        bail!("{name}: the block size must be positive");
    }
    let kv_t = if int8 { DevType::I8 } else { t };
    // Int8 heads shorter than a 32-byte block (the tiny preset's 16) move
    // as whole slot rows, which must be whole blocks, and each head's f32
    // part of a widened row must start on a block.
    let whole_rows = int8 && !d.is_multiple_of(32);
    if whole_rows {
        need_aligned_for(name, "an int8 slot row (every KV head)", hkv * d, DevType::I8)?;
        need_aligned_for(name, "an int8 head widened to f32", d, DevType::F32)?;
    }
    // int8: the half staging buffer of a chunk and the four parameter rows;
    // whole rows: the K/V chunks' other heads and the f32 widened chunk.
    let extra = |kv: u64| match (int8, whole_rows) {
        (false, _) => 0,
        (true, false) => r32(kv * d * 2) + r32(hkv * d * 4) + r32(4 * hkv * d * 4),
        (true, true) => {
            let row = hkv * d;
            4 * (r32(kv * row) - r32(kv * d)) + r32(kv * row * 2) + r32(kv * row * 4) + r32(row * 4) + r32(4 * row * 4)
        }
    };
    let plan = flash_tile(name, target, d, t, kv_t, extra, 128)?;
    let tiles = dims.tokens.clone().times(TExpr::c(hq));
    let entry = name.to_string();
    let on = |s: &str, f: &str| if int8 { s.to_string() } else { f.to_string() };
    let flash = if int8 { flash_vars_int8(&plan, whole_rows) } else { flash_vars("T", &plan) };
    let aq_stage = if whole_rows {
        "        pipe.InitBuffer(aqHalfBuf, kvTile * kvHeads * d * sizeof(half));\n        pipe.InitBuffer(aqWideBuf, kvTile * kvHeads * d * sizeof(float));\n"
    } else {
        "        pipe.InitBuffer(aqHalfBuf, kvTile * d * sizeof(half));\n"
    };
    let what = if int8 {
        "PagedAttention (ragged batch, paged int8 KV cache with per-channel antiquant, flash online softmax, GQA), in f32."
    } else {
        "PagedAttention (ragged batch, paged KV cache, flash online softmax, GQA), in f32."
    };
    let src = vector_source(
        &entry,
        what,
        PAGED_ATTENTION,
        &[
            &[
                ("T", t.cpp().into()),
                ("M", meta.cpp().into()),
                ("KV_USING", on("\nusing KV = int8_t;", "")),
                ("KVT", on("KV", "T")),
                ("AQ_PARAM", on("GM_ADDR kS, GM_ADDR kO, GM_ADDR vS, GM_ADDR vO, ", "")),
                ("AQ_ARG", on("kS, kO, vS, vO, ", "")),
                ("AQ_INIT", on(&AQ_INIT.replace("{{AQ_STAGE}}", aq_stage), "")),
                ("KV_GM", on("", "kGm, vGm, ")),
                ("AQ_MEMBERS", on(&AQ_MEMBERS.replace("{{AQ_WIDE}}", if whole_rows { ", aqWideBuf" } else { "" }), "")),
            ][..],
            &flash,
        ]
        .concat(),
    );
    let sizes = vec![
        TilingField::u32("blockSize", TExpr::c(block_size)),
        TilingField::u32("numBlocks", dims.num_blocks.clone()),
        TilingField::u32("maxBlocks", dims.max_blocks.clone()),
        TilingField::u32("seqs", dims.seqs.clone()),
    ];
    let fields = flash_fields(&tiles, (hq, hkv, d), sizes, &plan, scale);
    let mut dk = vector_kernel(entry, src, fields, &tiles, plan.ub);
    let p = |n: &str, dtype: DevType, role: Role, i: usize| Param::new(n, dtype, role, ArgRef::Orig(i));
    dk.params = vec![
        p("q", t, Role::Input, 0),
        p("k", kv_t, Role::Input, 1),
        p("v", kv_t, Role::Input, 2),
        p("table", meta, Role::Input, 3),
        p("qsl", meta, Role::Input, 4),
        p("ctxLens", meta, Role::Input, 5),
    ];
    if int8 {
        for (i, n) in ["kS", "kO", "vS", "vO"].into_iter().enumerate() {
            dk.params.push(p(n, DevType::F32, Role::Input, 6 + i));
        }
        dk.params.push(p("out", t, Role::Output, 10));
    } else {
        dk.params.push(p("out", t, Role::Output, 6));
    }
    Ok(dk)
}

//! RoPE tables and the fused QKV split + RoPE + KV-cache append.
//!
//! `RopeTable` computes `cos`/`sin` of `pos * inv_freq` on the vector unit
//! (AscendC's `Cos`/`Sin` math API). Why on the device and not on the host:
//! the positions live in device memory and the tables are ordinary kernel
//! outputs of the program, so the host program stays a plain launcher; the
//! inverse frequencies are constants of the model and travel in the tiling
//! struct (computed in f64 and rounded to f32 here, like HF's f32 tables).

use super::vector::{need_aligned, tiles_fields, vector_kernel, vector_source};
use super::{r32, Ctx, DeviceKernels, Role, TExpr, TilingField};
use crate::target::DevType;
use anyhow::{bail, Result};
use panguc_ir::op::RopeKind;

const ROPE_TABLE: &str = r#"
using T = {{T}};

// out[i, :] = {{FN}}(pos[i] * invFreq[j % half]) for j in 0..headDim; one
// position per tile. invFreq (f32) comes from the tiling struct.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR pos, GM_ADDR out, const {{TILING}}& t)
    {
        d = t.headDim;
{{RANGE}}
        posGm.SetGlobalBuffer((__gm__ {{P}}*)pos, t.tiles);
        outGm.SetGlobalBuffer((__gm__ T*)out, t.tiles * d);
        pipe.InitBuffer(outQ, 2, d * sizeof(T));
        pipe.InitBuffer(freqBuf, d * sizeof(float));
        pipe.InitBuffer(angBuf, d * sizeof(float));
        pipe.InitBuffer(resBuf, d * sizeof(float));
        LocalTensor<float> freq = freqBuf.Get<float>();
        const uint32_t half = d / 2;
        for (uint32_t i = 0; i < half; i++) {
            freq.SetValue(i, t.invFreq[i]);
            freq.SetValue(i + half, t.invFreq[i]);
        }
    }
    __aicore__ inline void Process()
    {
        if (start >= end) return;
        event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(e);
        WaitFlag<HardEvent::S_V>(e);
        LocalTensor<float> freq = freqBuf.Get<float>();
        LocalTensor<float> ang = angBuf.Get<float>();
        LocalTensor<float> res = resBuf.Get<float>();
        for (uint32_t i = start; i < end; i++) {
            const float p = static_cast<float>(posGm.GetValue(i));
            Muls(ang, freq, p, d);
            PipeBarrier<PIPE_V>();
            {{FN}}(res, ang, d);
            PipeBarrier<PIPE_V>();
            LocalTensor<T> y = outQ.AllocTensor<T>();
            FromFloat(y, res, d);
            outQ.EnQue(y);
            y = outQ.DeQue<T>();
            DataCopy(outGm[i * d], y, d);
            outQ.FreeTensor(y);
        }
    }

private:
    TPipe pipe;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> freqBuf, angBuf, resBuf;
    GlobalTensor<{{P}}> posGm;
    GlobalTensor<T> outGm;
    uint32_t d = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR pos, GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(pos, out, t);
    op.Process();
}
"#;

/// `RopeTable (positions[T] i64 (or i32 in a ragged step), out[T, head_dim])`.
pub(crate) fn rope_table(ctx: &Ctx, kind: RopeKind, theta: f64, head_dim: usize) -> Result<DeviceKernels> {
    let d = ctx.cdim(1, 1, "head_dim")?;
    if d != head_dim as u64 || d % 2 != 0 {
        bail!("{}: table width {d} must be the even head_dim {head_dim}", ctx.k.name);
    }
    let t = ctx.dt[1];
    let p = ctx.dt[0];
    if !matches!(p, DevType::I64 | DevType::I32) {
        bail!("{}: positions must be i64 or i32 on the device, found {p}", ctx.k.name);
    }
    need_aligned(ctx, "a table row", d, t)?;
    need_aligned(ctx, "a table row in f32", d, DevType::F32)?;
    let inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64)).collect();
    let f = match kind {
        RopeKind::Cos => "Cos",
        RopeKind::Sin => "Sin",
    };
    let tiles = ctx.dim(0, 0)?;
    let entry = ctx.entry("");
    let src = vector_source(
        &entry,
        &format!("RoPE {f} table."),
        ROPE_TABLE,
        &[("T", t.cpp().into()), ("FN", f.into()), ("P", p.cpp().into())],
    );
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("headDim", TExpr::c(d)));
    fields.push(TilingField::f32_array("invFreq", inv_freq));
    let ub = 2 * r32(d * t.size()) + 3 * r32(d * 4);
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = vec![ctx.param("pos", 0, Role::Input), ctx.param("out", 1, Role::Output)];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

/// RoPE (NeoX rotate-half) of one head of the merged QKV row at `src`
/// into `xf` (f32), and `RopeHead` storing it at `dst[dstOff]` in the
/// activation dtype; shared by the contiguous, paged and int8 KV writes.
/// `csf` holds the token's cos then sin row in f32.
pub(crate) const ROPE_HEAD: &str = r#"    __aicore__ inline void RopeF32(uint32_t src, const LocalTensor<float>& csf)
    {
        const uint32_t half = d / 2;
        LocalTensor<T> x = inX.AllocTensor<T>();
        DataCopy(x, yGm[src], d);
        inX.EnQue(x);
        x = inX.DeQue<T>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> rot = rotBuf.Get<float>();
        ToFloat(xf, x, d);
        inX.FreeTensor(x);
        PipeBarrier<PIPE_V>();
        Muls(rot, xf[half], -1.0f, half);
        DataCopy(rot[half], xf, half);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, csf, d);
        Mul(rot, rot, csf[d], d);
        PipeBarrier<PIPE_V>();
        Add(xf, xf, rot, d);
        PipeBarrier<PIPE_V>();
    }
    __aicore__ inline void RopeHead(uint32_t src, const GlobalTensor<T>& dst, uint32_t dstOff, const LocalTensor<float>& csf)
    {
        RopeF32(src, csf);
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<T> y = outY.AllocTensor<T>();
        FromFloat(y, xf, d);
        outY.EnQue(y);
        y = outY.DeQue<T>();
        DataCopy(dst[dstOff], y, d);
        outY.FreeTensor(y);
    }
"#;

/// The int8 (C8) cache write of one token's k and v rows (all KV heads,
/// contiguous in a slot): the roped k heads are rounded to the activation
/// dtype (what the unfused rope stores) and gathered into `kvf`, then each
/// row is quantized per channel, `clamp(rint(x / scale + offset))`, with
/// the scales loaded once per block.
const INT8_KV_STORE: &str = r#"    __aicore__ inline void LoadChannels(const GlobalTensor<float>& g, const LocalTensor<float>& dst)
    {
        LocalTensor<float> p = inP.AllocTensor<float>();
        DataCopy(p, g, kvHeads * d);
        inP.EnQue(p);
        p = inP.DeQue<float>();
        DataCopy(dst, p, kvHeads * d);
        inP.FreeTensor(p);
        PipeBarrier<PIPE_V>();
    }
    __aicore__ inline void QuantStore(const LocalTensor<float>& xf, const LocalTensor<float>& sc, const LocalTensor<float>& of, const GlobalTensor<int8_t>& dst, uint32_t off)
    {
        const uint32_t cols = kvHeads * d;
        Div(xf, xf, sc, cols);
        PipeBarrier<PIPE_V>();
        Add(xf, xf, of, cols);
        PipeBarrier<PIPE_V>();
{{TO_INT8}}    }
    __aicore__ inline void StoreKv(uint32_t row, uint32_t cacheRow, const LocalTensor<float>& csf)
    {
        LocalTensor<float> kvf = kvBuf.Get<float>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<T> rt = rtBuf.Get<T>();
        for (uint32_t h = 0; h < kvHeads; h++) {
            RopeF32(row + (qHeads + h) * d, csf);
            FromFloat(rt, xf, d);
            PipeBarrier<PIPE_V>();
            ToFloat(kvf[h * d], rt, d);
            PipeBarrier<PIPE_V>();
        }
        QuantStore(kvf, kScBuf.Get<float>(), kOfBuf.Get<float>(), kGm, cacheRow);
        LocalTensor<T> v = inV.AllocTensor<T>();
        DataCopy(v, yGm[row + (qHeads + kvHeads) * d], kvHeads * d);
        inV.EnQue(v);
        v = inV.DeQue<T>();
        ToFloat(kvf, v, kvHeads * d);
        inV.FreeTensor(v);
        PipeBarrier<PIPE_V>();
        QuantStore(kvf, vScBuf.Get<float>(), vOfBuf.Get<float>(), vGm, cacheRow);
    }
"#;

const QKV_ROPE_KV_WRITE: &str = r#"
using T = {{T}};
using C = {{C}};

// One token per tile: split the merged QKV row into heads, RoPE (NeoX
// rotate-half) the q and k heads, write q to qOut[token] and k, v to the
{{WHERE}}class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR y, GM_ADDR cosT, GM_ADDR sinT, {{SLOT_PARAM}}GM_ADDR kCache, GM_ADDR vCache, GM_ADDR qOut, const {{TILING}}& t)
    {
        d = t.headDim;
        qHeads = t.qHeads;
        kvHeads = t.kvHeads;
{{CACHE_SIZE}}        width = (qHeads + 2 * kvHeads) * d;
{{RANGE}}
        yGm.SetGlobalBuffer((__gm__ T*)y, t.tiles * width);
        cosGm.SetGlobalBuffer((__gm__ C*)cosT, t.tiles * d);
        sinGm.SetGlobalBuffer((__gm__ C*)sinT, t.tiles * d);
        kGm.SetGlobalBuffer((__gm__ {{KV}}*)kCache, {{CACHE_ROWS}} * kvHeads * d);
        vGm.SetGlobalBuffer((__gm__ {{KV}}*)vCache, {{CACHE_ROWS}} * kvHeads * d);
        qGm.SetGlobalBuffer((__gm__ T*)qOut, t.tiles * qHeads * d);
{{SLOT_GM}}        pipe.InitBuffer(inX, 2, d * sizeof(T));
        pipe.InitBuffer(inCS, 1, 2 * d * sizeof(C));
        pipe.InitBuffer(outY, 2, d * sizeof(T));
        pipe.InitBuffer(vQue, 2, d * sizeof(T));
        pipe.InitBuffer(xBuf, d * sizeof(float));
        pipe.InitBuffer(rotBuf, d * sizeof(float));
        pipe.InitBuffer(csBuf, 2 * d * sizeof(float));
{{KV_INIT}}    }
    __aicore__ inline void Process()
    {
{{PROCESS_HEAD}}        for (uint32_t tok = start; tok < end; tok++) {
            LocalTensor<C> cs = inCS.AllocTensor<C>();
            DataCopy(cs, cosGm[tok * d], d);
            DataCopy(cs[d], sinGm[tok * d], d);
            inCS.EnQue(cs);
            cs = inCS.DeQue<C>();
            LocalTensor<float> csf = csBuf.Get<float>();
            ToFloat(csf, cs, 2 * d);
            inCS.FreeTensor(cs);
            const uint32_t row = tok * width;
            for (uint32_t h = 0; h < qHeads; h++) RopeHead(row + h * d, qGm, (tok * qHeads + h) * d, csf);
{{CACHE_ROW}}{{KV_STORE}}        }
    }

private:
{{ROPE_HEAD}}{{KV_HELPERS}}
    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX;
    TQue<TPosition::VECIN, 1> inCS;
    TQue<TPosition::VECOUT, 2> outY;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> vQue;
    TBuf<TPosition::VECCALC> xBuf, rotBuf, csBuf;
    GlobalTensor<T> yGm, qGm;
    GlobalTensor<{{KV}}> kGm, vGm;
    GlobalTensor<C> cosGm, sinGm;
{{KV_MEMBERS}}{{SLOT_MEMBER}}    uint32_t d = 0, qHeads = 0, kvHeads = 0, {{CACHE_VAR}} = 0, width = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR y, GM_ADDR cosT, GM_ADDR sinT, {{SLOT_PARAM}}GM_ADDR kCache, GM_ADDR vCache, GM_ADDR qOut, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(y, cosT, sinT, {{SLOT_ARG}}kCache, vCache, qOut, t);
    op.Process();
}
"#;

/// `QkvRopeAppend (y[T, (Hq+2Hkv)*D], cos[T, D], sin[T, D], q_out[T, Hq, D],
/// k_cache[P+T, Hkv, D], v_cache[P+T, Hkv, D])`. The device kernel takes the
/// caches (read-write, in place) before `q_out`: CANN orders a kernel's
/// parameters inputs first, and an in-place cache is declared as an input.
pub(crate) fn qkv_rope_append(ctx: &Ctx, q_heads: usize, kv_heads: usize) -> Result<DeviceKernels> {
    qkv_rope_kv_write(ctx, q_heads, kv_heads, KvWrite::Append)
}

/// `QkvRopeCacheWrite (y[T, (Hq+2Hkv)*D], cos[T, D], sin[T, D], slot_mapping[T] i32 or i64,
/// q_out[T, Hq, D], k_cache[NB, BS, Hkv, D], v_cache[NB, BS, Hkv, D])`: the
/// same kernel storing k and v at each token's slot of the paged caches.
/// Device parameters: the inputs, the slots, the caches (in place), `q_out`.
pub(crate) fn qkv_rope_cache_write(ctx: &Ctx, q_heads: usize, kv_heads: usize) -> Result<DeviceKernels> {
    qkv_rope_kv_write(ctx, q_heads, kv_heads, KvWrite::Paged)
}

/// `QkvRopeCacheWriteQuant (y, cos, sin, slot_mapping, k_scale[Hkv, D],
/// k_offset, v_scale, v_offset (f32), q_out, k_cache i8[NB, BS, Hkv, D],
/// v_cache i8[same])`: the paged write into int8 (C8) caches, each slot's
/// k and v rows quantized per channel on the way in. Device parameters:
/// the inputs, the slots, the four scale rows, the caches, `q_out`.
pub(crate) fn qkv_rope_cache_write_quant(ctx: &Ctx, q_heads: usize, kv_heads: usize) -> Result<DeviceKernels> {
    qkv_rope_kv_write(ctx, q_heads, kv_heads, KvWrite::PagedInt8)
}

/// Where the fused QKV kernel stores the new k and v rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KvWrite {
    /// Contiguous caches, rows `past..past+T`.
    Append,
    /// Paged caches, row `t` at slot `slot_mapping[t]`.
    Paged,
    /// Paged int8 caches, quantized per channel.
    PagedInt8,
}

/// Argument indices of a fused QKV kernel: `y, cos, sin, [slots], [k_scale,
/// k_offset, v_scale, v_offset], q_out, k_cache, v_cache`.
struct QkvArgs {
    slots: Option<usize>,
    scales: Option<usize>,
    q_out: usize,
    k_cache: usize,
    v_cache: usize,
}

impl QkvArgs {
    fn of(how: KvWrite) -> QkvArgs {
        let (slots, scales, q_out) = match how {
            KvWrite::Append => (None, None, 3),
            KvWrite::Paged => (Some(3), None, 4),
            KvWrite::PagedInt8 => (Some(3), Some(4), 8),
        };
        QkvArgs { slots, scales, q_out, k_cache: q_out + 1, v_cache: q_out + 2 }
    }
}

/// The int8 write's template pieces (empty for the float caches).
fn int8_kv_vars(int8: bool) -> Vec<(&'static str, String)> {
    if !int8 {
        return ["KV_INIT", "PROCESS_HEAD", "KV_HELPERS", "KV_MEMBERS"]
            .map(|k| (k, String::new()))
            .into_iter()
            .chain([
                ("KV", "T".into()),
                (
                    "KV_STORE",
                    "            for (uint32_t h = 0; h < kvHeads; h++) {
                RopeHead(row + (qHeads + h) * d, kGm, cacheRow + h * d, csf);
                LocalTensor<T> v = vQue.AllocTensor<T>();
                DataCopy(v, yGm[row + (qHeads + kvHeads + h) * d], d);
                vQue.EnQue(v);
                v = vQue.DeQue<T>();
                DataCopy(vGm[cacheRow + h * d], v, d);
                vQue.FreeTensor(v);
            }
"
                    .into(),
                ),
            ])
            .collect();
    }
    let init = "        const uint32_t cols = kvHeads * d;
        kScGm.SetGlobalBuffer((__gm__ float*)kScale, cols);
        kOfGm.SetGlobalBuffer((__gm__ float*)kOffset, cols);
        vScGm.SetGlobalBuffer((__gm__ float*)vScale, cols);
        vOfGm.SetGlobalBuffer((__gm__ float*)vOffset, cols);
        pipe.InitBuffer(inP, 1, cols * sizeof(float));
        pipe.InitBuffer(inV, 2, cols * sizeof(T));
        pipe.InitBuffer(outQ, 2, cols * sizeof(int8_t));
        pipe.InitBuffer(kvBuf, cols * sizeof(float));
        pipe.InitBuffer(rtBuf, d * sizeof(T));
        pipe.InitBuffer(kScBuf, cols * sizeof(float));
        pipe.InitBuffer(kOfBuf, cols * sizeof(float));
        pipe.InitBuffer(vScBuf, cols * sizeof(float));
        pipe.InitBuffer(vOfBuf, cols * sizeof(float));
        pipe.InitBuffer(iBuf, cols * sizeof(int32_t));
        pipe.InitBuffer(hBuf, cols * sizeof(half));
";
    let head = "        if (start >= end) return;
        LoadChannels(kScGm, kScBuf.Get<float>());
        LoadChannels(kOfGm, kOfBuf.Get<float>());
        LoadChannels(vScGm, vScBuf.Get<float>());
        LoadChannels(vOfGm, vOfBuf.Get<float>());
";
    let members = "    TQue<TPosition::VECIN, 1> inP;
    TQue<TPosition::VECIN, 2> inV;
    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> kvBuf, rtBuf, kScBuf, kOfBuf, vScBuf, vOfBuf, iBuf, hBuf;
    GlobalTensor<float> kScGm, kOfGm, vScGm, vOfGm;
";
    let to_int8 = super::quant::TO_INT8.replace("qGm[r * cols]", "dst[off]");
    vec![
        ("KV", "int8_t".into()),
        ("KV_INIT", init.into()),
        ("PROCESS_HEAD", head.into()),
        ("KV_HELPERS", INT8_KV_STORE.replace("{{TO_INT8}}", &to_int8)),
        ("KV_MEMBERS", members.into()),
        ("KV_STORE", "            StoreKv(row, cacheRow, csf);\n".into()),
    ]
}

fn qkv_rope_kv_write(ctx: &Ctx, q_heads: usize, kv_heads: usize, how: KvWrite) -> Result<DeviceKernels> {
    let paged = how != KvWrite::Append;
    let int8 = how == KvWrite::PagedInt8;
    let QkvArgs { slots, scales, q_out, k_cache, v_cache } = QkvArgs::of(how);
    let d = ctx.cdim(1, 1, "head_dim")?;
    let width = ctx.cdim(0, 1, "qkv width")?;
    let (hq, hkv) = (q_heads as u64, kv_heads as u64);
    if width != (hq + 2 * hkv) * d || d % 2 != 0 {
        bail!("{}: qkv width {width} is not ({hq} + 2*{hkv}) * {d} with an even head_dim", ctx.k.name);
    }
    let (t, c) = (ctx.dt[0], ctx.dt[1]);
    let kv = if int8 { DevType::I8 } else { t };
    if ctx.dt[q_out] != t || ctx.dt[k_cache] != kv || ctx.dt[v_cache] != kv || ctx.dt[2] != c {
        bail!("{}: y and q must share one dtype, the caches {kv}, cos and sin another", ctx.k.name);
    }
    if let Some(s) = slots {
        if !matches!(ctx.dt[s], DevType::I32 | DevType::I64) {
            bail!("{}: slot_mapping must be i32 or i64 on the device, found {}", ctx.k.name, ctx.dt[s]);
        }
        let rank = ctx.rank(k_cache);
        if rank != 4 || ctx.cdim(k_cache, 2, "kv heads")? != hkv || ctx.cdim(k_cache, 3, "head_dim")? != d {
            bail!("{}: the paged caches must be [num_blocks, block_size, {hkv}, {d}]", ctx.k.name);
        }
    }
    if let Some(first) = scales {
        for (i, what) in (first..first + 4).zip(["k_scale", "k_offset", "v_scale", "v_offset"]) {
            if ctx.dt[i] != DevType::F32 || ctx.k.args[i].shape[..] != ctx.k.args[k_cache].shape[2..] {
                bail!("{}: {what} (argument {i}) must be f32 per channel, [{hkv}, {d}]", ctx.k.name);
            }
        }
        // One slot's k (or v) row is stored as one int8 block run.
        need_aligned(ctx, "a slot's int8 row", hkv * d, DevType::I8)?;
        need_aligned(ctx, "a slot's row", hkv * d, t)?;
    }
    need_aligned(ctx, "half a head", d / 2, DevType::F32)?;
    need_aligned(ctx, "a head", d, t)?;
    need_aligned(ctx, "a cos/sin row", d, c)?;
    let tiles = ctx.dim(0, 0)?;
    let entry = ctx.entry("");
    let text = |on: &str, off: &str| if paged { on.to_string() } else { off.to_string() };
    let slot_t = slots.map_or("int32_t", |s| ctx.dt[s].cpp());
    let slot_param = match how {
        KvWrite::Append => "",
        KvWrite::Paged => "GM_ADDR slots, ",
        KvWrite::PagedInt8 => "GM_ADDR slots, GM_ADDR kScale, GM_ADDR kOffset, GM_ADDR vScale, GM_ADDR vOffset, ",
    };
    let slot_arg = match how {
        KvWrite::Append => "",
        KvWrite::Paged => "slots, ",
        KvWrite::PagedInt8 => "slots, kScale, kOffset, vScale, vOffset, ",
    };
    let mut vars = vec![
        ("T", t.cpp().into()),
        ("C", c.cpp().into()),
        ("ROPE_HEAD", ROPE_HEAD.into()),
        (
            "WHERE",
            text(
                "// paged caches at slot slotMapping[token] (block slot / blockSize, offset\n\
                 // slot % blockSize). No other slot is touched; a slot outside the cache\n\
                 // (the runtime never sends one) stores nothing.\n",
                "// caches at row past + token. Cache rows 0..past are never touched.\n",
            ),
        ),
        ("SLOT_PARAM", slot_param.into()),
        ("SLOT_ARG", slot_arg.into()),
        ("CACHE_SIZE", text("        cacheSlots = t.numBlocks * t.blockSize;\n", "        past = t.past;\n")),
        ("CACHE_ROWS", text("cacheSlots", "(past + t.tiles)")),
        ("SLOT_GM", text(&format!("        slotGm.SetGlobalBuffer((__gm__ {slot_t}*)slots, t.tiles);\n"), "")),
        (
            "CACHE_ROW",
            text(
                "            const int64_t slot = static_cast<int64_t>(slotGm.GetValue(tok));\n\
                 \x20           if (slot < 0 || slot >= static_cast<int64_t>(cacheSlots)) continue;\n\
                 \x20           const uint32_t cacheRow = static_cast<uint32_t>(slot) * kvHeads * d;\n",
                "            const uint32_t cacheRow = (past + tok) * kvHeads * d;\n",
            ),
        ),
        ("CACHE_VAR", text("cacheSlots", "past")),
        ("SLOT_MEMBER", text(&format!("    GlobalTensor<{slot_t}> slotGm;\n"), "")),
    ];
    vars.extend(int8_kv_vars(int8));
    let what = match how {
        KvWrite::Paged => "QKV split + RoPE (NeoX) + paged KV-cache write through the slot mapping, in f32.",
        KvWrite::PagedInt8 => {
            "QKV split + RoPE (NeoX) in f32 + per-channel int8 quantization into the paged (C8) KV caches through the slot mapping."
        }
        KvWrite::Append => "QKV split + RoPE (NeoX) + KV-cache append, in f32.",
    };
    let src = vector_source(&entry, what, QKV_ROPE_KV_WRITE, &vars);
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("qHeads", TExpr::c(hq)));
    fields.push(TilingField::u32("kvHeads", TExpr::c(hkv)));
    fields.push(TilingField::u32("headDim", TExpr::c(d)));
    if paged {
        fields.push(TilingField::u32("numBlocks", ctx.dim(k_cache, 0)?));
        fields.push(TilingField::u32("blockSize", TExpr::c(ctx.cdim(k_cache, 1, "block size")?)));
    } else {
        fields.push(TilingField::u32("past", TExpr::Past));
    }
    let mut ub = 6 * r32(d * t.size()) + r32(2 * d * c.size()) + 4 * r32(d * 4);
    if int8 {
        let cols = hkv * d;
        // inP, kvBuf, four scale rows, iBuf (f32/i32); inV x2; hBuf; outQ x2; rtBuf.
        ub += 7 * r32(cols * 4) + 2 * r32(cols * t.size()) + r32(cols * 2) + 2 * r32(cols) + r32(d * t.size());
    }
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params =
        vec![ctx.param("y", 0, Role::Input), ctx.param("cosT", 1, Role::Input), ctx.param("sinT", 2, Role::Input)];
    if let Some(s) = slots {
        dk.params.push(ctx.param("slots", s, Role::Input));
    }
    if let Some(first) = scales {
        for (i, name) in (first..first + 4).zip(["kScale", "kOffset", "vScale", "vOffset"]) {
            dk.params.push(ctx.param(name, i, Role::Input));
        }
    }
    dk.params.extend([
        ctx.param("kCache", k_cache, Role::InOut),
        ctx.param("vCache", v_cache, Role::InOut),
        ctx.param("qOut", q_out, Role::Output),
    ]);
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

//! Vector-core kernels: norms, gather, elementwise, RoPE, attention, gating.
//!
//! Shared shape: the host tiling gives `tiles` and `tilesPerCore`; block `b`
//! owns tiles `[b*tilesPerCore, min((b+1)*tilesPerCore, tiles))`, so every
//! output byte has exactly one writer (no cross-block GM traffic). Data is
//! moved with double-buffered VECIN/VECOUT queues and computed in f32
//! (`ToFloat`/`FromFloat`) whatever the activation dtype, like the
//! reference interpreter.

use super::flash::{check_heads, flash_fields, flash_tile, flash_vars};
use super::{fill_kernel, head, r32, CoreType, Ctx, DeviceKernel, DeviceKernels, MemUse, Role, TExpr, TilingField};
use crate::target::{DevType, Target};
use anyhow::{bail, Result};
use panguc_ir::kernel::{ElemOp, ExprToken};
use panguc_ir::op::{BinaryOp, UnaryOp};

/// Helpers every vector kernel file starts with.
pub(crate) const PRELUDE: &str = r#"
__aicore__ inline uint32_t MinU(uint32_t a, uint32_t b) { return a < b ? a : b; }

// Activation dtype <-> f32 on the vector unit; a UB copy when it is f32.
template <typename T>
__aicore__ inline void ToFloat(const LocalTensor<float>& d, const LocalTensor<T>& s, uint32_t n)
{
    Cast(d, s, RoundMode::CAST_NONE, n);
}
template <>
__aicore__ inline void ToFloat<float>(const LocalTensor<float>& d, const LocalTensor<float>& s, uint32_t n)
{
    DataCopy(d, s, n);
}
template <typename T>
__aicore__ inline void FromFloat(const LocalTensor<T>& d, const LocalTensor<float>& s, uint32_t n)
{
    // Round to nearest even: 310P's float -> half supports only CAST_NONE
    // (rint when lossy) and CAST_ODD; 910B's float -> bf16 has no CAST_NONE.
#if PANGUC_DAV_C220
    Cast(d, s, RoundMode::CAST_RINT, n);
#else
    Cast(d, s, RoundMode::CAST_NONE, n);
#endif
}
template <>
__aicore__ inline void FromFloat<float>(const LocalTensor<float>& d, const LocalTensor<float>& s, uint32_t n)
{
    DataCopy(d, s, n);
}
"#;

/// The row of `n` elements of `t` must be whole 32-byte blocks (DataCopy
/// moves whole blocks; these kernels do not pad rows).
pub(crate) fn need_aligned(ctx: &Ctx, what: &str, n: u64, t: DevType) -> Result<()> {
    need_aligned_for(&ctx.k.name, what, n, t)
}

/// [`need_aligned`] naming kernel `name`.
pub(crate) fn need_aligned_for(name: &str, what: &str, n: u64, t: DevType) -> Result<()> {
    if !(n * t.size()).is_multiple_of(32) {
        bail!(
            "{name}: cannot be tiled: {what} of {n} {t} elements ({} bytes) is not a multiple of 32 bytes",
            n * t.size()
        );
    }
    Ok(())
}

pub(crate) fn tiles_fields(tiles: &TExpr) -> Vec<TilingField> {
    vec![TilingField::u32("tiles", tiles.clone()), TilingField::u32("tilesPerCore", TExpr::per_core(tiles))]
}

/// A vector-core kernel of `tiles` block tiles using `ub` bytes of UB; the
/// caller sets its parameters.
pub(crate) fn vector_kernel(
    entry: String,
    source: String,
    fields: Vec<TilingField>,
    tiles: &TExpr,
    ub: u64,
) -> DeviceKernel {
    let up = super::upper_camel(&entry);
    DeviceKernel {
        op_type: up.clone(),
        tiling_struct: format!("{up}Tiling"),
        entry,
        core: CoreType::Vector,
        source,
        fields,
        block_dim: TExpr::block_dim(tiles),
        params: vec![],
        mem: MemUse { ub, ..Default::default() },
    }
}

/// Work range of this block (after `t` is read).
pub(crate) const RANGE: &str = "        start = static_cast<uint32_t>(GetBlockIdx()) * t.tilesPerCore;
        end = MinU(start + t.tilesPerCore, t.tiles);";

/// A vector kernel file: the common head and [`PRELUDE`], then `template`
/// filled with `vars`, the block's work range (`{{RANGE}}`) and the kernel
/// names (see [`fill_kernel`]).
pub(crate) fn vector_source(entry: &str, what: &str, template: &str, vars: &[(&str, String)]) -> String {
    head(entry, what) + PRELUDE + &fill_kernel(template, entry, &[vars, &[("RANGE", RANGE.into())]].concat())
}

const RMS_NORM: &str = r#"
using T = {{T}};
using W = {{W}};

// One row of `cols` elements per tile: {{WHAT}}
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR x, {{RES_PARAM}}GM_ADDR w, {{SUM_PARAM}}GM_ADDR y, const {{TILING}}& t)
    {
        cols = t.cols;
        eps = t.eps;
{{RANGE}}
        xGm.SetGlobalBuffer((__gm__ T*)x, t.tiles * cols);
{{RES_INIT}}        wGm.SetGlobalBuffer((__gm__ W*)w, cols);
        yGm.SetGlobalBuffer((__gm__ T*)y, t.tiles * cols);
        pipe.InitBuffer(inX, 2, cols * sizeof(T));
        pipe.InitBuffer(outY, 2, cols * sizeof(T));
        pipe.InitBuffer(wIn, 1, cols * sizeof(W));
        pipe.InitBuffer(wBuf, cols * sizeof(float));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
        pipe.InitBuffer(sqBuf, cols * sizeof(float));
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(sumBuf, 32);
    }
    __aicore__ inline void Process()
    {
        if (start >= end) return;
        LocalTensor<W> wl = wIn.AllocTensor<W>();
        DataCopy(wl, wGm, cols);
        wIn.EnQue(wl);
        wl = wIn.DeQue<W>();
        LocalTensor<float> wf = wBuf.Get<float>();
        ToFloat(wf, wl, cols);
        wIn.FreeTensor(wl);
        for (uint32_t r = start; r < end; r++) {
            CopyIn(r);
            Compute(wf);
            CopyOut(r);
        }
    }

private:
    __aicore__ inline void CopyIn(uint32_t r)
    {
        LocalTensor<T> x = inX.AllocTensor<T>();
        DataCopy(x, xGm[r * cols], cols);
        inX.EnQue(x);
{{RES_COPYIN}}    }
    __aicore__ inline void Compute(const LocalTensor<float>& wf)
    {
        LocalTensor<T> x = inX.DeQue<T>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> sq = sqBuf.Get<float>();
        LocalTensor<float> work = workBuf.Get<float>();
        LocalTensor<float> sum = sumBuf.Get<float>();
        ToFloat(xf, x, cols);
        inX.FreeTensor(x);
{{RES_COMPUTE}}        PipeBarrier<PIPE_V>();
        Mul(sq, xf, xf, cols);
        PipeBarrier<PIPE_V>();
        ReduceSum(sum, sq, work, cols);
        event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(e);
        WaitFlag<HardEvent::V_S>(e);
        // Scalar maths in float (rstd = 1 / sqrt(mean(x^2) + eps)), then back
        // to the vector unit for the 1-element rsqrt.
        const float ms = sum.GetValue(0) / static_cast<float>(cols) + eps;
        sum.SetValue(0, ms);
        event_t e2 = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(e2);
        WaitFlag<HardEvent::S_V>(e2);
        Rsqrt(sum, sum, 1);
        SetFlag<HardEvent::V_S>(e);
        WaitFlag<HardEvent::V_S>(e);
        const float rstd = sum.GetValue(0);
        Muls(xf, xf, rstd, cols);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, wf, cols);
        PipeBarrier<PIPE_V>();
        LocalTensor<T> y = outY.AllocTensor<T>();
        FromFloat(y, xf, cols);
        outY.EnQue(y);
    }
    __aicore__ inline void CopyOut(uint32_t r)
    {
{{SUM_COPYOUT}}        LocalTensor<T> y = outY.DeQue<T>();
        DataCopy(yGm[r * cols], y, cols);
        outY.FreeTensor(y);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX;
{{RES_MEMBERS}}    TQue<TPosition::VECIN, 1> wIn;
    TQue<TPosition::VECOUT, 2> outY;
    TBuf<TPosition::VECCALC> wBuf, xBuf, sqBuf, workBuf, sumBuf;
    GlobalTensor<T> xGm, yGm;
    GlobalTensor<W> wGm;
    uint32_t cols = 0, start = 0, end = 0;
    float eps = 0.0f;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, {{RES_PARAM}}GM_ADDR w, {{SUM_PARAM}}GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, {{RES_ARG}}w, {{SUM_ARG}}y, t);
    op.Process();
}
"#;

/// ReduceSum work buffer for `n` f32 elements (one block per 8 repeats).
pub(crate) fn reduce_work_bytes(n: u64) -> u64 {
    let repeats = (n * 4).div_ceil(256);
    r32(repeats.div_ceil(8) * 32).max(32)
}

/// `RmsNorm (x, w, out)` and `AddRmsNorm (x, residual, w, sum_out, norm_out)`.
pub(crate) fn rms_norm(ctx: &Ctx, eps: f64, add: bool) -> Result<DeviceKernels> {
    let r = ctx.rank(0);
    let cols = ctx.cdim(0, r - 1, "hidden size")?;
    let t = ctx.dt[0];
    let w_arg = if add { 2 } else { 1 };
    let w = ctx.dt[w_arg];
    need_aligned(ctx, "a row", cols, t)?;
    need_aligned(ctx, "the norm weight", cols, w)?;
    let tiles = ctx.dims(0, 0, r - 1)?;
    let entry = ctx.entry("");
    let (res_param, sum_param, res_arg, sum_arg) =
        if add { ("GM_ADDR res, ", "GM_ADDR sumOut, ", "res, ", "sumOut, ") } else { ("", "", "", "") };
    let s = |on: bool, v: &str| if on { v.to_string() } else { String::new() };
    let res_init = "        rGm.SetGlobalBuffer((__gm__ T*)res, t.tiles * cols);\n        sGm.SetGlobalBuffer((__gm__ T*)sumOut, t.tiles * cols);\n        pipe.InitBuffer(inR, 2, cols * sizeof(T));\n        pipe.InitBuffer(outS, 2, cols * sizeof(T));\n        pipe.InitBuffer(rBuf, cols * sizeof(float));\n";
    let res_copyin = "        LocalTensor<T> rl = inR.AllocTensor<T>();\n        DataCopy(rl, rGm[r * cols], cols);\n        inR.EnQue(rl);\n";
    let res_compute = "        // x + residual in f32; the sum is stored and normalised.\n        LocalTensor<T> rl = inR.DeQue<T>();\n        LocalTensor<float> rf = rBuf.Get<float>();\n        ToFloat(rf, rl, cols);\n        inR.FreeTensor(rl);\n        PipeBarrier<PIPE_V>();\n        Add(xf, xf, rf, cols);\n        PipeBarrier<PIPE_V>();\n        LocalTensor<T> so = outS.AllocTensor<T>();\n        FromFloat(so, xf, cols);\n        outS.EnQue(so);\n";
    let sum_copyout = "        LocalTensor<T> so = outS.DeQue<T>();\n        DataCopy(sGm[r * cols], so, cols);\n        outS.FreeTensor(so);\n";
    let res_members = "    TQue<TPosition::VECIN, 2> inR;\n    TQue<TPosition::VECOUT, 2> outS;\n    TBuf<TPosition::VECCALC> rBuf;\n    GlobalTensor<T> rGm, sGm;\n";
    let work = reduce_work_bytes(cols);
    let what = if add { "sum = x + residual; y = rmsnorm(sum) * w" } else { "y = rmsnorm(x) * w" };
    let src = vector_source(
        &entry,
        &format!("{}: {what}, in f32.", if add { "AddRmsNorm" } else { "RmsNorm" }),
        RMS_NORM,
        &[
            ("T", t.cpp().into()),
            ("W", w.cpp().into()),
            ("WHAT", what.into()),
            ("RES_PARAM", res_param.into()),
            ("SUM_PARAM", sum_param.into()),
            ("RES_ARG", res_arg.into()),
            ("SUM_ARG", sum_arg.into()),
            ("RES_INIT", s(add, res_init)),
            ("RES_COPYIN", s(add, res_copyin)),
            ("RES_COMPUTE", s(add, res_compute)),
            ("SUM_COPYOUT", s(add, sum_copyout)),
            ("RES_MEMBERS", s(add, res_members)),
            ("WORK", work.to_string()),
        ],
    );
    let row_t = r32(cols * t.size());
    let row_f = r32(cols * 4);
    let mut ub = 4 * row_t + r32(cols * w.size()) + 3 * row_f + work + 32;
    if add {
        ub += 4 * row_t + row_f;
    }
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("cols", TExpr::c(cols)));
    fields.push(TilingField::f32("eps", eps));
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = if add {
        vec![
            ctx.param("x", 0, Role::Input),
            ctx.param("res", 1, Role::Input),
            ctx.param("w", 2, Role::Input),
            ctx.param("sumOut", 3, Role::Output),
            ctx.param("y", 4, Role::Output),
        ]
    } else {
        vec![ctx.param("x", 0, Role::Input), ctx.param("w", 1, Role::Input), ctx.param("y", 2, Role::Output)]
    };
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

const ROW_MOVE: &str = r#"
using T = {{T}};
using I = {{I}};

// {{WHAT}}; one index per tile.
// {{BAD_DOC}}
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR table, GM_ADDR idx, GM_ADDR out, const {{TILING}}& t)
    {
        cols = t.cols;
        rows = t.rows;
{{RANGE}}
        tableGm.SetGlobalBuffer((__gm__ T*)table, {{TABLE_ROWS}} * cols);
        idxGm.SetGlobalBuffer((__gm__ I*)idx, t.tiles);
        outGm.SetGlobalBuffer((__gm__ T*)out, {{OUT_ROWS}} * cols);
        pipe.InitBuffer(que, 2, cols * sizeof(T));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t i = start; i < end; i++) {
            int64_t id = static_cast<int64_t>(idxGm.GetValue(i));
            if (id < 0 || id >= static_cast<int64_t>(rows)) {{BAD}}
            LocalTensor<T> row = que.AllocTensor<T>();
            DataCopy(row, tableGm[{{SRC_ROW}} * cols], cols);
            que.EnQue(row);
            row = que.DeQue<T>();
            DataCopy(outGm[{{DST_ROW}} * cols], row, cols);
            que.FreeTensor(row);
        }
    }

private:
    TPipe pipe;
    // VECIN -> GM directly: no compute, so one queue carries the row.
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> que;
    GlobalTensor<T> tableGm, outGm;
    GlobalTensor<I> idxGm;
    uint32_t cols = 0, rows = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR table, GM_ADDR idx, GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(table, idx, out, t);
    op.Process();
}
"#;

/// `Gather (table[R, W], idx[..] i64, out[.., W])`.
/// `out[i, :] = table[idx[i], :]` for `tiles` i64 indices into a
/// `[rows, cols]` table of `t` (rows of whole 32-byte blocks); the caller
/// sets the parameters `(table, idx, out)`.
pub(crate) fn gather_kernel(entry: String, rows: TExpr, cols: u64, t: DevType, tiles: &TExpr) -> DeviceKernel {
    let vars = [
        ("T", t.cpp().into()),
        ("I", "int64_t".into()),
        ("WHAT", "Embedding gather: out[i, :] = table[idx[i], :]".into()),
        ("BAD_DOC", "An index outside the table reads row 0 (the runtime validates token ids).".into()),
        ("BAD", "id = 0;".into()),
        ("TABLE_ROWS", "rows".into()),
        ("OUT_ROWS", "t.tiles".into()),
        ("SRC_ROW", "static_cast<uint64_t>(id)".into()),
        ("DST_ROW", "i".into()),
    ];
    let src = vector_source(&entry, "Gather (embedding lookup).", ROW_MOVE, &vars);
    row_move_kernel(entry, src, rows, cols, t, tiles)
}

/// The scatter counterpart of [`gather_kernel`]: `out[idx[i], :] = in[i, :]`
/// for `tiles` indices of dtype `idx` into an `[rows, cols]` output of `t`,
/// written in place (other rows untouched; an index outside it stores
/// nothing). The caller sets the parameters `(in, idx, out)`.
pub(crate) fn scatter_kernel(
    entry: String,
    rows: TExpr,
    cols: u64,
    t: DevType,
    idx: DevType,
    tiles: &TExpr,
) -> DeviceKernel {
    let vars = [
        ("T", t.cpp().into()),
        ("I", idx.cpp().into()),
        ("WHAT", "Row scatter: out[idx[i], :] = in[i, :]".into()),
        ("BAD_DOC", "An index outside the output stores nothing.".into()),
        ("BAD", "continue;".into()),
        ("TABLE_ROWS", "t.tiles".into()),
        ("OUT_ROWS", "rows".into()),
        ("SRC_ROW", "i".into()),
        ("DST_ROW", "static_cast<uint64_t>(id)".into()),
    ];
    let src = vector_source(&entry, "Row scatter (paged KV-cache write).", ROW_MOVE, &vars);
    row_move_kernel(entry, src, rows, cols, t, tiles)
}

fn row_move_kernel(entry: String, src: String, rows: TExpr, cols: u64, t: DevType, tiles: &TExpr) -> DeviceKernel {
    let mut fields = tiles_fields(tiles);
    fields.push(TilingField::u32("rows", rows));
    fields.push(TilingField::u32("cols", TExpr::c(cols)));
    vector_kernel(entry, src, fields, tiles, 2 * r32(cols * t.size()))
}

/// `KvCacheWrite (new[T, Hkv, D], slots[T], cache[num_blocks, block_size,
/// Hkv, D])`: row `t` of `new` stored at cache slot `slots[t]`, in place.
pub(crate) fn kv_cache_write(ctx: &Ctx) -> Result<DeviceKernels> {
    let name = &ctx.k.name;
    if ctx.k.args.len() != 3 || ctx.rank(0) != 3 || ctx.rank(2) != 4 {
        bail!("{name}: kv_cache_write takes new [T, Hkv, D], slots [T] and a cache [num_blocks, block_size, Hkv, D]");
    }
    let (hkv, d) = (ctx.cdim(2, 2, "kv heads")?, ctx.cdim(2, 3, "head_dim")?);
    if ctx.cdim(0, 1, "new kv heads")? != hkv || ctx.cdim(0, 2, "new head_dim")? != d {
        bail!("{name}: the new rows must be [T, {hkv}, {d}] like the cache's");
    }
    let t = ctx.dt[2];
    if ctx.dt[0] != t {
        bail!("{name}: the new rows' dtype {} differs from the cache's {t}", ctx.dt[0]);
    }
    if !matches!(ctx.dt[1], DevType::I32 | DevType::I64) {
        bail!("{name}: slots (argument 1) must be i32 or i64 on the device, found {}", ctx.dt[1]);
    }
    need_aligned(ctx, "a cache row", hkv * d, t)?;
    let slots = ctx.dim(2, 0)?.times(TExpr::c(ctx.cdim(2, 1, "block size")?));
    let mut dk = scatter_kernel(ctx.entry(""), slots, hkv * d, t, ctx.dt[1], &ctx.dim(0, 0)?);
    dk.params =
        vec![ctx.param("new", 0, Role::Input), ctx.param("slots", 1, Role::Input), ctx.param("cache", 2, Role::InOut)];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

pub(crate) fn gather(ctx: &Ctx) -> Result<DeviceKernels> {
    if ctx.rank(0) != 2 {
        bail!("{}: gather tables must be 2-D", ctx.k.name);
    }
    // The table is an embedding (static rows) or, for the batched MoE's
    // gather of sorted rows, the step's activations (`tokens` rows).
    let (rows, cols) = (ctx.dim(0, 0)?, ctx.cdim(0, 1, "table width")?);
    let t = ctx.dt[0];
    if ctx.dt[2] != t {
        bail!("{}: gather output dtype {} differs from the table's {t}", ctx.k.name, ctx.dt[2]);
    }
    need_aligned(ctx, "a table row", cols, t)?;
    let tiles = ctx.dims(1, 0, ctx.rank(1))?;
    let mut dk = gather_kernel(ctx.entry(""), rows, cols, t, &tiles);
    dk.params =
        vec![ctx.param("table", 0, Role::Input), ctx.param("idx", 1, Role::Input), ctx.param("out", 2, Role::Output)];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

const ELEMENTWISE: &str = r#"
using T = {{T}};

// out = {{WHAT}} over a flat range, in tiles of `tileLen` elements.
// The final tile may end inside a 32-byte block: {{TAIL_DOC}}
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init({{PARAMS}}GM_ADDR out, const {{TILING}}& t)
    {
        total = t.total;
        tileLen = t.tileLen;
{{RANGE}}
{{SET_GM}}        outGm.SetGlobalBuffer((__gm__ T*)out, total);
{{INIT_IN}}        pipe.InitBuffer(outQ, 2, tileLen * sizeof(T));
        for (uint32_t i = 0; i < {{NBUF}}; i++) pipe.InitBuffer(fBuf[i], tileLen * sizeof(float));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t off = tile * tileLen;
            const uint32_t len = MinU(tileLen, total - off);
            // Computing on whole 32-byte blocks keeps every vector operand aligned.
            const uint32_t padLen = (len + {{PER_BLOCK}} - 1) / {{PER_BLOCK}} * {{PER_BLOCK}};
            CopyIn(off, len, padLen);
            Compute(padLen);
            CopyOut(off, len);
        }
    }

private:
    __aicore__ inline void Load(TQue<TPosition::VECIN, 2>& q, const GlobalTensor<T>& g, uint32_t off, uint32_t len, uint32_t padLen)
    {
        LocalTensor<T> x = q.AllocTensor<T>();
        if (len == padLen) {
            DataCopy(x, g[off], len);
        } else {
{{LOAD_TAIL}}
        }
        q.EnQue(x);
    }
    __aicore__ inline void CopyIn(uint32_t off, uint32_t len, uint32_t padLen)
    {
{{COPY_IN}}    }
    __aicore__ inline void Compute(uint32_t n)
    {
{{COMPUTE}}    }
    __aicore__ inline void CopyOut(uint32_t off, uint32_t len)
    {
        LocalTensor<T> y = outQ.DeQue<T>();
        if (len % {{PER_BLOCK}} == 0) {
            DataCopy(outGm[off], y, len);
        } else {
{{STORE_TAIL}}
        }
        outQ.FreeTensor(y);
    }

    TPipe pipe;
{{MEMBERS}}    TQue<TPosition::VECOUT, 2> outQ;
    TBuf<TPosition::VECCALC> fBuf[{{NBUF}}];
    GlobalTensor<T> outGm;
    uint32_t total = 0, tileLen = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}({{PARAMS}}GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init({{ARGS}}out, t);
    op.Process();
}
"#;

/// 910B: `DataCopyPad` moves exactly `len` elements.
const TAIL_LOAD_910B: &str = "            DataCopyExtParams p{1, static_cast<uint32_t>(len * sizeof(T)), 0, 0, 0};
            DataCopyPadExtParams<T> pad{true, 0, static_cast<uint8_t>(padLen - len), static_cast<T>(0.0f)};
            DataCopyPad(x, g[off], p, pad);";
const TAIL_STORE_910B: &str = "            DataCopyExtParams p{1, static_cast<uint32_t>(len * sizeof(T)), 0, 0, 0};
            DataCopyPad(outGm[off], y, p);";
/// 310P (no DataCopyPad): whole blocks with DataCopy, the last partial
/// block element by element through the scalar unit; the padding is
/// zero-filled (masked) so the vector maths never sees garbage.
const TAIL_LOAD_310P: &str = "            const uint32_t body = len / {{PER_BLOCK}} * {{PER_BLOCK}};
            Duplicate(x[body], static_cast<T>(0.0f), {{PER_BLOCK}});
            if (body > 0) DataCopy(x, g[off], body);
            event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
            SetFlag<HardEvent::V_S>(e);
            WaitFlag<HardEvent::V_S>(e);
            for (uint32_t i = body; i < len; i++) x.SetValue(i, g.GetValue(off + i));
            // The vector unit reads what the scalar unit just stored.
            event_t s2v = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
            SetFlag<HardEvent::S_V>(s2v);
            WaitFlag<HardEvent::S_V>(s2v);";
const TAIL_STORE_310P: &str = "            const uint32_t body = len / {{PER_BLOCK}} * {{PER_BLOCK}};
            if (body > 0) DataCopy(outGm[off], y, body);
            // The scalar unit reads what the vector unit computed.
            event_t v2s = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
            SetFlag<HardEvent::V_S>(v2s);
            WaitFlag<HardEvent::V_S>(v2s);
            for (uint32_t i = body; i < len; i++) outGm.SetValue(off + i, y.GetValue(i));";

/// Vector code for one postfix token into float buffer `dst`.
fn token_code(tok: &ExprToken, stack: &mut Vec<usize>, next: &mut usize) -> Result<String> {
    let mut fresh = || {
        let b = *next;
        *next += 1;
        b
    };
    Ok(match tok {
        ExprToken::Arg(i) => {
            let d = fresh();
            stack.push(d);
            format!("        DataCopy(fBuf[{d}].Get<float>(), f{i}, n);\n")
        }
        ExprToken::Unary(u) => {
            let a = stack.pop().ok_or_else(|| anyhow::anyhow!("malformed elementwise expression"))?;
            let d = fresh();
            stack.push(d);
            let (x, y) = (format!("fBuf[{d}].Get<float>()"), format!("fBuf[{a}].Get<float>()"));
            match u {
                UnaryOp::Neg => format!("        Muls({x}, {y}, -1.0f, n);\n"),
                UnaryOp::Exp => format!("        Exp({x}, {y}, n);\n"),
                UnaryOp::Sqrt => format!("        Sqrt({x}, {y}, n);\n"),
                UnaryOp::Rsqrt => format!("        Rsqrt({x}, {y}, n);\n"),
                UnaryOp::Reciprocal => format!("        Reciprocal({x}, {y}, n);\n"),
                UnaryOp::Sigmoid => format!("        Sigmoid({x}, {y}, n);\n"),
            }
        }
        ExprToken::Binary(b) => {
            let rhs = stack.pop().ok_or_else(|| anyhow::anyhow!("malformed elementwise expression"))?;
            let lhs = stack.pop().ok_or_else(|| anyhow::anyhow!("malformed elementwise expression"))?;
            let d = fresh();
            stack.push(d);
            let f = match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Max => "Max",
            };
            format!("        {f}(fBuf[{d}].Get<float>(), fBuf[{lhs}].Get<float>(), fBuf[{rhs}].Get<float>(), n);\n")
        }
    } + "        PipeBarrier<PIPE_V>();\n")
}

/// `Elementwise (in.., out)` with operands of the output's shape; the op is
/// evaluated in f32 token by token like the reference.
pub(crate) fn elementwise(ctx: &Ctx, op: &ElemOp) -> Result<DeviceKernels> {
    let n_in = ctx.k.args.len() - 1;
    let out_shape = &ctx.k.args[n_in].shape;
    for i in 0..n_in {
        if &ctx.k.args[i].shape != out_shape {
            bail!("{}: elementwise operand {i} is broadcast; the AscendC elementwise kernel needs operands of the output's shape", ctx.k.name);
        }
    }
    let t = ctx.dt[n_in];
    if ctx.dt[..n_in].iter().any(|d| *d != t) {
        bail!("{}: elementwise operands must share the output dtype {t} (Convert kernels are not emitted)", ctx.k.name);
    }
    let tokens = op.tokens().ok_or_else(|| anyhow::anyhow!("{}: Convert has no AscendC kernel", ctx.k.name))?;
    let mut stack = vec![];
    let mut next = 0usize;
    let mut compute = String::new();
    for i in 0..n_in {
        compute += &format!("        LocalTensor<T> x{i} = inQ{i}.DeQue<T>();\n        LocalTensor<float> f{i} = inF{i}.Get<float>();\n        ToFloat(f{i}, x{i}, n);\n        inQ{i}.FreeTensor(x{i});\n");
    }
    compute += "        PipeBarrier<PIPE_V>();\n";
    for tok in &tokens {
        compute += &token_code(tok, &mut stack, &mut next)?;
    }
    let result = match stack.as_slice() {
        [r] => *r,
        _ => bail!("{}: elementwise expression leaves {} values", ctx.k.name, stack.len()),
    };
    compute += &format!("        LocalTensor<T> y = outQ.AllocTensor<T>();\n        FromFloat(y, fBuf[{result}].Get<float>(), n);\n        outQ.EnQue(y);\n");
    let nbuf = next.max(1) as u64;
    // Largest tile (multiple of 256 elements) whose buffers fit the UB:
    // per element 2*in + 2*out queue slots, an f32 copy per input and one
    // f32 buffer per expression token.
    let cap = ctx.target().capacity().ub;
    let per_elem = 2 * (n_in as u64 + 1) * t.size() + 4 * (n_in as u64 + nbuf);
    let tile_len = ((cap - 1024) / per_elem / 256 * 256).min(8192);
    if tile_len == 0 {
        bail!("{}: cannot be tiled: the expression needs too many buffers", ctx.k.name);
    }
    let per_block = t.per_block();
    let (tail_load, tail_store, tail_doc) = match ctx.target() {
        Target::Ascend910B => (TAIL_LOAD_910B.to_string(), TAIL_STORE_910B.to_string(), "DataCopyPad moves it."),
        Target::Ascend310P => (
            TAIL_LOAD_310P.replace("{{PER_BLOCK}}", &per_block.to_string()),
            TAIL_STORE_310P.replace("{{PER_BLOCK}}", &per_block.to_string()),
            "310P has no DataCopyPad, so whole blocks go by DataCopy and the last partial block element by element.",
        ),
    };
    let params: String = (0..n_in).map(|i| format!("GM_ADDR in{i}, ")).collect();
    let args: String = (0..n_in).map(|i| format!("in{i}, ")).collect();
    let set_gm: String =
        (0..n_in).map(|i| format!("        inGm{i}.SetGlobalBuffer((__gm__ T*)in{i}, total);\n")).collect();
    let init_in: String = (0..n_in)
        .map(|i| format!("        pipe.InitBuffer(inQ{i}, 2, tileLen * sizeof(T));\n        pipe.InitBuffer(inF{i}, tileLen * sizeof(float));\n"))
        .collect();
    let copy_in: String = (0..n_in).map(|i| format!("        Load(inQ{i}, inGm{i}, off, len, padLen);\n")).collect();
    let members: String = (0..n_in)
        .map(|i| format!("    TQue<TPosition::VECIN, 2> inQ{i};\n    TBuf<TPosition::VECCALC> inF{i};\n    GlobalTensor<T> inGm{i};\n"))
        .collect();
    let what = format!("{op:?}");
    let entry = ctx.entry("");
    let src = vector_source(
        &entry,
        &format!("Elementwise {what}, in f32."),
        ELEMENTWISE,
        &[
            ("T", t.cpp().into()),
            ("WHAT", what),
            ("TAIL_DOC", tail_doc.into()),
            ("PARAMS", params),
            ("ARGS", args),
            ("SET_GM", set_gm),
            ("INIT_IN", init_in),
            ("NBUF", nbuf.to_string()),
            ("PER_BLOCK", per_block.to_string()),
            ("LOAD_TAIL", tail_load),
            ("STORE_TAIL", tail_store),
            ("COPY_IN", copy_in),
            ("COMPUTE", compute),
            ("MEMBERS", members),
        ],
    );
    let total = ctx.dims(n_in, 0, out_shape.len())?;
    let tiles = total.clone().ceil_div(TExpr::c(tile_len));
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("total", total));
    fields.push(TilingField::u32("tileLen", TExpr::c(tile_len)));
    let ub = 2 * (n_in as u64 + 1) * r32(tile_len * t.size()) + (n_in as u64 + nbuf) * r32(tile_len * 4);
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = (0..n_in).map(|i| ctx.param(&format!("in{i}"), i, Role::Input)).collect();
    dk.params.push(ctx.param("out", n_in, Role::Output));
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

const ROPE: &str = r#"
using T = {{T}};
using C = {{C}};

// NeoX RoPE on one (token, head) row per tile: y = x*cos + rotate_half(x)*sin,
// rotate_half(x) = [-x[half:], x[:half]].
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR cosT, GM_ADDR sinT, GM_ADDR y, const {{TILING}}& t)
    {
        d = t.headDim;
        heads = t.heads;
{{RANGE}}
        const uint32_t tokens = t.tiles / heads;
        xGm.SetGlobalBuffer((__gm__ T*)x, t.tiles * d);
        yGm.SetGlobalBuffer((__gm__ T*)y, t.tiles * d);
        cosGm.SetGlobalBuffer((__gm__ C*)cosT, tokens * d);
        sinGm.SetGlobalBuffer((__gm__ C*)sinT, tokens * d);
        pipe.InitBuffer(inX, 2, d * sizeof(T));
        pipe.InitBuffer(inCS, 2, 2 * d * sizeof(C));
        pipe.InitBuffer(outY, 2, d * sizeof(T));
        pipe.InitBuffer(xBuf, d * sizeof(float));
        pipe.InitBuffer(rotBuf, d * sizeof(float));
        pipe.InitBuffer(csBuf, 2 * d * sizeof(float));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t tok = tile / heads;
            LocalTensor<T> x = inX.AllocTensor<T>();
            DataCopy(x, xGm[tile * d], d);
            inX.EnQue(x);
            LocalTensor<C> cs = inCS.AllocTensor<C>();
            DataCopy(cs, cosGm[tok * d], d);
            DataCopy(cs[d], sinGm[tok * d], d);
            inCS.EnQue(cs);
            Compute();
            LocalTensor<T> y = outY.DeQue<T>();
            DataCopy(yGm[tile * d], y, d);
            outY.FreeTensor(y);
        }
    }

private:
    __aicore__ inline void Compute()
    {
        const uint32_t half = d / 2;
        LocalTensor<T> x = inX.DeQue<T>();
        LocalTensor<C> cs = inCS.DeQue<C>();
        LocalTensor<float> xf = xBuf.Get<float>();
        LocalTensor<float> rot = rotBuf.Get<float>();
        LocalTensor<float> csf = csBuf.Get<float>();
        ToFloat(xf, x, d);
        ToFloat(csf, cs, 2 * d);
        inX.FreeTensor(x);
        inCS.FreeTensor(cs);
        PipeBarrier<PIPE_V>();
        Muls(rot, xf[half], -1.0f, half);
        DataCopy(rot[half], xf, half);
        PipeBarrier<PIPE_V>();
        Mul(xf, xf, csf, d);
        Mul(rot, rot, csf[d], d);
        PipeBarrier<PIPE_V>();
        Add(xf, xf, rot, d);
        PipeBarrier<PIPE_V>();
        LocalTensor<T> y = outY.AllocTensor<T>();
        FromFloat(y, xf, d);
        outY.EnQue(y);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX, inCS;
    TQue<TPosition::VECOUT, 2> outY;
    TBuf<TPosition::VECCALC> xBuf, rotBuf, csBuf;
    GlobalTensor<T> xGm, yGm;
    GlobalTensor<C> cosGm, sinGm;
    uint32_t d = 0, heads = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, GM_ADDR cosT, GM_ADDR sinT, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, cosT, sinT, y, t);
    op.Process();
}
"#;

/// `Rope (x[T, heads, D], cos[T, D], sin[T, D], out)`.
pub(crate) fn rope(ctx: &Ctx) -> Result<DeviceKernels> {
    let (heads, d) = (ctx.cdim(0, 1, "heads")?, ctx.cdim(0, 2, "head_dim")?);
    let (t, c) = (ctx.dt[0], ctx.dt[1]);
    if d % 2 != 0 {
        bail!("{}: head_dim {d} must be even", ctx.k.name);
    }
    // Both halves are vector operands: each must start on a 32-byte block.
    need_aligned(ctx, "half a head", d / 2, DevType::F32)?;
    need_aligned(ctx, "a head", d, t)?;
    need_aligned(ctx, "a cos/sin row", d, c)?;
    let tiles = ctx.dims(0, 0, 2)?;
    let entry = ctx.entry("");
    let src = vector_source(
        &entry,
        "RoPE (NeoX rotate-half), in f32.",
        ROPE,
        &[("T", t.cpp().into()), ("C", c.cpp().into())],
    );
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("heads", TExpr::c(heads)));
    fields.push(TilingField::u32("headDim", TExpr::c(d)));
    let ub = 4 * r32(d * t.size()) + 2 * r32(2 * d * c.size()) + 4 * r32(d * 4);
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = vec![
        ctx.param("x", 0, Role::Input),
        ctx.param("cosT", 1, Role::Input),
        ctx.param("sinT", 2, Role::Input),
        ctx.param("y", 3, Role::Output),
    ];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

const ATTENTION: &str = r#"
using T = {{T}};

// Causal GQA attention, FlashAttention style: one (token, query head) per
// tile; the visible keys (positions <= the token's position) are streamed
// through UB in chunks of `kvTile` rows with an online softmax (running max
// m, running sum l, rescaled f32 accumulator), so UB use does not depend on
// the KV length. Serves prefill and decode over the KV cache alike.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR pos, GM_ADDR out, const {{TILING}}& t)
    {
        d = t.headDim;
        qHeads = t.qHeads;
        kvHeads = t.kvHeads;
        kvLen = t.kvLen;
        kvTile = t.kvTile;
        scale = t.scale;
{{RANGE}}
        const uint32_t tokens = t.tiles / qHeads;
        qGm.SetGlobalBuffer((__gm__ T*)q, t.tiles * d);
        oGm.SetGlobalBuffer((__gm__ T*)out, t.tiles * d);
        kGm.SetGlobalBuffer((__gm__ T*)k, kvLen * kvHeads * d);
        vGm.SetGlobalBuffer((__gm__ T*)v, kvLen * kvHeads * d);
        posGm.SetGlobalBuffer((__gm__ int64_t*)pos, tokens);
{{FLASH_BUFFERS}}    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t tok = tile / qHeads;
            const uint32_t kh = (tile % qHeads) / (qHeads / kvHeads);
            int64_t p = posGm.GetValue(tok) + 1;
            const uint32_t visible = p < 0 ? 0 : MinU(static_cast<uint32_t>(p), kvLen);
            Row(tile, kh, visible);
        }
    }

private:
{{FLASH_HELPERS}}    __aicore__ inline void Row(uint32_t tile, uint32_t kh, uint32_t visible)
    {
{{FLASH_ROW_BEGIN}}        for (uint32_t j0 = 0; j0 < visible; j0 += kvTile) {
            const uint32_t n = MinU(kvTile, visible - j0);
            LoadRows(inK, kGm, j0, n, kh);
            LoadRows(inV, vGm, j0, n, kh);
{{FLASH_STEP}}        }
{{FLASH_ROW_END}}    }

{{FLASH_MEMBERS}}    GlobalTensor<T> qGm, kGm, vGm, oGm;
    GlobalTensor<int64_t> posGm;
    uint32_t d = 0, qHeads = 0, kvHeads = 0, kvLen = 0, kvTile = 0, start = 0, end = 0;
    float scale = 0.0f;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR pos, GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(q, k, v, pos, out, t);
    op.Process();
}
"#;

/// `Attention (q[T, Hq, D], k[K, Hkv, D], v[K, Hkv, D], positions[T], out)`.
pub(crate) fn attention(ctx: &Ctx, scale: f64) -> Result<DeviceKernels> {
    let (hq, d) = (ctx.cdim(0, 1, "query heads")?, ctx.cdim(0, 2, "head_dim")?);
    let hkv = ctx.cdim(1, 1, "kv heads")?;
    let t = ctx.dt[0];
    check_heads(&ctx.k.name, hq, hkv, d, t)?;
    if ctx.dt[1] != t || ctx.dt[2] != t || ctx.dt[4] != t {
        bail!("{}: q, k, v and out must share one dtype", ctx.k.name);
    }
    let plan = flash_tile(&ctx.k.name, ctx.target(), d, t, t, |_| 0, 128)?;
    let tiles = ctx.dims(0, 0, 2)?;
    let entry = ctx.entry("");
    let src = vector_source(
        &entry,
        "Attention (flash, online softmax, GQA), in f32.",
        ATTENTION,
        &[&[("T", t.cpp().into())][..], &flash_vars("T", &plan)].concat(),
    );
    let sizes = vec![TilingField::u32("kvLen", ctx.dim(1, 0)?)];
    let fields = flash_fields(&tiles, (hq, hkv, d), sizes, &plan, scale);
    let mut dk = vector_kernel(entry, src, fields, &tiles, plan.ub);
    dk.params = vec![
        ctx.param("q", 0, Role::Input),
        ctx.param("k", 1, Role::Input),
        ctx.param("v", 2, Role::Input),
        ctx.param("pos", 3, Role::Input),
        ctx.param("out", 4, Role::Output),
    ];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

const GATING: &str = r#"
// MoeGatingGroupTopK: softmax over all experts (f32), then the top-1 expert
// inside each of `groups` contiguous groups (lowest index wins ties),
// weight = p * scale[expert]. One token per tile.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR logits, GM_ADDR scaleIn, GM_ADDR wOut, GM_ADDR idOut, const {{TILING}}& t)
    {
        experts = t.experts;
        groups = t.groups;
{{RANGE}}
        lGm.SetGlobalBuffer((__gm__ float*)logits, t.tiles * experts);
        sGm.SetGlobalBuffer((__gm__ float*)scaleIn, experts);
        wGm.SetGlobalBuffer((__gm__ float*)wOut, t.tiles * groups);
        iGm.SetGlobalBuffer((__gm__ int64_t*)idOut, t.tiles * groups);
        pipe.InitBuffer(inL, 2, experts * sizeof(float));
        pipe.InitBuffer(outW, 2, groups * sizeof(float));
        pipe.InitBuffer(outI, 2, groups * sizeof(int64_t));
        pipe.InitBuffer(scaleBuf, experts * sizeof(float));
        pipe.InitBuffer(workBuf, {{WORK}});
        pipe.InitBuffer(redBuf, 32);
    }
    __aicore__ inline void Process()
    {
        if (start >= end) return;
        LocalTensor<float> sc = scaleBuf.Get<float>();
        DataCopy(sc, sGm, experts);
        for (uint32_t tok = start; tok < end; tok++) {
            LocalTensor<float> l = inL.AllocTensor<float>();
            DataCopy(l, lGm[tok * experts], experts);
            inL.EnQue(l);
            Compute(sc);
            LocalTensor<float> w = outW.DeQue<float>();
            LocalTensor<int64_t> id = outI.DeQue<int64_t>();
            DataCopy(wGm[tok * groups], w, groups);
            DataCopy(iGm[tok * groups], id, groups);
            outW.FreeTensor(w);
            outI.FreeTensor(id);
        }
    }

private:
    __aicore__ inline void Sync()
    {
        event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(e);
        WaitFlag<HardEvent::V_S>(e);
    }
    __aicore__ inline void Compute(const LocalTensor<float>& sc)
    {
        LocalTensor<float> p = inL.DeQue<float>();
        LocalTensor<float> work = workBuf.Get<float>();
        LocalTensor<float> red = redBuf.Get<float>();
        ReduceMax(red, p, work, experts);
        Sync();
        const float mx = red.GetValue(0);
        Adds(p, p, -mx, experts);
        PipeBarrier<PIPE_V>();
        Exp(p, p, experts);
        PipeBarrier<PIPE_V>();
        ReduceSum(red, p, work, experts);
        Sync();
        const float inv = 1.0f / red.GetValue(0);
        Muls(p, p, inv, experts);
        PipeBarrier<PIPE_V>();
        LocalTensor<float> w = outW.AllocTensor<float>();
        LocalTensor<int64_t> id = outI.AllocTensor<int64_t>();
        const uint32_t per = experts / groups;
        for (uint32_t g = 0; g < groups; g++) {
            ReduceMax(red, p[g * per], work, per, true);
            Sync();
            const uint32_t j = red.ReinterpretCast<uint32_t>().GetValue(1);
            const uint32_t e = g * per + j;
            w.SetValue(g, red.GetValue(0) * sc.GetValue(e));
            id.SetValue(g, static_cast<int64_t>(e));
        }
        // MTE3 copies out what the scalar unit stored.
        event_t s2m = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_MTE3));
        SetFlag<HardEvent::S_MTE3>(s2m);
        WaitFlag<HardEvent::S_MTE3>(s2m);
        inL.FreeTensor(p);
        outW.EnQue(w);
        outI.EnQue(id);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inL;
    TQue<TPosition::VECOUT, 2> outW, outI;
    TBuf<TPosition::VECCALC> scaleBuf, workBuf, redBuf;
    GlobalTensor<float> lGm, sGm, wGm;
    GlobalTensor<int64_t> iGm;
    uint32_t experts = 0, groups = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR logits, GM_ADDR scaleIn, GM_ADDR wOut, GM_ADDR idOut, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(logits, scaleIn, wOut, idOut, t);
    op.Process();
}
"#;

/// `MoeGating (logits[T, E] f32, scale[E] f32, weights_out[T, G] f32, ids_out[T, G] i64)`.
pub(crate) fn moe_gating(ctx: &Ctx, groups: usize) -> Result<DeviceKernels> {
    let e = ctx.cdim(0, 1, "experts")?;
    let g = groups as u64;
    if g == 0 || e % g != 0 {
        bail!("{}: {e} experts are not divisible into {g} groups", ctx.k.name);
    }
    for (i, want) in [(0, DevType::F32), (1, DevType::F32), (2, DevType::F32), (3, DevType::I64)] {
        if ctx.dt[i] != want {
            bail!("{}: gating argument {i} must be {want} on the device, found {}", ctx.k.name, ctx.dt[i]);
        }
    }
    need_aligned(ctx, "a logits row", e, DevType::F32)?;
    need_aligned(ctx, "a row of group weights", g, DevType::F32)?;
    let tiles = ctx.dim(0, 0)?;
    let work = r32(2 * (e * 4).div_ceil(256) * 4).max(64);
    let entry = ctx.entry("");
    let src = head(&entry, "MoeGatingGroupTopK (softmax, per-group top-1, scale).")
        + &fill_kernel(GATING, &entry, &[("RANGE", RANGE.into()), ("WORK", work.to_string())]);
    let src = src.replace("using namespace AscendC;\n", "using namespace AscendC;\n\n__aicore__ inline uint32_t MinU(uint32_t a, uint32_t b) { return a < b ? a : b; }\n");
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("experts", TExpr::c(e)));
    fields.push(TilingField::u32("groups", TExpr::c(g)));
    let ub = 3 * r32(e * 4) + 2 * r32(g * 4) + 2 * r32(g * 8) + work + 32;
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = vec![
        ctx.param("logits", 0, Role::Input),
        ctx.param("scaleIn", 1, Role::Input),
        ctx.param("wOut", 2, Role::Output),
        ctx.param("idOut", 3, Role::Output),
    ];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

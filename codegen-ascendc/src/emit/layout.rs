//! Data-movement kernels: `slice` along an axis, `copy_into` (a tensor
//! written into a slice of a bigger one), and the collectives of a
//! partitioned program (the HCCL call on the host, with the packing
//! kernels that turn chunks along an inner axis into the contiguous
//! per-member blocks HCCL sends and receives).
//!
//! All are one device kernel, the strided row copy: tile `(s, r)` copies
//! `width` elements from `src[srcBase + s*srcSeg + r*srcRow]` to
//! `dst[dstBase + s*dstSeg + r*dstRow]`. A slice is one segment (and
//! `copy_into`, its inverse, one segment with a destination base); packing
//! for `n` members is `n` segments.

use super::vector::{tiles_fields, vector_kernel, vector_source};
use super::{ArgRef, Ctx, DeviceKernel, DeviceKernels, HostCollective, Param, Role, TExpr, TempBuf, TilingField};
use crate::target::{DevType, Target};
use anyhow::{bail, Result};
use panguc_ir::op::CollectiveKind;
use panguc_ir::Dim;

const ROW_COPY: &str = r#"
using T = {{T}};

// {{WHAT}}
// Tile (s, r) copies `width` elements from src[srcBase + s*srcSeg + r*srcRow]
// to dst[dstBase + s*dstSeg + r*dstRow] through the UB, `chunk` elements at a time.
// Rows need not be whole 32-byte blocks: {{TAIL_DOC}}
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR src, GM_ADDR dst, const {{TILING}}& t)
    {
        rows = t.rows;
        width = t.width;
        chunk = t.chunk;
        srcBase = t.srcBase;
        srcSeg = t.srcSeg;
        srcRow = t.srcRow;
        dstBase = t.dstBase;
        dstSeg = t.dstSeg;
        dstRow = t.dstRow;
{{RANGE}}
        srcGm.SetGlobalBuffer((__gm__ T*)src, t.srcLen);
        dstGm.SetGlobalBuffer((__gm__ T*)dst, t.dstLen);
        pipe.InitBuffer(inQ, 2, chunk * sizeof(T));
        pipe.InitBuffer(outQ, 2, chunk * sizeof(T));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t s = tile / rows, r = tile % rows;
            const uint32_t from = srcBase + s * srcSeg + r * srcRow, to = dstBase + s * dstSeg + r * dstRow;
            // `c`: elements of this row already copied by this core.
            for (uint32_t c = 0; c < width; c += chunk) Copy(from + c, to + c, MinU(chunk, width - c), c);
        }
    }

private:
{{COPY}}
    TPipe pipe;
    TQue<TPosition::VECIN, 2> inQ;
    TQue<TPosition::VECOUT, 2> outQ;
    GlobalTensor<T> srcGm, dstGm;
    uint32_t rows = 0, width = 0, chunk = 0, srcBase = 0, srcSeg = 0, srcRow = 0, dstBase = 0, dstSeg = 0, dstRow = 0;
    uint32_t start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR src, GM_ADDR dst, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(src, dst, t);
    op.Process();
}
"#;

/// 910B: `DataCopyPad` moves exactly `len` elements each way (the UB copy
/// is padded with zeros to whole blocks).
const COPY_910B: &str = r#"    __aicore__ inline void Copy(uint32_t from, uint32_t to, uint32_t len, uint32_t /* done */)
    {
        const uint32_t padLen = (len + {{PER_BLOCK}} - 1) / {{PER_BLOCK}} * {{PER_BLOCK}};
        DataCopyExtParams p{1, static_cast<uint32_t>(len * sizeof(T)), 0, 0, 0};
        LocalTensor<T> x = inQ.AllocTensor<T>();
        if (len == padLen) {
            DataCopy(x, srcGm[from], len);
        } else {
            DataCopyPadExtParams<T> pad{true, 0, static_cast<uint8_t>(padLen - len), static_cast<T>(0)};
            DataCopyPad(x, srcGm[from], p, pad);
        }
        inQ.EnQue(x);
        x = inQ.DeQue<T>();
        LocalTensor<T> y = outQ.AllocTensor<T>();
        DataCopy(y, x, padLen);
        inQ.FreeTensor(x);
        outQ.EnQue(y);
        y = outQ.DeQue<T>();
        if (len == padLen) {
            DataCopy(dstGm[to], y, len);
        } else {
            DataCopyPad(dstGm[to], y, p);
        }
        outQ.FreeTensor(y);
    }
"#;

/// 310P (no `DataCopyPad`): whole 32-byte blocks through the UB. A partial
/// last block is moved as the row's last whole block, its start rolled back
/// into bytes this core already copied (rewritten with the same values), so
/// GM is written by DMA only: scalar stores go through the core's data cache
/// and are written back per 64-byte line, which would overwrite the
/// neighbouring row another core writes. Only a row shorter than one block
/// is copied element by element; the host then runs the copy on one core.
const COPY_310P: &str = r#"    __aicore__ inline void Copy(uint32_t from, uint32_t to, uint32_t len, uint32_t done)
    {
        const uint32_t body = len / {{PER_BLOCK}} * {{PER_BLOCK}};
        if (body > 0) Move(from, to, body);
        if (len == body) return;
        if (done + len >= {{PER_BLOCK}}) {
            Move(from + len - {{PER_BLOCK}}, to + len - {{PER_BLOCK}}, {{PER_BLOCK}});
        } else {
            for (uint32_t i = 0; i < len; i++) dstGm.SetValue(to + i, srcGm.GetValue(from + i));
        }
    }
    __aicore__ inline void Move(uint32_t from, uint32_t to, uint32_t len)
    {
        LocalTensor<T> x = inQ.AllocTensor<T>();
        DataCopy(x, srcGm[from], len);
        inQ.EnQue(x);
        x = inQ.DeQue<T>();
        LocalTensor<T> y = outQ.AllocTensor<T>();
        DataCopy(y, x, len);
        inQ.FreeTensor(x);
        outQ.EnQue(y);
        y = outQ.DeQue<T>();
        DataCopy(dstGm[to], y, len);
        outQ.FreeTensor(y);
    }
"#;

/// A strided row copy (see the module docs); every quantity in elements.
pub(crate) struct RowCopy {
    pub segs: TExpr,
    pub rows: TExpr,
    pub width: TExpr,
    pub src_base: TExpr,
    pub src_seg: TExpr,
    pub src_row: TExpr,
    pub dst_base: TExpr,
    pub dst_seg: TExpr,
    pub dst_row: TExpr,
    pub src_len: TExpr,
    pub dst_len: TExpr,
}

/// Largest chunk of a row moved per UB round trip: 16 KiB per buffer
/// (four buffers), or the whole row rounded up to a block when shorter.
fn chunk_elems(width: &TExpr, t: DevType) -> u64 {
    let cap = 16384 / t.size();
    match width {
        TExpr::C(w) => w.div_ceil(t.per_block()).saturating_mul(t.per_block()).clamp(t.per_block(), cap),
        _ => cap,
    }
}

/// The row-copy device kernel `entry` for elements of `t`.
pub(crate) fn row_copy_kernel(entry: String, what: &str, t: DevType, target: Target, c: RowCopy) -> DeviceKernel {
    let per_block = t.per_block().to_string();
    let (copy, tail_doc) = match target {
        Target::Ascend910B => (COPY_910B, "DataCopyPad moves the exact byte count."),
        Target::Ascend310P => {
            (COPY_310P, "310P has no DataCopyPad, so a partial last block is copied as the row's last whole block.")
        }
    };
    let src = vector_source(
        &entry,
        what,
        ROW_COPY,
        &[
            ("T", t.cpp().into()),
            ("WHAT", what.into()),
            ("TAIL_DOC", tail_doc.into()),
            ("COPY", copy.replace("{{PER_BLOCK}}", &per_block)),
        ],
    );
    let chunk = chunk_elems(&c.width, t);
    let width = c.width.clone();
    let tiles = c.segs.times(c.rows.clone());
    let mut fields = tiles_fields(&tiles);
    for (name, e) in [
        ("rows", c.rows),
        ("width", c.width),
        ("chunk", TExpr::c(chunk)),
        ("srcBase", c.src_base),
        ("srcSeg", c.src_seg),
        ("srcRow", c.src_row),
        ("dstBase", c.dst_base),
        ("dstSeg", c.dst_seg),
        ("dstRow", c.dst_row),
        ("srcLen", c.src_len),
        ("dstLen", c.dst_len),
    ] {
        fields.push(TilingField::u32(name, e));
    }
    let mut dk = vector_kernel(entry, src, fields, &tiles, 4 * super::r32(chunk * t.size()));
    if target == Target::Ascend310P && !matches!(width, TExpr::C(w) if w >= t.per_block()) {
        // Rows shorter than a block (or of unknown width) are stored element
        // by element: one core does every tile so no cache line is shared.
        for f in dk.fields.iter_mut().filter(|f| f.name == "tilesPerCore") {
            f.value = super::FieldValue::U32(tiles.clone());
        }
        dk.block_dim = TExpr::c(1);
    }
    dk
}

/// `(outer, len, inner)` of argument `arg` split at `axis`.
fn split_at_axis(ctx: &Ctx, arg: usize, axis: usize) -> Result<(TExpr, TExpr, TExpr)> {
    let rank = ctx.rank(arg);
    if axis >= rank {
        bail!("{}: axis {axis} is out of range for a rank-{rank} argument", ctx.k.name);
    }
    Ok((ctx.dims(arg, 0, axis)?, ctx.dim(arg, axis)?, ctx.dims(arg, axis + 1, rank)?))
}

/// `Slice (in, out)`: `out = in[.., start..start+len_out, ..]` along `axis`.
pub(crate) fn slice(ctx: &Ctx, axis: usize, start: usize) -> Result<DeviceKernels> {
    let t = ctx.dt[0];
    if ctx.dt[1] != t {
        bail!("{}: slice output dtype {} differs from the input's {t}", ctx.k.name, ctx.dt[1]);
    }
    let (outer, len_in, inner) = split_at_axis(ctx, 0, axis)?;
    let (_, len_out, _) = split_at_axis(ctx, 1, axis)?;
    let width = len_out.times(inner.clone());
    let copy = RowCopy {
        segs: TExpr::c(1),
        rows: outer.clone(),
        src_base: TExpr::c(start as u64).times(inner.clone()),
        src_seg: TExpr::c(0),
        src_row: len_in.clone().times(inner.clone()),
        dst_base: TExpr::c(0),
        dst_seg: TExpr::c(0),
        dst_row: width.clone(),
        src_len: outer.clone().times(len_in).times(inner),
        dst_len: outer.times(width.clone()),
        width,
    };
    let what = format!("Slice along axis {axis} from {start}.");
    let mut dk = row_copy_kernel(ctx.entry(""), &what, t, ctx.target(), copy);
    dk.params = vec![ctx.param("src", 0, Role::Input), ctx.param("dst", 1, Role::Output)];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

/// `CopyInto (in, out)`: `out[.., offset..offset+len_in, ..] = in` along
/// `axis` (one part of a concat, or new rows appended to a contiguous KV
/// cache at `past`); the rest of `out` is not touched, so it is read-write.
pub(crate) fn copy_into(ctx: &Ctx, axis: usize, offset: &Dim) -> Result<DeviceKernels> {
    let t = ctx.dt[0];
    if ctx.dt[1] != t {
        bail!("{}: copy_into output dtype {} differs from the input's {t}", ctx.k.name, ctx.dt[1]);
    }
    let (outer, len_in, inner) = split_at_axis(ctx, 0, axis)?;
    let (outer_out, len_out, inner_out) = split_at_axis(ctx, 1, axis)?;
    if outer != outer_out || inner != inner_out {
        bail!("{}: copy_into input and output must agree on every dim but axis {axis}", ctx.k.name);
    }
    let offset = TExpr::from_dim(offset).map_err(|e| anyhow::anyhow!("{}: copy_into offset: {e}", ctx.k.name))?;
    let width = len_in.clone().times(inner.clone());
    let dst_row = len_out.times(inner.clone());
    let copy = RowCopy {
        segs: TExpr::c(1),
        rows: outer.clone(),
        src_base: TExpr::c(0),
        src_seg: TExpr::c(0),
        src_row: width.clone(),
        dst_base: offset.times(inner),
        dst_seg: TExpr::c(0),
        dst_row: dst_row.clone(),
        src_len: outer.clone().times(width.clone()),
        dst_len: outer.times(dst_row),
        width,
    };
    let what = format!("Copy into a slice along axis {axis}.");
    let mut dk = row_copy_kernel(ctx.entry(""), &what, t, ctx.target(), copy);
    dk.params = vec![ctx.param("src", 0, Role::Input), ctx.param("dst", 1, Role::InOut)];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

/// A collective `(in, out)` over `group` along `axis`: the host calls HCCL
/// on contiguous per-member blocks. When the axis has outer dimensions
/// (`outer > 1`, e.g. the hidden axis of `[tokens, hidden]`), chunks along
/// it are packed into blocks by a row copy before the call (reduce-scatter,
/// all-to-all) and unpacked after it (all-gather, all-to-all), through
/// temporary GM buffers.
pub(crate) fn collective(ctx: &Ctx, kind: CollectiveKind, group: &[usize], axis: usize) -> Result<DeviceKernels> {
    let t = ctx.dt[0];
    if ctx.dt[1] != t {
        bail!("{}: collective output dtype {} differs from the input's {t}", ctx.k.name, ctx.dt[1]);
    }
    let n = group.len() as u64;
    let (outer, len, inner) = split_at_axis(ctx, 0, axis)?;
    let needs_packing = outer != TExpr::c(1) && kind != CollectiveKind::AllReduce;
    let mut out = DeviceKernels {
        kernels: vec![],
        temps: vec![],
        host: Some(HostCollective {
            kind,
            group: group.to_vec(),
            pre: 0,
            send: ArgRef::Orig(0),
            recv: ArgRef::Orig(1),
            dtype: t,
        }),
    };
    if !needs_packing {
        return Ok(out);
    }
    // Per-member block of the *sent* layout along the axis.
    let (sent_len, recv_len) = match kind {
        CollectiveKind::AllGather => (len.clone(), len.clone().times(TExpr::c(n))),
        _ => {
            let TExpr::C(l) = len else {
                bail!("{}: the collective axis {axis} must be static to split it {n} ways", ctx.k.name)
            };
            if l % n != 0 {
                bail!("{}: collective axis {axis} of length {l} does not split {n} ways", ctx.k.name);
            }
            (TExpr::c(l), TExpr::c(l / n))
        }
    };
    let temp = |name: &str, elems: TExpr| TempBuf { name: name.into(), dtype: t, shape: vec![elems.clone()], elems };
    let param = |name: &str, arg: ArgRef, role: Role| Param::new(name, t, role, arg);
    // [outer][n][chunk] (chunks along the axis) -> [n][outer][chunk].
    let pack = |chunk: TExpr, total: TExpr| RowCopy {
        segs: TExpr::c(n),
        rows: outer.clone(),
        width: chunk.clone(),
        src_base: TExpr::c(0),
        src_seg: chunk.clone(),
        src_row: TExpr::c(n).times(chunk.clone()),
        dst_base: TExpr::c(0),
        dst_seg: outer.clone().times(chunk.clone()),
        dst_row: chunk,
        src_len: total.clone(),
        dst_len: total,
    };
    // [n][outer][chunk] -> [outer][n][chunk].
    let unpack = |chunk: TExpr, total: TExpr| RowCopy {
        segs: TExpr::c(n),
        rows: outer.clone(),
        width: chunk.clone(),
        src_base: TExpr::c(0),
        src_seg: outer.clone().times(chunk.clone()),
        src_row: chunk.clone(),
        dst_base: TExpr::c(0),
        dst_seg: chunk.clone(),
        dst_row: TExpr::c(n).times(chunk),
        src_len: total.clone(),
        dst_len: total,
    };
    let in_total = outer.clone().times(sent_len.clone()).times(inner.clone());
    let host = out.host.as_mut().expect("set above");
    if matches!(kind, CollectiveKind::ReduceScatter | CollectiveKind::AllToAll) {
        let chunk = recv_len.clone().times(inner.clone());
        out.temps.push(temp("packed", in_total.clone()));
        let mut dk = row_copy_kernel(
            ctx.entry("_pack"),
            &format!("Packs the {n} chunks along axis {axis} into per-member blocks for {kind:?}."),
            t,
            ctx.target(),
            pack(chunk, in_total.clone()),
        );
        dk.params = vec![param("src", ArgRef::Orig(0), Role::Input), param("dst", ArgRef::Temp(0), Role::Output)];
        out.kernels.push(dk);
        host.pre = 1;
        host.send = ArgRef::Temp(0);
    }
    if matches!(kind, CollectiveKind::AllGather | CollectiveKind::AllToAll) {
        let (chunk, total) = match kind {
            CollectiveKind::AllGather => (sent_len.times(inner), in_total.times(TExpr::c(n))),
            _ => (recv_len.times(inner), in_total),
        };
        let j = out.temps.len();
        out.temps.push(temp("blocks", total.clone()));
        let mut dk = row_copy_kernel(
            ctx.entry("_unpack"),
            &format!("Unpacks the {n} per-member blocks of {kind:?} into chunks along axis {axis}."),
            t,
            ctx.target(),
            unpack(chunk, total),
        );
        dk.params = vec![param("src", ArgRef::Temp(j), Role::Input), param("dst", ArgRef::Orig(1), Role::Output)];
        out.kernels.push(dk);
        host.recv = ArgRef::Temp(j);
    }
    Ok(out)
}

const INDEX_ARITH: &str = r#"
using T = {{T}};

// {{WHAT}}
// Index arithmetic on the scalar unit: the vector unit has no 64-bit
// integer maths, and these tensors are small (a few ids per token).
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR a, GM_ADDR b, GM_ADDR out, const {{TILING}}& t)
    {
        total = t.total;
        tileLen = t.tileLen;
{{RANGE}}
        aGm.SetGlobalBuffer((__gm__ T*)a, {{A_LEN}});
        bGm.SetGlobalBuffer((__gm__ T*)b, {{B_LEN}});
        outGm.SetGlobalBuffer((__gm__ T*)out, total);
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t off = tile * tileLen;
            const uint32_t stop = MinU(off + tileLen, total);
            for (uint32_t i = off; i < stop; i++) {
                const T x = aGm.GetValue({{A_AT}});
                const T y = bGm.GetValue({{B_AT}});
                outGm.SetValue(i, {{EXPR}});
            }
        }
    }

private:
    GlobalTensor<T> aGm, bGm, outGm;
    uint32_t total = 0, tileLen = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR a, GM_ADDR b, GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(a, b, out, t);
    op.Process();
}
"#;

/// `Elementwise (a, b, out)` on integers (`i64` ids, e.g. a rank's local
/// expert ids = global ids - first local expert): one binary op, either
/// operand a scalar (`[]`) broadcast over the other's shape.
pub(crate) fn index_arith(ctx: &Ctx, op: panguc_ir::op::BinaryOp) -> Result<DeviceKernels> {
    use panguc_ir::op::BinaryOp;
    if ctx.k.args.len() != 3 || ctx.dt.iter().any(|d| *d != DevType::I64) {
        bail!("{}: integer elementwise kernels take two i64 operands and an i64 output", ctx.k.name);
    }
    let out_shape = &ctx.k.args[2].shape;
    let operand = |i: usize| -> Result<(String, String)> {
        let shape = &ctx.k.args[i].shape;
        if shape == out_shape {
            Ok(("total".into(), "i".into()))
        } else if shape.iter().all(|d| d.as_const() == Some(1)) {
            Ok(("1".into(), "0".into()))
        } else {
            bail!("{}: integer operand {i} must have the output's shape or be a scalar", ctx.k.name)
        }
    };
    let ((a_len, a_at), (b_len, b_at)) = (operand(0)?, operand(1)?);
    let expr = match op {
        BinaryOp::Add => "x + y",
        BinaryOp::Sub => "x - y",
        BinaryOp::Mul => "x * y",
        BinaryOp::Max => "(x > y ? x : y)",
        BinaryOp::Div => bail!("{}: integer division has no AscendC kernel", ctx.k.name),
    };
    let entry = ctx.entry("");
    let what = format!("Integer elementwise {op:?}.");
    let src = vector_source(
        &entry,
        &what,
        INDEX_ARITH,
        &[
            ("T", DevType::I64.cpp().into()),
            ("WHAT", what.clone()),
            ("A_LEN", a_len),
            ("B_LEN", b_len),
            ("A_AT", a_at),
            ("B_AT", b_at),
            ("EXPR", expr.into()),
        ],
    );
    let tile_len = 1024;
    let total = ctx.dims(2, 0, out_shape.len())?;
    let tiles = total.clone().ceil_div(TExpr::c(tile_len));
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("total", total));
    fields.push(TilingField::u32("tileLen", TExpr::c(tile_len)));
    let mut dk = vector_kernel(entry, src, fields, &tiles, 0);
    dk.params = vec![ctx.param("a", 0, Role::Input), ctx.param("b", 1, Role::Input), ctx.param("out", 2, Role::Output)];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

const ROW_BROADCAST: &str = r#"
using T = {{T}};
using W = {{W}};

// {{WHAT}}
// One row of `cols` elements per tile; the broadcast row is read once.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR w, GM_ADDR y, const {{TILING}}& t)
    {
        cols = t.cols;
{{RANGE}}
        xGm.SetGlobalBuffer((__gm__ T*)x, t.tiles * cols);
        wGm.SetGlobalBuffer((__gm__ W*)w, cols);
        yGm.SetGlobalBuffer((__gm__ T*)y, t.tiles * cols);
        pipe.InitBuffer(inX, 2, cols * sizeof(T));
        pipe.InitBuffer(outY, 2, cols * sizeof(T));
        pipe.InitBuffer(wIn, 1, cols * sizeof(W));
        pipe.InitBuffer(wBuf, cols * sizeof(float));
        pipe.InitBuffer(xBuf, cols * sizeof(float));
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
            LocalTensor<T> x = inX.AllocTensor<T>();
            DataCopy(x, xGm[r * cols], cols);
            inX.EnQue(x);
            x = inX.DeQue<T>();
            LocalTensor<float> xf = xBuf.Get<float>();
            ToFloat(xf, x, cols);
            inX.FreeTensor(x);
            PipeBarrier<PIPE_V>();
            {{OP}}(xf, {{OPERANDS}}, cols);
            PipeBarrier<PIPE_V>();
            LocalTensor<T> y = outY.AllocTensor<T>();
            FromFloat(y, xf, cols);
            outY.EnQue(y);
            y = outY.DeQue<T>();
            DataCopy(yGm[r * cols], y, cols);
            outY.FreeTensor(y);
        }
    }

private:
    TPipe pipe;
    TQue<TPosition::VECIN, 2> inX;
    TQue<TPosition::VECIN, 1> wIn;
    TQue<TPosition::VECOUT, 2> outY;
    TBuf<TPosition::VECCALC> wBuf, xBuf;
    GlobalTensor<T> xGm, yGm;
    GlobalTensor<W> wGm;
    uint32_t cols = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR x, GM_ADDR w, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(x, w, y, t);
    op.Process();
}
"#;

/// The operand of a binary elementwise kernel that is broadcast as a row
/// (its shape is the output's last dimension), if exactly one is.
pub(crate) fn row_broadcast_operand(k: &panguc_ir::kernel::Kernel) -> Option<usize> {
    if k.args.len() != 3 {
        return None;
    }
    let out = &k.args[2].shape;
    let is_row = |i: usize| out.len() >= 2 && k.args[i].shape.as_slice() == &out[out.len() - 1..];
    match (k.args[0].shape == *out, k.args[1].shape == *out) {
        (true, false) if is_row(1) => Some(1),
        (false, true) if is_row(0) => Some(0),
        _ => None,
    }
}

/// `Elementwise (a, b, out)` where operand `row` is one row broadcast over
/// the other's rows (a bias added after a collective, for example).
pub(crate) fn row_broadcast(ctx: &Ctx, op: panguc_ir::op::BinaryOp, row: usize) -> Result<DeviceKernels> {
    use panguc_ir::op::BinaryOp;
    let full = 1 - row;
    let (t, w) = (ctx.dt[2], ctx.dt[row]);
    if ctx.dt[full] != t {
        bail!("{}: operand dtype {} differs from the output's {t}", ctx.k.name, ctx.dt[full]);
    }
    let rank = ctx.rank(2);
    let cols = ctx.cdim(2, rank - 1, "row width")?;
    super::vector::need_aligned(ctx, "a row", cols, t)?;
    super::vector::need_aligned(ctx, "the broadcast row", cols, w)?;
    let name = match op {
        BinaryOp::Add => "Add",
        BinaryOp::Sub => "Sub",
        BinaryOp::Mul => "Mul",
        BinaryOp::Div => "Div",
        BinaryOp::Max => "Max",
    };
    // xf holds the full operand; keep the IR's operand order for Sub/Div.
    let operands = if row == 1 { "xf, wf" } else { "wf, xf" };
    let entry = ctx.entry("");
    let what = format!("Elementwise {op:?} with operand {row} broadcast over the rows, in f32.");
    let src = vector_source(
        &entry,
        &what,
        ROW_BROADCAST,
        &[
            ("T", t.cpp().into()),
            ("W", w.cpp().into()),
            ("WHAT", what.clone()),
            ("OP", name.into()),
            ("OPERANDS", operands.into()),
        ],
    );
    let tiles = ctx.dims(2, 0, rank - 1)?;
    let mut fields = tiles_fields(&tiles);
    fields.push(TilingField::u32("cols", TExpr::c(cols)));
    let ub = 4 * super::r32(cols * t.size()) + super::r32(cols * w.size()) + 2 * super::r32(cols * 4);
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    let mut params = vec![ctx.param("x", full, Role::Input), ctx.param("w", row, Role::Input)];
    params.push(ctx.param("y", 2, Role::Output));
    dk.params = params;
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}

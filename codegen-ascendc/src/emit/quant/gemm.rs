//! The int8 GEMMs (dense static / per-token, grouped experts) and their
//! dequant epilogue.

use super::{
    acc_param, acc_temp, checked, need_int8_dims, need_out, orig, Dequant, Granularity, GroupedQuantMatMulSpec,
    QuantMatMulSpec,
};
use crate::emit::cube::{cube_device_kernel, cube_kernel_for, BaseTile, CubeSpec};
use crate::emit::moe::{grouped_cube_fields, grouped_cube_source};
use crate::emit::vector::{tiles_fields, vector_kernel, vector_source, PRELUDE};
use crate::emit::{
    fill_kernel, head, r32, ArgRef, DeviceKernel, DeviceKernels, EmitOptions, Param, Role, TExpr, TempBuf, TilingField,
};
use crate::target::DevType;
use anyhow::{bail, Result};

/// Static or per-token int8 matmul: cube kernel (int32 to a workspace) and
/// the dequant epilogue.
pub fn quant_matmul(s: &QuantMatMulSpec, o: &EmitOptions) -> Result<DeviceKernels> {
    quant_matmul_with(s, EpilogueAdds::default(), o)
}

/// Float terms the dequant epilogue adds to the dequantized f32 value, in
/// this order (the reference's `(y + bias) + residual`), each of the given
/// device dtype; `None` leaves the term out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpilogueAdds {
    /// A column vector `bias[N]` (the linear's bias).
    pub bias: Option<DevType>,
    /// A row-major `residual[M, N]` (the residual add after the projection).
    pub residual: Option<DevType>,
}

/// [`quant_matmul`] with fused epilogue adds: arguments `(xq, w, a, b,
/// [bias,] [residual,] out)`.
pub fn quant_matmul_with(s: &QuantMatMulSpec, adds: EpilogueAdds, o: &EmitOptions) -> Result<DeviceKernels> {
    need_int8_dims(&s.name, s.n, s.k)?;
    need_out(&s.name, o, s.out)?;
    let cube = cube_kernel_for(
        &s.name,
        o,
        CubeSpec {
            entry: format!("{}_cube", s.name),
            what: "int8 x int8 to an int32 workspace",
            t: DevType::I8,
            out: DevType::I32,
            m: s.m.clone(),
            n: s.n,
            k: s.k,
            params: vec![
                orig("a", DevType::I8, Role::Input, 0),
                orig("w", DevType::I8, Role::Input, 1),
                acc_param(Role::Output),
            ],
        },
    )?;
    let (a, b) = match s.dequant {
        Dequant::Static { deq } => {
            need_scale_dtype(&s.name, "deq_scale", deq, true)?;
            (orig("bias", DevType::I32, Role::Input, 2), orig("deq", deq, Role::Input, 3))
        }
        Dequant::PerToken => (orig("ws", DevType::F32, Role::Input, 2), orig("xs", DevType::F32, Role::Input, 3)),
    };
    let epi = dequant_kernel(
        DequantSpec {
            entry: format!("{}_dequant", s.name),
            dequant: s.dequant,
            grouped: None,
            rows: s.m.clone(),
            n: s.n,
            out: s.out,
            row_weight: false,
            adds,
        },
        epilogue_params(vec![acc_param(Role::Input), a, b], adds, s.out),
    )?;
    checked(
        DeviceKernels { kernels: vec![cube, epi], temps: vec![acc_temp(&s.name, &s.m, s.n)], host: None },
        o,
        &s.name,
    )
}

/// `DynQuantMatMul (x[M, K] of dtype x, w i8[N, K], w_scale f32[N],
/// [bias[N],] [residual[M, N],] out[M, N])` (`s.dequant` per token): the
/// `dynamic_quant` kernel writes the int8 rows and their scales to
/// temporaries, then [`quant_matmul_with`] runs on them. The int8 rows do
/// reach GM here (unlike the CPU kernel's): the cube unit reads its A
/// operand from GM, and M x K int8 bytes are a quarter of the f32 input.
pub fn dyn_quant_matmul(s: &QuantMatMulSpec, x: DevType, adds: EpilogueAdds, o: &EmitOptions) -> Result<DeviceKernels> {
    if s.dequant != Dequant::PerToken {
        bail!("{}: dyn_quant_matmul dequantizes per token", s.name);
    }
    let quant = super::dynamic_quant(&format!("{}_quant", s.name), s.m.clone(), s.k, x, o)?;
    // The quant kernel's (x, q_out, scale_out) against the program kernel's
    // (x, w, w_scale, [adds..], out); the GEMM's (xq, w, w_scale, x_scale,
    // [adds..], out) likewise.
    let mm_arg = |i: usize| if i > 3 { ArgRef::Orig(i - 1) } else { ArgRef::Orig(i) };
    let temps = vec![("xq", DevType::I8, vec![s.m.clone(), TExpr::c(s.k)]), ("xs", DevType::F32, vec![s.m.clone()])];
    quantized_input(s, quant, &[(1, 0), (2, 1)], &[(0, 0), (3, 1)], mm_arg, temps, adds, o)
}

/// `StaticQuantMatMul (x[M, K] of dtype x, in_scale f32[1], in_offset
/// f32[1], w i8[N, K], quant_bias i32[N], deq_scale[N], out[M, N])`
/// (`s.dequant` static): the per-tensor `quantize` kernel writes the int8
/// rows to a temporary (GM, as in [`dyn_quant_matmul`]), then
/// [`quant_matmul`] runs on them.
pub fn static_quant_matmul(s: &QuantMatMulSpec, x: DevType, o: &EmitOptions) -> Result<DeviceKernels> {
    if !matches!(s.dequant, Dequant::Static { .. }) {
        bail!("{}: static_quant_matmul dequantizes with quant_bias and deq_scale", s.name);
    }
    let quant = super::quantize(&format!("{}_quant", s.name), s.m.clone(), s.k, Granularity::PerTensor, x, o)?;
    // The quant kernel's (x, scale, offset, q_out) against the program
    // kernel's (x, scale, offset, w, quant_bias, deq_scale, out); the GEMM's
    // (xq, w, quant_bias, deq_scale, out) are its arguments 3.. .
    let temps = vec![("xq", DevType::I8, vec![s.m.clone(), TExpr::c(s.k)])];
    quantized_input(s, quant, &[(3, 0)], &[(0, 0)], |i| ArgRef::Orig(i + 2), temps, EpilogueAdds::default(), o)
}

/// A quantizing kernel followed by [`quant_matmul_with`] over what it
/// wrote: `quant_out` maps the quant kernel's output arguments and
/// `mm_in` the GEMM's quantized inputs to temps (indices into `temps`,
/// after the GEMM's own accumulator temp); the GEMM's other arguments map
/// through `mm_arg`.
#[allow(clippy::too_many_arguments)]
fn quantized_input(
    s: &QuantMatMulSpec,
    mut quant: DeviceKernels,
    quant_out: &[(usize, usize)],
    mm_in: &[(usize, usize)],
    mm_arg: impl Fn(usize) -> ArgRef,
    temps: Vec<(&str, DevType, Vec<TExpr>)>,
    adds: EpilogueAdds,
    o: &EmitOptions,
) -> Result<DeviceKernels> {
    let mut mm = quant_matmul_with(s, adds, o)?;
    // Temps: the GEMM's accumulators (0), then `temps`.
    let lookup = |map: &[(usize, usize)], i: usize| map.iter().find(|(a, _)| *a == i).map(|(_, t)| ArgRef::Temp(t + 1));
    remap(&mut quant, |a| match a {
        ArgRef::Orig(i) => lookup(quant_out, *i).unwrap_or(ArgRef::Orig(*i)),
        other => other.clone(),
    });
    remap(&mut mm, |a| match a {
        ArgRef::Orig(i) => lookup(mm_in, *i).unwrap_or_else(|| mm_arg(*i)),
        other => other.clone(),
    });
    for (name, dtype, shape) in temps {
        let elems = shape.iter().cloned().fold(TExpr::c(1), TExpr::times);
        mm.temps.push(TempBuf { name: format!("{}.{name}", s.name), dtype, shape, elems });
    }
    let mut kernels = quant.kernels;
    kernels.extend(mm.kernels);
    checked(DeviceKernels { kernels, temps: mm.temps, host: None }, o, &s.name)
}

/// Points every device-kernel parameter at `f(its argument)`.
fn remap(dks: &mut DeviceKernels, f: impl Fn(&ArgRef) -> ArgRef) {
    for p in dks.kernels.iter_mut().flat_map(|k| k.params.iter_mut()) {
        p.arg = f(&p.arg);
    }
}

/// The epilogue's parameters after `(acc, a, b)`: the adds, then `y`;
/// program arguments from 4 on, in that order.
fn epilogue_params(mut params: Vec<Param>, adds: EpilogueAdds, out: DevType) -> Vec<Param> {
    let mut next = 4;
    for (name, t) in [("fb", adds.bias), ("res", adds.residual)] {
        if let Some(t) = t {
            params.push(orig(name, t, Role::Input, next));
            next += 1;
        }
    }
    params.push(orig("y", out, Role::Output, next));
    params
}

fn need_scale_dtype(name: &str, what: &str, t: DevType, i64_ok: bool) -> Result<()> {
    match t {
        DevType::F32 => Ok(()),
        DevType::I64 if i64_ok => Ok(()),
        other => bail!("{name}: {what} must be f32{} on the device, not {other}", if i64_ok { " or i64" } else { "" }),
    }
}

/// Grouped W8A8_DYNAMIC expert GEMM: counts -> offsets, grouped int8 cube
/// GEMM, per-token dequant with each row's expert scales.
pub fn grouped_quant_matmul(s: &GroupedQuantMatMulSpec, o: &EmitOptions) -> Result<DeviceKernels> {
    need_int8_dims(&s.name, s.n, s.k)?;
    need_out(&s.name, o, s.out)?;
    if !matches!(s.counts, DevType::I64 | DevType::I32) {
        bail!("{}: expert counts must be i64 or i32 on the device, not {}", s.name, s.counts);
    }
    let offsets = offsets_kernel(&s.name, s.experts, s.rows.clone(), s.counts)?;
    let off = |role| Param::new("offsets", DevType::I64, role, ArgRef::Temp(1));
    let cube = grouped_int8_cube(
        &format!("{}_cube", s.name),
        GroupedDims { experts: s.experts, rows: s.rows.clone(), n: s.n, k: s.k },
        [
            orig("a", DevType::I8, Role::Input, 0),
            off(Role::Input),
            orig("w", DevType::I8, Role::Input, 1),
            acc_param(Role::Output),
        ],
        o,
    );
    let epi = grouped_dequant_kernel(
        &format!("{}_dequant", s.name),
        GroupedDims { experts: s.experts, rows: s.rows.clone(), n: s.n, k: s.k },
        Dequant::PerToken,
        s.out,
        false,
        vec![
            acc_param(Role::Input),
            orig("ws", DevType::F32, Role::Input, 2),
            orig("xs", DevType::F32, Role::Input, 3),
            off(Role::Input),
            orig("y", s.out, Role::Output, 5),
        ],
    )?;
    let mut offsets = offsets;
    offsets.params = vec![orig("counts", s.counts, Role::Input, 4), off(Role::Output)];
    let off_temp = TempBuf {
        name: format!("{}.offsets", s.name),
        dtype: DevType::I64,
        shape: vec![TExpr::c(s.experts + 1)],
        elems: TExpr::c(s.experts + 1),
    };
    let dks = DeviceKernels {
        kernels: vec![offsets, cube, epi],
        temps: vec![acc_temp(&s.name, &s.rows, s.n), off_temp],
        host: None,
    };
    checked(dks, o, &s.name)
}

/// Sizes of a grouped expert GEMM: `rows` expert-sorted rows of K int8
/// against `experts` weights `[N, K]`.
#[derive(Debug, Clone)]
pub(super) struct GroupedDims {
    pub experts: u64,
    pub rows: TExpr,
    pub n: u64,
    pub k: u64,
}

/// The grouped int8 cube GEMM of `moe.rs` over rows already contiguous per
/// expert (A fetched as row blocks, never one row per K step): parameters
/// `[a i8[rows, K], offsets i64[E+1], w i8[E, N, K], acc i32[rows, N]]`.
/// The weight is read pre-tiled when `o` allows it ([`EmitOptions::nz_weight`]).
pub(super) fn grouped_int8_cube(entry: &str, d: GroupedDims, mut params: [Param; 4], o: &EmitOptions) -> DeviceKernel {
    let base = BaseTile::for_type(DevType::I8);
    params[2].nz = o.nz_weight(&params[2], base, DevType::I8, d.n, d.k);
    let src = grouped_cube_source(entry, "routed experts, int8", DevType::I8, false, params[2].nz.is_some());
    let fields = grouped_cube_fields(&base, d.experts, d.rows.clone(), d.rows, d.n, d.k);
    let tiles = TExpr::c(d.experts * d.n.div_ceil(base.n));
    cube_device_kernel(entry.to_string(), src, fields, &tiles, params.into(), base.mem(DevType::I8, o.target))
}

/// The grouped dequant epilogue, per token `y = f32(acc) *
/// w_scale[e(r), n] * x_scale[r]` or static `y = f32(acc + quant_bias[e(r),
/// n]) * deq_scale[e(r), n]`, then `* row_weight[r]` with `row_weight`;
/// parameters `[acc, w_scale f32[E, N] | quant_bias i32[E, N], x_scale
/// f32[rows] | deq_scale[E, N], offsets i64[E+1], (row_weight f32[rows],) y]`.
pub(super) fn grouped_dequant_kernel(
    entry: &str,
    d: GroupedDims,
    dequant: Dequant,
    out: DevType,
    row_weight: bool,
    params: Vec<Param>,
) -> Result<DeviceKernel> {
    if let Dequant::Static { deq } = dequant {
        need_scale_dtype(entry, "deq_scale", deq, true)?;
    }
    let spec = DequantSpec {
        entry: entry.to_string(),
        dequant,
        grouped: Some(d.experts),
        rows: d.rows,
        n: d.n,
        out,
        row_weight,
        adds: EpilogueAdds::default(),
    };
    dequant_kernel(spec, params)
}

const OFFSETS: &str = r#"
using C = {{C}};

// offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e]: where expert e's
// rows start in the expert-sorted rows. One block; each prefix is clamped
// to the row count, so corrupt counts cannot send the GEMM out of bounds
// (the interpreter rejects counts that do not partition the rows).
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR counts, GM_ADDR offsets, const {{TILING}}& t)
    {
        experts = t.experts;
        rows = t.rows;
        cGm.SetGlobalBuffer((__gm__ C*)counts, experts);
        oGm.SetGlobalBuffer((__gm__ int64_t*)offsets, experts + 1);
    }
    __aicore__ inline void Process()
    {
        if (GetBlockIdx() != 0) return;
        int64_t acc = 0;
        oGm.SetValue(0, 0);
        for (uint32_t e = 0; e < experts; e++) {
            const int64_t c = static_cast<int64_t>(cGm.GetValue(e));
            acc += c > 0 ? c : 0;
            if (acc > static_cast<int64_t>(rows)) acc = rows;
            oGm.SetValue(e + 1, acc);
        }
    }

private:
    GlobalTensor<C> cGm;
    GlobalTensor<int64_t> oGm;
    uint32_t experts = 0, rows = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR counts, GM_ADDR offsets, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(counts, offsets, t);
    op.Process();
}
"#;

fn offsets_kernel(name: &str, experts: u64, rows: TExpr, counts: DevType) -> Result<DeviceKernel> {
    let entry = format!("{name}_offsets");
    // One block: no work range, so not `vector_source` (whose template
    // must take `{{RANGE}}`).
    let src = head(&entry, "Expert counts to row offsets (prefix sum).")
        + PRELUDE
        + &fill_kernel(OFFSETS, &entry, &[("C", counts.cpp().into())]);
    let tiles = TExpr::c(1);
    let mut fields = tiles_fields(&tiles);
    fields.extend([TilingField::u32("experts", TExpr::c(experts)), TilingField::u32("rows", rows)]);
    Ok(vector_kernel(entry, src, fields, &tiles, 0))
}

/// `ExpertOf(r)`: the expert whose `offGm` range holds sorted row `r`, for
/// a kernel with members `offGm` (i64 `[E+1]`), `experts` and `cursor`
/// (start 0). Rows of a block come in increasing order, so the cursor only
/// moves forward (rows past the last offset keep the last expert).
pub(super) const EXPERT_OF: &str = "    __aicore__ inline int64_t ExpertOf(uint32_t r)
    {
        if (cursor > 0 && static_cast<int64_t>(r) < offGm.GetValue(cursor)) cursor = 0;
        while (cursor + 1 < static_cast<int64_t>(experts) && static_cast<int64_t>(r) >= offGm.GetValue(cursor + 1)) cursor++;
        return cursor;
    }
";

/// The dequant epilogue of the int8 GEMMs.
struct DequantSpec {
    entry: String,
    dequant: Dequant,
    /// `Some(experts)`: per-expert `w_scale[E, N]` chosen through `offsets`.
    grouped: Option<u64>,
    rows: TExpr,
    n: u64,
    out: DevType,
    /// Grouped only: `* row_weight[r]` last (MoeDownQuant's routing
    /// weight), an extra parameter right after `offsets`.
    row_weight: bool,
    adds: EpilogueAdds,
}

/// Rows of one epilogue tile: the column scales are loaded once per tile.
const DQ_ROWS: u64 = 16;
/// Column chunk of one epilogue tile.
const DQ_COLS: u64 = 1024;

const DEQUANT: &str = r#"
using O = {{O}};
using D = {{D}};

// Dequant epilogue of an int8 GEMM: {{WHAT}}. One tile = up to rowsPerTile
// rows x one column chunk; the column vectors are loaded once per tile (and
// again only when a grouped tile crosses into the next expert's rows).
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR acc, GM_ADDR colA, GM_ADDR colB, {{OFF_PARAM}}{{ADD_PARAM}}GM_ADDR y, const {{TILING}}& t)
    {
        n = t.n;
        nTile = t.nTile;
        rows = t.rows;
        rowsPerTile = t.rowsPerTile;
        chunks = (n + nTile - 1) / nTile;
{{RANGE}}
        accGm.SetGlobalBuffer((__gm__ int32_t*)acc, rows * n);
        yGm.SetGlobalBuffer((__gm__ O*)y, rows * n);
{{INIT}}        pipe.InitBuffer(inAcc, 2, nTile * sizeof(int32_t));
        pipe.InitBuffer(outY, 2, nTile * sizeof(O));
        pipe.InitBuffer(inCol, 1, nTile * sizeof(D));
        pipe.InitBuffer(scBuf, nTile * sizeof(float));
        pipe.InitBuffer(xBuf, nTile * sizeof(float));
{{ADD_INIT}}    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t r0 = (tile / chunks) * rowsPerTile;
            const uint32_t r1 = MinU(r0 + rowsPerTile, rows);
            const uint32_t c0 = (tile % chunks) * nTile;
            const uint32_t len = MinU(nTile, n - c0);
            int64_t loaded = -1;
            for (uint32_t r = r0; r < r1; r++) {
                const int64_t e = {{EXPERT_OF}};
                if (e != loaded) {
                    LoadCols(static_cast<uint32_t>(e), c0, len);
                    loaded = e;
                }
                Row(r, c0, len);
            }
        }
    }

private:
    // The column scales (and static bias) of expert e, columns c0..c0+len.
    __aicore__ inline void LoadCols(uint32_t e, uint32_t c0, uint32_t len)
    {
        LocalTensor<float> sc = scBuf.Get<float>();
        LocalTensor<D> raw = inCol.AllocTensor<D>();
        DataCopy(raw, scaleGm[e * n + c0], len);
        inCol.EnQue(raw);
        raw = inCol.DeQue<D>();
{{DECODE}}        inCol.FreeTensor(raw);
{{LOAD_BIAS}}{{LOAD_FB}}    }
    __aicore__ inline void Row(uint32_t r, uint32_t c0, uint32_t len)
    {
        LocalTensor<int32_t> a = inAcc.AllocTensor<int32_t>();
        DataCopy(a, accGm[r * n + c0], len);
        inAcc.EnQue(a);
        a = inAcc.DeQue<int32_t>();
        LocalTensor<float> x = xBuf.Get<float>();
        LocalTensor<float> sc = scBuf.Get<float>();
{{ADD_BIAS}}        Cast(x, a, RoundMode::CAST_NONE, len);
        inAcc.FreeTensor(a);
        PipeBarrier<PIPE_V>();
        Mul(x, x, sc, len);
        PipeBarrier<PIPE_V>();
{{ROW_SCALE}}{{ROW_ADDS}}        LocalTensor<O> y = outY.AllocTensor<O>();
        FromFloat(y, x, len);
        outY.EnQue(y);
        y = outY.DeQue<O>();
        DataCopy(yGm[r * n + c0], y, len);
        outY.FreeTensor(y);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inAcc;
    TQue<TPosition::VECOUT, 2> outY;
    TQue<TPosition::VECIN, 1> inCol;
    TBuf<TPosition::VECCALC> scBuf, xBuf{{BIAS_BUF}};
    GlobalTensor<int32_t> accGm;
    GlobalTensor<D> scaleGm;
    GlobalTensor<O> yGm;
{{MEMBERS}}{{ADD_MEMBERS}}    uint32_t n = 0, nTile = 0, rows = 0, rowsPerTile = 0, chunks = 1, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR acc, GM_ADDR colA, GM_ADDR colB, {{OFF_PARAM}}{{ADD_PARAM}}GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(acc, colA, colB, {{OFF_ARG}}{{ADD_ARG}}y, t);
    op.Process();
}
"#;

/// f32 scales: a UB copy into the scale buffer.
pub(super) const DECODE_F32: &str = "        DataCopy(sc, raw, len);
        PipeBarrier<PIPE_V>();
";
/// msModelSlim's int64 `deq_scale`: the f32 bits are the low (first,
/// little-endian) word of each int64; picked by the scalar unit once per
/// tile (the vector unit has no stride-2 element move in our API subset).
pub(super) const DECODE_I64: &str =
    "        event_t m2s = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::MTE2_S));
        SetFlag<HardEvent::MTE2_S>(m2s);
        WaitFlag<HardEvent::MTE2_S>(m2s);
        LocalTensor<uint32_t> words = raw.ReinterpretCast<uint32_t>();
        LocalTensor<uint32_t> bits = sc.ReinterpretCast<uint32_t>();
        for (uint32_t i = 0; i < len; i++) bits.SetValue(i, words.GetValue(2 * i));
        event_t s2v = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(s2v);
        WaitFlag<HardEvent::S_V>(s2v);
";

fn dequant_kernel(s: DequantSpec, params: Vec<Param>) -> Result<DeviceKernel> {
    let DequantSpec { entry, dequant, grouped, rows, n, out, row_weight, adds } = s;
    if row_weight && grouped.is_none() {
        bail!("{entry}: a row-weighted dequant epilogue must be grouped");
    }
    let n_tile = DQ_COLS.min(n);
    let (d, what) = match dequant {
        Dequant::Static { deq } if row_weight => {
            (deq, "y = f32(acc + quant_bias[e(r), n]) * deq_scale[e(r), n] * row_weight[r]")
        }
        Dequant::Static { deq } if grouped.is_some() => {
            (deq, "y = f32(acc + quant_bias[e(r), n]) * deq_scale[e(r), n]")
        }
        Dequant::Static { deq } => (deq, "y = f32(acc + quant_bias[n]) * deq_scale[n]"),
        Dequant::PerToken if row_weight => {
            (DevType::F32, "y = f32(acc) * w_scale[e(r), n] * x_scale[r] * row_weight[r]")
        }
        Dequant::PerToken if grouped.is_some() => (DevType::F32, "y = f32(acc) * w_scale[e(r), n] * x_scale[r]"),
        Dequant::PerToken => (DevType::F32, "y = f32(acc) * w_scale[n] * x_scale[r]"),
    };
    let what = format!(
        "{what}{}{}",
        if adds.bias.is_some() { ", + bias[n]" } else { "" },
        if adds.residual.is_some() { ", + residual[r, n]" } else { "" }
    );
    let experts = grouped.unwrap_or(1);
    let stat = matches!(dequant, Dequant::Static { .. });
    let mut init = String::new();
    let mut members = String::new();
    if stat {
        init += "        biasGm.SetGlobalBuffer((__gm__ int32_t*)colA, t.experts * n);\n        scaleGm.SetGlobalBuffer((__gm__ D*)colB, t.experts * n);\n        pipe.InitBuffer(inBias, 1, nTile * sizeof(int32_t));\n        pipe.InitBuffer(biasBuf, nTile * sizeof(int32_t));\n";
        members += "    TQue<TPosition::VECIN, 1> inBias;\n    GlobalTensor<int32_t> biasGm;\n";
    } else {
        init += "        scaleGm.SetGlobalBuffer((__gm__ D*)colA, t.experts * n);\n        xsGm.SetGlobalBuffer((__gm__ float*)colB, rows);\n";
        members += "    GlobalTensor<float> xsGm;\n";
    }
    if grouped.is_some() {
        init +=
            "        offGm.SetGlobalBuffer((__gm__ int64_t*)offsets, t.experts + 1);\n        experts = t.experts;\n";
        members += "    GlobalTensor<int64_t> offGm;\n    uint32_t experts = 0;\n    int64_t cursor = 0;\n";
    }
    let expert_of = if grouped.is_some() { "ExpertOf(r)" } else { "0" };
    let mut template = DEQUANT.to_string();
    if grouped.is_some() {
        template = template.replace("    TPipe pipe;\n", &format!("{EXPERT_OF}\n    TPipe pipe;\n"));
    }
    let load_bias = if stat {
        "        LocalTensor<int32_t> b = inBias.AllocTensor<int32_t>();
        DataCopy(b, biasGm[e * n + c0], len);
        inBias.EnQue(b);
        b = inBias.DeQue<int32_t>();
        DataCopy(biasBuf.Get<int32_t>(), b, len);
        inBias.FreeTensor(b);
        PipeBarrier<PIPE_V>();
"
    } else {
        ""
    };
    let add_bias =
        if stat { "        Add(a, a, biasBuf.Get<int32_t>(), len);\n        PipeBarrier<PIPE_V>();\n" } else { "" };
    let mut row_scale = if stat {
        String::new()
    } else {
        "        Muls(x, x, xsGm.GetValue(r), len);\n        PipeBarrier<PIPE_V>();\n".into()
    };
    let mut off_param = if grouped.is_some() { "GM_ADDR offsets, " } else { "" }.to_string();
    let mut off_arg = if grouped.is_some() { "offsets, " } else { "" }.to_string();
    if row_weight {
        // After the per-token scale, as the reference's `weight * y`.
        row_scale += "        Muls(x, x, rwGm.GetValue(r), len);\n        PipeBarrier<PIPE_V>();\n";
        off_param += "GM_ADDR rowW, ";
        off_arg += "rowW, ";
        init += "        rwGm.SetGlobalBuffer((__gm__ float*)rowW, rows);\n";
        members += "    GlobalTensor<float> rwGm;\n";
    }
    let src = vector_source(
        &entry,
        &format!("Int8 GEMM dequant epilogue: {what}."),
        &template,
        &[
            ("O", out.cpp().into()),
            ("D", d.cpp().into()),
            ("WHAT", what.clone()),
            ("OFF_PARAM", off_param),
            ("OFF_ARG", off_arg),
            ("INIT", init),
            ("MEMBERS", members),
            ("EXPERT_OF", expert_of.into()),
            ("DECODE", if d == DevType::I64 { DECODE_I64 } else { DECODE_F32 }.into()),
            ("LOAD_BIAS", load_bias.into()),
            ("ADD_BIAS", add_bias.into()),
            ("ROW_SCALE", row_scale),
            ("BIAS_BUF", if stat { ", biasBuf" } else { "" }.into()),
        ]
        .into_iter()
        .chain(adds_vars(adds))
        .collect::<Vec<_>>(),
    );
    let tiles = rows.clone().ceil_div(TExpr::c(DQ_ROWS)).times(TExpr::c(n.div_ceil(n_tile)));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("n", TExpr::c(n)),
        TilingField::u32("nTile", TExpr::c(n_tile)),
        TilingField::u32("rows", rows),
        TilingField::u32("rowsPerTile", TExpr::c(DQ_ROWS)),
        TilingField::u32("experts", TExpr::c(experts)),
    ]);
    let mut ub = 2 * r32(n_tile * 4) + 2 * r32(n_tile * out.size()) + r32(n_tile * d.size()) + 2 * r32(n_tile * 4);
    if stat {
        ub += 2 * r32(n_tile * 4);
    }
    if let Some(b) = adds.bias {
        ub += r32(n_tile * b.size()) + r32(n_tile * 4);
    }
    if let Some(r) = adds.residual {
        ub += 2 * r32(n_tile * r.size()) + r32(n_tile * 4);
    }
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = params;
    Ok(dk)
}

/// Template pieces of the epilogue adds: the bias chunk is loaded (as f32)
/// with the column scales, the residual row chunk with each row.
fn adds_vars(adds: EpilogueAdds) -> Vec<(&'static str, String)> {
    let mut param = String::new();
    let mut arg = String::new();
    let mut init = String::new();
    let mut members = String::new();
    let mut load = String::new();
    let mut row = String::new();
    if let Some(b) = adds.bias {
        param += "GM_ADDR fb, ";
        arg += "fb, ";
        init += "        fbGm.SetGlobalBuffer((__gm__ B*)fb, n);\n        pipe.InitBuffer(inFb, 1, nTile * sizeof(B));\n        pipe.InitBuffer(fbBuf, nTile * sizeof(float));\n";
        members += &format!("    using B = {};\n    TQue<TPosition::VECIN, 1> inFb;\n    TBuf<TPosition::VECCALC> fbBuf;\n    GlobalTensor<B> fbGm;\n", b.cpp());
        load += "        LocalTensor<B> fbl = inFb.AllocTensor<B>();
        DataCopy(fbl, fbGm[c0], len);
        inFb.EnQue(fbl);
        fbl = inFb.DeQue<B>();
        ToFloat(fbBuf.Get<float>(), fbl, len);
        inFb.FreeTensor(fbl);
        PipeBarrier<PIPE_V>();
";
        row += "        Add(x, x, fbBuf.Get<float>(), len);\n        PipeBarrier<PIPE_V>();\n";
    }
    if let Some(r) = adds.residual {
        param += "GM_ADDR res, ";
        arg += "res, ";
        init += "        resGm.SetGlobalBuffer((__gm__ RT*)res, rows * n);\n        pipe.InitBuffer(inRes, 2, nTile * sizeof(RT));\n        pipe.InitBuffer(resBuf, nTile * sizeof(float));\n";
        members += &format!("    using RT = {};\n    TQue<TPosition::VECIN, 2> inRes;\n    TBuf<TPosition::VECCALC> resBuf;\n    GlobalTensor<RT> resGm;\n", r.cpp());
        row += "        LocalTensor<RT> rl = inRes.AllocTensor<RT>();
        DataCopy(rl, resGm[r * n + c0], len);
        inRes.EnQue(rl);
        rl = inRes.DeQue<RT>();
        LocalTensor<float> rf = resBuf.Get<float>();
        ToFloat(rf, rl, len);
        inRes.FreeTensor(rl);
        PipeBarrier<PIPE_V>();
        Add(x, x, rf, len);
        PipeBarrier<PIPE_V>();
";
    }
    vec![
        ("ADD_PARAM", param),
        ("ADD_ARG", arg),
        ("ADD_INIT", init),
        ("ADD_MEMBERS", members),
        ("LOAD_FB", load),
        ("ROW_ADDS", row),
    ]
}

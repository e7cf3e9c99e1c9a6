//! Cube-core GEMM `C[M, N] = A[M, K] · W[N, K]^T` (HF Linear layout) and
//! its vector epilogues (cast, `+ bias`, SwiGLU).
//!
//! Why the low-level `Mmad` path and not the high-level `Matmul` API: the
//! projections here are all `x · W^T` with a static N, K and a run-time M,
//! so a fixed base tile is enough, and the low-level path is what the
//! simulation implements (the high-level API's tiling object
//! `TCubeTiling` needs CANN's `matmul_tiling` host library). Data path:
//! GM -(Nd2Nz)-> L1 -(LoadData)-> L0A/L0B -(Mmad, f32 accumulate)-> L0C,
//! then `Fixpipe` to GM on 910B or L0C -> UB -> GM on 310P.
//!
//! Split mode (910B): a matmul whose result needs an epilogue is a cube
//! kernel writing f32 to an intermediate GM buffer plus a vector kernel;
//! on hardware these would be one mix kernel (`Iterate` + `GetTensorC`),
//! which the simulation does not support. 310P: the same two kernels (a
//! coupled-core fused version is future work).

use super::vector::{tiles_fields, vector_kernel, vector_source};
use super::{
    fill, fill_kernel, head, r32, ArgRef, CoreType, Ctx, DeviceKernel, DeviceKernels, EmitOptions, MemUse, Param, Role,
    TExpr, TempBuf, TilingField,
};
use crate::target::{DevType, Target};
use anyhow::{bail, Result};
use panguc_ir::kernel::Epilogue;

/// Base tile of one Mmad step (multiples of 16; K per step in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BaseTile {
    pub m: u64,
    pub n: u64,
    pub k: u64,
}

impl BaseTile {
    /// 128x128 output tiles, K steps of 32 KiB of A and B each: 256 (int8),
    /// 128 (f16/bf16) or 64 (f32): L0A/L0B hold 32 KiB each, L0C 64 KiB
    /// (f32 or int32), L1 double-buffered 128 KiB.
    pub fn for_type(t: DevType) -> BaseTile {
        BaseTile { m: 128, n: 128, k: 256 / t.size().min(4) }
    }

    /// The `baseM`, `baseN`, `baseK` tiling fields the cube templates read.
    pub fn fields(&self) -> [TilingField; 3] {
        [
            TilingField::u32("baseM", TExpr::c(self.m)),
            TilingField::u32("baseN", TExpr::c(self.n)),
            TilingField::u32("baseK", TExpr::c(self.k)),
        ]
    }

    pub fn mem(&self, t: DevType, target: Target) -> MemUse {
        let a = r32(self.m * self.k * t.size());
        let b = r32(self.n * self.k * t.size());
        let c = self.m * self.n * 4;
        MemUse { ub: if target == Target::Ascend310P { c } else { 0 }, l1: 2 * (a + b), l0a: a, l0b: b, l0c: c }
    }
}

/// `CopyIn`'s copy of the weight's L1 B tile (row `n0`, column `k0`, of the
/// matrix at element `wBase`), after A's copy with the `Nd2NzParams p`.
/// Row-major: Nd2Nz, one DMA burst per weight row. Pre-tiled (`nz`, the
/// order of [`crate::weights::tile_nz`]): the tile's image is contiguous,
/// so one plain copy.
pub(crate) fn copy_b(nz: bool, w_base: &str) -> String {
    if nz {
        format!(
            "        // W is stored pre-tiled in L1 order: this step's image is contiguous.
        const uint32_t kPad = (tl.k + C0 - 1) / C0 * C0;
        DataCopy(b1, wGm[{w_base}n0 * kPad + CeilCube(nLen) * k0], CeilCube(nLen) * ((kLen + C0 - 1) / C0 * C0));
"
        )
    } else {
        format!(
            "        p.nValue = nLen;
        p.dstNzC0Stride = CeilCube(nLen);
        DataCopy(b1, wGm[{w_base}n0 * tl.k + k0], p);
"
        )
    }
}

/// How a template's comments describe the weight tile copy.
pub(crate) fn w_layout(nz: bool) -> &'static str {
    if nz {
        "stored pre-tiled in its L1 tile order, one contiguous copy per K step"
    } else {
        "row-major, its rows copied with Nd2Nz"
    }
}

/// Fractal constants and helpers at the top of both cube templates
/// ([`MATMUL`] and the grouped MoE GEMM).
pub(crate) const CUBE_CONSTS: &str =
    "constexpr uint32_t C0 = 32 / sizeof(T);     // fractal width: 16 (f16/bf16), 8 (f32)
constexpr uint32_t FRAC = 512 / sizeof(T);  // elements per 512-byte fractal

__aicore__ inline uint32_t CeilCube(uint32_t x) { return (x + 15) / 16 * 16; }
__aicore__ inline uint32_t MinU(uint32_t a, uint32_t b) { return a < b ? a : b; }";

/// `Init`'s buffer allocation of the cube pipeline: double-buffered L1 (A1,
/// B1), single L0A/L0B/L0C, and on 310P the UB staging buffer of `CopyOut`.
const CUBE_BUFFERS: &str = "        pipe.InitBuffer(qA1, 2, t.baseM * t.baseK * sizeof(T));
        pipe.InitBuffer(qB1, 2, t.baseN * t.baseK * sizeof(T));
        pipe.InitBuffer(qA2, 1, t.baseM * t.baseK * sizeof(T));
        pipe.InitBuffer(qB2, 1, t.baseN * t.baseK * sizeof(T));
        pipe.InitBuffer(qCO1, 1, t.baseM * t.baseN * sizeof({{ACC}}));
#if !PANGUC_DAV_C220
        pipe.InitBuffer(qCO2, 1, t.baseM * t.baseN * sizeof({{ACC}}));
#endif";

/// [`CUBE_BUFFERS`] for the L0C accumulator type `acc` (`float`, or
/// `int32_t` for int8 x int8).
pub(crate) fn cube_buffers(acc: &str) -> String {
    fill(CUBE_BUFFERS, &[("ACC", acc.into())])
}

/// The per-K-step stages after `CopyIn` (`Split` L1 -> L0A/L0B, `Compute`
/// Mmad into L0C) and `CopyOut` (L0C -> GM), plus the pipe and queue members
/// they use. Shared by the plain and the grouped GEMM, whose `CopyIn` and
/// tile loops differ; both set `m0`, `n0`, `mLen`, `nLen` and `tl` first.
const CUBE_STAGES: &str = r#"    __aicore__ inline void Split(uint32_t kLen)
    {
        LocalTensor<T> a1 = qA1.DeQue<T>();
        LocalTensor<T> b1 = qB1.DeQue<T>();
        LocalTensor<T> a2 = qA2.AllocTensor<T>();
        LocalTensor<T> b2 = qB2.AllocTensor<T>();
        const uint32_t mBlocks = CeilCube(mLen) / 16, nBlocks = CeilCube(nLen) / 16;
        const uint32_t kBlocks = (kLen + C0 - 1) / C0;
        for (uint32_t mb = 0; mb < mBlocks; mb++) {
            LoadData2DParams p;
            p.startIndex = mb;
            p.repeatTimes = kBlocks;
            p.srcStride = mBlocks;
            p.ifTranspose = false;
            LoadData(a2[mb * kBlocks * FRAC], a1, p);
        }
        LoadData2DParams q;
        q.startIndex = 0;
        q.repeatTimes = kBlocks * nBlocks;
        q.srcStride = 1;
        q.ifTranspose = false;
        LoadData(b2, b1, q);
        qA1.FreeTensor(a1);
        qB1.FreeTensor(b1);
        qA2.EnQue(a2);
        qB2.EnQue(b2);
    }
    __aicore__ inline void Compute(LocalTensor<{{ACC}}>& c1, uint32_t kLen, bool first)
    {
        LocalTensor<T> a2 = qA2.DeQue<T>();
        LocalTensor<T> b2 = qB2.DeQue<T>();
        MmadParams p;
        p.m = mLen;
        p.n = nLen;
        p.k = kLen;
        p.cmatrixInitVal = first;
        Mmad(c1, a2, b2, p);
        qA2.FreeTensor(a2);
        qB2.FreeTensor(b2);
    }
    __aicore__ inline void CopyOut()
    {
        LocalTensor<{{ACC}}> c1 = qCO1.DeQue<{{ACC}}>();
#if PANGUC_DAV_C220
        FixpipeParamsV220 f;
        f.nSize = nLen;
        f.mSize = mLen;
        f.srcStride = CeilCube(mLen);
        f.dstStride = tl.n;
        f.ndNum = 1;
        f.srcNdStride = 0;
        f.dstNdStride = 0;
        f.quantPre = {{QUANT}};
        Fixpipe(cGm[m0 * tl.n + n0], c1, f);
        qCO1.FreeTensor(c1);
#else
        // L0C -> UB (16x16 fractals), then one strided copy per 16-column block.
        const uint32_t mBlocks = CeilCube(mLen) / 16, nBlocks = CeilCube(nLen) / 16;
        LocalTensor<{{ACC}}> c2 = qCO2.AllocTensor<{{ACC}}>();
        DataCopyParams p;
        p.blockCount = 1;
        p.blockLen = mBlocks * nBlocks;
        DataCopyEnhancedParams e;
        e.blockMode = BlockMode::BLOCK_MODE_MATRIX;
        DataCopy(c2, c1, p, e);
        qCO1.FreeTensor(c1);
        qCO2.EnQue(c2);
        c2 = qCO2.DeQue<{{ACC}}>();
        for (uint32_t nb = 0; nb < nBlocks; nb++) {
            DataCopyParams q;
            q.blockCount = mLen;
            q.blockLen = 16 * sizeof({{ACC}}) / 32;
            q.srcStride = 0;
            q.dstStride = (tl.n - 16) * sizeof({{ACC}}) / 32;
            DataCopy(cGm[m0 * tl.n + n0 + nb * 16], c2[nb * mBlocks * 256], q);
        }
        qCO2.FreeTensor(c2);
#endif
    }

    TPipe pipe;
    TQue<TPosition::A1, 2> qA1;
    TQue<TPosition::B1, 2> qB1;
    TQue<TPosition::A2, 1> qA2;
    TQue<TPosition::B2, 1> qB2;
    TQue<TPosition::CO1, 1> qCO1;
#if !PANGUC_DAV_C220
    TQue<TPosition::CO2, 1> qCO2;
#endif"#;

/// [`CUBE_STAGES`] with `CopyOut`'s Fixpipe quantisation (accumulator ->
/// `O`) and the L0C accumulator type `acc` (`float`, or `int32_t` for the
/// int8 GEMMs).
pub(crate) fn cube_stages(quant: &str, acc: &str) -> String {
    fill(CUBE_STAGES, &[("QUANT", quant.into()), ("ACC", acc.into())])
}

const MATMUL: &str = r#"
using T = {{T}};
using O = {{O}};
{{CUBE_CONSTS}}

// C[M, N] = A[M, K] * W[N, K]^T; one baseM x baseN output tile at a time,
// K accumulated in L0C in baseK steps. W's L1 tile is already in L0B's ZN
// order, so B needs no transpose.
// W: {{W_LAYOUT}}.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR a, GM_ADDR w, GM_ADDR c, const {{TILING}}& t)
    {
        tl = t;
        const uint32_t nTiles = (t.n + t.baseN - 1) / t.baseN;
        start = static_cast<uint32_t>(GetBlockIdx()) * t.tilesPerCore;
        end = MinU(start + t.tilesPerCore, t.tiles);
        nTilesPerRow = nTiles;
        aGm.SetGlobalBuffer((__gm__ T*)a, t.m * t.k);
        wGm.SetGlobalBuffer((__gm__ T*)w, t.n * t.k);
        cGm.SetGlobalBuffer((__gm__ O*)c, t.m * t.n);
{{CUBE_BUFFERS}}
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            m0 = (tile / nTilesPerRow) * tl.baseM;
            n0 = (tile % nTilesPerRow) * tl.baseN;
            mLen = MinU(tl.baseM, tl.m - m0);
            nLen = MinU(tl.baseN, tl.n - n0);
            LocalTensor<{{ACC}}> c1 = qCO1.AllocTensor<{{ACC}}>();
            for (uint32_t k0 = 0; k0 < tl.k; k0 += tl.baseK) {
                const uint32_t kLen = MinU(tl.baseK, tl.k - k0);
                CopyIn(k0, kLen);
                Split(kLen);
                Compute(c1, kLen, k0 == 0);
            }
            qCO1.EnQue(c1);
            CopyOut();
        }
    }

private:
    __aicore__ inline void CopyIn(uint32_t k0, uint32_t kLen)
    {
        LocalTensor<T> a1 = qA1.AllocTensor<T>();
        LocalTensor<T> b1 = qB1.AllocTensor<T>();
        Nd2NzParams p;
        p.ndNum = 1;
        p.nValue = mLen;
        p.dValue = kLen;
        p.srcNdMatrixStride = 0;
        p.srcDValue = tl.k;
        p.dstNzC0Stride = CeilCube(mLen);
        p.dstNzNStride = 1;
        p.dstNzMatrixStride = 0;
        DataCopy(a1, aGm[m0 * tl.k + k0], p);
{{COPY_B}}        qA1.EnQue(a1);
        qB1.EnQue(b1);
    }
{{CUBE_STAGES}}
    GlobalTensor<T> aGm, wGm;
    GlobalTensor<O> cGm;
    {{TILING}} tl;
    uint32_t start = 0, end = 0, nTilesPerRow = 1, m0 = 0, n0 = 0, mLen = 0, nLen = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR a, GM_ADDR w, GM_ADDR c, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(a, w, c, t);
    op.Process();
}
"#;

const EPILOGUE: &str = r#"
using T = {{T}};
using B = {{B}};

// Epilogue of a split-mode matmul: {{WHAT}}. Reads the f32 product rows
// written by the cube kernel; one (row, column chunk) per tile.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR c, {{BIAS_PARAM}}GM_ADDR y, const {{TILING}}& t)
    {
        n = t.n;
        nTile = t.nTile;
        chunks = (n + nTile - 1) / nTile;
{{RANGE}}
        const uint32_t rows = t.tiles / chunks;
        cGm.SetGlobalBuffer((__gm__ float*)c, rows * t.cols);
        yGm.SetGlobalBuffer((__gm__ T*)y, rows * n);
        cols = t.cols;
{{BIAS_INIT}}        pipe.InitBuffer(inC, 2, {{IN_FACTOR}} * nTile * sizeof(float));
        pipe.InitBuffer(outY, 2, nTile * sizeof(T));
        pipe.InitBuffer(tmpBuf, nTile * sizeof(float));
    }
    __aicore__ inline void Process()
    {
        for (uint32_t tile = start; tile < end; tile++) {
            const uint32_t r = tile / chunks;
            const uint32_t c0 = (tile % chunks) * nTile;
            const uint32_t len = MinU(nTile, n - c0);
            LocalTensor<float> x = inC.AllocTensor<float>();
{{LOAD}}            inC.EnQue(x);
            x = inC.DeQue<float>();
            LocalTensor<float> tmp = tmpBuf.Get<float>();
{{COMPUTE}}            LocalTensor<T> y = outY.AllocTensor<T>();
            FromFloat(y, x, len);
            inC.FreeTensor(x);
            outY.EnQue(y);
            y = outY.DeQue<T>();
            DataCopy(yGm[r * n + c0], y, len);
            outY.FreeTensor(y);
        }
    }

private:
    TPipe pipe;
    TQue<TPosition::VECIN, 2> inC;
    TQue<TPosition::VECOUT, 2> outY;
    TBuf<TPosition::VECCALC> tmpBuf;
{{BIAS_MEMBERS}}    GlobalTensor<float> cGm;
    GlobalTensor<T> yGm;
    uint32_t n = 0, nTile = 0, chunks = 1, cols = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR c, {{BIAS_PARAM}}GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(c, {{BIAS_ARG}}y, t);
    op.Process();
}
"#;

/// Everything the cube kernel of one GEMM needs.
pub(crate) struct CubeSpec<'a> {
    pub entry: String,
    pub what: &'a str,
    pub t: DevType,
    pub out: DevType,
    pub m: TExpr,
    pub n: u64,
    pub k: u64,
    pub params: Vec<Param>,
}

/// Mmad moves whole 16x16 fractals, so N and K of every cube GEMM must be
/// multiples of 16 (`what` names the GEMM in the error).
pub(crate) fn need_fractal_dims(ctx: &Ctx, what: &str, n: u64, k: u64) -> Result<()> {
    if !n.is_multiple_of(16) || !k.is_multiple_of(16) {
        bail!("{}: cannot be tiled: {what} N = {n} and K = {k} must be multiples of 16 (cube fractals)", ctx.k.name);
    }
    Ok(())
}

/// A cube-core kernel of `tiles` block tiles (the cube counterpart of
/// [`super::vector::vector_kernel`]).
pub(crate) fn cube_device_kernel(
    entry: String,
    source: String,
    fields: Vec<TilingField>,
    tiles: &TExpr,
    params: Vec<Param>,
    mem: MemUse,
) -> DeviceKernel {
    let up = super::upper_camel(&entry);
    DeviceKernel {
        op_type: up.clone(),
        tiling_struct: format!("{up}Tiling"),
        entry,
        core: CoreType::Cube,
        source,
        fields,
        block_dim: TExpr::block_dim(tiles),
        params,
        mem,
    }
}

/// The cube kernel (`a`, `w`, `c` parameters).
pub(crate) fn cube_kernel(ctx: &Ctx, s: CubeSpec) -> Result<DeviceKernel> {
    need_fractal_dims(ctx, "matmul", s.n, s.k)?;
    cube_kernel_for(&ctx.k.name, ctx.o, s)
}

/// [`cube_kernel`] without a program kernel (`name` in errors): f16/bf16/f32
/// with f32 accumulation, or int8 x int8 with int32 accumulation written as
/// int32 (`out` = i32; dequantisation is a vector epilogue). The weight
/// (`params[1]`) is read pre-tiled when `o` allows it ([`EmitOptions::nz_weight`]).
pub(crate) fn cube_kernel_for(name: &str, o: &EmitOptions, mut s: CubeSpec) -> Result<DeviceKernel> {
    let target = o.target;
    let quant = match (s.t, s.out) {
        (DevType::I8, DevType::I32) => "QuantMode_t::NoQuant",
        (DevType::I8, o) => bail!("{name}: an int8 matmul writes its int32 accumulators, not {o}"),
        (_, DevType::F32) => "QuantMode_t::NoQuant",
        (DevType::F16, DevType::F16) => "QuantMode_t::F322F16",
        (DevType::BF16, DevType::BF16) => "QuantMode_t::F322BF16",
        (a, o) => bail!("{name}: matmul of {a} into {o} is not supported"),
    };
    if target == Target::Ascend310P && !matches!(s.out, DevType::F32 | DevType::I32) {
        bail!("{name}: on 310P the cube kernel writes f32 (a vector epilogue casts)");
    }
    let int8 = s.t == DevType::I8;
    let acc = if int8 { "int32_t" } else { "float" };
    let base = BaseTile::for_type(s.t);
    let Some(w) = s.params.get_mut(1) else { bail!("{name}: the cube kernel needs parameters (a, w, c)") };
    w.nz = o.nz_weight(w, base, s.t, s.n, s.k);
    let nz = w.nz.is_some();
    let what = if int8 { "int32 accumulation" } else { "f32 accumulation" };
    let src = head(&s.entry, &format!("Cube GEMM ({}): C = A * W^T, {what}.", s.what))
        + &fill_kernel(
            MATMUL,
            &s.entry,
            &[
                ("T", s.t.cpp().into()),
                ("O", s.out.cpp().into()),
                ("ACC", acc.into()),
                ("CUBE_CONSTS", CUBE_CONSTS.into()),
                ("CUBE_BUFFERS", cube_buffers(acc)),
                ("CUBE_STAGES", cube_stages(quant, acc)),
                ("COPY_B", copy_b(nz, "")),
                ("W_LAYOUT", w_layout(nz).into()),
            ],
        );
    let tiles = s.m.clone().ceil_div(TExpr::c(base.m)).times(TExpr::c(s.n.div_ceil(base.n)));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("m", s.m.clone()),
        TilingField::u32("n", TExpr::c(s.n)),
        TilingField::u32("k", TExpr::c(s.k)),
    ]);
    fields.extend(base.fields());
    Ok(cube_device_kernel(s.entry, src, fields, &tiles, s.params, base.mem(s.t, target)))
}

/// Column chunk of the epilogue (elements).
const EPI_TILE: u64 = 4096;

/// The vector epilogue: `y = cast(c)`, `cast(c + bias)` or
/// `cast(silu(gate) * up)` with gate/up the two halves of each `c` row.
pub(crate) struct EpilogueSpec {
    pub entry: String,
    pub ep: Epilogue,
    /// Scale row `r` by the f32 `rowW[r]` (MoeDown's routing weight); the
    /// extra parameter comes right before `y`.
    pub row_scale: bool,
    /// Output dtype.
    pub t: DevType,
    pub bias_t: Option<DevType>,
    pub rows: TExpr,
    /// Output columns.
    pub n: u64,
    pub params: Vec<Param>,
}

pub(crate) fn epilogue_kernel(ctx: &Ctx, s: EpilogueSpec) -> Result<DeviceKernel> {
    let EpilogueSpec { entry, ep, row_scale, t, bias_t, rows, n, params } = s;
    let n_tile = EPI_TILE.min(n);
    if !n.is_multiple_of(16) {
        bail!("{}: cannot be tiled: epilogue width {n} must be a multiple of 16", ctx.k.name);
    }
    let swiglu = ep == Epilogue::SwiGlu;
    let cols = if swiglu { 2 * n } else { n };
    let b = bias_t.unwrap_or(t);
    let (mut bias_param, mut bias_arg) =
        if ep == Epilogue::Bias { ("GM_ADDR bias, ".to_string(), "bias, ".to_string()) } else { Default::default() };
    let mut bias_init = if ep == Epilogue::Bias {
        "        biasGm.SetGlobalBuffer((__gm__ B*)bias, n);\n        pipe.InitBuffer(inB, 2, nTile * sizeof(B));\n"
            .to_string()
    } else {
        String::new()
    };
    let mut bias_members = if ep == Epilogue::Bias {
        "    TQue<TPosition::VECIN, 2> inB;\n    GlobalTensor<B> biasGm;\n".to_string()
    } else {
        String::new()
    };
    let load = if swiglu {
        "            DataCopy(x, cGm[r * cols + c0], len);\n            DataCopy(x[nTile], cGm[r * cols + n + c0], len);\n"
    } else {
        "            DataCopy(x, cGm[r * cols + c0], len);\n"
    };
    let mut compute = match ep {
        Epilogue::None => String::new(),
        Epilogue::Bias => "            LocalTensor<B> bl = inB.AllocTensor<B>();\n            DataCopy(bl, biasGm[c0], len);\n            inB.EnQue(bl);\n            bl = inB.DeQue<B>();\n            ToFloat(tmp, bl, len);\n            inB.FreeTensor(bl);\n            PipeBarrier<PIPE_V>();\n            Add(x, x, tmp, len);\n            PipeBarrier<PIPE_V>();\n".into(),
        // silu(g) * u = (g * sigmoid(g)) * u, as the reference computes it.
        Epilogue::SwiGlu => "            Sigmoid(tmp, x, len);\n            PipeBarrier<PIPE_V>();\n            Mul(x, x, tmp, len);\n            PipeBarrier<PIPE_V>();\n            Mul(x, x, x[nTile], len);\n            PipeBarrier<PIPE_V>();\n".into(),
    };
    let mut what = match ep {
        Epilogue::None => "y = cast(c)",
        Epilogue::Bias => "y = cast(c + bias)",
        Epilogue::SwiGlu => "y = cast(silu(c[:, :n]) * c[:, n:])",
    };
    if row_scale {
        if ep == Epilogue::SwiGlu {
            bail!("{}: a row-scaled SwiGLU epilogue is not supported", ctx.k.name);
        }
        what = if ep == Epilogue::Bias { "y = cast((c + bias) * rowW[r])" } else { "y = cast(c * rowW[r])" };
        bias_param += "GM_ADDR rowW, ";
        bias_arg += "rowW, ";
        bias_init += "        rwGm.SetGlobalBuffer((__gm__ float*)rowW, rows);\n";
        bias_members += "    GlobalTensor<float> rwGm;\n";
        compute += "            Muls(x, x, rwGm.GetValue(r), len);\n            PipeBarrier<PIPE_V>();\n";
    }
    let in_factor = if swiglu { 2 } else { 1 };
    let src = vector_source(
        &entry,
        &format!("Matmul epilogue: {what}."),
        EPILOGUE,
        &[
            ("T", t.cpp().into()),
            ("B", b.cpp().into()),
            ("WHAT", what.into()),
            ("BIAS_PARAM", bias_param),
            ("BIAS_ARG", bias_arg),
            ("BIAS_INIT", bias_init),
            ("BIAS_MEMBERS", bias_members),
            ("IN_FACTOR", in_factor.to_string()),
            ("LOAD", load.into()),
            ("COMPUTE", compute),
        ],
    );
    let tiles = rows.times(TExpr::c(n.div_ceil(n_tile)));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("n", TExpr::c(n)),
        TilingField::u32("cols", TExpr::c(cols)),
        TilingField::u32("nTile", TExpr::c(n_tile)),
    ]);
    let mut ub = 2 * in_factor * r32(n_tile * 4) + 2 * r32(n_tile * t.size()) + r32(n_tile * 4);
    if ep == Epilogue::Bias {
        ub += 2 * r32(n_tile * b.size());
    }
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = params;
    Ok(dk)
}

/// `Gemm (a[M, K], w, [bias[N]], out[M, N])`, w stored `[N, K]` on the
/// device (`[2I, K]`, gate rows first, for the SwiGLU epilogue).
pub(crate) fn gemm(ctx: &Ctx, ep: Epilogue) -> Result<DeviceKernels> {
    let nargs = ctx.k.args.len();
    let out = nargs - 1;
    if ctx.rank(0) != 2 || ctx.rank(out) != 2 {
        bail!("{}: only 2-D matmuls have an AscendC kernel (batched GEMM is not emitted)", ctx.k.name);
    }
    let k = ctx.cdim(0, 1, "K")?;
    let n_out = ctx.cdim(out, 1, "N")?;
    let n_mm = if ep == Epilogue::SwiGlu { 2 * n_out } else { n_out };
    let (t, o) = (ctx.dt[0], ctx.dt[out]);
    if ctx.dt[1] != t {
        bail!("{}: weight dtype {} differs from the activation dtype {t}", ctx.k.name, ctx.dt[1]);
    }
    let m = ctx.dim(0, 0)?;
    let direct = ep == Epilogue::None && (o == DevType::F32 || ctx.target() == Target::Ascend910B);
    let a = ctx.param("a", 0, Role::Input);
    let w = ctx.param("w", 1, Role::Input);
    if direct {
        let cube = cube_kernel(
            ctx,
            CubeSpec {
                entry: ctx.entry(""),
                what: "direct",
                t,
                out: o,
                m,
                n: n_mm,
                k,
                params: vec![a, w, ctx.param("c", out, Role::Output)],
            },
        )?;
        return Ok(DeviceKernels { kernels: vec![cube], temps: vec![], host: None });
    }
    let temp = TempBuf {
        name: format!("{}.c", ctx.k.name),
        dtype: DevType::F32,
        shape: vec![m.clone(), TExpr::c(n_mm)],
        elems: m.clone().times(TExpr::c(n_mm)),
    };
    let c_param = |role| Param::new("c", DevType::F32, role, ArgRef::Temp(0));
    let cube = cube_kernel(
        ctx,
        CubeSpec {
            entry: ctx.entry("_cube"),
            what: "product to f32 workspace",
            t,
            out: DevType::F32,
            m: m.clone(),
            n: n_mm,
            k,
            params: vec![a, w, c_param(Role::Output)],
        },
    )?;
    let mut params = vec![c_param(Role::Input)];
    let bias_t = if ep == Epilogue::Bias {
        params.push(ctx.param("bias", 2, Role::Input));
        Some(ctx.dt[2])
    } else {
        None
    };
    params.push(ctx.param("y", out, Role::Output));
    let epi = epilogue_kernel(
        ctx,
        EpilogueSpec { entry: ctx.entry("_epilogue"), ep, row_scale: false, t: o, bias_t, rows: m, n: n_out, params },
    )?;
    Ok(DeviceKernels { kernels: vec![cube, epi], temps: vec![temp], host: None })
}

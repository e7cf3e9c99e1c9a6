//! AscendC emission: kernel program kernels -> device kernels.
//!
//! One [`panguc_ir::kernel::Kernel`] becomes one or more [`DeviceKernel`]s
//! (a 910B matmul with an epilogue is a cube kernel plus a vector kernel,
//! because the simulation cannot run mix kernels). A device kernel carries
//! everything both the CANN project and the simulation need: the kernel
//! source (classic `extern "C" __global__ __aicore__` entry with GM tiling),
//! its tiling struct, the tiling *formulas* ([`TExpr`]) that the generated
//! host tiling function evaluates at run time from the actual token count and
//! KV length (and that the sim engine evaluates in Rust, so both agree), the
//! block-dim formula, and the worst-case on-chip memory use that the emitter
//! proved to fit.

mod cube;
mod expr;
mod flash;
mod layout;
mod moe;
pub mod paged;
pub mod quant;
mod rope;
mod route;
mod vector;

pub use expr::{Env, TExpr};

use crate::target::{DevType, Target};
pub use crate::weights::NzTile;
use anyhow::{bail, Result};
use panguc_ir::kernel::{Kernel, KernelKind};
use std::fmt::Write;

/// Which AI-core unit a kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CoreType {
    /// Vector cores (AIV on 910B).
    Vector,
    /// Cube cores (AIC on 910B); on 310P the coupled AI core.
    Cube,
}

/// One tiling-struct field: `uint32_t name` computed by a formula, or a
/// `float` constant (eps, scale).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    U32(TExpr),
    F32(f64),
    /// `float name[len]` of constants (e.g. RoPE inverse frequencies).
    F32Array(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TilingField {
    pub name: String,
    pub value: FieldValue,
}

impl TilingField {
    pub fn u32(name: &str, e: TExpr) -> Self {
        TilingField { name: name.to_string(), value: FieldValue::U32(e) }
    }
    pub fn f32(name: &str, v: f64) -> Self {
        TilingField { name: name.to_string(), value: FieldValue::F32(v) }
    }
    pub fn f32_array(name: &str, v: Vec<f64>) -> Self {
        TilingField { name: name.to_string(), value: FieldValue::F32Array(v) }
    }
}

/// Direction of a kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    Input,
    Output,
    /// Read and written in place (the KV cache append).
    InOut,
}

/// Where a device-kernel parameter comes from at launch time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgRef {
    /// Argument `i` of the kernel-program kernel.
    Orig(usize),
    /// Intermediate buffer `j` of [`DeviceKernels::temps`].
    Temp(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub dtype: DevType,
    pub role: Role,
    pub arg: ArgRef,
    /// The kernel reads this weight pre-tiled in its L1 B tile order
    /// ([`NzTile`]) rather than row-major; the program stores the buffer so
    /// (`AscendProgram::buffer_nz`) and the package README says it.
    pub nz: Option<NzTile>,
}

impl Param {
    /// A row-major parameter.
    pub fn new(name: &str, dtype: DevType, role: Role, arg: ArgRef) -> Param {
        Param { name: name.to_string(), dtype, role, arg, nz: None }
    }
}

/// Worst-case on-chip memory use of one kernel, bytes (each buffer rounded
/// up to 32 B, as `InitBuffer` allocates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemUse {
    pub ub: u64,
    pub l1: u64,
    pub l0a: u64,
    pub l0b: u64,
    pub l0c: u64,
}

impl MemUse {
    /// Fails naming the memory, the use and the capacity.
    pub fn check(&self, t: Target, what: &str) -> Result<()> {
        let cap = t.capacity();
        for (name, used, cap) in [
            ("UB", self.ub, cap.ub),
            ("L1", self.l1, cap.l1),
            ("L0A", self.l0a, cap.l0a),
            ("L0B", self.l0b, cap.l0b),
            ("L0C", self.l0c, cap.l0c),
        ] {
            if used > cap {
                bail!("{what}: cannot be tiled for {t}: needs {used} bytes of {name}, capacity is {cap} bytes");
            }
        }
        Ok(())
    }
}

/// Round up to the 32-byte allocation unit of UB/L1.
pub fn r32(bytes: u64) -> u64 {
    bytes.div_ceil(32) * 32
}

/// One `__global__` kernel, ready to be written to `op_kernel/` or run
/// under the simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceKernel {
    /// snake_case entry, also the kernel file stem.
    pub entry: String,
    /// UpperCamel op type whose CANN snake case is `entry`.
    pub op_type: String,
    pub core: CoreType,
    /// Kernel source without the tiling struct (`#include "<entry>_tiling.h"`).
    pub source: String,
    pub tiling_struct: String,
    pub fields: Vec<TilingField>,
    /// Number of blocks to launch (at most the core count).
    pub block_dim: TExpr,
    pub params: Vec<Param>,
    pub mem: MemUse,
}

/// Intermediate GM buffer between the device kernels of one program kernel
/// (e.g. the f32 matmul result that the bias epilogue reads).
#[derive(Debug, Clone, PartialEq)]
pub struct TempBuf {
    pub name: String,
    pub dtype: DevType,
    /// Row-major shape (the host program describes it as an aclTensor).
    pub shape: Vec<TExpr>,
    pub elems: TExpr,
}

/// The device kernels that implement one program kernel, in launch order.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceKernels {
    pub kernels: Vec<DeviceKernel>,
    pub temps: Vec<TempBuf>,
    /// A collective: the host's communication-library call, between the
    /// device kernels (which only repack data for it).
    pub host: Option<HostCollective>,
}

/// The host side of a collective launch: one HCCL call over `group` on
/// contiguous per-member blocks (`send`/`recv` are the program kernel's
/// arguments, or temps the device kernels pack into and unpack from).
#[derive(Debug, Clone, PartialEq)]
pub struct HostCollective {
    pub kind: panguc_ir::op::CollectiveKind,
    /// Global ranks taking part, in member order.
    pub group: Vec<usize>,
    /// Device kernels `[..pre]` run before the call, the rest after it.
    pub pre: usize,
    pub send: ArgRef,
    pub recv: ArgRef,
    pub dtype: DevType,
}

/// Emission choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmitOptions {
    pub target: Target,
    /// Activation dtype: bf16 or f16 on 910B, f16 on 310P; f32 on 910B for
    /// the end-to-end token check under the simulation.
    pub act: DevType,
    /// Bit `i`: argument `i` of the kernel being emitted is a weight the
    /// program may store pre-tiled, so a cube GEMM reading it as its B
    /// operand copies each L1 tile with one contiguous DataCopy (see
    /// [`EmitOptions::nz_weight`]); 0 (every weight row-major) by default.
    pub nz_args: u64,
}

impl EmitOptions {
    pub fn new(target: Target, act: DevType) -> Result<Self> {
        target.check_act(act)?;
        Ok(EmitOptions { target, act, nz_args: 0 })
    }

    /// The tile order in which a cube GEMM of base tile `base` over
    /// elements `t` reads its weight parameter `w` (`[.., n, k]`), or
    /// `None` to read it row-major with Nd2Nz. Tiled only when the
    /// argument may be, and when the tiled matrix has exactly the
    /// row-major size (N a multiple of 16, K of C0): the host program's
    /// weight size checks and every size computed from the logical shape
    /// then hold for both layouts.
    pub(crate) fn nz_weight(&self, w: &Param, base: cube::BaseTile, t: DevType, n: u64, k: u64) -> Option<NzTile> {
        let ArgRef::Orig(i) = w.arg else { return None };
        let tile = NzTile { base_n: base.n, base_k: base.k, c0: 32 / t.size() };
        let fits = n.is_multiple_of(16) && k.is_multiple_of(tile.c0) && tile.stored_elems(n, k) == n * k;
        (i < 64 && (self.nz_args >> i) & 1 == 1 && fits).then_some(tile)
    }
}

impl DeviceKernel {
    /// Tiling header shared by the kernel and the host tiling function.
    pub fn tiling_header(&self) -> String {
        let guard = format!("{}_TILING_H", self.entry.to_uppercase());
        let mut s = format!("// Generated by panguc. Tiling of `{}`.\n#ifndef {guard}\n#define {guard}\n", self.entry);
        s.push_str("#include <cstdint>\n\n");
        let _ = writeln!(s, "struct {} {{", self.tiling_struct);
        for f in &self.fields {
            match &f.value {
                FieldValue::U32(_) => {
                    let _ = writeln!(s, "    uint32_t {};", f.name);
                }
                FieldValue::F32(_) => {
                    let _ = writeln!(s, "    float {};", f.name);
                }
                FieldValue::F32Array(v) => {
                    let _ = writeln!(s, "    float {}[{}];", f.name, v.len());
                }
            }
        }
        let _ = writeln!(s, "}};\n\n#endif  // {guard}");
        s
    }

    /// The source compiled under the simulation: the tiling header inlined.
    pub fn sim_source(&self) -> String {
        let inc = format!("#include \"{}_tiling.h\"\n", self.entry);
        let hdr = self.tiling_header().replace("#include <cstdint>\n", "");
        self.source.replacen(&inc, &hdr, 1)
    }

    /// Tiling bytes (little-endian, 4 bytes per field) for actual sizes.
    pub fn tiling_bytes(&self, env: &Env) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.fields.len() * 4);
        for f in &self.fields {
            match &f.value {
                FieldValue::U32(e) => {
                    let x = e.eval(env)?;
                    let x = u32::try_from(x)
                        .map_err(|_| anyhow::anyhow!("{}: tiling field {} = {x} overflows u32", self.entry, f.name))?;
                    v.extend_from_slice(&x.to_le_bytes());
                }
                FieldValue::F32(x) => v.extend_from_slice(&(*x as f32).to_le_bytes()),
                FieldValue::F32Array(xs) => xs.iter().for_each(|x| v.extend_from_slice(&(*x as f32).to_le_bytes())),
            }
        }
        Ok(v)
    }
}

/// Emit the device kernels of `k`. `dtypes` gives the device dtype of each
/// argument of `k` (see [`crate::program::device_dtypes`]).
pub fn emit_kernel(k: &Kernel, dtypes: &[DevType], o: &EmitOptions) -> Result<DeviceKernels> {
    if dtypes.len() != k.args.len() {
        bail!("{}: {} dtypes for {} arguments", k.name, dtypes.len(), k.args.len());
    }
    let ctx = Ctx { k, dt: dtypes, o };
    let dks = match &k.kind {
        KernelKind::RmsNorm { eps } => vector::rms_norm(&ctx, *eps, false)?,
        KernelKind::AddRmsNorm { eps } => vector::rms_norm(&ctx, *eps, true)?,
        KernelKind::Gather => vector::gather(&ctx)?,
        KernelKind::Elementwise { op: panguc_ir::kernel::ElemOp::Binary(b) }
            if dtypes.iter().all(|d| *d == DevType::I64) =>
        {
            layout::index_arith(&ctx, *b)?
        }
        KernelKind::Elementwise { op: panguc_ir::kernel::ElemOp::Binary(b) }
            if layout::row_broadcast_operand(k).is_some() =>
        {
            layout::row_broadcast(&ctx, *b, layout::row_broadcast_operand(k).expect("checked"))?
        }
        KernelKind::Elementwise { op } => vector::elementwise(&ctx, op)?,
        KernelKind::Rope => vector::rope(&ctx)?,
        KernelKind::Attention { scale } => vector::attention(&ctx, *scale)?,
        KernelKind::MoeGating { groups } => vector::moe_gating(&ctx, *groups)?,
        KernelKind::Gemm { epilogue } => cube::gemm(&ctx, *epilogue)?,
        KernelKind::MatMul { transpose_b: true, bias } => {
            cube::gemm(&ctx, if *bias { panguc_ir::kernel::Epilogue::Bias } else { panguc_ir::kernel::Epilogue::None })?
        }
        KernelKind::RopeTable { kind, theta, head_dim } => rope::rope_table(&ctx, *kind, *theta, *head_dim)?,
        KernelKind::QkvRopeAppend { q_heads, kv_heads } => rope::qkv_rope_append(&ctx, *q_heads, *kv_heads)?,
        KernelKind::QkvRopeCacheWrite { q_heads, kv_heads } => rope::qkv_rope_cache_write(&ctx, *q_heads, *kv_heads)?,
        KernelKind::QkvRopeCacheWriteQuant { q_heads, kv_heads } => {
            rope::qkv_rope_cache_write_quant(&ctx, *q_heads, *kv_heads)?
        }
        KernelKind::PagedAttention { scale } => paged::paged_attention(&ctx, *scale)?,
        KernelKind::MoeRoute => route::route(&ctx)?,
        KernelKind::MoeGateUp => moe::gate_up(&ctx)?,
        KernelKind::MoeGroupedGateUp => moe::gate_up_sorted(&ctx)?,
        KernelKind::MoeDown => moe::down(&ctx)?,
        KernelKind::MoeCombine { shared_residual } => moe::combine(&ctx, *shared_residual)?,
        KernelKind::Slice { axis, start } => layout::slice(&ctx, *axis, *start)?,
        KernelKind::CopyInto { axis, offset } => layout::copy_into(&ctx, *axis, offset)?,
        KernelKind::KvCacheWrite => vector::kv_cache_write(&ctx)?,
        KernelKind::Collective { kind, group, axis } => layout::collective(&ctx, *kind, group, *axis)?,
        KernelKind::DynamicQuant => quant::wire::dynamic_quant(&ctx)?,
        KernelKind::RmsNormQuant { eps, add } => quant::wire::rms_norm_quant(&ctx, *eps, *add)?,
        KernelKind::Quantize => quant::wire::quantize(&ctx)?,
        KernelKind::Dequantize => quant::wire::dequantize(&ctx)?,
        KernelKind::QuantMatMul { per_token, bias } => quant::wire::quant_matmul(&ctx, *per_token, *bias)?,
        KernelKind::DynQuantMatMul { bias, residual } => quant::wire::dyn_quant_matmul(&ctx, *bias, *residual)?,
        KernelKind::KvCacheWriteQuant => quant::wire::kv_cache_write_quant(&ctx)?,
        KernelKind::PagedAttentionInt8 { scale } => quant::wire::paged_attention_int8_kernel(&ctx, *scale)?,
        KernelKind::MoeGateUpQuant => quant::experts::moe_gate_up_quant(&ctx)?,
        KernelKind::QuantGateUpQuant => quant::experts::quant_gate_up_quant(&ctx)?,
        KernelKind::MoeDownQuant => quant::experts::moe_down_quant(&ctx)?,
        KernelKind::StaticQuantMatMul => quant::statics::static_quant_matmul(&ctx)?,
        KernelKind::MoeGateUpStatic => quant::statics::moe_gate_up_static(&ctx)?,
        KernelKind::QuantGateUpStatic => quant::statics::quant_gate_up_static(&ctx)?,
        KernelKind::MoeDownStatic => quant::statics::moe_down_static(&ctx)?,
        other => bail!(
            "{}: kernel kind `{}` has no AscendC implementation yet (supported: rms_norm, add_rms_norm, gather, \
             elementwise, rope, rope_table, qkv_rope_append, qkv_rope_cache_write, qkv_rope_cache_write_quant, kv_cache_write, attention, paged_attention, moe_gating, gemm, matmul(transposed b), \
             moe_route, moe_gate_up, moe_down, moe_combine, slice, copy_into, collectives, dynamic_quant, quantize, \
             dequantize, rms_norm_quant, add_rms_norm_quant, quant_matmul, dyn_quant_matmul, kv_cache_write_quant, \
             paged_attention_int8, moe_gate_up_quant, quant_gate_up_quant, moe_down_quant, static_quant_matmul, \
             moe_gate_up_static, quant_gate_up_static, moe_down_static)",
            k.name,
            other.mnemonic()
        ),
    };
    for dk in &dks.kernels {
        dk.mem.check(o.target, &format!("kernel `{}` ({})", k.name, dk.entry))?;
    }
    Ok(dks)
}

/// What a per-kind emitter sees.
pub(crate) struct Ctx<'a> {
    pub k: &'a Kernel,
    pub dt: &'a [DevType],
    pub o: &'a EmitOptions,
}

impl Ctx<'_> {
    /// A static dimension of argument `arg`, or a clear error.
    pub fn cdim(&self, arg: usize, dim: usize, what: &str) -> Result<u64> {
        let d = self.k.args.get(arg).and_then(|a| a.shape.get(dim));
        match d.and_then(|d| d.as_const()) {
            Some(c) => Ok(c as u64),
            None => bail!("{}: {what} (argument {arg} dim {dim}) must be static", self.k.name),
        }
    }
    /// A dimension as a run-time formula (`tokens`, `past + tokens`, constant).
    pub fn dim(&self, arg: usize, dim: usize) -> Result<TExpr> {
        let d = &self.k.args[arg].shape[dim];
        TExpr::from_dim(d).map_err(|e| anyhow::anyhow!("{}: argument {arg} dim {dim}: {e}", self.k.name))
    }
    /// Product of dims `from..to` of argument `arg`.
    pub fn dims(&self, arg: usize, from: usize, to: usize) -> Result<TExpr> {
        let mut e = TExpr::c(1);
        for i in from..to {
            e = e.times(self.dim(arg, i)?);
        }
        Ok(e)
    }
    pub fn rank(&self, arg: usize) -> usize {
        self.k.args[arg].shape.len()
    }
    /// The kernel's entry name (program kernel names are already snake case).
    pub fn entry(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.k.name)
    }
    pub fn param(&self, name: &str, arg: usize, role: Role) -> Param {
        Param::new(name, self.dt[arg], role, ArgRef::Orig(arg))
    }
    pub fn target(&self) -> Target {
        self.o.target
    }
}

/// `panguc_k003_rms_norm` -> `PangucK003RmsNorm` (CANN's snake case of the
/// result is the input again; checked in tests).
pub fn upper_camel(snake: &str) -> String {
    snake
        .split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// CANN's op-type -> file/entry rule: an underscore before an upper-case
/// letter that follows a lower-case letter or digit, or that ends an
/// acronym (upper case followed by lower case), then lower case
/// (`Conv2DCustom` -> `conv2_d_custom`).
pub fn cann_snake(op_type: &str) -> String {
    let mut s = String::new();
    let chars: Vec<char> = op_type.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let prev_lower = i > 0 && (chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit());
        let acronym_end =
            i > 0 && chars[i - 1].is_ascii_uppercase() && chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
        if c.is_ascii_uppercase() && (prev_lower || acronym_end) {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

/// Substitute `{{KEY}}` placeholders; every key must be used and no
/// placeholder may remain (catches template typos at emit time).
pub(crate) fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        let pat = format!("{{{{{k}}}}}");
        assert!(s.contains(&pat), "template placeholder {pat} unused");
        s = s.replace(&pat, v);
    }
    assert!(!s.contains("{{"), "unfilled template placeholder in:\n{s}");
    s
}

/// `template` filled with `vars` and the names every kernel template uses:
/// `{{CLASS}}` (`Kernel<UpperCamel entry>`), `{{TILING}}` (the tiling
/// struct, `<UpperCamel entry>Tiling`) and `{{ENTRY}}`.
pub(crate) fn fill_kernel(template: &str, entry: &str, vars: &[(&str, String)]) -> String {
    let up = upper_camel(entry);
    let names = [("CLASS", format!("Kernel{up}")), ("TILING", format!("{up}Tiling")), ("ENTRY", entry.to_string())];
    fill(template, &[vars, &names].concat())
}

/// Common head of every kernel file.
pub(crate) fn head(entry: &str, what: &str) -> String {
    format!(
        "// Generated by panguc. {what}\n#include \"kernel_operator.h\"\n#include \"{entry}_tiling.h\"\n{ARCH}\nusing namespace AscendC;\n"
    )
}

/// Chip selection every kernel file starts with: current device compilers
/// define `__NPU_ARCH__` and a `__DAV_<arch>__` macro per compile, older ones
/// only `__CCE_AICORE__`; kernels branch on `PANGUC_DAV_C220` (910B) alone.
pub(crate) const ARCH: &str = r#"
// 910B (dav-c220) or 310P (dav-m200), from the macros the device compiler defines.
#if (defined(__NPU_ARCH__) && __NPU_ARCH__ == 2201) || defined(__DAV_C220_VEC__) || defined(__DAV_C220_CUBE__) || \
    (!defined(__NPU_ARCH__) && defined(__CCE_AICORE__) && __CCE_AICORE__ == 220)
#define PANGUC_DAV_C220 1
#else
#define PANGUC_DAV_C220 0
#endif
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_cann_conventions() {
        for s in ["panguc_k003_rms_norm", "panguc_k012_gemm_epilogue", "panguc_k000_gather"] {
            assert_eq!(cann_snake(&upper_camel(s)), s);
        }
        assert_eq!(upper_camel("panguc_k003_rms_norm"), "PangucK003RmsNorm");
        assert_eq!(cann_snake("Conv2DCustom"), "conv2_d_custom");
    }
}

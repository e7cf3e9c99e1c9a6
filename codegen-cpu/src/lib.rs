//! panguc-codegen-cpu: native code for the CPU through LLVM (inkwell).
//!
//! [`compile`] turns a kernel program into one LLVM module with an exported
//! function per kernel (the ABI is described in `cg`), specialised to the
//! model's dtypes and shapes, optimised with the `default<O3>` pipeline for
//! the host CPU (target machine from the host's name and features, and the
//! same `target-cpu`/`target-features` attributes on every function so the
//! vectorisers use the wide registers), and emitted as an object file plus
//! assembly and optimised IR for inspection. A package is compiled once
//! per [`Tier`] (baseline x86-64-v3 and AVX-512 BF16 on x86-64), and the
//! runtime picks the library from the running CPU. [`link_shared_library`] links
//! the object into the package's shared library; [`with_jit`] runs the same
//! module in-process for tests.

mod cg;
mod kernels;

use anyhow::{anyhow, bail, Context as _, Result};
use inkwell::context::Context;
use inkwell::module::Linkage;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::OptimizationLevel;
use panguc_ir::kernel::KernelProgram;
use std::path::Path;

/// Version of the kernel calling convention; exported by every library as
/// `panguc_kernel_abi()` so the runtime can refuse a mismatched one.
pub const KERNEL_ABI_VERSION: i32 = 1;

/// Name of the exported ABI-version function.
pub const ABI_SYMBOL: &str = "panguc_kernel_abi";

/// Sorted rows of one expert per tile of the int8 expert kernels (the
/// rows that share each weight panel load); tests aim at its edges.
pub const EXPERT_BLOCK_ROWS: usize = kernels::EXPERT_BLOCK_ROWS;

/// `void kernel(i8** args, const i64* syms, i64 begin, i64 end, i8* scratch)`.
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64, *mut u8);

/// The machine code is generated for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTarget {
    pub triple: String,
    pub cpu: String,
    /// LLVM feature string (`+avx2,+fma,...`).
    pub features: String,
}

impl HostTarget {
    /// The machine we are running on.
    pub fn detect() -> Result<HostTarget> {
        Target::initialize_native(&InitializationConfig::default()).map_err(|e| anyhow!("LLVM native target: {e}"))?;
        Ok(HostTarget {
            triple: TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned(),
            cpu: TargetMachine::get_host_cpu_name().to_string(),
            features: TargetMachine::get_host_cpu_features().to_string(),
        })
    }

    fn has(&self, feature: &str) -> bool {
        self.features.split(',').any(|x| x.strip_prefix('+') == Some(feature))
    }

    /// True when GEMMs on bf16 weights use the AVX-512 BF16 dot product
    /// (`vdpbf16ps`) on activations rounded to bf16, instead of exact f32
    /// multiplies and adds.
    pub fn bf16_dot(&self) -> bool {
        self.has("avx512bf16")
    }

    /// True when int8 dot products use AVX-512 VNNI (`vpdpbusd` on 512-bit
    /// registers); otherwise the widening multiply-add (`vpmaddwd` on AVX2).
    pub fn int8_vnni(&self) -> bool {
        self.has("avx512vnni") && self.has("avx512bw")
    }

    /// The widest f32 vector the features allow, in lanes.
    pub fn vector_lanes(&self) -> u32 {
        let has = |f: &str| self.has(f);
        if has("avx512f") {
            16
        } else if has("avx2") || has("avx") {
            8
        } else {
            4
        }
    }

    fn machine(&self) -> Result<TargetMachine> {
        let triple = inkwell::targets::TargetTriple::create(&self.triple);
        let target = Target::from_triple(&triple).map_err(|e| anyhow!("no LLVM target for {}: {e}", self.triple))?;
        target
            .create_target_machine(
                &triple,
                &self.cpu,
                &self.features,
                OptimizationLevel::Aggressive,
                RelocMode::PIC,
                CodeModel::Default,
            )
            .ok_or_else(|| anyhow!("cannot create an LLVM target machine for {} ({})", self.triple, self.cpu))
    }
}

/// Name of the baseline x86-64 tier: x86-64-v3 (AVX2 + FMA + F16C, ...).
pub const BASELINE_TIER: &str = "x86-64-v3";
/// Name of the best x86-64 tier: AVX-512 (F, BW, CD, DQ, VL) with the BF16
/// dot-product and VNNI instructions.
pub const BF16_TIER: &str = "avx512-bf16";

/// Features of the x86-64-v3 level the runtime can check (the CPU name
/// implies the same set to LLVM).
const V3_FEATURES: &str = "+avx,+avx2,+bmi,+bmi2,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse4.1,+sse4.2,+ssse3,+xsave";
const AVX512_BF16_FEATURES: &str = "+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl,+avx512bf16,+avx512vnni";

/// One instruction-set tier of the kernel library. A package carries a
/// library per tier and the runtime loads the best one the running CPU
/// supports, so the code never depends on the build machine's CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Stable name (`x86-64-v3`, `avx512-bf16`, or `host` off x86-64).
    pub name: String,
    pub target: HostTarget,
}

impl Tier {
    /// The tiers a package is built for, baseline first, best last: the two
    /// x86-64 tiers on an x86-64 build machine (whatever its own CPU), the
    /// build machine itself elsewhere.
    pub fn all() -> Result<Vec<Tier>> {
        let host = HostTarget::detect()?;
        if !host.triple.starts_with("x86_64") {
            return Ok(vec![Tier { name: "host".into(), target: host }]);
        }
        Ok([BASELINE_TIER, BF16_TIER].iter().map(|n| Tier::x86(n, &host.triple).expect("known tier")).collect())
    }

    /// The x86-64 tier `name` for `triple`.
    pub fn x86(name: &str, triple: &str) -> Option<Tier> {
        let (cpu, features) = match name {
            BASELINE_TIER => ("x86-64-v3", V3_FEATURES.to_string()),
            BF16_TIER => ("x86-64-v4", format!("{V3_FEATURES},{AVX512_BF16_FEATURES}")),
            _ => return None,
        };
        Some(Tier { name: name.into(), target: HostTarget { triple: triple.into(), cpu: cpu.into(), features } })
    }
}

/// What [`compile`] produces.
#[derive(Debug, Clone)]
pub struct CompiledKernels {
    /// ELF relocatable object with one exported symbol per kernel.
    pub object: Vec<u8>,
    /// The same code as assembly (for inspection and tests).
    pub assembly: String,
    /// Optimised LLVM IR.
    pub llvm_ir: String,
    /// Exported kernel symbols, in program order.
    pub symbols: Vec<String>,
}

/// Build the optimised LLVM module of `program` inside `ctx`.
fn build_module<'c>(
    ctx: &'c Context,
    program: &KernelProgram,
    target: &HostTarget,
) -> Result<inkwell::module::Module<'c>> {
    Target::initialize_native(&InitializationConfig::default()).map_err(|e| anyhow!("LLVM native target: {e}"))?;
    let mut cg = cg::Cg::new(ctx, "panguc_kernels", program.symbols.clone(), &target.cpu, &target.features);
    cg.bf16_dot = target.bf16_dot();
    cg.vnni = target.int8_vnni();
    for k in &program.kernels {
        kernels::emit(&mut cg, k)?;
    }
    // `i32 panguc_kernel_abi()`.
    let abi = cg.module.add_function(ABI_SYMBOL, ctx.i32_type().fn_type(&[], false), Some(Linkage::External));
    cg.add_target_attrs(abi);
    let bb = ctx.append_basic_block(abi, "entry");
    cg.b.position_at_end(bb);
    cg.b.build_return(Some(&ctx.i32_type().const_int(KERNEL_ABI_VERSION as u64, false)))
        .map_err(|e| anyhow!("{e:?}"))?;
    let module = cg.module;
    module.verify().map_err(|e| anyhow!("generated LLVM IR does not verify: {}", e.to_string()))?;
    let machine = target.machine()?;
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let opts = PassBuilderOptions::create();
    opts.set_loop_vectorization(true);
    opts.set_loop_slp_vectorization(true);
    opts.set_loop_unrolling(true);
    opts.set_loop_interleaving(true);
    module.run_passes("default<O3>", &machine, opts).map_err(|e| anyhow!("LLVM O3 pipeline: {}", e.to_string()))?;
    Ok(module)
}

/// Generate, optimise and emit every kernel of `program` for `target`.
pub fn compile(program: &KernelProgram, target: &HostTarget) -> Result<CompiledKernels> {
    let ctx = Context::create();
    let module = build_module(&ctx, program, target)?;
    let machine = target.machine()?;
    let emit = |ft: FileType| -> Result<Vec<u8>> {
        let buf =
            machine.write_to_memory_buffer(&module, ft).map_err(|e| anyhow!("LLVM emission: {}", e.to_string()))?;
        Ok(buf.as_slice().to_vec())
    };
    let object = emit(FileType::Object)?;
    let assembly = String::from_utf8_lossy(&emit(FileType::Assembly)?).into_owned();
    Ok(CompiledKernels {
        object,
        assembly,
        llvm_ir: module.print_to_string().to_string(),
        symbols: program.kernels.iter().filter(|k| !k.kind.is_host()).map(|k| k.name.clone()).collect(),
    })
}

/// Link an object from [`compile`] into a shared library at `out` with the
/// system C compiler driver (`$CC`, default `cc`). The object is written
/// next to `out` and removed afterwards.
pub fn link_shared_library(object: &[u8], out: &Path) -> Result<()> {
    let obj = out.with_extension("o");
    std::fs::write(&obj, object).with_context(|| format!("writing {}", obj.display()))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let result = std::process::Command::new(&cc)
        .args(["-shared", "-o"])
        .arg(out)
        .arg(&obj)
        // No build id or other host noise: compiling twice must give the
        // same bytes.
        .args(["-Wl,--build-id=none", "-Wl,-z,noexecstack", "-lm"])
        .output();
    let _ = std::fs::remove_file(&obj);
    let output =
        result.with_context(|| format!("running `{cc}` to link the kernel library (is a C compiler installed?)"))?;
    if !output.status.success() {
        bail!("linking {} failed: {}", out.display(), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Compile `program` and run `f` with a lookup from kernel name to the
/// JIT-compiled function (the same optimised module as [`compile`]).
pub fn with_jit<R>(
    program: &KernelProgram,
    target: &HostTarget,
    f: impl FnOnce(&dyn Fn(&str) -> Option<KernelFn>) -> R,
) -> Result<R> {
    let ctx = Context::create();
    let module = build_module(&ctx, program, target)?;
    let engine = module
        .create_jit_execution_engine(OptimizationLevel::Aggressive)
        .map_err(|e| anyhow!("creating the JIT: {}", e.to_string()))?;
    let lookup = |name: &str| -> Option<KernelFn> {
        let addr = engine.get_function_address(name).ok()?;
        // SAFETY: every exported kernel has the `KernelFn` signature.
        Some(unsafe { std::mem::transmute::<usize, KernelFn>(addr) })
    };
    Ok(f(&lookup))
}

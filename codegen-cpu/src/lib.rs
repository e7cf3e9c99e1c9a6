//! panguc-codegen-cpu: native code for the CPU through LLVM (inkwell).
//!
//! [`compile`] turns a kernel program into one LLVM module with an exported
//! function per kernel (the ABI is described in `cg`), specialised to the
//! model's dtypes and shapes, optimised with the `default<O3>` pipeline for
//! the host CPU (target machine from the host's name and features, and the
//! same `target-cpu`/`target-features` attributes on every function so the
//! vectorisers use the wide registers), and emitted as an object file plus
//! assembly and optimised IR for inspection. [`link_shared_library`] links
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

    /// The widest f32 vector the features allow, in lanes.
    pub fn vector_lanes(&self) -> u32 {
        let has = |f: &str| self.features.split(',').any(|x| x == format!("+{f}"));
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

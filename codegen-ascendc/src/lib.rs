//! panguc-codegen-ascendc: AscendC code generation for Huawei Ascend NPUs.
//!
//! [`emit`] turns the kernels of a panguc kernel program into AscendC device
//! kernels (vector kernels for norms, gather, elementwise, RoPE, attention
//! and gating; cube GEMMs with vector epilogues) with host-evaluated tiling
//! formulas; [`target`] holds the per-SoC rules (capacities, dtypes).
//! [`emit::quant`] and [`emit::paged::paged_attention_int8`] are the int8
//! kernels (W8A8 GEMMs, grouped expert GEMM, dynamic quant, int8 KV cache),
//! emitted from explicit sizes until the kernel program has int8 kinds.
//!
//! The crate also owns the CPU simulation of the AscendC API subset that the
//! emitter may use ([`sim`]): C++ headers under `sim/include/` that implement
//! `kernel_operator.h` (real names and argument orders) with checks the
//! hardware does not give, plus a Rust harness that compiles a kernel with
//! g++ against them, launches it once per block index and returns its outputs
//! or a typed error. Emitted kernels are validated there against the
//! reference interpreter, because the CANN toolkit cannot be installed here.
//! `sim/README.md` lists the supported API subset and its checks.

pub mod data;
pub mod emit;
pub mod engine;
pub mod host;
pub mod op_host_check;
pub mod perf;
pub mod program;
pub mod project;
pub mod sim;
pub mod target;
pub mod timing;
pub mod weights;

pub use emit::{emit_kernel, DeviceKernel, DeviceKernels, EmitOptions, Env, TExpr};
pub use engine::AscendSimEngine;
pub use sim::{sim_headers, sim_include_dir, syntax_check, SimArg, SimError, SimKernel, SimRun, Soc};
pub use target::{DevType, Target};
pub use timing::{SimTiming, TimingParams};

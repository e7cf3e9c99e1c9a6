//! panguc-codegen-ascendc: AscendC code generation for Huawei Ascend NPUs.
//!
//! This crate turns panguc kernel programs into AscendC kernel sources, host
//! tiling code and CANN build projects (operator packages or kernel-launch
//! projects) for the 910B and 310P SoCs. The emitter itself is being written
//! separately and will land here later.
//!
//! The crate also owns the CPU simulation of the AscendC API subset that the
//! emitter may use ([`sim`]): C++ headers under `sim/include/` that implement
//! `kernel_operator.h` (real names and argument orders) with checks the
//! hardware does not give, plus a Rust harness that compiles a kernel with
//! g++ against them, launches it once per block index and returns its outputs
//! or a typed error. Emitted kernels are validated there against the
//! reference interpreter, because the CANN toolkit cannot be installed here.
//! `sim/README.md` lists the supported API subset and its checks.

pub mod sim;

pub use sim::{sim_headers, sim_include_dir, syntax_check, SimArg, SimError, SimKernel, SimRun, Soc};

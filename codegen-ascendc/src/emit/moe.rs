//! Grouped-matmul MoE kernels (dispatch, per-expert GEMMs, combine).
//!
//! Not emitted yet: the kinds are recognised so that the error names what
//! is missing instead of reporting an unknown kind.

use super::{Ctx, DeviceKernels};
use anyhow::{bail, Result};

fn missing(ctx: &Ctx) -> Result<DeviceKernels> {
    bail!("{}: the AscendC grouped-matmul MoE kernel `{}` is not implemented yet", ctx.k.name, ctx.k.kind.mnemonic())
}

pub(crate) fn route(ctx: &Ctx) -> Result<DeviceKernels> {
    missing(ctx)
}
pub(crate) fn gate_up(ctx: &Ctx) -> Result<DeviceKernels> {
    missing(ctx)
}
pub(crate) fn down(ctx: &Ctx) -> Result<DeviceKernels> {
    missing(ctx)
}
pub(crate) fn combine(ctx: &Ctx, _shared_residual: bool) -> Result<DeviceKernels> {
    missing(ctx)
}

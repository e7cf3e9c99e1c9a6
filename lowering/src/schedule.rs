//! Scheduling: the (fused) graph IR becomes a kernel program
//! ([`panguc_ir::kernel::KernelProgram`]) that every code generator consumes.
//!
//! Steps:
//! 1. [`flatten`]: inline every `call` (one decoder-layer function called per
//!    layer) into one flat graph whose weights carry full checkpoint names.
//! 2. Constant analysis: a value computed only from weights and constants is
//!    evaluated at package time into a *prepared weight*, stored in the
//!    layout its consuming kernel wants (packed panels for matmuls, gate/up
//!    interleaved, stacked experts). Reshapes and widening casts are views
//!    and cost nothing.
//! 3. Kernel selection ([`select`]): one or more launches per remaining node;
//!    identical specialisations (same kind, dtypes, shapes) share a kernel.
//!    The KV-cache `concat(cache, new)` becomes an in-place append.
//! 4. Buffer plan: the launch graph ([`crate::dataflow::LaunchGraph`])
//!    checks the order and gives every activation its live range; slots
//!    are assigned by lifetime (greedy, first fit), so a decoder layer's
//!    temporaries are reused by the next layer.

mod flatten;
mod select;

use anyhow::{bail, Result};
use panguc_ir::kernel::{BufferKind, KernelProgram};
use panguc_ir::Module;

use crate::dataflow::LaunchGraph;

pub use flatten::{flatten, Def, FlatGraph};

/// Target-dependent choices of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleOptions {
    /// Column-panel width of packed matmul weights (the CPU GEMM
    /// micro-kernel's register tile width in f32 lanes).
    pub panel_width: u32,
    /// `Some((rank, devices))` when scheduling one rank's program of a
    /// partitioned module: collective ops become host-executed
    /// [`panguc_ir::kernel::KernelKind::Collective`] launches. `None` (one
    /// device): all-reduce and all-to-all are the identity, the other
    /// collectives are rejected.
    pub ranks: Option<(usize, usize)>,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions { panel_width: 16, ranks: None }
    }
}

/// Schedule the entry function of `module` (the session contract of
/// `panguc_ir::session`) into a kernel program.
pub fn schedule(module: &Module, opts: &ScheduleOptions) -> Result<KernelProgram> {
    if opts.panel_width < 2 || !opts.panel_width.is_multiple_of(2) {
        bail!("panel width must be even and >= 2, got {}", opts.panel_width);
    }
    if let Some((rank, devices)) = opts.ranks {
        if rank >= devices {
            bail!("rank {rank} is outside 0..{devices}");
        }
    }
    let flat = flatten(module)?;
    let mut program = select::Selector::new(&flat, opts).run()?;
    assign_slots(&mut program)?;
    program.validate().map_err(|e| anyhow::anyhow!("scheduler produced an invalid kernel program: {e}"))?;
    Ok(program)
}

/// Summary numbers for reports.
pub fn stats(p: &KernelProgram) -> serde_json::Value {
    let weight_bytes: usize = p.weights.iter().map(|w| w.stored_bytes()).sum();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for l in &p.launches {
        *kinds.entry(p.kernels[l.kernel].kind.mnemonic()).or_default() += 1;
    }
    serde_json::json!({
        "kernels": p.kernels.len(),
        "launches": p.launches.len(),
        "buffers": p.buffers.len(),
        "arena_slots": p.slots,
        "prepared_weights": p.weights.len(),
        "prepared_weight_bytes": weight_bytes,
        "launches_by_kind": kinds,
    })
}

/// Give every activation buffer an arena slot. Buffers whose live ranges
/// (first write .. last read, in launch order, from the launch graph) do
/// not overlap may share a slot; the runtime sizes a slot as the largest of
/// its buffers. Fails when the launch order breaks a dependency.
fn assign_slots(p: &mut KernelProgram) -> Result<()> {
    let graph = LaunchGraph::build(p).map_err(|e| anyhow::anyhow!("scheduler bug: {e}"))?;
    graph.check_order(p).map_err(|e| anyhow::anyhow!("scheduler bug: {e}"))?;
    let ranges = graph.live_ranges(p);
    let end = p.launches.len();
    // Buffers that are first written at each launch, in buffer order.
    let mut starts: Vec<Vec<usize>> = vec![vec![]; end + 1];
    for (i, r) in ranges.iter().enumerate() {
        if let Some((first, _)) = r {
            starts[*first].push(i);
        }
    }
    let last = |b: usize| ranges[b].map_or(0, |r| r.1);
    // slot -> (buffer currently holding it, its size signature)
    let mut holder: Vec<(usize, String)> = vec![];
    let mut assigned = vec![usize::MAX; p.buffers.len()];
    for (li, new) in starts.iter().enumerate() {
        for &b in new {
            let sig = format!("{}{:?}", p.buffers[b].dtype.size_bytes(), p.buffers[b].shape);
            let free = |s: &(usize, String)| last(s.0) < li;
            // Prefer a free slot last used by a buffer of the same size, so
            // slots stay tight; otherwise the lowest free slot.
            let pick = holder.iter().position(|s| free(s) && s.1 == sig).or_else(|| holder.iter().position(free));
            let slot = match pick {
                Some(s) => {
                    holder[s] = (b, sig);
                    s
                }
                None => {
                    holder.push((b, sig));
                    holder.len() - 1
                }
            };
            assigned[b] = slot;
        }
    }
    for (i, b) in p.buffers.iter_mut().enumerate() {
        if let BufferKind::Activation { slot } = &mut b.kind {
            *slot = assigned[i];
        }
    }
    p.slots = holder.len();
    Ok(())
}

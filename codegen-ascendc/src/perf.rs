//! Per-kernel simulated efficiency of an emitted program under the timing
//! model ([`crate::timing`]), for the report of `panguc compile`.
//!
//! Full-size shapes (a 72B model) cannot be simulated element by element in
//! seconds, so each distinct device kernel is timed once per workload by a
//! representative tile-level run, extrapolated over its grid:
//!
//! - the kernel is launched with the workload's real tiling and block count,
//!   but only its first block is simulated; every other block is charged
//!   that block's time (the blocks of these kernels get equal shares, block
//!   0 a full one), laid out round robin over the target's cores;
//! - the arithmetic of Mmad and elementwise vector operations is skipped
//!   (only the instruction stream matters for timing); when a kernel's
//!   control flow needs real values and the skipped run fails, it is rerun
//!   with arithmetic on;
//! - inputs are zero (large ones allocated lazily by the simulation, so a
//!   weight is never materialised) and float inputs below 1 MiB hold small
//!   pseudo-random values. Kernels whose work depends on index data (MoE
//!   routing, gathers, paged attention) see all-zero indices, so their
//!   figures are marked `data_dependent` and are indicative only.
//!
//! The roofline is computed from the launch shape: every argument's bytes
//! (inputs, outputs and intermediate buffers at the workload's sizes) over
//! the chip's GM bandwidth, or the cube FLOPs (block 0's, times the grid)
//! over the chip's peak, whichever is longer.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use panguc_ir::kernel::KernelKind;

use serde::Serialize;

use crate::emit::{ArgRef, CoreType, DeviceKernel, Env, Role};
use crate::program::AscendProgram;
use crate::sim::{SimArg, SimError, SimKernel};
use crate::target::DevType;
use crate::timing::{SimTiming, TimingParams};

/// Float inputs up to this size get pseudo-random contents; larger ones
/// (weights) are lazily allocated zeros.
const RANDOM_INPUT_LIMIT: usize = 1 << 20;

/// One device kernel's timing for one workload.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    pub name: String,
    /// Launches of this kernel in one step (e.g. once per layer).
    pub launches: usize,
    pub blocks: u32,
    pub simulated_us: f64,
    pub roofline_us: f64,
    /// roofline_us / simulated_us.
    pub efficiency: f64,
    /// Busy time of each pipe on the busiest core.
    pub busy_us: BTreeMap<String, f64>,
    /// Argument bytes of one launch (the roofline's traffic).
    pub bytes: f64,
    pub cube_flops: f64,
    /// Index-driven work: the figures come from all-zero index inputs.
    pub data_dependent: bool,
    /// Whether the arithmetic had to be simulated (see the module doc).
    pub computed: bool,
}

/// A kernel the model could not time, with the reason.
#[derive(Clone, Debug, Serialize)]
pub struct KernelFailure {
    pub name: String,
    pub error: String,
}

/// Timing of every distinct device kernel of `ap` for the sizes in `env`,
/// in first-launch order. `env.core_num` is replaced by the target's cores
/// of each kernel's unit.
pub fn time_program(
    ap: &AscendProgram,
    env: &Env,
    params: &TimingParams,
) -> Result<(Vec<KernelTime>, Vec<KernelFailure>)> {
    let p = &ap.program;
    let mut order: Vec<(String, usize, usize)> = vec![]; // (entry, launch, device-kernel index)
    let mut launches: BTreeMap<String, usize> = BTreeMap::new();
    for (li, l) in p.launches.iter().enumerate() {
        for (di, dk) in ap.kernels[l.kernel].kernels.iter().enumerate() {
            let n = launches.entry(dk.entry.clone()).or_insert(0);
            if *n == 0 {
                order.push((dk.entry.clone(), li, di));
            }
            *n += 1;
        }
    }
    let mut times = vec![];
    let mut failures = vec![];
    for (entry, li, di) in order {
        let l = &p.launches[li];
        let dks = &ap.kernels[l.kernel];
        let dk = &dks.kernels[di];
        let kind = &p.kernels[l.kernel].kind;
        match time_kernel(ap, li, dk, &dks.temps, kind, env, params) {
            Ok(mut t) => {
                t.launches = launches[&entry];
                times.push(t);
            }
            Err(e) => failures.push(KernelFailure { name: entry, error: format!("{e:#}") }),
        }
    }
    Ok((times, failures))
}

fn time_kernel(
    ap: &AscendProgram,
    li: usize,
    dk: &DeviceKernel,
    temps: &[crate::emit::TempBuf],
    kind: &KernelKind,
    env: &Env,
    params: &TimingParams,
) -> Result<KernelTime> {
    let cores = match dk.core {
        CoreType::Cube => params.cube_cores,
        CoreType::Vector => params.vec_cores,
    };
    let env = Env { core_num: cores as u64, ..*env };
    let l = &ap.program.launches[li];
    let mut args = vec![];
    let mut bytes = 0f64;
    for (pi, prm) in dk.params.iter().enumerate() {
        let n = match prm.arg {
            ArgRef::Orig(i) => buffer_bytes(ap, l.args[i].index(), &env)?,
            ArgRef::Temp(j) => usize::try_from(temps[j].elems.eval(&env)? * temps[j].dtype.size())?,
        };
        bytes += n as f64;
        args.push((
            prm.name.clone(),
            match prm.role {
                Role::Input if n <= RANDOM_INPUT_LIMIT => SimArg::Input(synthetic(prm.dtype, n, pi as u64)),
                Role::Input => SimArg::Zeroed(n),
                Role::Output => SimArg::Output(n),
                Role::InOut => SimArg::InOut(vec![0u8; n]),
            },
        ));
    }
    args.push(("workspace".into(), SimArg::Workspace(0)));
    args.push(("tiling".into(), SimArg::Tiling(dk.tiling_bytes(&env)?)));
    let block_dim = u32::try_from(dk.block_dim.eval(&env)?)?.max(1);
    let k = SimKernel::new(dk.sim_source(), dk.entry.clone(), ap.target.soc(), block_dim);
    let named: Vec<(&str, SimArg)> = args.iter().map(|(n, a)| (n.as_str(), a.clone())).collect();
    let timeout = Duration::from_secs(600);
    let fast = TimingParams { run_blocks: 1, skip_compute: true, ..params.clone() };
    let (timing, computed) = match k.run_timed(&named, &fast, timeout) {
        Ok((_, t)) => (t, false),
        Err(SimError::Kernel { .. }) => {
            let exact = TimingParams { run_blocks: 1, skip_compute: false, ..params.clone() };
            (k.run_timed(&named, &exact, timeout).with_context(|| format!("timing `{}`", dk.entry))?.1, true)
        }
        Err(e) => return Err(anyhow!(e)).with_context(|| format!("timing `{}`", dk.entry)),
    };
    Ok(summarise(dk, kind, &timing, bytes, params, computed))
}

fn summarise(
    dk: &DeviceKernel,
    kind: &KernelKind,
    t: &SimTiming,
    bytes: f64,
    p: &TimingParams,
    computed: bool,
) -> KernelTime {
    let roofline_ns = p.roofline_ns(bytes, t.cube_flops_f16);
    KernelTime {
        name: dk.entry.clone(),
        launches: 1,
        blocks: t.blocks,
        simulated_us: t.launch_ns / 1e3,
        roofline_us: roofline_ns / 1e3,
        efficiency: if t.launch_ns > 0.0 { roofline_ns / t.launch_ns } else { 0.0 },
        busy_us: t.busy_ns.iter().map(|(k, v)| (k.clone(), v / 1e3)).collect(),
        bytes,
        cube_flops: t.cube_flops,
        data_dependent: matches!(
            kind,
            KernelKind::Gather
                | KernelKind::MoeRoute
                | KernelKind::MoeGateUp
                | KernelKind::MoeGroupedGateUp
                | KernelKind::MoeDown
                | KernelKind::MoeCombine { .. }
                | KernelKind::PagedAttention { .. }
                | KernelKind::QkvRopeCacheWrite { .. }
                | KernelKind::QkvRopeCacheWriteQuant { .. }
        ),
        computed,
    }
}

/// Bytes of program buffer `i` at the sizes in `env`.
fn buffer_bytes(ap: &AscendProgram, i: usize, env: &Env) -> Result<usize> {
    crate::engine::buffer_extent(&ap.program, ap, i, env)
}

/// `n` bytes of `dtype`: small pseudo-random floats (a fixed LCG, so runs are
/// reproducible), zero for integers.
fn synthetic(dtype: DevType, n: usize, seed: u64) -> Vec<u8> {
    let size = dtype.size() as usize;
    if matches!(dtype, DevType::I64 | DevType::I32) || size == 0 {
        return vec![0u8; n];
    }
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let vals: Vec<f32> = (0..n / size)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let mut out = crate::data::encode(dtype, &vals);
    out.resize(n, 0);
    out
}

/// The report section for one target: the parameters and, per workload,
/// every kernel's figures plus the step's totals.
pub fn report(ap: &AscendProgram, workloads: &[(&str, Env)]) -> Result<serde_json::Value> {
    let params = TimingParams::for_soc(ap.target.soc());
    let mut w = serde_json::Map::new();
    for (name, env) in workloads {
        let (kernels, failures) = time_program(ap, env, &params)?;
        let step_us: f64 = kernels.iter().map(|k| k.simulated_us * k.launches as f64).sum();
        let roof_us: f64 = kernels.iter().map(|k| k.roofline_us * k.launches as f64).sum();
        w.insert(
            name.to_string(),
            serde_json::json!({
                "tokens": env.tokens,
                "past": env.past,
                "step_simulated_us": step_us,
                "step_roofline_us": roof_us,
                "kernels": kernels,
                "failures": failures,
            }),
        );
    }
    Ok(serde_json::json!({
        "model": "per-pipe timing model (codegen-ascendc/src/timing.rs, perf.rs): block 0 simulated, extrapolated over the grid",
        "params": params,
        "workloads": w,
    }))
}

//! Parameters and results of the simulation's per-pipe timing model.
//!
//! The model itself runs inside the simulation (`sim/include/panguc_sim/timing.h`):
//! every instruction a kernel issues charges the pipe it runs on, pipes run
//! concurrently and wait for each other only at the kernel's SetFlag/WaitFlag,
//! PipeBarrier<PIPE_ALL> and queue EnQue/DeQue/AllocTensor/FreeTensor. This
//! module holds the one table of per-target parameters (passed to the
//! simulation on its command line), parses the per-launch summary it prints,
//! and computes the launch's roofline.
//!
//! # Parameters per target
//!
//! | parameter | ascend910b (910B1) | ascend310p (310P3) | source |
//! |---|---|---|---|
//! | core clock | 1.85 GHz | 1.06 GHz | vendor spec (ascendc.md table) |
//! | chip GM bandwidth | 1420 GB/s | 204 GB/s | platform-file arithmetic (ascendc.md); nominal HBM is ~1.6 TB/s |
//! | cube cores / vector cores | 24 / 48 | 8 / 8 | vendor spec; 310P coupled kernels run on the 8 AI cores |
//! | cube MACs per cycle (fp16) | 4096 | 4096 | vendor spec (16x16x16 fractal; int8 x2, fp32 /4) |
//! | vector bytes per cycle | 256 | 256 | vendor spec (one 256-byte repeat per cycle) |
//! | per-core GM cap | 128 B/cycle | 64 B/cycle | assumed (a core's DMA alone cannot use the whole chip's bandwidth) |
//! | DMA burst overhead | 64 cycles | 64 cycles | assumed, so that a 16 KB copy reaches ~90% of the core's share (ascendc.md: full bandwidth from ~16 KB) |
//! | vector instruction overhead | 8 cycles | 8 cycles | assumed |
//! | cube (Mmad) overhead | 16 cycles | 16 cycles | assumed |
//! | L1 -> L0 bytes per cycle | 256 | 256 | assumed |
//! | local move overhead | 16 cycles | 16 cycles | assumed |
//! | L0C drain bytes per cycle | 128 | 128 | assumed |
//! | scalar UB access | 2 cycles | 2 cycles | assumed |
//! | scalar GM access (data cache) | 200 cycles | 200 cycles | assumed (a miss to HBM/DDR) |
//! | issue slot per instruction | 1 cycle | 1 cycle | assumed |
//!
//! A core's GM bandwidth is the chip's divided by the cores of the kernel's
//! kind that the launch keeps busy (min(blocks, cores)), capped by the
//! per-core figure. Blocks beyond the core count run in waves (round robin).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::sim::Soc;

/// The timing model's parameters for one target (see the module table).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimingParams {
    pub clock_ghz: f64,
    /// Whole-chip GM bandwidth, GB/s (= bytes per ns).
    pub gm_gbps: f64,
    /// Most one core's DMA can move, GB/s.
    pub core_gm_cap_gbps: f64,
    pub dma_overhead_cycles: f64,
    pub vec_bytes_per_cycle: f64,
    pub vec_overhead_cycles: f64,
    pub cube_macs_per_cycle_f16: f64,
    pub cube_overhead_cycles: f64,
    pub mte1_bytes_per_cycle: f64,
    pub local_overhead_cycles: f64,
    pub fix_bytes_per_cycle: f64,
    pub scalar_cycles: f64,
    pub scalar_gm_cycles: f64,
    pub issue_cycles: f64,
    pub cube_cores: u32,
    pub vec_cores: u32,
    /// Simulation option, not hardware: run only the first `run_blocks`
    /// blocks and charge every other block their mean (0: run all).
    pub run_blocks: u32,
    /// Simulation option: skip the arithmetic of Mmad and elementwise
    /// vector operations (outputs are garbage, the instruction stream and
    /// its timing are unchanged) for shapes too large to compute.
    pub skip_compute: bool,
}

impl TimingParams {
    /// The table's column for `soc`.
    pub fn for_soc(soc: Soc) -> TimingParams {
        let common =
            |clock_ghz: f64, gm_gbps: f64, cap_bytes_per_cycle: f64, cube_cores: u32, vec_cores: u32| TimingParams {
                clock_ghz,
                gm_gbps,
                core_gm_cap_gbps: cap_bytes_per_cycle * clock_ghz,
                dma_overhead_cycles: 64.0,
                vec_bytes_per_cycle: 256.0,
                vec_overhead_cycles: 8.0,
                cube_macs_per_cycle_f16: 4096.0,
                cube_overhead_cycles: 16.0,
                mte1_bytes_per_cycle: 256.0,
                local_overhead_cycles: 16.0,
                fix_bytes_per_cycle: 128.0,
                scalar_cycles: 2.0,
                scalar_gm_cycles: 200.0,
                issue_cycles: 1.0,
                cube_cores,
                vec_cores,
                run_blocks: 0,
                skip_compute: false,
            };
        match soc {
            Soc::Ascend910B => common(1.85, 1420.0, 128.0, 24, 48),
            Soc::Ascend310P => common(1.06, 204.0, 64.0, 8, 8),
        }
    }

    /// The simulation driver's parameter argument (`key=value,...`).
    pub fn to_arg(&self) -> String {
        let f = |k: &str, v: f64| format!("{k}={v}");
        [
            f("clock_ghz", self.clock_ghz),
            f("gm_gbps", self.gm_gbps),
            f("core_gm_cap_gbps", self.core_gm_cap_gbps),
            f("dma_overhead_cycles", self.dma_overhead_cycles),
            f("vec_bytes_per_cycle", self.vec_bytes_per_cycle),
            f("vec_overhead_cycles", self.vec_overhead_cycles),
            f("cube_macs_per_cycle_f16", self.cube_macs_per_cycle_f16),
            f("cube_overhead_cycles", self.cube_overhead_cycles),
            f("mte1_bytes_per_cycle", self.mte1_bytes_per_cycle),
            f("local_overhead_cycles", self.local_overhead_cycles),
            f("fix_bytes_per_cycle", self.fix_bytes_per_cycle),
            f("scalar_cycles", self.scalar_cycles),
            f("scalar_gm_cycles", self.scalar_gm_cycles),
            f("issue_cycles", self.issue_cycles),
            f("cube_cores", self.cube_cores as f64),
            f("vec_cores", self.vec_cores as f64),
            f("run_blocks", self.run_blocks as f64),
            f("skip_compute", if self.skip_compute { 1.0 } else { 0.0 }),
        ]
        .join(",")
    }

    /// Chip cube peak in fp16 FLOP per ns (cores x MACs x 2 x clock).
    pub fn cube_peak_flops_per_ns(&self) -> f64 {
        self.cube_cores as f64 * self.cube_macs_per_cycle_f16 * 2.0 * self.clock_ghz
    }

    /// Roofline time (ns) of moving `bytes` through GM and computing
    /// `cube_flops_f16` (fp16-rate equivalent) on every cube core.
    pub fn roofline_ns(&self, bytes: f64, cube_flops_f16: f64) -> f64 {
        (bytes / self.gm_gbps).max(cube_flops_f16 / self.cube_peak_flops_per_ns())
    }
}

/// The pipes of a core, in the simulation's order.
pub const PIPES: [&str; 7] = ["S", "V", "M", "MTE1", "MTE2", "MTE3", "FIX"];

/// What the timing model measured for one launch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimTiming {
    /// Simulated launch time: the busiest core's blocks back to back.
    pub launch_ns: f64,
    /// Cores the launch used (min(blocks, cores of its kind)).
    pub cores: u32,
    /// Whether it was a cube kernel (L1/L0 buffers).
    pub cube: bool,
    /// Busy time of each pipe on the busiest core, by pipe name.
    pub busy_ns: BTreeMap<String, f64>,
    /// Bytes every DMA of every block moved between GM and the cores.
    pub gm_bytes: f64,
    /// Distinct GM bytes of the inputs and outputs the launch touched: the
    /// traffic its shape cannot avoid (0 when only some blocks were run).
    pub compulsory_bytes: f64,
    /// 2*m*n*k over every Mmad.
    pub cube_flops: f64,
    /// The same at the fp16 rate (int8 counts half, fp32 four times).
    pub cube_flops_f16: f64,
    pub vec_bytes: f64,
    pub instructions: f64,
    /// Blocks of the launch, and how many of them were simulated (the rest
    /// are charged their mean; see [`TimingParams::run_blocks`]).
    pub blocks: u32,
    pub run_blocks: u32,
}

impl SimTiming {
    /// Parse the simulation's `panguc-sim: timing: key=value ...` line.
    pub fn parse(line: &str) -> Option<SimTiming> {
        let mut kv = BTreeMap::new();
        for part in line.split_whitespace() {
            let (k, v) = part.split_once('=')?;
            kv.insert(k.to_string(), v.parse::<f64>().ok()?);
        }
        let get = |k: &str| kv.get(k).copied();
        let mut busy_ns = BTreeMap::new();
        for p in PIPES {
            busy_ns.insert(p.to_string(), get(&format!("busy_{p}_ns"))?);
        }
        Some(SimTiming {
            launch_ns: get("launch_ns")?,
            cores: get("cores")? as u32,
            cube: get("cube")? != 0.0,
            busy_ns,
            gm_bytes: get("gm_bytes")?,
            compulsory_bytes: get("compulsory_bytes")?,
            cube_flops: get("cube_flops")?,
            cube_flops_f16: get("cube_flops_f16")?,
            vec_bytes: get("vec_bytes")?,
            instructions: get("instructions")?,
            blocks: get("blocks")? as u32,
            run_blocks: get("run_blocks")? as u32,
        })
    }

    /// Roofline of this launch's shape: compulsory bytes over the chip's GM
    /// bandwidth or its cube FLOPs over the chip's peak, whichever is longer.
    pub fn roofline_ns(&self, p: &TimingParams) -> f64 {
        p.roofline_ns(self.compulsory_bytes, self.cube_flops_f16)
    }

    /// Roofline time over simulated time (1.0 = at the roofline).
    pub fn efficiency(&self, p: &TimingParams) -> f64 {
        if self.launch_ns > 0.0 {
            self.roofline_ns(p) / self.launch_ns
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_round_trips() {
        let line = "launch_ns=100 cores=2 cube=1 busy_S_ns=1 busy_V_ns=2 busy_M_ns=3 busy_MTE1_ns=4 busy_MTE2_ns=5 \
                    busy_MTE3_ns=6 busy_FIX_ns=7 gm_bytes=8 compulsory_bytes=9 cube_flops=10 cube_flops_f16=11 \
                    vec_bytes=12 instructions=13 blocks=4 run_blocks=1";
        let t = SimTiming::parse(line).unwrap();
        assert_eq!(t.launch_ns, 100.0);
        assert!(t.cube);
        assert_eq!(t.busy_ns["MTE3"], 6.0);
        assert_eq!(t.compulsory_bytes, 9.0);
        assert!(SimTiming::parse("launch_ns=1").is_none());
    }

    #[test]
    fn roofline_takes_the_slower_bound() {
        let p = TimingParams::for_soc(Soc::Ascend910B);
        // 1420 bytes at 1420 GB/s = 1 ns.
        assert!((p.roofline_ns(1420.0, 0.0) - 1.0).abs() < 1e-12);
        let peak = 24.0 * 4096.0 * 2.0 * 1.85;
        assert!((p.roofline_ns(0.0, peak * 3.0) - 3.0).abs() < 1e-9);
    }
}

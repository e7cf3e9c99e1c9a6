// panguc CPU simulation: per-pipe timing model.
//
// Every simulated instruction charges the pipe it runs on (see Pipe in
// base.h). Each pipe of the current core has a clock (ns): an instruction
// starts when its pipe is free and the scalar unit has issued it, and moves
// the pipe's clock by its cost. Pipes only wait for each other where the
// kernel synchronises them: WaitFlag moves the waiting pipe's clock to the
// time the matching SetFlag fired, PipeBarrier<PIPE_ALL> joins all clocks,
// a queue's DeQue waits for its EnQue and AllocTensor for the FreeTensor of
// the buffer it reuses (the syncs TQue inserts on hardware). A block's time
// is its latest pipe clock, but at least its GM bytes over the core's
// bandwidth share (MTE2, MTE3 and FIX share one memory path). Blocks are
// laid out on the cores round robin; the launch time is the busiest core.
//
// The parameters come from the Rust harness (one table per target in
// codegen-ascendc/src/timing.rs, with sources) on the driver's command line;
// without them timing is off and costs nothing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace panguc_sim {

struct TimingParams {
    bool enabled = false;
    double clockGhz = 1.0;          // core clock (cycles per ns)
    double gmBytesPerNs = 1.0;      // whole-chip GM bandwidth (GB/s = bytes/ns)
    double coreGmCapBytesPerNs = 1.0;  // most one core's DMA can move
    double dmaOverheadCycles = 0;   // fixed cost of one contiguous DMA burst
    double vecBytesPerCycle = 256;  // one 256-byte repeat per cycle
    double vecOverheadCycles = 0;   // issue/drain cost of one vector instruction
    double cubeMacsPerCycleF16 = 4096;
    double cubeOverheadCycles = 0;
    double mte1BytesPerCycle = 256;  // L1 -> L0A/L0B
    double localOverheadCycles = 0;  // fixed cost of one MTE1 / local move
    double fixBytesPerCycle = 128;   // L0C drain (FIX / 310P CO1->CO2)
    double scalarCycles = 1;         // scalar UB access
    double scalarGmCycles = 100;     // scalar GM access through the data cache
    double issueCycles = 1;          // scalar issue slot of every instruction
    int cubeCores = 1;
    int vecCores = 1;
    // Simulation options (not hardware): run only the first `runBlocks`
    // blocks and extrapolate the rest from their mean (0: run all), and
    // skip the arithmetic of Mmad and elementwise vector operations (their
    // results are left as the destination held; only the instruction stream
    // is timed), for large shapes where only the timing is wanted.
    uint32_t runBlocks = 0;
    bool skipCompute = false;
};
inline TimingParams& timingParams() {
    static TimingParams p;
    return p;
}

// Parse "key=value,key=value" (the driver's 4th argument).
inline bool ParseTimingParams(const std::string& s, std::string* err) {
    TimingParams p;
    std::stringstream ss(s);
    std::string kv;
    while (std::getline(ss, kv, ',')) {
        const size_t eq = kv.find('=');
        if (eq == std::string::npos) {
            *err = "timing parameter without '=': " + kv;
            return false;
        }
        const std::string k = kv.substr(0, eq);
        char* end = nullptr;
        const double v = std::strtod(kv.c_str() + eq + 1, &end);
        if (end == kv.c_str() + eq + 1 || *end != '\0' || !(v >= 0)) {
            *err = "bad value for timing parameter " + k;
            return false;
        }
        if (k == "clock_ghz") p.clockGhz = v;
        else if (k == "gm_gbps") p.gmBytesPerNs = v;
        else if (k == "core_gm_cap_gbps") p.coreGmCapBytesPerNs = v;
        else if (k == "dma_overhead_cycles") p.dmaOverheadCycles = v;
        else if (k == "vec_bytes_per_cycle") p.vecBytesPerCycle = v;
        else if (k == "vec_overhead_cycles") p.vecOverheadCycles = v;
        else if (k == "cube_macs_per_cycle_f16") p.cubeMacsPerCycleF16 = v;
        else if (k == "cube_overhead_cycles") p.cubeOverheadCycles = v;
        else if (k == "mte1_bytes_per_cycle") p.mte1BytesPerCycle = v;
        else if (k == "local_overhead_cycles") p.localOverheadCycles = v;
        else if (k == "fix_bytes_per_cycle") p.fixBytesPerCycle = v;
        else if (k == "scalar_cycles") p.scalarCycles = v;
        else if (k == "scalar_gm_cycles") p.scalarGmCycles = v;
        else if (k == "issue_cycles") p.issueCycles = v;
        else if (k == "cube_cores") p.cubeCores = static_cast<int>(v);
        else if (k == "vec_cores") p.vecCores = static_cast<int>(v);
        else if (k == "run_blocks") p.runBlocks = static_cast<uint32_t>(v);
        else if (k == "skip_compute") p.skipCompute = v != 0;
        else {
            *err = "unknown timing parameter " + k;
            return false;
        }
    }
    if (p.clockGhz <= 0 || p.gmBytesPerNs <= 0 || p.coreGmCapBytesPerNs <= 0 || p.vecBytesPerCycle <= 0 ||
        p.cubeMacsPerCycleF16 <= 0 || p.mte1BytesPerCycle <= 0 || p.fixBytesPerCycle <= 0 || p.cubeCores < 1 ||
        p.vecCores < 1) {
        *err = "timing parameters must be positive";
        return false;
    }
    p.enabled = true;
    timingParams() = p;
    return true;
}

// Clocks of the pipes of the core running the current block.
struct CoreTiming {
    double clock[kPipeCount] = {};
    double busy[kPipeCount] = {};
    double flagTime[kPipeCount][kPipeCount][8] = {};
    double gmBytes = 0;  // bytes this block moved between GM and the core
};

// Totals of one launch.
struct LaunchTiming {
    std::vector<double> blockNs;
    std::vector<std::vector<double>> blockBusy;
    double gmBytes = 0;        // all DMA traffic, every block
    double cubeFlops = 0;      // 2*m*n*k of every Mmad
    double cubeFlopsF16 = 0;   // the same in fp16-equivalent cube cycles' worth
    double vecBytes = 0;       // bytes processed by the vector unit
    uint64_t instructions = 0;
};

namespace timing {

inline double Ns(double cycles) { return cycles / timingParams().clockGhz; }

// GM bandwidth one core gets: its share of the chip when every core of the
// kernel's kind is busy, capped by what one core's DMA can move.
inline double CoreGmBytesPerNs();

// The current block's clocks and the launch totals live in the context.
inline CoreTiming& Core();
inline LaunchTiming& Launch();

// Run one instruction of `cost` ns on pipe p (issued in program order by S).
inline void Run(Pipe p, double costNs) {
    if (!timingParams().enabled || p == Pipe::None) return;
    CoreTiming& c = Core();
    const int i = static_cast<int>(p);
    const int s = static_cast<int>(Pipe::S);
    const double issue = Ns(timingParams().issueCycles);
    if (p == Pipe::S) {
        c.clock[s] += costNs;
        c.busy[s] += costNs;
    } else {
        c.clock[s] += issue;
        c.busy[s] += issue;
        const double start = std::max(c.clock[i], c.clock[s]);
        c.clock[i] = start + costNs;
        c.busy[i] += costNs;
    }
    ++Launch().instructions;
}

// The time pipe p reaches a sync point issued now (its queue drains up to it).
inline double ReadyTime(Pipe p) {
    CoreTiming& c = Core();
    return std::max(c.clock[static_cast<int>(p)], c.clock[static_cast<int>(Pipe::S)]);
}
// Pipe p may not run anything issued from now on before time t.
inline void WaitUntil(Pipe p, double t) {
    if (!timingParams().enabled || p == Pipe::None) return;
    double& c = Core().clock[static_cast<int>(p)];
    c = std::max(c, t);
}

// One contiguous DMA burst between GM and the core.
inline void Gm(Pipe p, uint64_t bytes) {
    if (!timingParams().enabled) return;
    Core().gmBytes += double(bytes);
    Launch().gmBytes += double(bytes);
    Run(p, Ns(timingParams().dmaOverheadCycles) + double(bytes) / CoreGmBytesPerNs());
}
// A move between local memories (UB->UB, UB->L1, L1->L0) on pipe p.
inline void Local(Pipe p, uint64_t bytes) {
    if (!timingParams().enabled) return;
    const TimingParams& t = timingParams();
    const double perCycle = p == Pipe::V ? t.vecBytesPerCycle : t.mte1BytesPerCycle;
    Run(p, Ns(t.localOverheadCycles + double(bytes) / perCycle));
}
// L0C drain through the fixpipe; on 910B it writes GM directly, so it takes
// at least the GM transfer time of what it writes.
inline void Fix(uint64_t l0cBytes, uint64_t gmBytes) {
    if (!timingParams().enabled) return;
    const TimingParams& t = timingParams();
    Core().gmBytes += double(gmBytes);
    Launch().gmBytes += double(gmBytes);
    double ns = Ns(t.localOverheadCycles + double(l0cBytes) / t.fixBytesPerCycle);
    if (gmBytes) ns = std::max(ns, Ns(t.dmaOverheadCycles) + double(gmBytes) / CoreGmBytesPerNs());
    Run(Pipe::FIX, ns);
}
// A vector instruction processing `bytes` per operand in 256-byte repeats,
// each costing `factor` cycles (transcendental and multi-pass operations
// take several).
inline void Vec(uint64_t bytes, double factor = 1) {
    if (!timingParams().enabled) return;
    const TimingParams& t = timingParams();
    Launch().vecBytes += double(bytes);
    const double repeats = std::ceil(double(bytes) / t.vecBytesPerCycle);
    Run(Pipe::V, Ns(t.vecOverheadCycles + std::max(1.0, repeats) * factor));
}
// A vector instruction in repeat form: `repeats` repeats of 256 bytes.
inline void VecRepeats(uint64_t repeats) {
    if (!timingParams().enabled) return;
    const TimingParams& t = timingParams();
    Launch().vecBytes += double(repeats) * t.vecBytesPerCycle;
    Run(Pipe::V, Ns(t.vecOverheadCycles + std::max<double>(1.0, double(repeats))));
}
// One Mmad of m x k by k x n. The cube computes whole 16 x 16 x k0 fractal
// steps (k0 = 32 bytes of the input type); `macsPerCycle` is the input
// type's rate (fp16/bf16 4096, int8 twice, fp32 a quarter).
inline void Cube(uint32_t m, uint32_t n, uint32_t k, uint32_t inBytes) {
    if (!timingParams().enabled) return;
    const TimingParams& t = timingParams();
    const double rel = inBytes == 1 ? 2.0 : inBytes == 4 ? 0.25 : 1.0;
    const uint32_t k0 = 32 / inBytes;
    const double padded = double((m + 15) / 16 * 16) * double((n + 15) / 16 * 16) * double((k + k0 - 1) / k0 * k0);
    const double flops = 2.0 * double(m) * double(n) * double(k);
    Launch().cubeFlops += flops;
    Launch().cubeFlopsF16 += flops / rel;
    Run(Pipe::M, Ns(t.cubeOverheadCycles + padded / (t.cubeMacsPerCycleF16 * rel)));
}
inline void ScalarUb() {
    if (timingParams().enabled) Run(Pipe::S, Ns(timingParams().scalarCycles));
}
inline void ScalarGm() {
    if (timingParams().enabled) Run(Pipe::S, Ns(timingParams().scalarGmCycles));
}

}  // namespace timing
}  // namespace panguc_sim

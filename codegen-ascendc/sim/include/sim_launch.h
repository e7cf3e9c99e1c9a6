// sim_launch.h -- launch an AscendC kernel under the panguc CPU simulation.
//
//   std::vector<panguc_sim::ArgBuffer> args = {
//       panguc_sim::In("x", xBytes), panguc_sim::Out("y", yBytes),
//       panguc_sim::Workspace(0), panguc_sim::TilingArg(tilingStruct)};
//   panguc_sim::LaunchStatus st = panguc_sim::Launch(blockDim, add_custom, args);
//   // st.ok, st.message; outputs are now in args[i].data
//
// The kernel runs once per block index, sequentially, with the per-core state
// (UB/L1/L0 contents, TPipe, queues) reset between blocks. Parameters are
// bound by type: each pointer parameter (GM_ADDR) receives the next argument
// buffer; a by-value struct parameter receives the bytes of a Tiling argument
// (sizes must match). The first failed check aborts the launch.
//
// DriverMain() is the `main` of the executables built by the Rust harness
// (codegen-ascendc/src/sim.rs); its file formats are documented there.
#pragma once

#include "kernel_operator.h"

#include <fstream>
#include <iostream>
#include <memory>
#include <tuple>
#include <utility>

namespace panguc_sim {

struct ArgBuffer {
    ArgKind kind = ArgKind::Input;
    std::string name;
    std::vector<uint8_t> data;  // Input/InOut/Tiling: contents; Output/Workspace: size only (contents ignored)
    // An Input of this many zero bytes, allocated lazily (pages nobody reads
    // cost nothing): for timing large shapes without shipping their data.
    uint64_t zeroLen = 0;
};

inline ArgBuffer In(std::string name, std::vector<uint8_t> bytes) { return {ArgKind::Input, std::move(name), std::move(bytes)}; }
inline ArgBuffer InOut(std::string name, std::vector<uint8_t> bytes) { return {ArgKind::InOut, std::move(name), std::move(bytes)}; }
inline ArgBuffer Out(std::string name, size_t bytes) { return {ArgKind::Output, std::move(name), std::vector<uint8_t>(bytes)}; }
inline ArgBuffer Workspace(size_t bytes) { return {ArgKind::Workspace, "workspace", std::vector<uint8_t>(bytes)}; }
template <typename S> inline ArgBuffer TilingArg(const S& s) {
    static_assert(std::is_trivially_copyable<S>::value, "tiling structs must be trivially copyable");
    ArgBuffer a{ArgKind::Tiling, "tiling", std::vector<uint8_t>(sizeof(S))};
    std::memcpy(a.data.data(), &s, sizeof(S));
    return a;
}

struct LaunchStatus {
    bool ok = true;
    std::string message;  // first error, "[block b of n] file:line: what"
    std::vector<std::string> warnings;
    std::string timing;  // timing model summary (key=value ...), when enabled
};

namespace detail {

// GM storage for one argument: 512-byte aligned like device allocations, with
// at least one byte so that even empty buffers have a unique address.
struct Registered {
    uint8_t* storage = nullptr;  // calloc'ed: zero pages are mapped on first touch
    GmBuffer buf;
    Registered() = default;
    Registered(const Registered&) = delete;
    Registered& operator=(const Registered&) = delete;
    ~Registered() { std::free(storage); }
};

inline std::unique_ptr<Registered> Register(const ArgBuffer& a) {
    auto r = std::make_unique<Registered>();
    const size_t n = a.zeroLen ? a.zeroLen : a.data.size();
    r->storage = static_cast<uint8_t*>(std::calloc(n + 512 + 1, 1));
    if (!r->storage) throw SimError(Str("cannot allocate ", n, " bytes for argument '", a.name, "'"));
    uint8_t* base = r->storage;
    base += (512 - reinterpret_cast<uintptr_t>(base) % 512) % 512;
    const bool poison = a.kind == ArgKind::Output || a.kind == ArgKind::Workspace;
    if (poison) std::memset(base, 0xFF, n);  // unwritten output bytes read back as NaN / -1
    else if (n && !a.zeroLen) std::memcpy(base, a.data.data(), n);
    r->buf.name = a.name;
    r->buf.kind = a.kind;
    r->buf.base = base;
    r->buf.size = n;
    // Race tracking needs every block; a timing run of a block subset
    // (TimingParams::runBlocks) skips it, which also keeps huge outputs cheap.
    const bool fullRun = timingParams().runBlocks == 0;
    if (r->buf.Writable() && fullRun) {
        r->buf.writer.assign(n, -1);
        r->buf.reader.assign(n, -1);
        r->buf.lineScalarWriter.assign((n + kGmLine - 1) / kGmLine, -1);
        r->buf.lineWriter.assign((n + kGmLine - 1) / kGmLine, -1);
    }
    if (timingParams().enabled && fullRun && a.kind != ArgKind::Tiling && a.kind != ArgKind::Workspace) {
        r->buf.touched.assign(n, 0);
    }
    return r;
}

template <typename P> inline P BindParam(const Registered& r, const ArgBuffer& a, size_t i) {
    if constexpr (std::is_pointer<P>::value) {
        return reinterpret_cast<P>(r.buf.base);
    } else {
        static_assert(std::is_trivially_copyable<P>::value, "by-value kernel parameters must be trivially copyable");
        if (a.kind != ArgKind::Tiling || a.data.size() != sizeof(P)) {
            throw SimError(Str("kernel parameter ", i, " is a ", sizeof(P), "-byte struct passed by value (tiling), but argument ",
                               i, " is a ", ArgKindName(a.kind), " of ", a.data.size(), " bytes: tiling size mismatch"));
        }
        P p;
        std::memcpy(&p, a.data.data(), sizeof(P));
        return p;
    }
}

template <typename... P, size_t... I>
inline std::tuple<P...> BindAll(const std::vector<std::unique_ptr<Registered>>& regs, const std::vector<ArgBuffer>& args,
                                std::index_sequence<I...>) {
    return std::tuple<P...>(BindParam<P>(*regs[I], args[I], I)...);
}

}  // namespace detail

// The timing model's figures for the finished launch, as `key=value` pairs:
// launch_ns (blocks laid out round robin on the kernel's cores, the busiest
// core's total), the per-pipe busy time of that core (busy_<pipe>_ns), the
// GM traffic of all DMAs (gm_bytes), the distinct GM bytes of the
// non-workspace arguments that were touched (compulsory_bytes), cube FLOPs
// and their fp16-rate equivalent, and the core count used.
inline std::string SummariseTiming(const std::vector<std::unique_ptr<detail::Registered>>& regs) {
    const Ctx& c = ctx();
    const TimingParams& t = timingParams();
    const LaunchTiming& l = c.launch;
    const int64_t cores = std::max<int64_t>(1, std::min<int64_t>(c.blockDim, c.usedCube ? t.cubeCores : t.vecCores));
    std::vector<double> coreNs(cores, 0.0);
    std::vector<std::vector<double>> coreBusy(cores, std::vector<double>(kPipeCount, 0.0));
    // Blocks that were not run (TimingParams::runBlocks) cost the mean of
    // those that were.
    const size_t ran = std::max<size_t>(1, l.blockNs.size());
    double meanNs = 0;
    std::vector<double> meanBusy(kPipeCount, 0.0);
    for (size_t b = 0; b < l.blockNs.size(); ++b) {
        meanNs += l.blockNs[b] / double(ran);
        for (int p = 0; p < kPipeCount; ++p) meanBusy[p] += l.blockBusy[b][p] / double(ran);
    }
    for (int64_t b = 0; b < c.blockDim; ++b) {
        const bool wasRun = size_t(b) < l.blockNs.size();
        coreNs[b % cores] += wasRun ? l.blockNs[b] : meanNs;
        for (int p = 0; p < kPipeCount; ++p) coreBusy[b % cores][p] += wasRun ? l.blockBusy[b][p] : meanBusy[p];
    }
    const double scale = double(c.blockDim) / double(ran);
    size_t worst = 0;
    for (size_t i = 1; i < coreNs.size(); ++i) if (coreNs[i] > coreNs[worst]) worst = i;
    uint64_t compulsory = 0;
    for (const auto& r : regs) for (uint8_t x : r->buf.touched) compulsory += x;
    std::ostringstream o;
    o.precision(17);
    o << "launch_ns=" << coreNs[worst] << " cores=" << cores << " cube=" << (c.usedCube ? 1 : 0);
    for (int p = 0; p < kPipeCount; ++p) o << " busy_" << PipeName(static_cast<Pipe>(p)) << "_ns=" << coreBusy[worst][p];
    o << " gm_bytes=" << l.gmBytes * scale << " compulsory_bytes=" << compulsory << " cube_flops=" << l.cubeFlops * scale
      << " cube_flops_f16=" << l.cubeFlopsF16 * scale << " vec_bytes=" << l.vecBytes * scale
      << " instructions=" << double(l.instructions) * scale << " blocks=" << c.blockDim << " run_blocks=" << ran;
    return o.str();
}

// Run `fn` for block indices 0..blockDim-1. Output, InOut and Workspace
// contents are copied back into `args` (also after a failure, for debugging).
template <typename... P>
inline LaunchStatus Launch(uint32_t blockDim, void (*fn)(P...), std::vector<ArgBuffer>& args) {
    LaunchStatus st;
    Ctx& c = ctx();
    if (args.size() != sizeof...(P)) {
        st.ok = false;
        st.message = Str("the kernel takes ", sizeof...(P), " parameters but ", args.size(), " arguments were given");
        return st;
    }
    if (blockDim == 0) {
        st.ok = false;
        st.message = "blockDim must be >= 1";
        return st;
    }
    std::vector<std::unique_ptr<detail::Registered>> regs;
    for (const ArgBuffer& a : args) regs.push_back(detail::Register(a));
    ResetCtx();
    for (auto& r : regs) c.gm.push_back(&r->buf);
    c.inLaunch = true;
    c.blockDim = blockDim;
    try {
        std::tuple<P...> params = detail::BindAll<P...>(regs, args, std::index_sequence_for<P...>{});
        const uint32_t sub = timingParams().enabled ? timingParams().runBlocks : 0;
        const uint32_t run = sub && sub < blockDim ? sub : blockDim;
        for (uint32_t b = 0; b < run; ++b) {
            c.blockIdx = b;
            ResetCoreMemories();
            c.livePipe = nullptr;
            c.usedVector = c.usedCube = false;
            c.atomicAdd = false;
            std::apply(fn, params);
            timing::EndBlock();
        }
    } catch (const SimError& e) {
        st.ok = false;
        st.message = e.what();
    } catch (const std::exception& e) {
        st.ok = false;
        st.message = Str("[block ", c.blockIdx, " of ", c.blockDim, "] unexpected C++ exception: ", e.what());
    }
    for (size_t i = 0; i < args.size(); ++i) {
        // A timing run of a block subset returns empty outputs (they are
        // incomplete, and can be huge).
        if (regs[i]->buf.Writable() && timingParams().runBlocks == 0) {
            args[i].data.assign(regs[i]->buf.base, regs[i]->buf.base + regs[i]->buf.size);
        }
    }
    st.warnings = c.warnings;
    if (st.ok && timingParams().enabled) st.timing = SummariseTiming(regs);
    c.inLaunch = false;
    c.gm.clear();
    return st;
}

// ---------------------------------------------------------------------------
// Driver for the Rust harness: `prog ARGS_FILE OUT_FILE BLOCK_DIM [TIMING]`
// (TIMING: the timing model's parameters, see timing.h; its summary is
// printed on stderr as `panguc-sim: timing: key=value ...`).
// Exit status: 0 ok, 3 simulation error (message on stderr), 2 usage/IO error.
// ---------------------------------------------------------------------------
namespace detail {
template <typename T> inline bool ReadPod(std::istream& in, T& v) {
    return static_cast<bool>(in.read(reinterpret_cast<char*>(&v), sizeof(T)));
}
template <typename T> inline void WritePod(std::ostream& out, const T& v) {
    out.write(reinterpret_cast<const char*>(&v), sizeof(T));
}
}  // namespace detail

template <typename... P> inline int DriverMain(int argc, char** argv, void (*fn)(P...)) {
    if (argc != 4 && argc != 5) {
        std::cerr << "usage: " << argv[0] << " ARGS_FILE OUT_FILE BLOCK_DIM [TIMING_PARAMS]\n";
        return 2;
    }
    if (argc == 5) {
        std::string err;
        if (!ParseTimingParams(argv[4], &err)) {
            std::cerr << "panguc-sim: " << err << "\n";
            return 2;
        }
    }
    std::ifstream in(argv[1], std::ios::binary);
    char magic[8];
    uint32_t n = 0;
    if (!in.read(magic, 8) || std::memcmp(magic, "PGSIMA01", 8) != 0 || !detail::ReadPod(in, n)) {
        std::cerr << "panguc-sim: bad argument file " << argv[1] << "\n";
        return 2;
    }
    std::vector<ArgBuffer> args(n);
    for (ArgBuffer& a : args) {
        uint8_t kind = 0;
        uint32_t nameLen = 0;
        uint64_t len = 0;
        if (!detail::ReadPod(in, kind) || !detail::ReadPod(in, nameLen)) return 2;
        a.name.resize(nameLen);
        if (nameLen && !in.read(&a.name[0], nameLen)) return 2;
        if (!detail::ReadPod(in, len)) return 2;
        if (kind == 6) {  // zero-filled input, no bytes in the file
            a.kind = ArgKind::Input;
            a.zeroLen = len;
            continue;
        }
        a.kind = static_cast<ArgKind>(kind);
        if (a.kind != ArgKind::Input && a.kind != ArgKind::InOut && a.kind != ArgKind::Tiling &&
            timingParams().runBlocks != 0) {
            a.zeroLen = len;  // sized lazily; nothing is returned
            continue;
        }
        a.data.resize(len);
        const bool hasData = a.kind == ArgKind::Input || a.kind == ArgKind::InOut || a.kind == ArgKind::Tiling;
        if (hasData && len && !in.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(len))) return 2;
    }
    const uint32_t blockDim = static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10));
    LaunchStatus st = Launch(blockDim, fn, args);
    for (const std::string& w : st.warnings) std::cerr << "panguc-sim: warning: " << w << "\n";
    if (!st.timing.empty()) std::cerr << "panguc-sim: timing: " << st.timing << "\n";
    if (!st.ok) {
        std::cerr << "panguc-sim: error: " << st.message << "\n";
        return 3;
    }
    std::ofstream out(argv[2], std::ios::binary);
    out.write("PGSIMO01", 8);
    uint32_t nOut = 0;
    for (const ArgBuffer& a : args) nOut += (a.kind == ArgKind::Output || a.kind == ArgKind::InOut);
    detail::WritePod(out, nOut);
    for (const ArgBuffer& a : args) {
        if (a.kind != ArgKind::Output && a.kind != ArgKind::InOut) continue;
        detail::WritePod(out, static_cast<uint64_t>(a.data.size()));
        out.write(reinterpret_cast<const char*>(a.data.data()), static_cast<std::streamsize>(a.data.size()));
    }
    if (!out) {
        std::cerr << "panguc-sim: cannot write " << argv[2] << "\n";
        return 2;
    }
    return 0;
}

}  // namespace panguc_sim

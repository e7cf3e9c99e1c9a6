// panguc CPU simulation of the AscendC API subset: base layer.
//
// Target selection, the AscendC keyword macros, the scalar types `half` and
// `bfloat16_t`, source locations for error messages, the per-launch context
// (current block, simulated on-chip memories, registered global buffers) and
// the global-memory race tracking.
//
// Only compiled by g++ on a machine without CANN. On a CANN machine the real
// `kernel_operator.h` is used instead and none of this exists, so nothing in
// here may be required by kernel source beyond the real AscendC names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// Target selection: -DPANGUC_SIM_SOC=910B (default) or -DPANGUC_SIM_SOC=310P.
// "910B" is a pp-number, not an integer, so it cannot be compared with `==`;
// token pasting turns it into the name of one of the two ids below.
// ---------------------------------------------------------------------------
#define PANGUC_SIM 1
#define PANGUC_SIM_SOC_ID_910B 1
#define PANGUC_SIM_SOC_ID_310P 2
#define PANGUC_SIM_CAT_(a, b) a##b
#define PANGUC_SIM_CAT(a, b) PANGUC_SIM_CAT_(a, b)
#ifndef PANGUC_SIM_SOC
#define PANGUC_SIM_SOC 910B
#endif
#define PANGUC_SIM_SOC_ID PANGUC_SIM_CAT(PANGUC_SIM_SOC_ID_, PANGUC_SIM_SOC)
#if PANGUC_SIM_SOC_ID == 1
#define PANGUC_SIM_910B 1
#define PANGUC_SIM_310P 0
#elif PANGUC_SIM_SOC_ID == 2
#define PANGUC_SIM_910B 0
#define PANGUC_SIM_310P 1
#else
#error "PANGUC_SIM_SOC must be 910B or 310P"
#endif

// The device compiler defines these per target; kernels branch on them
// (e.g. `#if __CCE_AICORE__ == 220` for 910B-only DataCopyPad).
// Current toolchains define __NPU_ARCH__ and one __DAV_<arch>__ macro per
// compile (the vector-core compile of a 910B kernel here); __CCE_AICORE__ is
// the older spelling, kept so that older kernels still compile.
#if PANGUC_SIM_910B
#ifndef __CCE_AICORE__
#define __CCE_AICORE__ 220
#endif
#ifndef __NPU_ARCH__
#define __NPU_ARCH__ 2201
#endif
#ifndef __DAV_C220_VEC__
#define __DAV_C220_VEC__ 1
#endif
#else
#ifndef __CCE_AICORE__
#define __CCE_AICORE__ 200
#endif
#ifndef __NPU_ARCH__
#define __NPU_ARCH__ 2002
#endif
#ifndef __DAV_M200__
#define __DAV_M200__ 1
#endif
#endif

// AscendC address-space / function qualifiers: meaningless on the CPU.
#ifndef __aicore__
#define __aicore__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __gm__
#define __gm__
#endif
#ifndef __ubuf__
#define __ubuf__
#endif
#ifndef __cbuf__
#define __cbuf__
#endif
#ifndef __ca__
#define __ca__
#endif
#ifndef __cb__
#define __cb__
#endif
#ifndef __cc__
#define __cc__
#endif
#ifndef GM_ADDR
#define GM_ADDR __gm__ uint8_t*
#endif

namespace panguc_sim {
namespace fp {

// Rounding used by conversions; mirrors AscendC::RoundMode (CAST_NONE is
// treated as RINT, as the real API does whenever the conversion is lossy).
enum class Rnd { RINT, FLOOR, CEIL, ROUND, TRUNC, ODD };

// Round |x| to a binary floating-point format with `mant` explicit mantissa
// bits, minimum normal exponent `emin` and largest finite value `maxFinite`.
// Returns a double that is exactly representable in the target format.
inline double RoundToFormat(double x, int mant, int emin, double maxFinite, Rnd r) {
    if (std::isnan(x) || std::isinf(x) || x == 0.0) return x;
    const bool neg = x < 0;
    const double a = std::fabs(x);
    int e = 0;
    std::frexp(a, &e);
    int E = e - 1;
    if (E < emin) E = emin;  // subnormal range shares the quantum of emin
    const double q = std::ldexp(1.0, E - mant);
    const double m = a / q;
    const double fl = std::floor(m);
    const double frac = m - fl;
    const bool flEven = std::fmod(fl, 2.0) == 0.0;
    double rm = fl;
    switch (r) {
        case Rnd::RINT: rm = frac > 0.5 ? fl + 1 : (frac < 0.5 ? fl : (flEven ? fl : fl + 1)); break;
        case Rnd::ROUND: rm = frac >= 0.5 ? fl + 1 : fl; break;
        case Rnd::TRUNC: rm = fl; break;
        case Rnd::FLOOR: rm = (neg && frac > 0) ? fl + 1 : fl; break;
        case Rnd::CEIL: rm = (!neg && frac > 0) ? fl + 1 : fl; break;
        case Rnd::ODD: rm = (frac > 0 && flEven) ? fl + 1 : fl; break;
    }
    double res = rm * q;
    if (res > maxFinite) {
        const bool toInf = r == Rnd::RINT || r == Rnd::ROUND || (r == Rnd::FLOOR && neg) ||
                           (r == Rnd::CEIL && !neg);
        res = toInf ? INFINITY : maxFinite;
    }
    return neg ? -res : res;
}

inline uint16_t EncodeExact16(double v, int mant, int bias, int emin, uint16_t infBits, uint16_t nanBits) {
    uint16_t s = std::signbit(v) ? 0x8000 : 0;
    if (std::isnan(v)) return nanBits;
    double a = std::fabs(v);
    if (std::isinf(a)) return s | infBits;
    if (a == 0.0) return s;
    int e = 0;
    std::frexp(a, &e);
    int E = e - 1;
    if (E < emin) return s | static_cast<uint16_t>(a / std::ldexp(1.0, emin - mant));
    uint16_t m = static_cast<uint16_t>((a / std::ldexp(1.0, E) - 1.0) * std::ldexp(1.0, mant));
    return s | static_cast<uint16_t>((E + bias) << mant) | m;
}

inline double DecodeF16(uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    double v;
    if (e == 0) v = std::ldexp(static_cast<double>(m), -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp(1.0 + m / 1024.0, e - 15);
    return s ? -v : v;
}

inline uint16_t F16FromDouble(double x, Rnd r) {
    return EncodeExact16(RoundToFormat(x, 10, -14, 65504.0, r), 10, 15, -14, 0x7C00, 0x7E00);
}

inline double DecodeBF16(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t BF16FromDouble(double x, Rnd r) {
    const double maxBf = std::ldexp(2.0 - std::ldexp(1.0, -7), 127);
    return EncodeExact16(RoundToFormat(x, 7, -126, maxBf, r), 7, 127, -126, 0x7F80, 0x7FC0);
}

}  // namespace fp
}  // namespace panguc_sim

// IEEE binary16, the AscendC `half` scalar type. Arithmetic happens in float
// through the implicit conversion (no operator overloads, so `h + 1.0f` is
// never ambiguous); converting back rounds to nearest even.
struct half {
    uint16_t bits_;
    half() = default;
    half(float f) : bits_(panguc_sim::fp::F16FromDouble(f, panguc_sim::fp::Rnd::RINT)) {}
    operator float() const { return static_cast<float>(panguc_sim::fp::DecodeF16(bits_)); }
    static half FromBits(uint16_t b) { half h; h.bits_ = b; return h; }
    half& operator+=(float o) { return *this = half(float(*this) + o); }
    half& operator-=(float o) { return *this = half(float(*this) - o); }
    half& operator*=(float o) { return *this = half(float(*this) * o); }
    half& operator/=(float o) { return *this = half(float(*this) / o); }
};

// bfloat16, the AscendC `bfloat16_t` scalar type (910B only: any tensor of
// this type on 310P is rejected by the simulation, as bisheng would reject it).
struct bfloat16_t {
    uint16_t bits_;
    bfloat16_t() = default;
    bfloat16_t(float f) : bits_(panguc_sim::fp::BF16FromDouble(f, panguc_sim::fp::Rnd::RINT)) {}
    operator float() const { return static_cast<float>(panguc_sim::fp::DecodeBF16(bits_)); }
    static bfloat16_t FromBits(uint16_t b) { bfloat16_t h; h.bits_ = b; return h; }
    bfloat16_t& operator+=(float o) { return *this = bfloat16_t(float(*this) + o); }
    bfloat16_t& operator-=(float o) { return *this = bfloat16_t(float(*this) - o); }
    bfloat16_t& operator*=(float o) { return *this = bfloat16_t(float(*this) * o); }
    bfloat16_t& operator/=(float o) { return *this = bfloat16_t(float(*this) / o); }
};

static_assert(sizeof(half) == 2 && std::is_trivially_copyable<half>::value, "half layout");
static_assert(sizeof(bfloat16_t) == 2 && std::is_trivially_copyable<bfloat16_t>::value, "bf16 layout");

namespace panguc_sim {

template <typename T> struct IsLowFloat : std::false_type {};
template <> struct IsLowFloat<half> : std::true_type {};
template <> struct IsLowFloat<bfloat16_t> : std::true_type {};
template <typename T>
constexpr bool kIsFloatLike = std::is_floating_point<T>::value || IsLowFloat<T>::value;

template <typename T> inline const char* TypeName() {
    if (std::is_same<T, half>::value) return "half";
    if (std::is_same<T, bfloat16_t>::value) return "bfloat16_t";
    if (std::is_same<T, float>::value) return "float";
    if (std::is_same<T, double>::value) return "double";
    if (std::is_same<T, int8_t>::value) return "int8_t";
    if (std::is_same<T, uint8_t>::value) return "uint8_t";
    if (std::is_same<T, int16_t>::value) return "int16_t";
    if (std::is_same<T, uint16_t>::value) return "uint16_t";
    if (std::is_same<T, int32_t>::value) return "int32_t";
    if (std::is_same<T, uint32_t>::value) return "uint32_t";
    if (std::is_same<T, int64_t>::value) return "int64_t";
    if (std::is_same<T, uint64_t>::value) return "uint64_t";
    return "T";
}

template <typename T> inline double ToDouble(T v) {
    if constexpr (IsLowFloat<T>::value) return static_cast<double>(static_cast<float>(v));
    else return static_cast<double>(v);
}

// Convert one scalar with an explicit rounding mode (Cast, Fixpipe quant).
// Integer targets saturate; NaN converts to 0.
template <typename D, typename S> inline D ConvertValue(S v, fp::Rnd r) {
    const double x = ToDouble(v);
    if constexpr (std::is_same<D, half>::value) {
        return half::FromBits(fp::F16FromDouble(x, r));
    } else if constexpr (std::is_same<D, bfloat16_t>::value) {
        return bfloat16_t::FromBits(fp::BF16FromDouble(x, r));
    } else if constexpr (std::is_same<D, float>::value) {
        return static_cast<float>(fp::RoundToFormat(x, 23, -126, std::numeric_limits<float>::max(), r));
    } else if constexpr (std::is_floating_point<D>::value) {
        return static_cast<D>(x);
    } else {
        if (std::isnan(x)) return D(0);
        double y = x;
        switch (r) {
            case fp::Rnd::RINT: y = std::nearbyint(x); break;
            case fp::Rnd::ROUND: y = std::round(x); break;
            case fp::Rnd::FLOOR: y = std::floor(x); break;
            case fp::Rnd::CEIL: y = std::ceil(x); break;
            case fp::Rnd::TRUNC: y = std::trunc(x); break;
            case fp::Rnd::ODD: { double t = std::trunc(x); y = (t != x && std::fmod(t, 2.0) == 0.0) ? t + (x > 0 ? 1 : -1) : t; } break;
        }
        const double lo = static_cast<double>(std::numeric_limits<D>::lowest());
        const double hi = static_cast<double>(std::numeric_limits<D>::max());
        if (y <= lo) return std::numeric_limits<D>::lowest();
        if (y >= hi) return std::numeric_limits<D>::max();
        return static_cast<D>(y);
    }
}

// Source location of the kernel line that called an API, captured through
// default arguments (`SrcLoc loc = SrcLoc::Here()`): g++ evaluates
// __builtin_FILE/__builtin_LINE at the outermost call site.
struct SrcLoc {
    const char* file;
    int line;
    static SrcLoc Here(const char* f = __builtin_FILE(), int l = __builtin_LINE()) { return SrcLoc{f, l}; }
};

// Thrown by every failed check; caught by the launcher, which reports it and
// aborts the launch with a non-zero status.
class SimError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

template <typename... A> inline std::string Str(const A&... a) {
    std::ostringstream os;
    (os << ... << a);
    return os.str();
}

enum class Soc { k910B, k310P };
constexpr Soc kSoc = PANGUC_SIM_910B ? Soc::k910B : Soc::k310P;
inline const char* SocName() { return PANGUC_SIM_910B ? "910B" : "310P"; }

// Simulated on-chip memories of one core.
enum class Mem : uint8_t { UB = 0, L1, L0A, L0B, L0C, Count, None };
constexpr int kMemCount = static_cast<int>(Mem::Count);
inline const char* MemName(Mem m) {
    switch (m) {
        case Mem::UB: return "UB";
        case Mem::L1: return "L1";
        case Mem::L0A: return "L0A";
        case Mem::L0B: return "L0B";
        case Mem::L0C: return "L0C";
        default: return "?";
    }
}
// Capacities from docs/ascendc.md. The UB is what user buffers may use: on
// 910B 192 KiB minus the 256 B the runtime keeps minus the 8 KiB the library
// reserves for its temporary buffer; on 310P the library's temporary area
// starts at 248 KiB.
constexpr uint32_t kUbUsable910B = 192u * 1024 - 256 - 8u * 1024;
constexpr uint32_t kUbUsable310P = 248u * 1024;
inline uint32_t MemCapacity(Mem m) {
    switch (m) {
        case Mem::UB: return PANGUC_SIM_910B ? kUbUsable910B : kUbUsable310P;
        case Mem::L1: return PANGUC_SIM_910B ? 512u * 1024 : 1024u * 1024;
        case Mem::L0A: return 64u * 1024;
        case Mem::L0B: return 64u * 1024;
        case Mem::L0C: return PANGUC_SIM_910B ? 128u * 1024 : 256u * 1024;
        default: return 0;
    }
}

// Kinds of kernel arguments, shared with the Rust harness's wire format.
enum class ArgKind : uint8_t { Input = 1, Output = 2, InOut = 3, Workspace = 4, Tiling = 5 };
inline const char* ArgKindName(ArgKind k) {
    switch (k) {
        case ArgKind::Input: return "input";
        case ArgKind::Output: return "output";
        case ArgKind::InOut: return "in/out";
        case ArgKind::Workspace: return "workspace";
        case ArgKind::Tiling: return "tiling";
    }
    return "?";
}

// One global-memory buffer handed to the kernel. For writable buffers every
// byte records which block wrote it and which block(s) read it during the
// launch: blocks run concurrently on hardware, so any byte touched by two
// blocks where at least one writes is a race (reported as an error).
struct GmBuffer {
    std::string name;
    ArgKind kind = ArgKind::Input;
    uint8_t* base = nullptr;
    uint64_t size = 0;
    std::vector<int32_t> writer;  // -1: never written
    std::vector<int32_t> reader;  // -1: never read, -2: read by several blocks
    // Per 64-byte line (buffers are 512-byte aligned, so lines are physical
    // lines): the block that wrote it with a scalar store (-1: none) and the
    // block that wrote any of its bytes (-1: none, -2: several).
    std::vector<int32_t> lineScalarWriter;
    std::vector<int32_t> lineWriter;
    // Bytes any block moved to or from the core (timing model: the launch's
    // compulsory GM traffic). Empty when timing is off, and for the tiling
    // and workspace arguments.
    std::vector<uint8_t> touched;
    bool Writable() const { return kind == ArgKind::Output || kind == ArgKind::InOut || kind == ArgKind::Workspace; }
};

struct PipeState;

// ---- pipes -----------------------------------------------------------------
// The units of one core that run concurrently on hardware. Every simulated
// instruction runs on one of them: scalar accesses to local memory on S,
// vector operations and UB->UB copies on V, cube Mmad on M, L1->L0 loads on
// MTE1, GM->local copies on MTE2, UB->GM copies on MTE3, L0C->GM on FIX.
enum class Pipe : uint8_t { S = 0, V, M, MTE1, MTE2, MTE3, FIX, None };
constexpr int kPipeCount = 7;
inline const char* PipeName(Pipe p) {
    switch (p) {
        case Pipe::S: return "S";
        case Pipe::V: return "V";
        case Pipe::M: return "M";
        case Pipe::MTE1: return "MTE1";
        case Pipe::MTE2: return "MTE2";
        case Pipe::MTE3: return "MTE3";
        case Pipe::FIX: return "FIX";
        default: return "?";
    }
}

// What one pipe knows to be complete: seen[w] is the last instruction
// sequence number of pipe w that has finished before this pipe's next
// instruction. A SetFlag / EnQue captures the producer's view (its own
// instructions so far plus what it had waited for); the matching WaitFlag /
// DeQue merges it into the consumer's view. Per pipe timelines for a later
// timing model hang off the same state.
struct PipeView {
    uint32_t seen[kPipeCount] = {};
    void Merge(const PipeView& o) {
        for (int i = 0; i < kPipeCount; ++i) seen[i] = std::max(seen[i], o.seen[i]);
    }
};
}  // namespace panguc_sim

#include "panguc_sim/timing.h"

namespace panguc_sim {

// Per-launch context: the only global state of the simulation.
struct Ctx {
    bool inLaunch = false;
    int64_t blockIdx = 0;
    int64_t blockDim = 1;
    std::vector<GmBuffer*> gm;
    std::vector<uint8_t> mem[kMemCount];
    std::vector<uint8_t> init[kMemCount];  // 1 = byte written since the block started
    bool dirty[kMemCount] = {};
    PipeState* livePipe = nullptr;
    bool usedVector = false;
    bool usedCube = false;
    bool atomicAdd = false;  // SetAtomicAdd<T>() active: GM stores accumulate
    // Pipe synchronisation of the current core (reset per block).
    Pipe curPipe = Pipe::V;  // pipe of the API call being executed
    uint32_t seq = 0;        // instructions issued so far
    PipeView view[kPipeCount];
    PipeView flags[kPipeCount][kPipeCount][8];  // SetFlag<src_dst>(id) snapshots
    bool flagSet[kPipeCount][kPipeCount][8] = {};
    std::vector<uint8_t> wpipe[kMemCount];  // writer pipe of every byte
    std::vector<uint32_t> wseq[kMemCount];  // and its instruction number
    std::vector<std::string> warnings;
    CoreTiming core;      // pipe clocks of the current block (timing.h)
    LaunchTiming launch;  // per-block times and totals of this launch
};
inline Ctx& ctx() {
    static Ctx c;
    return c;
}
namespace timing {
inline CoreTiming& Core() { return ctx().core; }
inline LaunchTiming& Launch() { return ctx().launch; }
inline double CoreGmBytesPerNs() {
    const Ctx& c = ctx();
    const TimingParams& t = timingParams();
    const int64_t cores = c.usedCube ? t.cubeCores : t.vecCores;
    const int64_t active = std::max<int64_t>(1, std::min<int64_t>(c.blockDim, cores));
    return std::min(t.coreGmCapBytesPerNs, t.gmBytesPerNs / double(active));
}
// The current block is done: record its time (its latest pipe, or its GM
// bytes over the core's bandwidth share if that is longer).
inline void EndBlock() {
    if (!timingParams().enabled) return;
    CoreTiming& core = Core();
    double end = 0;
    for (double t : core.clock) end = std::max(end, t);
    end = std::max(end, core.gmBytes / CoreGmBytesPerNs());
    Launch().blockNs.push_back(end);
    Launch().blockBusy.emplace_back(core.busy, core.busy + kPipeCount);
    core = CoreTiming{};
}
}  // namespace timing
// Fresh per-launch state (a non-template function: g++ 12 crashes on
// `ctx() = Ctx{}` inside a function template).
inline void ResetCtx() { ctx() = Ctx(); }

[[noreturn]] inline void Fail(const SrcLoc& loc, const std::string& msg) {
    const Ctx& c = ctx();
    throw SimError(Str("[block ", c.blockIdx, " of ", c.blockDim, "] ", loc.file, ":", loc.line, ": ", msg));
}

inline void Warn(const SrcLoc& loc, const std::string& msg) {
    Ctx& c = ctx();
    c.warnings.push_back(Str("[block ", c.blockIdx, "] ", loc.file, ":", loc.line, ": ", msg));
}

// Memory of one core, (re)initialised lazily: poison 0xFF (NaN for every
// float type) and "never written" for all bytes.
inline uint8_t* MemBase(Mem m) {
    Ctx& c = ctx();
    const int i = static_cast<int>(m);
    if (c.mem[i].empty()) {
        c.mem[i].assign(MemCapacity(m), 0xFF);
        c.init[i].assign(MemCapacity(m), 0);
        c.wpipe[i].assign(MemCapacity(m), static_cast<uint8_t>(Pipe::None));
        c.wseq[i].assign(MemCapacity(m), 0);
    }
    c.dirty[i] = true;
    return c.mem[i].data();
}
inline void ResetCoreMemories() {
    Ctx& c = ctx();
    for (int i = 0; i < kMemCount; ++i) {
        if (c.dirty[i]) {
            std::fill(c.mem[i].begin(), c.mem[i].end(), 0xFF);
            std::fill(c.init[i].begin(), c.init[i].end(), 0);
            std::fill(c.wpipe[i].begin(), c.wpipe[i].end(), static_cast<uint8_t>(Pipe::None));
            c.dirty[i] = false;
        }
    }
    c.curPipe = Pipe::V;
    c.seq = 0;
    for (auto& v : c.view) v = PipeView{};
    std::memset(c.flagSet, 0, sizeof(c.flagSet));
}

// Runs the enclosing API call on pipe `p` (vector operations need none:
// V is the default).
struct OnPipe {
    Pipe saved;
    explicit OnPipe(Pipe p) : saved(ctx().curPipe) { ctx().curPipe = p; }
    ~OnPipe() { ctx().curPipe = saved; }
    OnPipe(const OnPipe&) = delete;
    OnPipe& operator=(const OnPipe&) = delete;
};

// Bytes written by the current instruction: remember its pipe.
inline void MarkWriter(Mem m, uint64_t addr, uint64_t bytes) {
    Ctx& c = ctx();
    const int i = static_cast<int>(m);
    const uint32_t s = ++c.seq;
    std::fill_n(c.wpipe[i].begin() + addr, bytes, static_cast<uint8_t>(c.curPipe));
    std::fill_n(c.wseq[i].begin() + addr, bytes, s);
}

// A read by the current pipe of bytes another pipe wrote must come after a
// synchronisation that made that write visible (SetFlag/WaitFlag,
// PipeBarrier<PIPE_ALL>, or the EnQue/DeQue of a queue): otherwise the
// hardware reads whatever was there before.
inline void CheckPipeOrder(Mem m, uint64_t addr, uint64_t bytes, const SrcLoc& loc, const char* what) {
    Ctx& c = ctx();
    const int i = static_cast<int>(m);
    if (c.wpipe[i].empty()) return;
    const PipeView& mine = c.view[static_cast<int>(c.curPipe)];
    for (uint64_t k = 0; k < bytes; ++k) {
        const uint8_t w = c.wpipe[i][addr + k];
        if (w == static_cast<uint8_t>(Pipe::None) || w == static_cast<uint8_t>(c.curPipe)) continue;
        if (c.wseq[i][addr + k] > mine.seen[w]) {
            const char* wn = PipeName(static_cast<Pipe>(w));
            const char* rn = PipeName(c.curPipe);
            Fail(loc, Str(what, ": missing ", wn, "->", rn, " synchronisation: pipe ", rn, " reads ", MemName(m),
                          " bytes at address ", addr, ".. (", bytes, " bytes, first unsynchronised at ", addr + k,
                          ") that pipe ", wn, " wrote, without a SetFlag/WaitFlag<HardEvent::", wn, "_", rn,
                          ">, PipeBarrier<PIPE_ALL> or queue EnQue/DeQue in between (on hardware the read may see "
                          "the old contents)"));
        }
    }
}

inline void MarkInit(Mem m, uint64_t addr, uint64_t bytes) {
    MemBase(m);
    std::fill_n(ctx().init[static_cast<int>(m)].begin() + addr, bytes, 1);
    MarkWriter(m, addr, bytes);
}
inline void CopyInit(Mem dm, uint64_t daddr, Mem sm, uint64_t saddr, uint64_t bytes, const SrcLoc& loc,
                     const char* what) {
    MemBase(dm);
    MemBase(sm);
    CheckPipeOrder(sm, saddr, bytes, loc, what);
    Ctx& c = ctx();
    std::memmove(c.init[static_cast<int>(dm)].data() + daddr, c.init[static_cast<int>(sm)].data() + saddr, bytes);
    MarkWriter(dm, daddr, bytes);
}
// Reading bytes that nothing wrote since the block started is reported: on
// hardware they hold whatever the previous kernel left there.
inline void CheckInit(Mem m, uint64_t addr, uint64_t bytes, const SrcLoc& loc, const char* what) {
    MemBase(m);
    CheckPipeOrder(m, addr, bytes, loc, what);
#ifndef PANGUC_SIM_ALLOW_UNINIT_READS
    const uint8_t* in = ctx().init[static_cast<int>(m)].data();
    for (uint64_t i = 0; i < bytes; ++i) {
        if (!in[addr + i]) {
            Fail(loc, Str(what, ": reads uninitialised ", MemName(m), " memory at byte address ", addr + i,
                          " (nothing wrote it since the block started; region starts at ", addr, ", ", bytes,
                          " bytes)"));
        }
    }
#else
    (void)m; (void)addr; (void)bytes; (void)loc; (void)what;
#endif
}

template <typename T> inline T Ld(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
template <typename T> inline void St(uint8_t* p, const T& v) { std::memcpy(p, &v, sizeof(T)); }

// ---- global memory ---------------------------------------------------------
constexpr uint64_t kGmLine = 64;  // data-cache line of scalar GM accesses
inline GmBuffer* FindGm(const void* p, uint64_t bytes = 0) {
    const uint8_t* q = static_cast<const uint8_t*>(p);
    for (GmBuffer* b : ctx().gm) {
        if (q >= b->base && q + bytes <= b->base + b->size && (q < b->base + b->size || bytes == 0)) return b;
    }
    return nullptr;
}

inline std::string GmDesc(const GmBuffer* b) { return Str(ArgKindName(b->kind), " '", b->name, "'"); }

inline void GmTouch(GmBuffer* b, const uint8_t* p, uint64_t bytes) {
    if (!b->touched.empty()) std::fill_n(b->touched.begin() + (p - b->base), bytes, uint8_t(1));
}

inline void GmRead(GmBuffer* b, const uint8_t* p, uint64_t bytes, const SrcLoc& loc, const char* op) {
    GmTouch(b, p, bytes);
    if (!b->Writable() || b->writer.empty()) return;  // no race tracking (timing of a block subset)
    const int32_t me = static_cast<int32_t>(ctx().blockIdx);
    const uint64_t off = static_cast<uint64_t>(p - b->base);
    for (uint64_t i = 0; i < bytes; ++i) {
        const int32_t w = b->writer[off + i];
        if (w >= 0 && w != me) {
            Fail(loc, Str(op, ": cross-block read: block ", me, " reads byte ", off + i, " of ", GmDesc(b),
                          ", which block ", w,
                          " wrote in the same launch (blocks run concurrently on hardware; the value is undefined)"));
        }
        int32_t& r = b->reader[off + i];
        if (r == -1) r = me;
        else if (r != me) r = -2;
    }
}

// A scalar store (GlobalTensor::SetValue) into a line that another block
// also writes, in any way, loses one of the writes on hardware.
inline void GmScalarWrite(GmBuffer* b, const uint8_t* p, uint64_t bytes, const SrcLoc& loc, const char* op) {
    if (!b->Writable() || b->writer.empty()) return;  // GmWrite reports it
    const int32_t me = static_cast<int32_t>(ctx().blockIdx);
    const uint64_t off = static_cast<uint64_t>(p - b->base);
    for (uint64_t l = off / kGmLine; l <= (off + bytes - 1) / kGmLine; ++l) {
        const int32_t w = b->lineWriter[l];
        if (w == -2 || (w >= 0 && w != me)) {
            Fail(loc, Str(op, ": shared cache line: block ", me, " stores a scalar into bytes ", l * kGmLine, "..",
                          l * kGmLine + kGmLine - 1, " of ", GmDesc(b), ", a 64-byte line that ",
                          (w == -2 ? std::string("other blocks") : Str("block ", w)),
                          " also wrote in the same launch (scalar stores are written back per cache line; give each "
                          "core whole lines or write GM with DataCopy)"));
        }
        b->lineScalarWriter[l] = me;
    }
}

inline void GmWrite(GmBuffer* b, const uint8_t* p, uint64_t bytes, const SrcLoc& loc, const char* op) {
    if (!b->Writable()) {
        Fail(loc, Str(op, ": writes to read-only ", GmDesc(b), " (declare it as an output or in/out buffer)"));
    }
    GmTouch(b, p, bytes);
    if (b->writer.empty()) return;  // no race tracking (timing of a block subset)
    const int32_t me = static_cast<int32_t>(ctx().blockIdx);
    const uint64_t off = static_cast<uint64_t>(p - b->base);
    for (uint64_t l = off / kGmLine; bytes > 0 && l <= (off + bytes - 1) / kGmLine; ++l) {
        const int32_t s = b->lineScalarWriter[l];
        if (s >= 0 && s != me) {
            Fail(loc, Str(op, ": shared cache line: block ", me, " writes bytes ", l * kGmLine, "..",
                          l * kGmLine + kGmLine - 1, " of ", GmDesc(b), ", a 64-byte line block ", s,
                          " wrote with GlobalTensor::SetValue (scalar stores go through the core's data cache and "
                          "are written back per line, overwriting the other core's bytes)"));
        }
        int32_t& w = b->lineWriter[l];
        w = (w == -1 || w == me) ? me : -2;
    }
    for (uint64_t i = 0; i < bytes; ++i) {
        int32_t& w = b->writer[off + i];
        if (w >= 0 && w != me) {
            Fail(loc, Str(op, ": cross-block write: block ", me, " writes byte ", off + i, " of ", GmDesc(b),
                          ", which block ", w, " also wrote in the same launch (blocks run concurrently on hardware)"));
        }
        const int32_t r = b->reader[off + i];
        if (r == -2 || (r >= 0 && r != me)) {
            Fail(loc, Str(op, ": cross-block read: block ", me, " writes byte ", off + i, " of ", GmDesc(b),
                          ", which ", (r == -2 ? std::string("other blocks") : Str("block ", r)),
                          " read earlier in the same launch (blocks run concurrently on hardware)"));
        }
        w = me;
    }
}

}  // namespace panguc_sim

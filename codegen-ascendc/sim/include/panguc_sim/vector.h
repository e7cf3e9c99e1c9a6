// panguc CPU simulation of the AscendC API subset: vector unit.
//
// Two call forms, as in AscendC:
//  * count form  Op(dst, src..., count): the first `count` elements;
//  * repeat form Op(dst, src..., mask, repeatTimes, repeatParams): repeat r,
//    data block b (32 bytes), element j of an operand lives at byte
//    r*repStride*32 + b*blkStride*32 + j*sizeof(T); `mask` selects elements
//    of each 256-byte repeat (continuous: the first `mask`; bitwise: mask[2]).
// Half/bf16 arithmetic is done in float and rounded (RINT) after every op,
// as the vector unit does; integer ops wrap.
#pragma once

#include "panguc_sim/data_copy.h"

namespace AscendC {

enum class RoundMode : uint8_t { CAST_NONE = 0, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };
enum class CMPMODE : uint8_t { LT = 0, GT, EQ, LE, GE, NE };
enum class SELMODE : uint8_t { VSEL_CMPMASK_SPR = 0, VSEL_TENSOR_SCALAR_MODE, VSEL_TENSOR_TENSOR_MODE };

const int32_t DEFAULT_BLK_NUM = 8;
const int32_t DEFAULT_BLK_STRIDE = 1;
const uint8_t DEFAULT_REPEAT_STRIDE = 8;

struct UnaryRepeatParams {
    UnaryRepeatParams() {}
    UnaryRepeatParams(const uint16_t dstBlkStrideIn, const uint16_t srcBlkStrideIn, const uint8_t dstRepStrideIn,
                      const uint8_t srcRepStrideIn)
        : dstBlkStride(dstBlkStrideIn), srcBlkStride(srcBlkStrideIn), dstRepStride(dstRepStrideIn),
          srcRepStride(srcRepStrideIn) {}
    uint32_t blockNumber = DEFAULT_BLK_NUM;
    uint16_t dstBlkStride = DEFAULT_BLK_STRIDE;
    uint16_t srcBlkStride = DEFAULT_BLK_STRIDE;
    uint8_t dstRepStride = DEFAULT_REPEAT_STRIDE;
    uint8_t srcRepStride = DEFAULT_REPEAT_STRIDE;
    bool repeatStrideMode = false;
    bool strideSizeMode = false;
};

struct BinaryRepeatParams {
    BinaryRepeatParams() {}
    BinaryRepeatParams(const uint8_t dstBlkStrideIn, const uint8_t src0BlkStrideIn, const uint8_t src1BlkStrideIn,
                       const uint8_t dstRepStrideIn, const uint8_t src0RepStrideIn, const uint8_t src1RepStrideIn)
        : dstBlkStride(dstBlkStrideIn), src0BlkStride(src0BlkStrideIn), src1BlkStride(src1BlkStrideIn),
          dstRepStride(dstRepStrideIn), src0RepStride(src0RepStrideIn), src1RepStride(src1RepStrideIn) {}
    uint32_t blockNumber = DEFAULT_BLK_NUM;
    uint8_t dstBlkStride = DEFAULT_BLK_STRIDE;
    uint8_t src0BlkStride = DEFAULT_BLK_STRIDE;
    uint8_t src1BlkStride = DEFAULT_BLK_STRIDE;
    uint8_t dstRepStride = DEFAULT_REPEAT_STRIDE;
    uint8_t src0RepStride = DEFAULT_REPEAT_STRIDE;
    uint8_t src1RepStride = DEFAULT_REPEAT_STRIDE;
    bool repeatStrideMode = false;
    bool strideSizeMode = false;
};

namespace sim {

// Repeat count argument. AscendC declares it uint8_t, so a count above 255
// silently wraps on hardware; the simulation accepts any integer here so it
// can report the overflow (the same source still compiles with bisheng).
struct RepeatTimes {
    uint64_t v;
    template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
    RepeatTimes(I x) : v((std::is_signed<I>::value && x < I(0)) ? ~uint64_t(0) : static_cast<uint64_t>(x)) {}
};

template <typename T> struct Calc {
    using C = std::conditional_t<std::is_integral<T>::value, int64_t, float>;
    static C In(T v) {
        if constexpr (std::is_integral<T>::value) return static_cast<int64_t>(v);
        else return static_cast<float>(v);
    }
    static T Out(C v) {
        if constexpr (std::is_integral<T>::value) return static_cast<T>(v);
        else return T(static_cast<float>(v));
    }
};

template <typename T>
inline void VecOperand(const LocalTensor<T>& t, int64_t count, const SrcLoc& loc, const char* op, const char* role,
                       bool read) {
    t.SimCheckLive(loc, op);
    if (t.sim_mem_ != Mem::UB) {
        Fail(loc, Str(op, ": ", role, " must be a UB tensor (VECIN/VECOUT/VECCALC), got TPosition::", PosName(t.sim_pos_)));
    }
    if (t.sim_addr_ % 32) {
        Fail(loc, Str(op, ": misaligned UB address ", t.sim_addr_, " for ", role,
                      ": vector operands must start 32-byte aligned (tensor[offset] views must keep offset*sizeof(T) a "
                      "multiple of 32)"));
    }
    if (count < 0) Fail(loc, Str(op, ": negative count ", count));
    if (uint64_t(count) > t.sim_size_) {
        Fail(loc, Str(op, ": count ", count, " exceeds tensor size ", t.sim_size_, " of ", role, " (", TypeName<T>(), ")"));
    }
    if (read) CheckInit(Mem::UB, t.sim_addr_, uint64_t(count) * sizeof(T), loc, op);
}

template <typename T> inline uint8_t* VPtr(const LocalTensor<T>& t) { return MemBase(Mem::UB) + t.sim_addr_; }

// Cycles per 256-byte repeat of an elementwise operation in the timing
// model: 1 for the basic instructions; the advanced-API activations are
// several passes of them (assumed: Silu/Sigmoid exp + add + reciprocal/div +
// mul; Sin/Cos a range reduction and a polynomial).
inline double VecPasses(const char* op) {
    const std::string o(op);
    if (o == "Silu" || o == "Sigmoid") return 4;
    if (o == "Sin" || o == "Cos") return 12;
    return 1;
}

template <typename T, typename F>
inline void Unary(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& src, int64_t n, const SrcLoc& loc, F f) {
    VecOperand(src, n, loc, op, "src", true);
    VecOperand(dst, n, loc, op, "dst", false);
    timing::Vec(uint64_t(n) * sizeof(T), VecPasses(op));
    uint8_t* d = VPtr(dst);
    const uint8_t* s = VPtr(src);
    for (int64_t i = 0; i < n && !timingParams().skipCompute; ++i) {
        St<T>(d + i * sizeof(T), Calc<T>::Out(f(Calc<T>::In(Ld<T>(s + i * sizeof(T))))));
    }
    MarkInit(Mem::UB, dst.sim_addr_, uint64_t(n) * sizeof(T));
}

template <typename T, typename F>
inline void Binary(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b, int64_t n,
                   const SrcLoc& loc, F f) {
    VecOperand(a, n, loc, op, "src0", true);
    VecOperand(b, n, loc, op, "src1", true);
    VecOperand(dst, n, loc, op, "dst", false);
    timing::Vec(uint64_t(n) * sizeof(T));
    uint8_t* d = VPtr(dst);
    const uint8_t* pa = VPtr(a);
    const uint8_t* pb = VPtr(b);
    for (int64_t i = 0; i < n && !timingParams().skipCompute; ++i) {
        St<T>(d + i * sizeof(T),
              Calc<T>::Out(f(Calc<T>::In(Ld<T>(pa + i * sizeof(T))), Calc<T>::In(Ld<T>(pb + i * sizeof(T))))));
    }
    MarkInit(Mem::UB, dst.sim_addr_, uint64_t(n) * sizeof(T));
}

// ---- repeat form engine ----
struct MaskSpec {
    bool bitwise = false;
    uint64_t cont = 0;
    uint64_t bits[2] = {0, 0};
};
inline MaskSpec ContMask(uint64_t m) { MaskSpec s; s.cont = m; return s; }
inline MaskSpec BitMask(const uint64_t m[]) { MaskSpec s; s.bitwise = true; s.bits[0] = m[0]; s.bits[1] = m[1]; return s; }

struct Operand {
    uint32_t addr = 0;
    uint64_t len = 0;  // bytes
    uint32_t blk = 1, rep = 8;
    const char* role = "";
};
template <typename T> inline Operand Opnd(const LocalTensor<T>& t, uint32_t blk, uint32_t rep, const char* role) {
    Operand o;
    o.addr = t.sim_addr_;
    o.len = t.GetLength();
    o.blk = blk;
    o.rep = rep;
    o.role = role;
    return o;
}

template <typename T> inline void CheckRepeat(const MaskSpec& m, uint64_t repeat, const SrcLoc& loc, const char* op) {
    constexpr uint64_t per = 256 / sizeof(T);
    if (repeat > 255) {
        Fail(loc, Str(op, ": repeat count ", repeat == ~uint64_t(0) ? std::string("(negative)") : Str(repeat),
                      " exceeds 255 (repeatTimes is 8-bit on hardware and would wrap); split the call or use the count form"));
    }
    if (!m.bitwise) {
        if (m.cont < 1 || m.cont > per) Fail(loc, Str(op, ": mask ", m.cont, " is outside [1, ", per, "] for ", TypeName<T>()));
    } else {
        const bool extraHigh = per <= 64 && m.bits[1] != 0;
        const bool extraLow = per < 64 && (m.bits[0] >> (per % 64)) != 0;
        if (extraHigh || extraLow) {
            Fail(loc, Str(op, ": bitwise mask sets bits beyond the ", per, " elements of a repeat for ", TypeName<T>()));
        }
    }
}
inline bool LaneOn(const MaskSpec& m, uint32_t lane) {
    return m.bitwise ? ((m.bits[lane / 64] >> (lane % 64)) & 1u) != 0 : lane < m.cont;
}
inline uint64_t LaneOff(const Operand& o, uint64_t r, uint32_t lane, uint32_t esz) {
    const uint32_t epb = 32 / esz;
    return r * uint64_t(o.rep) * 32 + uint64_t(lane / epb) * o.blk * 32 + uint64_t(lane % epb) * esz;
}
inline void CheckLane(const Operand& o, uint64_t off, uint32_t esz, const SrcLoc& loc, const char* op) {
    if (off + esz > o.len) {
        Fail(loc, Str(op, ": repeat form accesses byte ", off, " of ", o.role, ", beyond its ", o.len,
                      "-byte tensor (check repeatTimes / strides)"));
    }
}

// nsrc sources (0..2). F receives Calc<T>::C values.
template <typename T, int NSrc, typename F>
inline void RepeatOp(const char* op, const SrcLoc& loc, const LocalTensor<T>& dst, Operand od, const LocalTensor<T>* s0,
                     Operand o0, const LocalTensor<T>* s1, Operand o1, const MaskSpec& mask, uint64_t repeat, F f) {
    constexpr uint32_t esz = sizeof(T);
    constexpr uint32_t per = 256 / esz;
    CheckRepeat<T>(mask, repeat, loc, op);
    VecOperand(dst, 0, loc, op, "dst", false);
    if constexpr (NSrc >= 1) VecOperand(*s0, 0, loc, op, "src0", false);
    if constexpr (NSrc >= 2) VecOperand(*s1, 0, loc, op, "src1", false);
    timing::VecRepeats(repeat);
    uint8_t* ub = MemBase(Mem::UB);
    std::vector<std::pair<uint64_t, T>> out;
    for (uint64_t r = 0; r < repeat; ++r) {
        out.clear();
        for (uint32_t lane = 0; lane < per; ++lane) {
            if (!LaneOn(mask, lane)) continue;
            typename Calc<T>::C a{}, b{};
            if constexpr (NSrc >= 1) {
                const uint64_t off = LaneOff(o0, r, lane, esz);
                CheckLane(o0, off, esz, loc, op);
                CheckInit(Mem::UB, o0.addr + off, esz, loc, op);
                a = Calc<T>::In(Ld<T>(ub + o0.addr + off));
            }
            if constexpr (NSrc >= 2) {
                const uint64_t off = LaneOff(o1, r, lane, esz);
                CheckLane(o1, off, esz, loc, op);
                CheckInit(Mem::UB, o1.addr + off, esz, loc, op);
                b = Calc<T>::In(Ld<T>(ub + o1.addr + off));
            }
            const uint64_t doff = LaneOff(od, r, lane, esz);
            CheckLane(od, doff, esz, loc, op);
            out.emplace_back(doff, Calc<T>::Out(f(a, b)));
        }
        // A repeat reads all its operands before writing (matters in place).
        for (auto& w : out) {
            St<T>(ub + od.addr + w.first, w.second);
            MarkInit(Mem::UB, od.addr + w.first, esz);
        }
    }
}

}  // namespace sim

// ---------------------------------------------------------------------------
// Binary ops
// ---------------------------------------------------------------------------
#define PANGUC_SIM_BINARY(NAME, EXPR)                                                                              \
    template <typename T>                                                                                          \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,          \
                     const int32_t& calCount, SrcLoc loc = SrcLoc::Here()) {                                       \
        sim::Binary(#NAME, dst, src0, src1, calCount, loc, [](auto a, auto b) { return EXPR; });                   \
    }                                                                                                              \
    template <typename T, bool isSetMask = true>                                                                   \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,          \
                     uint64_t mask, sim::RepeatTimes repeatTimes, const BinaryRepeatParams& p,                     \
                     SrcLoc loc = SrcLoc::Here()) {                                                                \
        sim::RepeatOp<T, 2>(#NAME, loc, dst, sim::Opnd(dst, p.dstBlkStride, p.dstRepStride, "dst"), &src0,         \
                            sim::Opnd(src0, p.src0BlkStride, p.src0RepStride, "src0"), &src1,                       \
                            sim::Opnd(src1, p.src1BlkStride, p.src1RepStride, "src1"), sim::ContMask(mask),         \
                            repeatTimes.v, [](auto a, auto b) { return EXPR; });                                   \
    }                                                                                                              \
    template <typename T, bool isSetMask = true>                                                                   \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,          \
                     const uint64_t mask[], sim::RepeatTimes repeatTimes, const BinaryRepeatParams& p,             \
                     SrcLoc loc = SrcLoc::Here()) {                                                                \
        sim::RepeatOp<T, 2>(#NAME, loc, dst, sim::Opnd(dst, p.dstBlkStride, p.dstRepStride, "dst"), &src0,         \
                            sim::Opnd(src0, p.src0BlkStride, p.src0RepStride, "src0"), &src1,                       \
                            sim::Opnd(src1, p.src1BlkStride, p.src1RepStride, "src1"), sim::BitMask(mask),          \
                            repeatTimes.v, [](auto a, auto b) { return EXPR; });                                   \
    }

PANGUC_SIM_BINARY(Add, a + b)
PANGUC_SIM_BINARY(Sub, a - b)
PANGUC_SIM_BINARY(Mul, a * b)
PANGUC_SIM_BINARY(Div, a / b)
PANGUC_SIM_BINARY(Max, (a > b ? a : b))
PANGUC_SIM_BINARY(Min, (a < b ? a : b))
#undef PANGUC_SIM_BINARY

// ---------------------------------------------------------------------------
// Unary ops (float types only)
// ---------------------------------------------------------------------------
#define PANGUC_SIM_UNARY(NAME, EXPR)                                                                              \
    template <typename T>                                                                                         \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& calCount,             \
                     SrcLoc loc = SrcLoc::Here()) {                                                               \
        static_assert(panguc_sim::kIsFloatLike<T>, #NAME " needs half/float");                                    \
        sim::Unary(#NAME, dst, src, calCount, loc, [](float a) { return EXPR; });                                 \
    }                                                                                                             \
    template <typename T, bool isSetMask = true>                                                                  \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint64_t mask,                       \
                     sim::RepeatTimes repeatTimes, const UnaryRepeatParams& p, SrcLoc loc = SrcLoc::Here()) {     \
        static_assert(panguc_sim::kIsFloatLike<T>, #NAME " needs half/float");                                    \
        sim::RepeatOp<T, 1>(#NAME, loc, dst, sim::Opnd(dst, p.dstBlkStride, p.dstRepStride, "dst"), &src,         \
                            sim::Opnd(src, p.srcBlkStride, p.srcRepStride, "src"), nullptr, sim::Operand{},       \
                            sim::ContMask(mask), repeatTimes.v, [](float a, float) { return EXPR; });             \
    }                                                                                                             \
    template <typename T, bool isSetMask = true>                                                                  \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const uint64_t mask[],               \
                     sim::RepeatTimes repeatTimes, const UnaryRepeatParams& p, SrcLoc loc = SrcLoc::Here()) {     \
        static_assert(panguc_sim::kIsFloatLike<T>, #NAME " needs half/float");                                    \
        sim::RepeatOp<T, 1>(#NAME, loc, dst, sim::Opnd(dst, p.dstBlkStride, p.dstRepStride, "dst"), &src,         \
                            sim::Opnd(src, p.srcBlkStride, p.srcRepStride, "src"), nullptr, sim::Operand{},       \
                            sim::BitMask(mask), repeatTimes.v, [](float a, float) { return EXPR; });              \
    }

PANGUC_SIM_UNARY(Exp, std::exp(a))
PANGUC_SIM_UNARY(Ln, std::log(a))
PANGUC_SIM_UNARY(Abs, std::fabs(a))
PANGUC_SIM_UNARY(Sqrt, std::sqrt(a))
PANGUC_SIM_UNARY(Rsqrt, 1.0f / std::sqrt(a))
PANGUC_SIM_UNARY(Reciprocal, 1.0f / a)
PANGUC_SIM_UNARY(Relu, (a > 0.0f ? a : 0.0f))
#undef PANGUC_SIM_UNARY

// ---------------------------------------------------------------------------
// Tensor-scalar ops: dst = f(src, scalar). The scalar has the tensor's type
// (write `static_cast<T>(x)` for half tensors, as with bisheng).
// ---------------------------------------------------------------------------
#define PANGUC_SIM_SCALAR(NAME, EXPR)                                                                             \
    template <typename T>                                                                                         \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue,                \
                     const int32_t& calCount, SrcLoc loc = SrcLoc::Here()) {                                       \
        const auto b = sim::Calc<T>::In(scalarValue);                                                             \
        sim::Unary(#NAME, dst, src, calCount, loc, [b](auto a) { return EXPR; });                                 \
    }                                                                                                             \
    template <typename T, bool isSetMask = true>                                                                  \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue, uint64_t mask, \
                     sim::RepeatTimes repeatTimes, const UnaryRepeatParams& p, SrcLoc loc = SrcLoc::Here()) {     \
        const auto b = sim::Calc<T>::In(scalarValue);                                                             \
        sim::RepeatOp<T, 1>(#NAME, loc, dst, sim::Opnd(dst, p.dstBlkStride, p.dstRepStride, "dst"), &src,         \
                            sim::Opnd(src, p.srcBlkStride, p.srcRepStride, "src"), nullptr, sim::Operand{},       \
                            sim::ContMask(mask), repeatTimes.v, [b](auto a, auto) { return EXPR; });              \
    }                                                                                                             \
    template <typename T, bool isSetMask = true>                                                                  \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue,                \
                     const uint64_t mask[], sim::RepeatTimes repeatTimes, const UnaryRepeatParams& p,             \
                     SrcLoc loc = SrcLoc::Here()) {                                                               \
        const auto b = sim::Calc<T>::In(scalarValue);                                                             \
        sim::RepeatOp<T, 1>(#NAME, loc, dst, sim::Opnd(dst, p.dstBlkStride, p.dstRepStride, "dst"), &src,         \
                            sim::Opnd(src, p.srcBlkStride, p.srcRepStride, "src"), nullptr, sim::Operand{},       \
                            sim::BitMask(mask), repeatTimes.v, [b](auto a, auto) { return EXPR; });               \
    }

PANGUC_SIM_SCALAR(Adds, a + b)
PANGUC_SIM_SCALAR(Muls, a * b)
PANGUC_SIM_SCALAR(Maxs, (a > b ? a : b))
PANGUC_SIM_SCALAR(Mins, (a < b ? a : b))
PANGUC_SIM_SCALAR(LeakyRelu, (a >= 0 ? a : a * b))
#undef PANGUC_SIM_SCALAR

// dst = dst + src * scalar (dst may be wider than src, e.g. float += half).
template <typename T, typename U>
inline void Axpy(const LocalTensor<T>& dst, const LocalTensor<U>& src, const U scalarValue, const int32_t& calCount,
                 SrcLoc loc = SrcLoc::Here()) {
    sim::VecOperand(src, calCount, loc, "Axpy", "src", true);
    sim::VecOperand(dst, calCount, loc, "Axpy", "dst", true);
    panguc_sim::timing::Vec(uint64_t(calCount) * std::max(sizeof(T), sizeof(U)));
    uint8_t* d = sim::VPtr(dst);
    const uint8_t* s = sim::VPtr(src);
    const float k = static_cast<float>(scalarValue);
    for (int32_t i = 0; i < calCount; ++i) {
        const float v = static_cast<float>(panguc_sim::Ld<T>(d + i * sizeof(T))) +
                        static_cast<float>(panguc_sim::Ld<U>(s + i * sizeof(U))) * k;
        panguc_sim::St<T>(d + i * sizeof(T), T(v));
    }
}

// ---------------------------------------------------------------------------
// Duplicate
// ---------------------------------------------------------------------------
template <typename T>
inline void Duplicate(const LocalTensor<T>& dst, const T& scalarValue, const int32_t& calCount, SrcLoc loc = SrcLoc::Here()) {
    sim::VecOperand(dst, calCount, loc, "Duplicate", "dst", false);
    panguc_sim::timing::Vec(uint64_t(calCount) * sizeof(T));
    uint8_t* d = sim::VPtr(dst);
    for (int32_t i = 0; i < calCount; ++i) panguc_sim::St<T>(d + i * sizeof(T), scalarValue);
    panguc_sim::MarkInit(panguc_sim::Mem::UB, dst.sim_addr_, uint64_t(calCount) * sizeof(T));
}
template <typename T, bool isSetMask = true>
inline void Duplicate(const LocalTensor<T>& dst, const T& scalarValue, uint64_t mask, sim::RepeatTimes repeatTimes,
                      const uint16_t dstBlockStride, const uint8_t dstRepeatStride, SrcLoc loc = SrcLoc::Here()) {
    const auto b = sim::Calc<T>::In(scalarValue);
    sim::RepeatOp<T, 0>("Duplicate", loc, dst, sim::Opnd(dst, dstBlockStride, dstRepeatStride, "dst"), nullptr,
                        sim::Operand{}, nullptr, sim::Operand{}, sim::ContMask(mask), repeatTimes.v,
                        [b](auto, auto) { return b; });
}
template <typename T, bool isSetMask = true>
inline void Duplicate(const LocalTensor<T>& dst, const T& scalarValue, const uint64_t mask[], sim::RepeatTimes repeatTimes,
                      const uint16_t dstBlockStride, const uint8_t dstRepeatStride, SrcLoc loc = SrcLoc::Here()) {
    const auto b = sim::Calc<T>::In(scalarValue);
    sim::RepeatOp<T, 0>("Duplicate", loc, dst, sim::Opnd(dst, dstBlockStride, dstRepeatStride, "dst"), nullptr,
                        sim::Operand{}, nullptr, sim::Operand{}, sim::BitMask(mask), repeatTimes.v,
                        [b](auto, auto) { return b; });
}

// ---------------------------------------------------------------------------
// Cast
// ---------------------------------------------------------------------------
namespace sim {
inline panguc_sim::fp::Rnd ToRnd(RoundMode m) {
    using panguc_sim::fp::Rnd;
    switch (m) {
        case RoundMode::CAST_FLOOR: return Rnd::FLOOR;
        case RoundMode::CAST_CEIL: return Rnd::CEIL;
        case RoundMode::CAST_ROUND: return Rnd::ROUND;
        case RoundMode::CAST_TRUNC: return Rnd::TRUNC;
        case RoundMode::CAST_ODD: return Rnd::ODD;
        default: return Rnd::RINT;  // CAST_NONE, CAST_RINT
    }
}
}  // namespace sim

namespace sim {
inline const char* RoundModeName(RoundMode m) {
    switch (m) {
        case RoundMode::CAST_NONE: return "CAST_NONE";
        case RoundMode::CAST_RINT: return "CAST_RINT";
        case RoundMode::CAST_FLOOR: return "CAST_FLOOR";
        case RoundMode::CAST_CEIL: return "CAST_CEIL";
        case RoundMode::CAST_ROUND: return "CAST_ROUND";
        case RoundMode::CAST_TRUNC: return "CAST_TRUNC";
        case RoundMode::CAST_ODD: return "CAST_ODD";
    }
    return "?";
}
// The per-chip table of round modes a vector Cast supports for the float
// conversions kernels use (the Cast documentation's table). A mode outside
// it compiles on the device but produces garbage, so it is a fault here.
// Pairs not listed are not checked.
template <typename D, typename S> inline bool CastModeSupported(RoundMode m, bool* listed) {
    using R = RoundMode;
    *listed = true;
    if constexpr (std::is_same<D, float>::value && (std::is_same<S, half>::value || std::is_same<S, bfloat16_t>::value)) {
        return m == R::CAST_NONE;  // widening is exact: no rounding to choose
    } else if constexpr (std::is_same<D, half>::value && std::is_same<S, float>::value) {
        if (PANGUC_SIM_310P) return m == R::CAST_NONE || m == R::CAST_ODD;
        return true;  // 910B: every mode
    } else if constexpr (std::is_same<D, bfloat16_t>::value && std::is_same<S, float>::value) {
        return m == R::CAST_RINT || m == R::CAST_FLOOR || m == R::CAST_CEIL || m == R::CAST_ROUND ||
               m == R::CAST_TRUNC;
    } else {
        *listed = false;
        return true;
    }
}
}  // namespace sim

template <typename T, typename U>
inline void Cast(const LocalTensor<T>& dst, const LocalTensor<U>& src, const RoundMode& round_mode,
                 const uint32_t calCount, SrcLoc loc = SrcLoc::Here()) {
    bool listed = false;
    if (!sim::CastModeSupported<T, U>(round_mode, &listed)) {
        panguc_sim::Fail(loc, panguc_sim::Str("Cast ", panguc_sim::TypeName<U>(), " -> ", panguc_sim::TypeName<T>(),
                                              " with unsupported round mode ", sim::RoundModeName(round_mode), " on ",
                                              panguc_sim::SocName(),
                                              " (the device computes garbage; see the per-chip Cast table)"));
    }
    sim::VecOperand(src, calCount, loc, "Cast", "src", true);
    sim::VecOperand(dst, calCount, loc, "Cast", "dst", false);
    panguc_sim::timing::Vec(uint64_t(calCount) * std::max(sizeof(T), sizeof(U)));
    const auto r = sim::ToRnd(round_mode);
    uint8_t* d = sim::VPtr(dst);
    const uint8_t* s = sim::VPtr(src);
    std::vector<T> tmp(calCount);  // src and dst may overlap (in-place narrowing casts)
    for (uint32_t i = 0; i < calCount; ++i) tmp[i] = panguc_sim::ConvertValue<T>(panguc_sim::Ld<U>(s + i * sizeof(U)), r);
    for (uint32_t i = 0; i < calCount; ++i) panguc_sim::St<T>(d + i * sizeof(T), tmp[i]);
    panguc_sim::MarkInit(panguc_sim::Mem::UB, dst.sim_addr_, uint64_t(calCount) * sizeof(T));
}

// ---------------------------------------------------------------------------
// Compare / Compares / Select. Masks are bit vectors, element i at bit i%8
// of byte i/8.
// ---------------------------------------------------------------------------
namespace sim {
template <typename C> inline bool CmpOp(CMPMODE m, C a, C b) {
    switch (m) {
        case CMPMODE::LT: return a < b;
        case CMPMODE::GT: return a > b;
        case CMPMODE::EQ: return a == b;
        case CMPMODE::LE: return a <= b;
        case CMPMODE::GE: return a >= b;
        case CMPMODE::NE: return a != b;
    }
    return false;
}
template <typename T, typename U, typename F>
inline void CompareImpl(const char* op, const LocalTensor<U>& dst, const LocalTensor<T>& src0, uint32_t count,
                        const SrcLoc& loc, F rhs, CMPMODE mode) {
    if ((uint64_t(count) * sizeof(T)) % 256 != 0) {
        Fail(loc, Str(op, ": count*sizeof(T) = ", uint64_t(count) * sizeof(T),
                      " bytes is not a multiple of 256 bytes (one repeat); pad the count"));
    }
    VecOperand(src0, count, loc, op, "src0", true);
    const uint64_t mbytes = (uint64_t(count) + 7) / 8;
    VecOperand(dst, 0, loc, op, "dst", false);
    if (mbytes > dst.GetLength()) Fail(loc, Str(op, ": mask of ", mbytes, " bytes exceeds dst of ", dst.GetLength(), " bytes"));
    timing::Vec(uint64_t(count) * sizeof(T));
    uint8_t* d = VPtr(dst);
    const uint8_t* s = VPtr(src0);
    std::memset(d, 0, mbytes);
    for (uint32_t i = 0; i < count; ++i) {
        if (CmpOp(mode, Calc<T>::In(Ld<T>(s + i * sizeof(T))), rhs(i))) d[i / 8] |= uint8_t(1u << (i % 8));
    }
    MarkInit(Mem::UB, dst.sim_addr_, mbytes);
}
}  // namespace sim

template <typename T, typename U>
inline void Compare(const LocalTensor<U>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, CMPMODE cmpMode,
                    uint32_t count, SrcLoc loc = SrcLoc::Here()) {
    sim::VecOperand(src1, count, loc, "Compare", "src1", true);
    const uint8_t* s1 = sim::VPtr(src1);
    sim::CompareImpl("Compare", dst, src0, count, loc,
                     [s1](uint32_t i) { return sim::Calc<T>::In(panguc_sim::Ld<T>(s1 + i * sizeof(T))); }, cmpMode);
}
template <typename T, typename U>
inline void Compares(const LocalTensor<U>& dst, const LocalTensor<T>& src0, const T src1Scalar, CMPMODE cmpMode,
                     uint32_t count, SrcLoc loc = SrcLoc::Here()) {
    const auto b = sim::Calc<T>::In(src1Scalar);
    sim::CompareImpl("Compares", dst, src0, count, loc, [b](uint32_t) { return b; }, cmpMode);
}

namespace sim {
template <typename T, typename U, typename F>
inline void SelectImpl(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0,
                       SELMODE mode, uint32_t count, const SrcLoc& loc, F other) {
    constexpr uint32_t per = 256 / sizeof(T);
    VecOperand(src0, count, loc, "Select", "src0", true);
    VecOperand(dst, count, loc, "Select", "dst", false);
    VecOperand(selMask, 0, loc, "Select", "selMask", false);
    const uint64_t mbytes = mode == SELMODE::VSEL_CMPMASK_SPR ? per / 8 : (uint64_t(count) + 7) / 8;
    if (mbytes > selMask.GetLength()) Fail(loc, Str("Select: selMask needs ", mbytes, " bytes but has ", selMask.GetLength()));
    CheckInit(Mem::UB, selMask.sim_addr_, mbytes, loc, "Select(selMask)");
    timing::Vec(uint64_t(count) * sizeof(T));
    const uint8_t* m = VPtr(selMask);
    const uint8_t* s = VPtr(src0);
    uint8_t* d = VPtr(dst);
    for (uint32_t i = 0; i < count; ++i) {
        // Mode 0 reuses the first repeat's mask bits for every repeat.
        const uint32_t bit = mode == SELMODE::VSEL_CMPMASK_SPR ? i % per : i;
        const bool take0 = (m[bit / 8] >> (bit % 8)) & 1u;
        St<T>(d + i * sizeof(T), take0 ? Ld<T>(s + i * sizeof(T)) : other(i));
    }
    MarkInit(Mem::UB, dst.sim_addr_, uint64_t(count) * sizeof(T));
}
}  // namespace sim

template <typename T, typename U>
inline void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0,
                   const LocalTensor<T>& src1, SELMODE selMode, uint32_t count, SrcLoc loc = SrcLoc::Here()) {
    if (selMode == SELMODE::VSEL_TENSOR_SCALAR_MODE) {
        panguc_sim::Fail(loc, "Select: VSEL_TENSOR_SCALAR_MODE takes a scalar src1, not a tensor");
    }
    sim::VecOperand(src1, count, loc, "Select", "src1", true);
    const uint8_t* s1 = sim::VPtr(src1);
    sim::SelectImpl(dst, selMask, src0, selMode, count, loc, [s1](uint32_t i) { return panguc_sim::Ld<T>(s1 + i * sizeof(T)); });
}
template <typename T, typename U>
inline void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0, T src1,
                   SELMODE selMode, uint32_t count, SrcLoc loc = SrcLoc::Here()) {
    if (selMode != SELMODE::VSEL_TENSOR_SCALAR_MODE) {
        panguc_sim::Fail(loc, "Select: a scalar src1 requires SELMODE::VSEL_TENSOR_SCALAR_MODE");
    }
    sim::SelectImpl(dst, selMask, src0, selMode, count, loc, [src1](uint32_t) { return src1; });
}

// ---------------------------------------------------------------------------
// Reductions, count form. dst[0] receives the result; ReduceMax/ReduceMin
// with calIndex also store the index of the (first) extremum in dst[1] as
// an integer bit pattern of the element width (read it with
// dst.ReinterpretCast<uint32_t>().GetValue(1) for float,
// dst.ReinterpretCast<uint16_t>().GetValue(1) for half).
// ReduceSum adds pairwise within each 256-byte repeat, then across repeats
// in order (910B) or pairwise (310P), rounding to T after every addition.
// workLocal is clobbered; it must hold at least the first-pass results.
// ---------------------------------------------------------------------------
namespace sim {
template <typename T>
inline void ReduceCheck(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work,
                        int32_t count, uint32_t perRepeatOut, uint32_t dstElems, const SrcLoc& loc) {
    if (count < 1) Fail(loc, Str(op, ": count ", count, " must be >= 1"));
    VecOperand(src, count, loc, op, "src", true);
    VecOperand(dst, dstElems, loc, op, "dst", false);
    constexpr uint32_t per = 256 / sizeof(T), epb = 32 / sizeof(T);
    const uint64_t firstRepeat = (uint64_t(count) + per - 1) / per;
    const uint64_t need = (firstRepeat * perRepeatOut + epb - 1) / epb * epb;
    VecOperand(work, 0, loc, op, "workLocal", false);
    if (work.GetSize() < need) {
        Fail(loc, Str(op, ": workLocal has ", work.GetSize(), " elements but ", need, " are needed for count ", count));
    }
    std::memset(VPtr(work), 0xFF, need * sizeof(T));
    MarkInit(Mem::UB, work.sim_addr_, need * sizeof(T));
    // One pass over the repeats, then one instruction across their results.
    timing::Vec(uint64_t(count) * sizeof(T));
    timing::VecRepeats(1);
}
template <typename T> inline float RoundT(float v) { return static_cast<float>(T(v)); }
template <typename T> inline float TreeSum(std::vector<float> v) {
    if (v.empty()) return 0.0f;
    while (v.size() > 1) {
        std::vector<float> n((v.size() + 1) / 2);
        for (size_t i = 0; i < n.size(); ++i) n[i] = RoundT<T>(v[2 * i] + (2 * i + 1 < v.size() ? v[2 * i + 1] : 0.0f));
        v.swap(n);
    }
    return v[0];
}
template <typename T>
inline void ReduceExt(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work,
                      int32_t count, bool calIndex, bool isMax, const SrcLoc& loc) {
    static_assert(panguc_sim::kIsFloatLike<T>, "ReduceMax/ReduceMin need half/float");
    ReduceCheck(op, dst, src, work, count, 2, calIndex ? 2 : 1, loc);
    const uint8_t* s = VPtr(src);
    float best = static_cast<float>(Ld<T>(s));
    uint32_t bi = 0;
    for (int32_t i = 1; i < count; ++i) {
        const float v = static_cast<float>(Ld<T>(s + i * sizeof(T)));
        if (isMax ? v > best : v < best) { best = v; bi = uint32_t(i); }
    }
    uint8_t* d = VPtr(dst);
    St<T>(d, T(best));
    MarkInit(Mem::UB, dst.sim_addr_, sizeof(T));
    if (calIndex) {
        if (sizeof(T) == 2) St<uint16_t>(d + sizeof(T), uint16_t(bi));
        else St<uint32_t>(d + sizeof(T), bi);
        MarkInit(Mem::UB, dst.sim_addr_ + sizeof(T), sizeof(T));
    }
}
}  // namespace sim

template <typename T>
inline void ReduceSum(const LocalTensor<T>& dstLocal, const LocalTensor<T>& srcLocal, const LocalTensor<T>& workLocal,
                      const int32_t count, SrcLoc loc = SrcLoc::Here()) {
    static_assert(panguc_sim::kIsFloatLike<T>, "ReduceSum needs half/float");
    sim::ReduceCheck("ReduceSum", dstLocal, srcLocal, workLocal, count, 1, 1, loc);
    constexpr int32_t per = 256 / sizeof(T);
    const uint8_t* s = sim::VPtr(srcLocal);
    std::vector<float> partial;
    for (int32_t r0 = 0; r0 < count; r0 += per) {
        std::vector<float> v(per, 0.0f);
        for (int32_t i = r0; i < std::min(count, r0 + per); ++i) v[i - r0] = static_cast<float>(panguc_sim::Ld<T>(s + i * sizeof(T)));
        partial.push_back(sim::TreeSum<T>(v));
    }
    float total;
    if (PANGUC_SIM_910B) {
        total = partial[0];
        for (size_t i = 1; i < partial.size(); ++i) total = sim::RoundT<T>(total + partial[i]);
    } else {
        total = sim::TreeSum<T>(partial);
    }
    panguc_sim::St<T>(sim::VPtr(dstLocal), T(total));
    panguc_sim::MarkInit(panguc_sim::Mem::UB, dstLocal.sim_addr_, sizeof(T));
}
template <typename T>
inline void ReduceMax(const LocalTensor<T>& dstLocal, const LocalTensor<T>& srcLocal, const LocalTensor<T>& workLocal,
                      const int32_t count, bool calIndex = 0, SrcLoc loc = SrcLoc::Here()) {
    sim::ReduceExt("ReduceMax", dstLocal, srcLocal, workLocal, count, calIndex, true, loc);
}
template <typename T>
inline void ReduceMin(const LocalTensor<T>& dstLocal, const LocalTensor<T>& srcLocal, const LocalTensor<T>& workLocal,
                      const int32_t count, bool calIndex = 0, SrcLoc loc = SrcLoc::Here()) {
    sim::ReduceExt("ReduceMin", dstLocal, srcLocal, workLocal, count, calIndex, false, loc);
}

// ---------------------------------------------------------------------------
// Advanced API (lib/): elementwise activations.
// ---------------------------------------------------------------------------
template <typename T, bool isReuseSource = false>
inline void Silu(const LocalTensor<T>& dstLocal, const LocalTensor<T>& srcLocal, uint32_t dataSize,
                 SrcLoc loc = SrcLoc::Here()) {
    static_assert(std::is_same<T, half>::value || std::is_same<T, float>::value, "Silu supports half/float");
    if (dstLocal.sim_mem_ == srcLocal.sim_mem_ && dataSize > 0 &&
        dstLocal.sim_addr_ < srcLocal.sim_addr_ + dataSize * sizeof(T) &&
        srcLocal.sim_addr_ < dstLocal.sim_addr_ + dataSize * sizeof(T)) {
        panguc_sim::Fail(loc, "Silu: source and destination must not overlap");
    }
    sim::Unary("Silu", dstLocal, srcLocal, dataSize, loc, [](float x) { return x / (1.0f + std::exp(-x)); });
}
template <typename T, bool isReuseSource = false>
inline void Sigmoid(const LocalTensor<T>& dstTensor, const LocalTensor<T>& srcTensor,
                    const LocalTensor<uint8_t>& sharedTmpBuffer, const uint32_t calCount, SrcLoc loc = SrcLoc::Here()) {
    static_assert(std::is_same<T, half>::value || std::is_same<T, float>::value, "Sigmoid supports half/float");
    sim::VecOperand(sharedTmpBuffer, 0, loc, "Sigmoid", "sharedTmpBuffer", false);
    if (sharedTmpBuffer.GetSize() == 0) panguc_sim::Fail(loc, "Sigmoid: sharedTmpBuffer is empty");
    sim::Unary("Sigmoid", dstTensor, srcTensor, calCount, loc, [](float x) { return 1.0f / (1.0f + std::exp(-x)); });
}
template <typename T, bool isReuseSource = false>
inline void Sigmoid(const LocalTensor<T>& dstTensor, const LocalTensor<T>& srcTensor, const uint32_t calCount,
                    SrcLoc loc = SrcLoc::Here()) {
    static_assert(std::is_same<T, half>::value || std::is_same<T, float>::value, "Sigmoid supports half/float");
    sim::Unary("Sigmoid", dstTensor, srcTensor, calCount, loc, [](float x) { return 1.0f / (1.0f + std::exp(-x)); });
}

// Sin / Cos (advanced math API, lib/math/sin.h and cos.h): half/float, computed
// here in float with the C library (the hardware uses a range reduction and a
// polynomial; its error for large arguments should be confirmed on a device).
#define PANGUC_SIM_TRIG(NAME, FN)                                                                                  \
    template <typename T, bool isReuseSource = false>                                                               \
    inline void NAME(const LocalTensor<T>& dstTensor, const LocalTensor<T>& srcTensor,                              \
                     const LocalTensor<uint8_t>& sharedTmpBuffer, const uint32_t calCount,                          \
                     SrcLoc loc = SrcLoc::Here()) {                                                                 \
        static_assert(std::is_same<T, half>::value || std::is_same<T, float>::value, #NAME " supports half/float"); \
        sim::VecOperand(sharedTmpBuffer, 0, loc, #NAME, "sharedTmpBuffer", false);                                  \
        if (sharedTmpBuffer.GetSize() == 0) panguc_sim::Fail(loc, #NAME ": sharedTmpBuffer is empty");              \
        sim::Unary(#NAME, dstTensor, srcTensor, calCount, loc, [](float x) { return FN(x); });                      \
    }                                                                                                               \
    template <typename T, bool isReuseSource = false>                                                               \
    inline void NAME(const LocalTensor<T>& dstTensor, const LocalTensor<T>& srcTensor, const uint32_t calCount,     \
                     SrcLoc loc = SrcLoc::Here()) {                                                                 \
        static_assert(std::is_same<T, half>::value || std::is_same<T, float>::value, #NAME " supports half/float"); \
        sim::Unary(#NAME, dstTensor, srcTensor, calCount, loc, [](float x) { return FN(x); });                      \
    }
PANGUC_SIM_TRIG(Sin, std::sin)
PANGUC_SIM_TRIG(Cos, std::cos)
#undef PANGUC_SIM_TRIG

}  // namespace AscendC

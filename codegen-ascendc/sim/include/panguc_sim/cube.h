// panguc CPU simulation of the AscendC API subset: cube unit, low-level path.
//
// Data path and layouts (fractal = 16 rows x C0 columns, C0 = 32/sizeof(T);
// 16x16 for half/bf16, 16x8 for float, 16x32 for int8):
//   GM (ND) --DataCopy(Nd2NzParams)--> A1/B1 (L1, "NZ": fractals column-major,
//            row-major inside)
//   A1 --LoadData(LoadData2DParams)--> A2 (L0A, "ZZ": fractals row-major over
//            (m-block, k-block), row-major inside)
//   B1 --LoadData--> B2 (L0B, "ZN": fractals row-major over (k-block,
//            n-block), column-major inside, i.e. each fractal stores [n][k])
//   Mmad(C (CO1/L0C), A2, B2, MmadParams{m, n, k}) --> C in "NZ": fractal
//            (m-block mb, n-block nb) at (nb*ceil(m/16) + mb)*256 elements,
//            16x16 row-major inside.
//   910B: Fixpipe(GM, CO1, FixpipeParamsV220) converts NZ to ND (+ optional
//            float->half/bf16 and ReLU). 310P: DataCopy CO1->CO2 (UB) with
//            DataCopyEnhancedParams{BLOCK_MODE_MATRIX}, then vector code.
// LoadData moves whole 512-byte fractals: repeat i copies source fractal
// startIndex + i*srcStride to destination fractal i*(1 + dstGap); with
// ifTranspose (16-bit types only) each 16x16 fractal is transposed, which is
// how a K x N B matrix in NZ becomes ZN. A weight stored N x K (row-major,
// as HF Linear weights are) copied with Nd2Nz is already ZN fractal-wise and
// loads without transpose for every type.
// Mmad computes exactly m x n x k (padding rows/columns are never read); on
// hardware keep K padding zero (Nd2Nz zero-fills each row's last 32 bytes).
#pragma once

#include "panguc_sim/data_copy.h"

// Fixpipe quantisation modes: a global enum in CANN.
enum QuantMode_t { NoQuant = 0, F322F16, F322BF16, DEQF16, VDEQF16, QF322B8_PRE, VQF322B8_PRE, REQ8, VREQ8 };

namespace AscendC {

using ::QuantMode_t;

struct LoadData2DParams {
    LoadData2DParams() {}
    LoadData2DParams(const uint16_t startIndexIn, const uint8_t repeatTimesIn, const uint16_t srcStrideIn,
                     const uint8_t sidIn, const uint16_t dstGapIn, const bool ifTransposeIn, const uint8_t addrModeIn)
        : startIndex(startIndexIn), repeatTimes(repeatTimesIn), srcStride(srcStrideIn), sid(sidIn), dstGap(dstGapIn),
          ifTranspose(ifTransposeIn), addrMode(addrModeIn) {}
    uint16_t startIndex = 0;  // first source fractal (512-byte units)
    uint8_t repeatTimes = 0;  // fractals to move, [1, 255]
    uint16_t srcStride = 0;   // source fractals between repeats
    uint8_t sid = 0;
    uint16_t dstGap = 0;      // destination fractals skipped between repeats
    bool ifTranspose = false;
    uint8_t addrMode = 0;
};

struct MmadParams {
    MmadParams() {}
    MmadParams(const uint16_t mIn, const uint16_t nIn, const uint16_t kIn, const bool isBiasIn = false,
               const int32_t fmOffsetIn = 0, const bool enSsparseIn = false, const bool enWinogradAIn = false,
               const bool enWinogradBIn = false)
        : m(mIn), n(nIn), k(kIn), isBias(isBiasIn), fmOffset(fmOffsetIn), enSsparse(enSsparseIn),
          enWinogradA(enWinogradAIn), enWinogradB(enWinogradBIn) {}
    uint16_t m = 0;
    uint16_t n = 0;
    uint16_t k = 0;
    bool isBias = false;  // deprecated: true = accumulate into C
    int32_t fmOffset = 0;
    bool enSsparse = false;
    bool enWinogradA = false;
    bool enWinogradB = false;
    uint8_t unitFlag = 0;
    bool kDirectionAlign = false;
    bool cmatrixSource = false;   // true: initial C from the bias table (unsupported)
    bool cmatrixInitVal = true;   // true: C = A*B; false: C += A*B
};

template <typename T> struct InitConstValueParams {
    InitConstValueParams() {}
    InitConstValueParams(const uint16_t repeatTimesIn, const uint16_t blockNumIn, const uint16_t dstGapIn, const T initValueIn)
        : repeatTimes(repeatTimesIn), blockNum(blockNumIn), dstGap(dstGapIn), initValue(initValueIn) {}
    uint16_t repeatTimes = 0;
    uint16_t blockNum = 0;  // 32-byte blocks per repeat
    uint16_t dstGap = 0;    // 32-byte blocks skipped between repeats
    T initValue = T(0);
};

enum class CO2Layout : uint8_t { NZ = 0, ROW_MAJOR, COLUMN_MAJOR };
struct FixpipeConfig {
    CO2Layout format;
};
constexpr FixpipeConfig CFG_NZ = {CO2Layout::NZ};
constexpr FixpipeConfig CFG_ROW_MAJOR = {CO2Layout::ROW_MAJOR};

struct FixpipeParamsV220 {
    FixpipeParamsV220() {}
    FixpipeParamsV220(const uint16_t nSizeIn, const uint16_t mSizeIn, const uint16_t srcStrideIn,
                      const uint32_t dstStrideIn, const bool reluEnIn)
        : nSize(nSizeIn), mSize(mSizeIn), srcStride(srcStrideIn), dstStride(dstStrideIn), reluEn(reluEnIn) {}
    uint16_t nSize = 0;      // columns to move
    uint16_t mSize = 0;      // rows to move
    uint16_t srcStride = 0;  // rows of one NZ column block in L0C (>= mSize, usually ceil16(m))
    uint32_t dstStride = 0;  // GM row stride in elements
    QuantMode_t quantPre = QuantMode_t::NoQuant;
    uint64_t deqScalar = 0;
    uint16_t ndNum = 1;
    uint16_t srcNdStride = 0;  // 16x16-fractal units
    uint16_t dstNdStride = 0;  // elements
    bool reluEn = false;
    uint8_t unitFlag = 0;
    bool isChannelSplit = false;
};

// ---- InitConstValue: fill L1/L0A/L0B with a constant -------------------------
template <typename T>
inline void InitConstValue(const LocalTensor<T>& dst, const InitConstValueParams<T>& p, SrcLoc loc = SrcLoc::Here()) {
    using namespace panguc_sim;
    // Modelled as the pipe that normally fills the memory: MTE2 for L1, MTE1 for L0A/L0B.
    OnPipe pipe(dst.sim_mem_ == Mem::L1 ? Pipe::MTE2 : Pipe::MTE1);
    sim::CheckLocal(dst, loc, "InitConstValue", "destination", 32);
    if (dst.sim_mem_ != Mem::L1 && dst.sim_mem_ != Mem::L0A && dst.sim_mem_ != Mem::L0B) {
        Fail(loc, Str("InitConstValue: destination must be A1/B1/A2/B2, got TPosition::", PosName(dst.sim_pos_)));
    }
    timing::Local(ctx().curPipe, uint64_t(p.repeatTimes) * p.blockNum * 32);
    for (uint32_t r = 0; r < p.repeatTimes; ++r) {
        const uint64_t off = uint64_t(r) * (uint64_t(p.blockNum) + p.dstGap) * 32;
        const uint64_t bytes = uint64_t(p.blockNum) * 32;
        sim::CheckLocalBytes(dst, off, bytes, loc, "InitConstValue", "destination");
        uint8_t* d = sim::LocalPtr(dst, off);
        for (uint64_t i = 0; i < bytes / sizeof(T); ++i) St<T>(d + i * sizeof(T), p.initValue);
        MarkInit(dst.sim_mem_, dst.sim_addr_ + off, bytes);
    }
}

// ---- LoadData (2D): A1 -> A2, B1 -> B2 --------------------------------------
template <typename T>
inline void LoadData(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LoadData2DParams& p,
                     SrcLoc loc = SrcLoc::Here()) {
    using namespace panguc_sim;
    OnPipe mte1(Pipe::MTE1);
    sim::CheckLocal(src, loc, "LoadData", "source", 32);
    const bool aPath = src.sim_pos_ == TPosition::A1 && dst.sim_pos_ == TPosition::A2;
    const bool bPath = src.sim_pos_ == TPosition::B1 && dst.sim_pos_ == TPosition::B2;
    if (!aPath && !bPath) {
        Fail(loc, Str("LoadData: ", PosName(src.sim_pos_), "->", PosName(dst.sim_pos_),
                      " is not supported (use A1->A2 or B1->B2)"));
    }
    sim::CheckLocal(dst, loc, "LoadData", "destination", 512);
    if (p.repeatTimes == 0) Fail(loc, "LoadData: repeatTimes is 0 (nothing would be loaded)");
    if (p.ifTranspose && sizeof(T) != 2) {
        Fail(loc, Str("LoadData: ifTranspose is only supported for 16-bit types, not ", TypeName<T>(),
                      " (store the matrix transposed in GM instead)"));
    }
    timing::Local(Pipe::MTE1, uint64_t(p.repeatTimes) * 512);
    for (uint32_t i = 0; i < p.repeatTimes; ++i) {
        const uint64_t s = (uint64_t(p.startIndex) + uint64_t(i) * p.srcStride) * 512;
        const uint64_t d = uint64_t(i) * (1 + uint64_t(p.dstGap)) * 512;
        sim::CheckLocalBytes(src, s, 512, loc, "LoadData", "source");
        sim::CheckLocalBytes(dst, d, 512, loc, "LoadData", "destination");
        if (!p.ifTranspose) {
            sim::SegLocalToLocal(dst, d, src, s, 512, loc, "LoadData");
        } else {
            CheckPipeOrder(src.sim_mem_, src.sim_addr_ + s, 512, loc, "LoadData");
            MarkWriter(dst.sim_mem_, dst.sim_addr_ + d, 512);
            const uint8_t* sp = sim::LocalPtr(src, s);
            uint8_t* dp = sim::LocalPtr(dst, d);
            const uint8_t* si = ctx().init[static_cast<int>(src.sim_mem_)].data() + src.sim_addr_ + s;
            uint8_t* di = ctx().init[static_cast<int>(dst.sim_mem_)].data() + dst.sim_addr_ + d;
            for (int r = 0; r < 16; ++r) {
                for (int c = 0; c < 16; ++c) {
                    std::memcpy(dp + (c * 16 + r) * 2, sp + (r * 16 + c) * 2, 2);
                    std::memcpy(di + (c * 16 + r) * 2, si + (r * 16 + c) * 2, 2);
                }
            }
        }
    }
}

// ---- Mmad -------------------------------------------------------------------
template <typename T, typename U, typename S>
inline void Mmad(const LocalTensor<T>& dst, const LocalTensor<U>& fm, const LocalTensor<S>& filter,
                 const MmadParams& p, SrcLoc loc = SrcLoc::Here()) {
    using namespace panguc_sim;
    OnPipe onM(Pipe::M);
    constexpr bool f16 = std::is_same<U, half>::value && std::is_same<S, half>::value && std::is_same<T, float>::value;
    constexpr bool bf16 = std::is_same<U, bfloat16_t>::value && std::is_same<S, bfloat16_t>::value && std::is_same<T, float>::value;
    constexpr bool f32 = std::is_same<U, float>::value && std::is_same<S, float>::value && std::is_same<T, float>::value;
    constexpr bool i8 = std::is_same<U, int8_t>::value && std::is_same<S, int8_t>::value && std::is_same<T, int32_t>::value;
    static_assert(f16 || bf16 || f32 || i8,
                  "Mmad supports half x half -> float, bfloat16_t x bfloat16_t -> float, float x float -> float, "
                  "int8_t x int8_t -> int32_t");
    if (PANGUC_SIM_310P && (bf16 || f32)) {
        Fail(loc, Str("Mmad: ", TypeName<U>(), " x ", TypeName<S>(), " is not supported on 310P (half and int8 only)"));
    }
    if (fm.sim_pos_ != TPosition::A2) Fail(loc, Str("Mmad: left matrix must be in A2 (L0A), got TPosition::", PosName(fm.sim_pos_)));
    if (filter.sim_pos_ != TPosition::B2) Fail(loc, Str("Mmad: right matrix must be in B2 (L0B), got TPosition::", PosName(filter.sim_pos_)));
    if (dst.sim_pos_ != TPosition::CO1) Fail(loc, Str("Mmad: result must be in CO1 (L0C), got TPosition::", PosName(dst.sim_pos_)));
    sim::CheckLocal(fm, loc, "Mmad", "left matrix", 512);
    sim::CheckLocal(filter, loc, "Mmad", "right matrix", 512);
    sim::CheckLocal(dst, loc, "Mmad", "result", 1024);
    if (p.m > 4095 || p.n > 4095 || p.k > 4095) {
        Fail(loc, Str("Mmad: m=", p.m, " n=", p.n, " k=", p.k, ": each must be <= 4095 (exceeds 4095)"));
    }
    if (p.m == 0 || p.n == 0 || p.k == 0) Fail(loc, Str("Mmad: m=", p.m, " n=", p.n, " k=", p.k, ": each must be >= 1"));
    if (p.cmatrixSource) Fail(loc, "Mmad: cmatrixSource (initial C from the bias table) is not supported by the simulation");
    const bool accumulate = p.isBias || !p.cmatrixInitVal;
    timing::Cube(p.m, p.n, p.k, sizeof(U));
    constexpr uint32_t C0 = 32 / sizeof(U);
    const uint32_t m = p.m, n = p.n, k = p.k;
    const uint32_t mB = (m + 15) / 16, nB = (n + 15) / 16, kB = (k + C0 - 1) / C0;
    if (uint64_t(mB) * kB * 16 * C0 > fm.GetSize()) {
        Fail(loc, Str("Mmad: left matrix needs ", uint64_t(mB) * kB * 16 * C0, " elements (", mB, "x", kB,
                      " fractals) but the A2 tensor has ", fm.GetSize()));
    }
    if (uint64_t(kB) * nB * 16 * C0 > filter.GetSize()) {
        Fail(loc, Str("Mmad: right matrix needs ", uint64_t(kB) * nB * 16 * C0, " elements (", kB, "x", nB,
                      " fractals) but the B2 tensor has ", filter.GetSize()));
    }
    if (uint64_t(mB) * nB * 256 > dst.GetSize()) {
        Fail(loc, Str("Mmad: result needs ", uint64_t(mB) * nB * 256, " elements but the CO1 tensor has ", dst.GetSize()));
    }
    if (timingParams().skipCompute) {  // timing only: the result is not computed
        MarkInit(dst.sim_mem_, dst.sim_addr_, uint64_t(mB) * nB * 256 * sizeof(T));
        return;
    }
    auto aIdx = [&](uint32_t i, uint32_t kk) {
        return (uint64_t(i / 16) * kB + kk / C0) * 16 * C0 + (i % 16) * C0 + kk % C0;
    };
    auto bIdx = [&](uint32_t kk, uint32_t j) {
        return (uint64_t(kk / C0) * nB + j / 16) * 16 * C0 + (j % 16) * C0 + kk % C0;
    };
    auto cIdx = [&](uint32_t i, uint32_t j) { return (uint64_t(j / 16) * mB + i / 16) * 256 + (i % 16) * 16 + j % 16; };
    const uint8_t* A = sim::LocalPtr(fm);
    const uint8_t* B = sim::LocalPtr(filter);
    uint8_t* Cp = sim::LocalPtr(dst);
    for (uint32_t i = 0; i < m; ++i)
        for (uint32_t kk = 0; kk < k; ++kk) CheckInit(fm.sim_mem_, fm.sim_addr_ + aIdx(i, kk) * sizeof(U), sizeof(U), loc, "Mmad(left matrix)");
    for (uint32_t kk = 0; kk < k; ++kk)
        for (uint32_t j = 0; j < n; ++j) CheckInit(filter.sim_mem_, filter.sim_addr_ + bIdx(kk, j) * sizeof(S), sizeof(S), loc, "Mmad(right matrix)");
    using Acc = std::conditional_t<std::is_same<T, int32_t>::value, int32_t, float>;
    std::vector<Acc> a(uint64_t(m) * k), b(uint64_t(k) * n);
    for (uint32_t i = 0; i < m; ++i)
        for (uint32_t kk = 0; kk < k; ++kk) a[uint64_t(i) * k + kk] = static_cast<Acc>(Ld<U>(A + aIdx(i, kk) * sizeof(U)));
    for (uint32_t kk = 0; kk < k; ++kk)
        for (uint32_t j = 0; j < n; ++j) b[uint64_t(kk) * n + j] = static_cast<Acc>(Ld<S>(B + bIdx(kk, j) * sizeof(S)));
    for (uint32_t i = 0; i < m; ++i) {
        for (uint32_t j = 0; j < n; ++j) {
            const uint64_t ci = cIdx(i, j);
            Acc acc = 0;
            if (accumulate) {
                CheckInit(dst.sim_mem_, dst.sim_addr_ + ci * sizeof(T), sizeof(T), loc,
                          "Mmad(accumulate into C; cmatrixInitVal=false needs an earlier Mmad)");
                acc = static_cast<Acc>(Ld<T>(Cp + ci * sizeof(T)));
            }
            for (uint32_t kk = 0; kk < k; ++kk) acc += a[uint64_t(i) * k + kk] * b[uint64_t(kk) * n + j];
            St<T>(Cp + ci * sizeof(T), static_cast<T>(acc));
            MarkInit(dst.sim_mem_, dst.sim_addr_ + ci * sizeof(T), sizeof(T));
        }
    }
}

// ---- Fixpipe (910B): CO1 -> GM ------------------------------------------------
// Row r, column c of ND matrix `nd` comes from L0C element
//   nd*srcNdStride*256 + (c/16)*srcStride*16 + r*16 + c%16
// and goes to GM element nd*dstNdStride + r*dstStride + c.
template <typename T, typename U, const FixpipeConfig& config = CFG_ROW_MAJOR>
inline void Fixpipe(const GlobalTensor<T>& dst, const LocalTensor<U>& src, const FixpipeParamsV220& p,
                    SrcLoc loc = SrcLoc::Here()) {
    using namespace panguc_sim;
    OnPipe fix(Pipe::FIX);
    if (PANGUC_SIM_310P) {
        Fail(loc, "Fixpipe is not available on 310P: copy L0C to UB with DataCopy(CO2 tensor, CO1 tensor, "
                  "DataCopyParams, DataCopyEnhancedParams{BLOCK_MODE_MATRIX}) and then to GM");
    }
    if (config.format != CO2Layout::ROW_MAJOR) Fail(loc, "Fixpipe: only CFG_ROW_MAJOR (NZ->ND) is supported by the simulation");
    if (src.sim_pos_ != TPosition::CO1) Fail(loc, Str("Fixpipe: source must be CO1 (L0C), got TPosition::", PosName(src.sim_pos_)));
    sim::CheckLocal(src, loc, "Fixpipe", "source", 64);
    if (p.mSize == 0 || p.nSize == 0) Fail(loc, "Fixpipe: mSize and nSize must be >= 1");
    if (p.srcStride < p.mSize) Fail(loc, Str("Fixpipe: srcStride ", p.srcStride, " is smaller than mSize ", p.mSize));
    if (p.ndNum == 0) Fail(loc, "Fixpipe: ndNum must be >= 1");
    const QuantMode_t q = p.quantPre;
    const bool okNoQuant = q == QuantMode_t::NoQuant && std::is_same<T, U>::value;
    const bool okF16 = q == QuantMode_t::F322F16 && std::is_same<U, float>::value && std::is_same<T, half>::value;
    const bool okBf16 = q == QuantMode_t::F322BF16 && std::is_same<U, float>::value && std::is_same<T, bfloat16_t>::value;
    if (!okNoQuant && !okF16 && !okBf16) {
        Fail(loc, Str("Fixpipe: quantPre=", int(q), " with ", TypeName<U>(), "->", TypeName<T>(),
                      " is not supported (NoQuant same type, F322F16 float->half, F322BF16 float->bfloat16_t)"));
    }
    timing::Fix(uint64_t(p.ndNum) * p.mSize * ((p.nSize + 15) / 16 * 16) * sizeof(U),
                uint64_t(p.ndNum) * p.mSize * p.nSize * sizeof(T));
    const uint8_t* sp = sim::LocalPtr(src);
    std::vector<uint8_t> row(uint64_t(p.nSize) * sizeof(T));
    for (uint32_t nd = 0; nd < p.ndNum; ++nd) {
        for (uint32_t r = 0; r < p.mSize; ++r) {
            for (uint32_t c = 0; c < p.nSize; ++c) {
                const uint64_t si = uint64_t(nd) * p.srcNdStride * 256 + uint64_t(c / 16) * p.srcStride * 16 + r * 16 + c % 16;
                sim::CheckLocalBytes(src, si * sizeof(U), sizeof(U), loc, "Fixpipe", "source");
                CheckInit(src.sim_mem_, src.sim_addr_ + si * sizeof(U), sizeof(U), loc, "Fixpipe");
                U v = Ld<U>(sp + si * sizeof(U));
                if (p.reluEn && v < U(0)) v = U(0);
                St<T>(row.data() + uint64_t(c) * sizeof(T), ConvertValue<T>(v, fp::Rnd::RINT));
            }
            const uint64_t doff = (uint64_t(nd) * p.dstNdStride + uint64_t(r) * p.dstStride) * sizeof(T);
            sim::GmStore(dst, doff, row.data(), row.size(), loc, "Fixpipe");
        }
    }
}

}  // namespace AscendC

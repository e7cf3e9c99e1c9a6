// panguc CPU simulation of the AscendC API subset: data movement
// (DataCopy in its count / DataCopyParams / Nd2NzParams / enhanced forms,
// DataCopyPad, atomic-add mode for GM stores).
#pragma once

#include "panguc_sim/tensor.h"

namespace AscendC {

struct DataCopyParams {
    DataCopyParams() {}
    DataCopyParams(const uint16_t count, const uint16_t len, const uint16_t srcStrideIn, const uint16_t dstStrideIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn) {}
    uint16_t blockCount = 1;  // number of blocks, [1, 4095]
    uint16_t blockLen = 0;    // DataCopy: 32-byte units; DataCopyPad: bytes
    uint16_t srcStride = 0;   // gap between blocks on the source side
    uint16_t dstStride = 0;   // gap between blocks on the destination side
};

struct DataCopyExtParams {
    DataCopyExtParams() {}
    DataCopyExtParams(const uint16_t count, const uint32_t len, const uint32_t srcStrideIn, const uint32_t dstStrideIn,
                      const uint32_t rsvIn = 0)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn) {}
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;   // bytes
    uint32_t srcStride = 0;  // GM side: bytes; UB side: 32-byte units
    uint32_t dstStride = 0;  // GM side: bytes; UB side: 32-byte units
    uint32_t rsv = 0;
};

template <typename T> struct DataCopyPadExtParams {
    DataCopyPadExtParams() {}
    DataCopyPadExtParams(const bool isPadIn, const uint8_t leftPadIn, const uint8_t rightPadIn, T padValue)
        : isPad(isPadIn), leftPadding(leftPadIn), rightPadding(rightPadIn), paddingValue(padValue) {}
    bool isPad = false;
    uint8_t leftPadding = 0;   // elements
    uint8_t rightPadding = 0;  // elements
    T paddingValue = T(0);
};

struct DataCopyPadParams {
    DataCopyPadParams() {}
    DataCopyPadParams(const bool isPadIn, const uint8_t leftPadIn, const uint8_t rightPadIn, const uint64_t padValue)
        : isPad(isPadIn), leftPadding(leftPadIn), rightPadding(rightPadIn), paddingValue(padValue) {}
    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    uint64_t paddingValue = 0;
};

struct Nd2NzParams {
    Nd2NzParams() {}
    Nd2NzParams(const uint16_t ndNumIn, const uint16_t nValueIn, const uint16_t dValueIn,
                const uint16_t srcNdMatrixStrideIn, const uint16_t srcDValueIn, const uint16_t dstNzC0StrideIn,
                const uint16_t dstNzNStrideIn, const uint16_t dstNzMatrixStrideIn)
        : ndNum(ndNumIn), nValue(nValueIn), dValue(dValueIn), srcNdMatrixStride(srcNdMatrixStrideIn),
          srcDValue(srcDValueIn), dstNzC0Stride(dstNzC0StrideIn), dstNzNStride(dstNzNStrideIn),
          dstNzMatrixStride(dstNzMatrixStrideIn) {}
    uint16_t ndNum = 1;
    uint16_t nValue = 0;             // rows
    uint16_t dValue = 0;             // columns (elements)
    uint16_t srcNdMatrixStride = 0;  // elements between ND matrices in GM
    uint16_t srcDValue = 0;          // GM row stride (elements)
    uint16_t dstNzC0Stride = 0;      // 32-byte units between column blocks in L1
    uint16_t dstNzNStride = 0;       // 32-byte units between rows in L1
    uint16_t dstNzMatrixStride = 0;  // elements between NZ matrices in L1
};

enum class BlockMode : uint8_t { BLOCK_MODE_NORMAL = 0, BLOCK_MODE_MATRIX, BLOCK_MODE_VECTOR, BLOCK_MODE_SMALL_CHANNEL, BLOCK_MODE_DEPTHWISE };
enum class DeqScale : uint8_t { DEQ_NONE = 0, DEQ, VDEQ, DEQ8, VDEQ8, DEQ16, VDEQ16 };

struct DataCopyEnhancedParams {
    BlockMode blockMode = BlockMode::BLOCK_MODE_NORMAL;
    DeqScale deqScale = DeqScale::DEQ_NONE;
    uint64_t deqValue = 0;
    uint8_t sidStoreMode = 0;
    bool isRelu = false;
    uint8_t padMode = 0;
    uint64_t padValue = 0;
    uint64_t deqTensorAddr = 0;
};

namespace sim {

template <typename T> inline uint8_t* LocalPtr(const LocalTensor<T>& t, uint64_t byteOff = 0) {
    return panguc_sim::MemBase(t.sim_mem_) + t.sim_addr_ + byteOff;
}

template <typename T>
inline void CheckLocal(const LocalTensor<T>& t, const SrcLoc& loc, const char* op, const char* role, uint32_t align) {
    t.SimCheckLive(loc, op);
    if (t.sim_addr_ % align) {
        Fail(loc, Str(op, ": misaligned ", MemName(t.sim_mem_), " address ", t.sim_addr_, " for ", role,
                      " (TPosition::", PosName(t.sim_pos_), "): must be ", align, "-byte aligned"));
    }
}

template <typename T>
inline void CheckLocalBytes(const LocalTensor<T>& t, uint64_t off, uint64_t bytes, const SrcLoc& loc, const char* op,
                            const char* role) {
    if (off + bytes > t.GetLength()) {
        Fail(loc, Str(op, ": ", role, " access to bytes [", off, ", ", off + bytes, ") exceeds the ", t.GetLength(),
                      "-byte tensor (", t.GetSize(), " x ", TypeName<T>(), ", TPosition::", PosName(t.sim_pos_), ")"));
    }
}

template <typename T>
inline void CheckGmBytes(const GlobalTensor<T>& g, uint64_t off, uint64_t bytes, const SrcLoc& loc, const char* op) {
    g.SimCheckBytes(off, bytes, loc, op);
}

template <typename T> inline void GmLoad(const GlobalTensor<T>& g, uint64_t off, uint8_t* dst, uint64_t bytes,
                                         const SrcLoc& loc, const char* op) {
    CheckGmBytes(g, off, bytes, loc, op);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(g.sim_ptr_) + off;
    GmRead(g.sim_buf_, p, bytes, loc, op);
    std::memcpy(dst, p, bytes);
}

// Every store to GM goes through here: range check, race tracking and, in
// atomic-add mode, read-modify-write accumulation.
template <typename T> inline void GmStore(const GlobalTensor<T>& g, uint64_t off, const uint8_t* src, uint64_t bytes,
                                          const SrcLoc& loc, const char* op) {
    CheckGmBytes(g, off, bytes, loc, op);
    uint8_t* p = reinterpret_cast<uint8_t*>(g.sim_ptr_) + off;
    GmBuffer* b = g.sim_buf_;
    if (!ctx().atomicAdd) {
        GmWrite(b, p, bytes, loc, op);
        std::memcpy(p, src, bytes);
        return;
    }
    if (!b->Writable()) Fail(loc, Str(op, ": atomic add to read-only ", GmDesc(b)));
    GmTouch(b, p, bytes);
    const int32_t me = static_cast<int32_t>(ctx().blockIdx);
    const uint64_t base = static_cast<uint64_t>(p - b->base);
    for (uint64_t i = 0; i < bytes && !b->writer.empty(); ++i) {
        int32_t& w = b->writer[base + i];
        const int32_t r = b->reader[base + i];
        if (w >= 0 && w != me) {
            Fail(loc, Str(op, ": cross-block write: atomic add by block ", me, " to byte ", base + i, " of ", GmDesc(b),
                          " that block ", w, " wrote without atomics"));
        }
        if (r == -2 || (r >= 0 && r != me)) {
            Fail(loc, Str(op, ": cross-block read: atomic add by block ", me, " to byte ", base + i, " of ", GmDesc(b),
                          " that another block read in the same launch"));
        }
        w = -3;  // accumulated atomically: any later plain read/write by another block is a race
    }
    const uint64_t n = bytes / sizeof(T);
    for (uint64_t i = 0; i < n; ++i) {
        const T a = Ld<T>(p + i * sizeof(T));
        const T v = Ld<T>(src + i * sizeof(T));
        if constexpr (std::is_integral<T>::value) St<T>(p + i * sizeof(T), static_cast<T>(a + v));
        else St<T>(p + i * sizeof(T), T(float(a) + float(v)));
    }
}

inline const char* Path(TPosition from, TPosition to) {
    static thread_local char buf[64];
    std::snprintf(buf, sizeof buf, "%s->%s", PosName(from), PosName(to));
    return buf;
}

inline bool GmToLocalOk(TPosition p) {
    return p == TPosition::VECIN || p == TPosition::VECOUT || p == TPosition::VECCALC || p == TPosition::A1 ||
           p == TPosition::B1 || p == TPosition::C1;
}

template <typename T> inline void CheckBytes32(uint64_t bytes, const SrcLoc& loc, const char* op, const char* what) {
    if (bytes == 0) Fail(loc, Str(op, ": ", what, " is 0 bytes"));
    if (bytes % 32 != 0) {
        Fail(loc, Str(op, ": length of ", bytes, " bytes (", bytes / sizeof(T), " x ", TypeName<T>(), ", ", what,
                      ") is not a multiple of 32 bytes; hardware silently truncates it. Use an aligned length",
                      PANGUC_SIM_910B ? " or DataCopyPad" : " (310P has no DataCopyPad)"));
    }
}

inline void CheckBlockCount(uint32_t n, const SrcLoc& loc, const char* op) {
    if (n < 1 || n > 4095) Fail(loc, Str(op, ": blockCount ", n, " is outside [1, 4095]"));
}

// One contiguous GM -> local segment.
template <typename T> inline void SegGmToLocal(const LocalTensor<T>& dst, uint64_t doff, const GlobalTensor<T>& src,
                                               uint64_t soff, uint64_t bytes, const SrcLoc& loc, const char* op) {
    OnPipe mte2(Pipe::MTE2);
    CheckLocalBytes(dst, doff, bytes, loc, op, "destination");
    timing::Gm(Pipe::MTE2, bytes);
    GmLoad(src, soff, LocalPtr(dst, doff), bytes, loc, op);
    MarkInit(dst.sim_mem_, dst.sim_addr_ + doff, bytes);
}
template <typename T> inline void SegLocalToGm(const GlobalTensor<T>& dst, uint64_t doff, const LocalTensor<T>& src,
                                               uint64_t soff, uint64_t bytes, const SrcLoc& loc, const char* op) {
    OnPipe mte3(Pipe::MTE3);
    CheckLocalBytes(src, soff, bytes, loc, op, "source");
    timing::Gm(Pipe::MTE3, bytes);
    CheckInit(src.sim_mem_, src.sim_addr_ + soff, bytes, loc, op);
    GmStore(dst, doff, LocalPtr(src, soff), bytes, loc, op);
}
template <typename T> inline void SegLocalToLocal(const LocalTensor<T>& dst, uint64_t doff, const LocalTensor<T>& src,
                                                  uint64_t soff, uint64_t bytes, const SrcLoc& loc, const char* op) {
    CheckLocalBytes(src, soff, bytes, loc, op, "source");
    CheckLocalBytes(dst, doff, bytes, loc, op, "destination");
    // UB -> UB runs on the vector pipe, UB -> L1 (310P) is an MTE3 move and
    // L1 -> L0A/L0B (LoadData) an MTE1 one.
    OnPipe pipe(dst.sim_mem_ == Mem::UB ? Pipe::V : dst.sim_mem_ == Mem::L1 ? Pipe::MTE3 : Pipe::MTE1);
    if (ctx().curPipe != Pipe::MTE1) timing::Local(ctx().curPipe, bytes);  // LoadData charges once per call
    std::memmove(LocalPtr(dst, doff), LocalPtr(src, soff), bytes);
    CopyInit(dst.sim_mem_, dst.sim_addr_ + doff, src.sim_mem_, src.sim_addr_ + soff, bytes, loc, op);
}

template <typename T> inline void CheckGmToLocal(const LocalTensor<T>& dst, const SrcLoc& loc, const char* op) {
    CheckLocal(dst, loc, op, "destination", 32);
    if (!GmToLocalOk(dst.sim_pos_)) {
        Fail(loc, Str(op, ": GM->", PosName(dst.sim_pos_), " is not a DataCopy path"));
    }
}
template <typename T> inline void CheckLocalToGm(const LocalTensor<T>& src, const SrcLoc& loc, const char* op) {
    CheckLocal(src, loc, op, "source", 32);
    if (!IsUbPos(src.sim_pos_)) {
        Fail(loc, Str(op, ": ", PosName(src.sim_pos_), "->GM is not a DataCopy path (only UB positions can be copied "
                      "to GM; L0C results use ", PANGUC_SIM_910B ? "Fixpipe" : "DataCopy CO1->CO2 first", ")"));
    }
}
template <typename T> inline void CheckLocalToLocal(const LocalTensor<T>& dst, const LocalTensor<T>& src,
                                                    const SrcLoc& loc, const char* op) {
    CheckLocal(src, loc, op, "source", 32);
    CheckLocal(dst, loc, op, "destination", 32);
    const bool ubToUb = src.sim_mem_ == panguc_sim::Mem::UB && dst.sim_mem_ == panguc_sim::Mem::UB;
    const bool ubToL1 = PANGUC_SIM_310P && src.sim_mem_ == panguc_sim::Mem::UB && dst.sim_mem_ == panguc_sim::Mem::L1;
    if (!ubToUb && !ubToL1) {
        Fail(loc, Str(op, ": ", Path(src.sim_pos_, dst.sim_pos_), " is not a supported local DataCopy path on ", SocName()));
    }
}

}  // namespace sim

template <typename T> inline void SetAtomicAdd() {
    static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value || std::is_same<T, int32_t>::value ||
                      std::is_same<T, bfloat16_t>::value,
                  "SetAtomicAdd supports float, half, bfloat16_t, int32_t");
    panguc_sim::ctx().atomicAdd = true;
}
inline void SetAtomicNone() { panguc_sim::ctx().atomicAdd = false; }

// ---- DataCopy, count form (length in elements, must be a 32-byte multiple) --
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const uint32_t calCount,
                     SrcLoc loc = SrcLoc::Here()) {
    sim::CheckGmToLocal(dst, loc, "DataCopy");
    const uint64_t bytes = uint64_t(calCount) * sizeof(T);
    sim::CheckBytes32<T>(bytes, loc, "DataCopy", sim::Path(TPosition::GM, dst.sim_pos_));
    sim::SegGmToLocal(dst, 0, src, 0, bytes, loc, "DataCopy");
}
template <typename T>
inline void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const uint32_t calCount,
                     SrcLoc loc = SrcLoc::Here()) {
    sim::CheckLocalToGm(src, loc, "DataCopy");
    const uint64_t bytes = uint64_t(calCount) * sizeof(T);
    sim::CheckBytes32<T>(bytes, loc, "DataCopy", sim::Path(src.sim_pos_, TPosition::GM));
    sim::SegLocalToGm(dst, 0, src, 0, bytes, loc, "DataCopy");
}
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, const uint32_t calCount,
                     SrcLoc loc = SrcLoc::Here()) {
    sim::CheckLocalToLocal(dst, src, loc, "DataCopy");
    const uint64_t bytes = uint64_t(calCount) * sizeof(T);
    sim::CheckBytes32<T>(bytes, loc, "DataCopy", sim::Path(src.sim_pos_, dst.sim_pos_));
    sim::SegLocalToLocal(dst, 0, src, 0, bytes, loc, "DataCopy");
}

// ---- DataCopy with DataCopyParams (blockLen and strides in 32-byte units) --
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyParams& p,
                     SrcLoc loc = SrcLoc::Here()) {
    sim::CheckGmToLocal(dst, loc, "DataCopy");
    sim::CheckBlockCount(p.blockCount, loc, "DataCopy");
    if (p.blockLen == 0) panguc_sim::Fail(loc, "DataCopy: blockLen is 0");
    const uint64_t len = uint64_t(p.blockLen) * 32;
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        sim::SegGmToLocal(dst, i * (len + uint64_t(p.dstStride) * 32), src, i * (len + uint64_t(p.srcStride) * 32), len,
                          loc, "DataCopy");
    }
}
template <typename T>
inline void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyParams& p,
                     SrcLoc loc = SrcLoc::Here()) {
    sim::CheckLocalToGm(src, loc, "DataCopy");
    sim::CheckBlockCount(p.blockCount, loc, "DataCopy");
    if (p.blockLen == 0) panguc_sim::Fail(loc, "DataCopy: blockLen is 0");
    const uint64_t len = uint64_t(p.blockLen) * 32;
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        sim::SegLocalToGm(dst, i * (len + uint64_t(p.dstStride) * 32), src, i * (len + uint64_t(p.srcStride) * 32), len,
                          loc, "DataCopy");
    }
}
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyParams& p,
                     SrcLoc loc = SrcLoc::Here()) {
    sim::CheckLocalToLocal(dst, src, loc, "DataCopy");
    sim::CheckBlockCount(p.blockCount, loc, "DataCopy");
    if (p.blockLen == 0) panguc_sim::Fail(loc, "DataCopy: blockLen is 0");
    const uint64_t len = uint64_t(p.blockLen) * 32;
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        sim::SegLocalToLocal(dst, i * (len + uint64_t(p.dstStride) * 32), src, i * (len + uint64_t(p.srcStride) * 32),
                             len, loc, "DataCopy");
    }
}

// ---- DataCopy with DataCopyEnhancedParams ----------------------------------
// The enhancement only acts on CO1 -> CO2 (L0C -> UB, 310P). There, with
// BLOCK_MODE_MATRIX, blockLen and both strides count 16x16 fractals (256
// elements of the respective side's type); float -> half converts (RINT).
// On every other path the enhanced parameters are ignored, as on hardware.
template <typename T, typename U>
inline void DataCopy(const LocalTensor<T>& dst, const LocalTensor<U>& src, const DataCopyParams& p,
                     const DataCopyEnhancedParams& e, SrcLoc loc = SrcLoc::Here()) {
    using namespace panguc_sim;
    if (src.sim_pos_ != TPosition::CO1) {
        if constexpr (std::is_same<T, U>::value) {
            DataCopy(dst, src, p, loc);
            return;
        } else {
            Fail(loc, "DataCopy with different source and destination types is only supported for CO1->CO2");
        }
    } else {
        OnPipe v(Pipe::V);  // L0C -> UB goes through the vector unit on 310P
        sim::CheckLocal(src, loc, "DataCopy", "source", 1024);
        sim::CheckLocal(dst, loc, "DataCopy", "destination", 32);
        if (dst.sim_pos_ != TPosition::CO2) Fail(loc, Str("DataCopy: CO1->", PosName(dst.sim_pos_), " is not a DataCopy path"));
        if (e.blockMode != BlockMode::BLOCK_MODE_MATRIX) {
            Fail(loc, "DataCopy CO1->CO2: only BlockMode::BLOCK_MODE_MATRIX is supported by the simulation");
        }
        constexpr bool same = std::is_same<T, U>::value;
        constexpr bool f2h = std::is_same<U, float>::value && std::is_same<T, half>::value;
        if constexpr (!same && !f2h) {
            Fail(loc, Str("DataCopy CO1->CO2: ", TypeName<U>(), "->", TypeName<T>(), " is not supported"));
        } else {
            sim::CheckBlockCount(p.blockCount, loc, "DataCopy");
            const uint64_t n = uint64_t(p.blockLen) * 256;
            timing::Fix(uint64_t(p.blockCount) * n * sizeof(U), 0);
            for (uint32_t i = 0; i < p.blockCount; ++i) {
                const uint64_t s0 = i * (uint64_t(p.blockLen) + p.srcStride) * 256;
                const uint64_t d0 = i * (uint64_t(p.blockLen) + p.dstStride) * 256;
                sim::CheckLocalBytes(src, s0 * sizeof(U), n * sizeof(U), loc, "DataCopy", "source");
                sim::CheckLocalBytes(dst, d0 * sizeof(T), n * sizeof(T), loc, "DataCopy", "destination");
                CheckPipeOrder(src.sim_mem_, src.sim_addr_ + s0 * sizeof(U), n * sizeof(U), loc, "DataCopy CO1->CO2");
                const uint8_t* sp = sim::LocalPtr(src, s0 * sizeof(U));
                uint8_t* dp = sim::LocalPtr(dst, d0 * sizeof(T));
                const uint8_t* si = ctx().init[static_cast<int>(src.sim_mem_)].data() + src.sim_addr_ + s0 * sizeof(U);
                for (uint64_t k = 0; k < n; ++k) {
                    U v = Ld<U>(sp + k * sizeof(U));
                    if (e.isRelu && float(v) < 0) v = U(0);
                    St<T>(dp + k * sizeof(T), ConvertValue<T>(v, fp::Rnd::RINT));
                    if (si[k * sizeof(U)]) MarkInit(dst.sim_mem_, dst.sim_addr_ + (d0 + k) * sizeof(T), sizeof(T));
                }
            }
        }
    }
}

// ---- DataCopy GM -> A1/B1 with ND -> NZ conversion -------------------------
// Row r, column c of ND matrix `nd` lands at element
//   nd*dstNzMatrixStride + (c / C0)*dstNzC0Stride*C0 + r*dstNzNStride*C0 + c % C0
// with C0 = 32 / sizeof(T); the last 32-byte block of each row is zero-filled
// past dValue. Rows beyond nValue are not written.
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const Nd2NzParams& p,
                     SrcLoc loc = SrcLoc::Here()) {
    using namespace panguc_sim;
    OnPipe mte2(Pipe::MTE2);
    sim::CheckLocal(dst, loc, "DataCopy(Nd2Nz)", "destination", 32);
    if (dst.sim_mem_ != Mem::L1) {
        Fail(loc, Str("DataCopy(Nd2Nz): destination must be A1/B1 (L1), got TPosition::", PosName(dst.sim_pos_)));
    }
    constexpr uint32_t C0 = 32 / sizeof(T);
    const uint32_t nblk = (uint32_t(p.dValue) + C0 - 1) / C0;
    // One burst per ND row. 310P has no ND->NZ DMA: the conversion is
    // emulated through UB (an extra vector pass and a UB->L1 move).
    for (uint32_t nd = 0; nd < p.ndNum; ++nd) {
        for (uint32_t r = 0; r < p.nValue; ++r) timing::Gm(Pipe::MTE2, uint64_t(p.dValue) * sizeof(T));
    }
    if (PANGUC_SIM_310P) {
        const uint64_t total = uint64_t(p.ndNum) * p.nValue * nblk * 32;
        timing::Vec(total);
        timing::Local(Pipe::MTE3, total);
    }
    for (uint32_t nd = 0; nd < p.ndNum; ++nd) {
        for (uint32_t r = 0; r < p.nValue; ++r) {
            const uint64_t srow = uint64_t(nd) * p.srcNdMatrixStride + uint64_t(r) * p.srcDValue;
            for (uint32_t k = 0; k < nblk; ++k) {
                const uint32_t cols = std::min<uint32_t>(C0, p.dValue - k * C0);
                const uint64_t delem = uint64_t(nd) * p.dstNzMatrixStride + uint64_t(k) * p.dstNzC0Stride * C0 +
                                       uint64_t(r) * p.dstNzNStride * C0;
                sim::CheckLocalBytes(dst, delem * sizeof(T), 32, loc, "DataCopy(Nd2Nz)", "destination");
                uint8_t* d = sim::LocalPtr(dst, delem * sizeof(T));
                std::memset(d, 0, 32);
                sim::GmLoad(src, (srow + uint64_t(k) * C0) * sizeof(T), d, uint64_t(cols) * sizeof(T), loc, "DataCopy(Nd2Nz)");
                MarkInit(dst.sim_mem_, dst.sim_addr_ + delem * sizeof(T), 32);
            }
        }
    }
}

// ---- DataCopyPad (910B only): byte-granular copies ------------------------
namespace sim {
inline void CheckPadAvailable(const SrcLoc& loc) {
    if (PANGUC_SIM_310P) {
        Fail(loc, "DataCopyPad is not available on 310P: use DataCopy with a 32-byte-multiple length "
                  "(pad the buffer, or copy an aligned superset and mask)");
    }
}
// GM -> UB: row i reads blockLen bytes at GM offset i*(blockLen + srcStride);
// in UB it occupies [leftPad | data | rightPad] rounded up to 32 bytes, and
// rows are dstStride*32 bytes apart beyond that.
template <typename T, typename P>
inline void PadIn(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const P& p, bool isPad, uint32_t left,
                  uint32_t right, T padValue, const SrcLoc& loc) {
    OnPipe mte2(Pipe::MTE2);
    CheckPadAvailable(loc);
    CheckGmToLocal(dst, loc, "DataCopyPad");
    CheckBlockCount(p.blockCount, loc, "DataCopyPad");
    if (p.blockLen == 0) Fail(loc, "DataCopyPad: blockLen is 0 bytes");
    if (p.blockLen % sizeof(T)) Fail(loc, Str("DataCopyPad: blockLen ", p.blockLen, " bytes is not a whole number of ", TypeName<T>()));
    if (left * sizeof(T) > 32 || right * sizeof(T) > 32) Fail(loc, "DataCopyPad: leftPadding/rightPadding may not exceed 32 bytes");
    const uint64_t rowData = uint64_t(left) * sizeof(T) + p.blockLen + uint64_t(right) * sizeof(T);
    const uint64_t rowUb = (rowData + 31) / 32 * 32;
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        const uint64_t doff = i * (rowUb + uint64_t(p.dstStride) * 32);
        const uint64_t soff = i * (uint64_t(p.blockLen) + p.srcStride);
        CheckLocalBytes(dst, doff, rowUb, loc, "DataCopyPad", "destination");
        uint8_t* d = LocalPtr(dst, doff);
        std::memset(d, 0xFF, rowUb);  // alignment filler: undefined on hardware, poison here
        timing::Gm(Pipe::MTE2, p.blockLen);
        for (uint32_t k = 0; k < left; ++k) if (isPad) St<T>(d + k * sizeof(T), padValue);
        GmLoad(src, soff, d + left * sizeof(T), p.blockLen, loc, "DataCopyPad");
        for (uint32_t k = 0; k < right; ++k) if (isPad) St<T>(d + left * sizeof(T) + p.blockLen + k * sizeof(T), padValue);
        MarkInit(dst.sim_mem_, dst.sim_addr_ + doff, rowUb);
    }
}
// UB -> GM: row i reads blockLen bytes at UB offset i*(roundup32(blockLen) +
// srcStride*32) and writes them at GM offset i*(blockLen + dstStride).
template <typename T, typename P>
inline void PadOut(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const P& p, const SrcLoc& loc) {
    CheckPadAvailable(loc);
    CheckLocalToGm(src, loc, "DataCopyPad");
    CheckBlockCount(p.blockCount, loc, "DataCopyPad");
    if (p.blockLen == 0) Fail(loc, "DataCopyPad: blockLen is 0 bytes");
    const uint64_t rowUb = (uint64_t(p.blockLen) + 31) / 32 * 32;
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        SegLocalToGm(dst, i * (uint64_t(p.blockLen) + p.dstStride), src, i * (rowUb + uint64_t(p.srcStride) * 32),
                     p.blockLen, loc, "DataCopyPad");
    }
}
}  // namespace sim

template <typename T>
inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& dataCopyParams,
                        const DataCopyPadExtParams<T>& padParams, SrcLoc loc = SrcLoc::Here()) {
    sim::PadIn(dst, src, dataCopyParams, padParams.isPad, padParams.leftPadding, padParams.rightPadding,
               padParams.paddingValue, loc);
}
template <typename T>
inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& dataCopyParams,
                        SrcLoc loc = SrcLoc::Here()) {
    sim::PadOut(dst, src, dataCopyParams, loc);
}
template <typename T>
inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyParams& dataCopyParams,
                        const DataCopyPadParams& padParams, SrcLoc loc = SrcLoc::Here()) {
    T v;
    std::memcpy(&v, &padParams.paddingValue, sizeof(T));
    sim::PadIn(dst, src, dataCopyParams, padParams.isPad, padParams.leftPadding, padParams.rightPadding, v, loc);
}
template <typename T>
inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyParams& dataCopyParams,
                        SrcLoc loc = SrcLoc::Here()) {
    sim::PadOut(dst, src, dataCopyParams, loc);
}

}  // namespace AscendC

// panguc CPU simulation of the AscendC API subset: tensors and memory
// management (TPosition, LocalTensor, GlobalTensor, TPipe, TQue/TQueBind,
// TBuf), block indices, synchronisation no-ops and tiling macros.
#pragma once

#include "panguc_sim/base.h"

#include <exception>

// Pipe and event ids are compiler built-ins in the global namespace on CANN.
enum pipe_t { PIPE_S = 0, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL, PIPE_FIX, PIPE_V2, PIPE_MTE4, PIPE_MTE5 };
enum event_t { EVENT_ID0 = 0, EVENT_ID1, EVENT_ID2, EVENT_ID3, EVENT_ID4, EVENT_ID5, EVENT_ID6, EVENT_ID7 };
namespace panguc_sim {
// The simulated pipe of a pipe_t (PIPE_ALL and unsupported pipes: None).
inline Pipe PipeOf(pipe_t p) {
    switch (p) {
        case PIPE_S: return Pipe::S;
        case PIPE_V: return Pipe::V;
        case PIPE_M: return Pipe::M;
        case PIPE_MTE1: return Pipe::MTE1;
        case PIPE_MTE2: return Pipe::MTE2;
        case PIPE_MTE3: return Pipe::MTE3;
        case PIPE_FIX: return Pipe::FIX;
        default: return Pipe::None;
    }
}
// PipeBarrier<PIPE_ALL>: every pipe waits for every other. A barrier on one
// pipe orders that pipe's own instructions, which the simulation executes in
// order anyway.
inline void Barrier(pipe_t p) {
    if (p != PIPE_ALL) return;
    Ctx& c = ctx();
    for (auto& v : c.view) {
        for (int w = 0; w < kPipeCount; ++w) v.seen[w] = c.seq;
    }
    if (timingParams().enabled) {
        double all = 0;
        for (double t : c.core.clock) all = std::max(all, t);
        for (double& t : c.core.clock) t = all;
    }
}
// What pipe `src` has completed, as seen by a pipe that synchronises with it now.
inline PipeView Snapshot(Pipe src) {
    Ctx& c = ctx();
    PipeView v = c.view[static_cast<int>(src)];
    v.seen[static_cast<int>(src)] = c.seq;
    return v;
}
}  // namespace panguc_sim

// Legacy spelling of PipeBarrier.
inline void pipe_barrier(pipe_t p) { panguc_sim::Barrier(p); }

namespace AscendC {

using panguc_sim::SrcLoc;

enum class TPosition : uint8_t {
    GM,
    A1,
    A2,
    B1,
    B2,
    C1,
    C2,
    CO1,
    CO2,
    VECIN,
    VECOUT,
    VECCALC,
    LCM = VECCALC,
    SPM,
    SHM = SPM,
    TSCM,
    C2PIPE2GM,
    C2PIPE2LOCAL,
    MAX,
};
using QuePosition = TPosition;

enum class HardEvent : uint8_t {
    MTE2_MTE1, MTE1_MTE2, MTE1_M, M_MTE1, MTE2_V, V_MTE2, MTE3_V, V_MTE3, M_V, V_M, V_V, MTE3_MTE1, MTE1_MTE3,
    MTE1_V, MTE2_M, M_MTE2, V_MTE1, M_FIX, FIX_M, MTE3_MTE2, MTE2_MTE3, S_V, V_S, S_MTE2, MTE2_S, S_MTE3,
    MTE3_S, MTE2_FIX, FIX_MTE2, FIX_S, M_S, FIX_MTE3, MTE1_FIX, FIX_MTE1, FIX_FIX, MAX,
};
using TEventID = int8_t;

namespace sim {
// Source and destination pipe of a HardEvent.
struct EventPipes {
    panguc_sim::Pipe src, dst;
    const char* name;
};
inline EventPipes PipesOf(HardEvent e) {
    using P = panguc_sim::Pipe;
    switch (e) {
        case HardEvent::MTE2_MTE1: return {P::MTE2, P::MTE1, "MTE2_MTE1"};
        case HardEvent::MTE1_MTE2: return {P::MTE1, P::MTE2, "MTE1_MTE2"};
        case HardEvent::MTE1_M: return {P::MTE1, P::M, "MTE1_M"};
        case HardEvent::M_MTE1: return {P::M, P::MTE1, "M_MTE1"};
        case HardEvent::MTE2_V: return {P::MTE2, P::V, "MTE2_V"};
        case HardEvent::V_MTE2: return {P::V, P::MTE2, "V_MTE2"};
        case HardEvent::MTE3_V: return {P::MTE3, P::V, "MTE3_V"};
        case HardEvent::V_MTE3: return {P::V, P::MTE3, "V_MTE3"};
        case HardEvent::M_V: return {P::M, P::V, "M_V"};
        case HardEvent::V_M: return {P::V, P::M, "V_M"};
        case HardEvent::V_V: return {P::V, P::V, "V_V"};
        case HardEvent::MTE3_MTE1: return {P::MTE3, P::MTE1, "MTE3_MTE1"};
        case HardEvent::MTE1_MTE3: return {P::MTE1, P::MTE3, "MTE1_MTE3"};
        case HardEvent::MTE1_V: return {P::MTE1, P::V, "MTE1_V"};
        case HardEvent::MTE2_M: return {P::MTE2, P::M, "MTE2_M"};
        case HardEvent::M_MTE2: return {P::M, P::MTE2, "M_MTE2"};
        case HardEvent::V_MTE1: return {P::V, P::MTE1, "V_MTE1"};
        case HardEvent::M_FIX: return {P::M, P::FIX, "M_FIX"};
        case HardEvent::FIX_M: return {P::FIX, P::M, "FIX_M"};
        case HardEvent::MTE3_MTE2: return {P::MTE3, P::MTE2, "MTE3_MTE2"};
        case HardEvent::MTE2_MTE3: return {P::MTE2, P::MTE3, "MTE2_MTE3"};
        case HardEvent::S_V: return {P::S, P::V, "S_V"};
        case HardEvent::V_S: return {P::V, P::S, "V_S"};
        case HardEvent::S_MTE2: return {P::S, P::MTE2, "S_MTE2"};
        case HardEvent::MTE2_S: return {P::MTE2, P::S, "MTE2_S"};
        case HardEvent::S_MTE3: return {P::S, P::MTE3, "S_MTE3"};
        case HardEvent::MTE3_S: return {P::MTE3, P::S, "MTE3_S"};
        case HardEvent::MTE2_FIX: return {P::MTE2, P::FIX, "MTE2_FIX"};
        case HardEvent::FIX_MTE2: return {P::FIX, P::MTE2, "FIX_MTE2"};
        case HardEvent::FIX_S: return {P::FIX, P::S, "FIX_S"};
        case HardEvent::M_S: return {P::M, P::S, "M_S"};
        case HardEvent::FIX_MTE3: return {P::FIX, P::MTE3, "FIX_MTE3"};
        case HardEvent::MTE1_FIX: return {P::MTE1, P::FIX, "MTE1_FIX"};
        case HardEvent::FIX_MTE1: return {P::FIX, P::MTE1, "FIX_MTE1"};
        case HardEvent::FIX_FIX: return {P::FIX, P::FIX, "FIX_FIX"};
        default: return {P::None, P::None, "?"};
    }
}
}  // namespace sim

// Synchronisation between the pipes of one core (see panguc_sim::PipeView):
// SetFlag<E>(id) captures what E's source pipe has done, WaitFlag<E>(id)
// makes it visible to E's destination pipe; PipeBarrier<PIPE_ALL> joins
// every pipe.
template <pipe_t pipe> inline void PipeBarrier() { panguc_sim::Barrier(pipe); }
template <HardEvent event> inline void SetFlag(int32_t id, SrcLoc loc = SrcLoc::Here()) {
    const sim::EventPipes e = sim::PipesOf(event);
    if (e.src == panguc_sim::Pipe::None || id < 0 || id >= 8) {
        panguc_sim::Fail(loc, panguc_sim::Str("SetFlag: unsupported event or event id ", id));
    }
    auto& c = panguc_sim::ctx();
    const int s = static_cast<int>(e.src), d = static_cast<int>(e.dst);
    c.flags[s][d][id] = panguc_sim::Snapshot(e.src);
    c.flagSet[s][d][id] = true;
    c.core.flagTime[s][d][id] = panguc_sim::timing::ReadyTime(e.src);
}
template <HardEvent event> inline void WaitFlag(int32_t id, SrcLoc loc = SrcLoc::Here()) {
    const sim::EventPipes e = sim::PipesOf(event);
    if (e.src == panguc_sim::Pipe::None || id < 0 || id >= 8) {
        panguc_sim::Fail(loc, panguc_sim::Str("WaitFlag: unsupported event or event id ", id));
    }
    auto& c = panguc_sim::ctx();
    const int s = static_cast<int>(e.src), d = static_cast<int>(e.dst);
    if (!c.flagSet[s][d][id]) {
        panguc_sim::Fail(loc, panguc_sim::Str("WaitFlag<HardEvent::", e.name, ">(", id,
                                              ") without a matching SetFlag (the pipe would wait forever)"));
    }
    c.view[d].Merge(c.flags[s][d][id]);
    c.flagSet[s][d][id] = false;
    panguc_sim::timing::WaitUntil(e.dst, c.core.flagTime[s][d][id]);
}
inline void SyncAll() = delete;  // cross-block sync cannot be simulated with sequential blocks

inline const char* PosName(TPosition p) {
    switch (p) {
        case TPosition::GM: return "GM";
        case TPosition::A1: return "A1";
        case TPosition::A2: return "A2";
        case TPosition::B1: return "B1";
        case TPosition::B2: return "B2";
        case TPosition::C1: return "C1";
        case TPosition::C2: return "C2";
        case TPosition::CO1: return "CO1";
        case TPosition::CO2: return "CO2";
        case TPosition::VECIN: return "VECIN";
        case TPosition::VECOUT: return "VECOUT";
        case TPosition::VECCALC: return "VECCALC";
        case TPosition::SPM: return "SPM";
        case TPosition::TSCM: return "TSCM";
        default: return "?";
    }
}

namespace sim {
using namespace panguc_sim;

// Which simulated memory backs a logical position (and whether the SoC has it).
inline Mem PosMem(TPosition p, const SrcLoc& loc) {
    switch (p) {
        case TPosition::VECIN:
        case TPosition::VECOUT:
        case TPosition::VECCALC: return Mem::UB;
        case TPosition::CO2:
            if (PANGUC_SIM_910B) {
                Fail(loc, "TPosition::CO2 does not exist on 910B: L0C results leave through Fixpipe (CO1 -> GM)");
            }
            return Mem::UB;
        case TPosition::A1:
        case TPosition::B1:
        case TPosition::C1: return Mem::L1;
        case TPosition::A2: return Mem::L0A;
        case TPosition::B2: return Mem::L0B;
        case TPosition::CO1: return Mem::L0C;
        default: Fail(loc, Str("TPosition::", PosName(p), " is not supported by the simulation"));
    }
}
inline bool IsUbPos(TPosition p) {
    return p == TPosition::VECIN || p == TPosition::VECOUT || p == TPosition::VECCALC || p == TPosition::CO2;
}

// Reject element types the SoC does not have (bf16 on 310P) at the first
// tensor of that type, so the error points at the kernel line that made it.
template <typename T> inline void CheckDtype(const SrcLoc& loc) {
    if (PANGUC_SIM_310P && std::is_same<T, bfloat16_t>::value) {
        Fail(loc, "bf16 is not supported on 310P (bfloat16_t tensors need 910B)");
    }
}

// The pipes a queue at a position synchronises (EnQue on the producer,
// DeQue on the consumer): VECIN MTE2->V, VECOUT V->MTE3, A1/B1 MTE2->MTE1,
// A2/B2 MTE1->M, CO1 M->FIX (910B) or M->V (310P), CO2 V->MTE3.
inline Pipe Producer(TPosition p) {
    switch (p) {
        case TPosition::VECIN: case TPosition::A1: case TPosition::B1: case TPosition::C1: return Pipe::MTE2;
        case TPosition::A2: case TPosition::B2: return Pipe::MTE1;
        case TPosition::CO1: return Pipe::M;
        default: return Pipe::V;  // VECOUT, VECCALC, CO2
    }
}
inline Pipe Consumer(TPosition p) {
    switch (p) {
        case TPosition::VECOUT: case TPosition::CO2: return Pipe::MTE3;
        case TPosition::A1: case TPosition::B1: case TPosition::C1: return Pipe::MTE1;
        case TPosition::A2: case TPosition::B2: return Pipe::M;
        case TPosition::CO1: return PANGUC_SIM_910B ? Pipe::FIX : Pipe::V;
        default: return Pipe::V;  // VECIN, VECCALC
    }
}

// State of one queue buffer; LocalTensors carry (slot, generation) so that
// use-after-free and use-while-enqueued are detected.
struct BufSlot {
    enum State { Free, Allocated, Queued };
    State state = Free;
    uint32_t gen = 0;
    double freeAt = 0;  // time (ns) the consumer pipe released it (timing model)
    const void* owner = nullptr;
};
}  // namespace sim

template <typename T> class LocalTensor {
public:
    using PrimType = T;
    LocalTensor() = default;

    T GetValue(uint32_t index, SrcLoc loc = SrcLoc::Here()) const {
        panguc_sim::OnPipe onS(panguc_sim::Pipe::S);
        panguc_sim::timing::ScalarUb();
        SimCheckScalar(index, loc, "LocalTensor::GetValue");
        const uint64_t a = sim_addr_ + uint64_t(index) * sizeof(T);
        panguc_sim::CheckInit(sim_mem_, a, sizeof(T), loc, "LocalTensor::GetValue");
        return panguc_sim::Ld<T>(panguc_sim::MemBase(sim_mem_) + a);
    }
    void SetValue(uint32_t index, const T& value, SrcLoc loc = SrcLoc::Here()) const {
        panguc_sim::OnPipe onS(panguc_sim::Pipe::S);
        panguc_sim::timing::ScalarUb();
        SimCheckScalar(index, loc, "LocalTensor::SetValue");
        const uint64_t a = sim_addr_ + uint64_t(index) * sizeof(T);
        panguc_sim::St<T>(panguc_sim::MemBase(sim_mem_) + a, value);
        panguc_sim::MarkInit(sim_mem_, a, sizeof(T));
    }
    // Offset view. An offset past the end yields an empty view: any later use
    // then fails with a size error (operator[] cannot carry a location).
    LocalTensor operator[](uint32_t offset) const {
        LocalTensor t = *this;
        const uint32_t off = offset <= sim_size_ ? offset : sim_size_;
        t.sim_addr_ += off * uint32_t(sizeof(T));
        t.sim_size_ = sim_size_ - off;
        return t;
    }
    uint32_t GetSize() const { return sim_size_; }
    uint32_t GetLength() const { return sim_size_ * uint32_t(sizeof(T)); }
    void SetSize(uint32_t size) { sim_size_ = size; }
    TPosition GetPosition() const { return sim_pos_; }
    template <typename U> LocalTensor<U> ReinterpretCast() const {
        LocalTensor<U> t;
        t.sim_mem_ = sim_mem_;
        t.sim_pos_ = sim_pos_;
        t.sim_addr_ = sim_addr_;
        t.sim_size_ = uint32_t(uint64_t(sim_size_) * sizeof(T) / sizeof(U));
        t.sim_slot_ = sim_slot_;
        t.sim_gen_ = sim_gen_;
        t.sim_valid_ = sim_valid_;
        return t;
    }
    // Host address of the data (the device address on hardware).
    T* GetPhyAddr() const { return reinterpret_cast<T*>(panguc_sim::MemBase(sim_mem_) + sim_addr_); }
    T* GetPhyAddr(uint32_t offset) const { return GetPhyAddr() + offset; }

    // ---- simulation internals (public so that free functions can use them) ----
    panguc_sim::Mem sim_mem_ = panguc_sim::Mem::None;
    TPosition sim_pos_ = TPosition::MAX;
    uint32_t sim_addr_ = 0;  // byte address inside sim_mem_
    uint32_t sim_size_ = 0;  // elements
    sim::BufSlot* sim_slot_ = nullptr;
    uint32_t sim_gen_ = 0;
    bool sim_valid_ = false;

    void SimCheckLive(const SrcLoc& loc, const char* op) const {
        if (!sim_valid_) panguc_sim::Fail(loc, panguc_sim::Str(op, ": uses a LocalTensor that was never allocated (default-constructed)"));
        if (sim_slot_) {
            if (sim_slot_->gen != sim_gen_ || sim_slot_->state == sim::BufSlot::Free) {
                panguc_sim::Fail(loc, panguc_sim::Str(op, ": uses a LocalTensor after FreeTensor (its queue buffer may already hold other data)"));
            }
            if (sim_slot_->state == sim::BufSlot::Queued) {
                panguc_sim::Fail(loc, panguc_sim::Str(op, ": uses a LocalTensor that is still enqueued (EnQue without a matching DeQue: "
                                  "on hardware the producer pipe may not have finished)"));
            }
        }
    }

private:
    void SimCheckScalar(uint32_t index, const SrcLoc& loc, const char* op) const {
        SimCheckLive(loc, op);
        if (sim_mem_ != panguc_sim::Mem::UB) {
            panguc_sim::Fail(loc, panguc_sim::Str(op, ": scalar access is only possible on UB tensors, not TPosition::", PosName(sim_pos_)));
        }
        if (index >= sim_size_) panguc_sim::Fail(loc, panguc_sim::Str(op, ": index ", index, " is outside the tensor of ", sim_size_, " elements"));
    }
};

template <typename T> class GlobalTensor {
public:
    using PrimType = T;
    GlobalTensor() = default;

    void SetGlobalBuffer(__gm__ T* buffer, uint64_t bufferSize, SrcLoc loc = SrcLoc::Here()) {
        sim::CheckDtype<T>(loc);
        panguc_sim::GmBuffer* b = panguc_sim::FindGm(buffer, 0);
        if (!b) {
            panguc_sim::Fail(loc, "SetGlobalBuffer: pointer does not point into any kernel argument buffer");
        }
        const uint64_t avail = (b->base + b->size - reinterpret_cast<uint8_t*>(buffer)) / sizeof(T);
        if (bufferSize > avail) {
            panguc_sim::Fail(loc, panguc_sim::Str("SetGlobalBuffer: ", bufferSize, " elements of ", panguc_sim::TypeName<T>(),
                                                  " exceed the ", avail, " elements left in ", panguc_sim::GmDesc(b),
                                                  " (outside global buffer)"));
        }
        sim_ptr_ = buffer;
        sim_size_ = bufferSize;
        sim_buf_ = b;
        sim_view_off_ = 0;
        sim_full_ = bufferSize;
    }
    // Without a length the view extends to the end of the argument buffer.
    void SetGlobalBuffer(__gm__ T* buffer, SrcLoc loc = SrcLoc::Here()) {
        panguc_sim::GmBuffer* b = panguc_sim::FindGm(buffer, 0);
        if (!b) panguc_sim::Fail(loc, "SetGlobalBuffer: pointer does not point into any kernel argument buffer");
        SetGlobalBuffer(buffer, (b->base + b->size - reinterpret_cast<uint8_t*>(buffer)) / sizeof(T), loc);
    }
    T GetValue(uint64_t offset, SrcLoc loc = SrcLoc::Here()) const {
        SimCheckRange(offset, 1, loc, "GlobalTensor::GetValue");
        panguc_sim::timing::ScalarGm();
        const uint8_t* p = reinterpret_cast<const uint8_t*>(sim_ptr_ + offset);
        panguc_sim::GmRead(sim_buf_, p, sizeof(T), loc, "GlobalTensor::GetValue");
        return panguc_sim::Ld<T>(p);
    }
    void SetValue(uint64_t offset, const T& value, SrcLoc loc = SrcLoc::Here()) const {
        SimCheckRange(offset, 1, loc, "GlobalTensor::SetValue");
        panguc_sim::timing::ScalarGm();
        uint8_t* p = reinterpret_cast<uint8_t*>(sim_ptr_ + offset);
        panguc_sim::GmScalarWrite(sim_buf_, p, sizeof(T), loc, "GlobalTensor::SetValue");
        panguc_sim::GmWrite(sim_buf_, p, sizeof(T), loc, "GlobalTensor::SetValue");
        panguc_sim::St<T>(p, value);
    }
    GlobalTensor operator[](uint64_t offset) const {
        // An offset past the end keeps the address but has size 0, so any
        // access through the view fails with an out-of-range error.
        GlobalTensor g = *this;
        g.sim_ptr_ += offset;
        g.sim_size_ = offset <= sim_size_ ? sim_size_ - offset : 0;
        g.sim_view_off_ += offset;
        return g;
    }
    uint64_t GetSize() const { return sim_size_; }
    __gm__ T* GetPhyAddr() const { return sim_ptr_; }
    __gm__ T* GetPhyAddr(uint64_t offset) const { return sim_ptr_ + offset; }

    // ---- simulation internals ----
    T* sim_ptr_ = nullptr;
    uint64_t sim_size_ = 0;      // elements visible through this view
    panguc_sim::GmBuffer* sim_buf_ = nullptr;
    uint64_t sim_view_off_ = 0;  // element offset of this view inside the SetGlobalBuffer range
    uint64_t sim_full_ = 0;      // elements given to SetGlobalBuffer

    void SimCheckRange(uint64_t first, uint64_t count, const SrcLoc& loc, const char* op) const {
        SimCheckBytes(first * sizeof(T), count * sizeof(T), loc, op);
    }
    void SimCheckBytes(uint64_t off, uint64_t bytes, const SrcLoc& loc, const char* op) const {
        if (!sim_buf_) panguc_sim::Fail(loc, panguc_sim::Str(op, ": GlobalTensor used before SetGlobalBuffer"));
        if (off + bytes > sim_size_ * sizeof(T)) {
            const uint64_t e0 = sim_view_off_ + off / sizeof(T);
            const uint64_t e1 = sim_view_off_ + (off + bytes + sizeof(T) - 1) / sizeof(T);
            panguc_sim::Fail(loc, panguc_sim::Str(op, ": access to elements [", e0, ", ", e1, ") is outside global buffer of ",
                                                  sim_full_, " x ", panguc_sim::TypeName<T>(), " set by SetGlobalBuffer on ",
                                                  panguc_sim::GmDesc(sim_buf_)));
        }
    }
};

class TPipe;

template <TPosition srcPos, TPosition dstPos, int32_t depth, auto mask = 0> class TQueBind {
public:
    TQueBind() = default;
    TQueBind(const TQueBind&) = delete;
    TQueBind& operator=(const TQueBind&) = delete;
    ~TQueBind() {
        // Not while unwinding from a failed check: that error is the story.
        if (sim_inited_ && !sim_fifo_.empty() && panguc_sim::ctx().inLaunch && std::uncaught_exceptions() == 0) {
            panguc_sim::Warn(sim_loc_, panguc_sim::Str("queue (TPosition::", PosName(Pos()), ") destroyed with ",
                                                       sim_fifo_.size(), " tensor(s) still enqueued (data never consumed)"));
        }
    }

    template <typename T> LocalTensor<T> AllocTensor(SrcLoc loc = SrcLoc::Here()) {
        SimCheckInited(loc, "AllocTensor");
        sim::CheckDtype<T>(loc);
        for (uint32_t k = 0; k < sim_num_; ++k) {
            const uint32_t i = (sim_next_ + k) % sim_num_;
            sim::BufSlot& s = sim_slots_[i];
            if (s.state == sim::BufSlot::Free) {
                s.state = sim::BufSlot::Allocated;
                // The producer may not overwrite the buffer before its last
                // consumer released it (the sync AllocTensor waits for).
                panguc_sim::timing::WaitUntil(sim::Producer(srcPos), s.freeAt);
                sim_next_ = (i + 1) % sim_num_;
                LocalTensor<T> t;
                t.sim_mem_ = sim_mem_;
                t.sim_pos_ = Pos();
                t.sim_addr_ = sim_base_ + i * sim_len_;
                t.sim_size_ = sim_len_ / uint32_t(sizeof(T));
                t.sim_slot_ = &s;
                t.sim_gen_ = s.gen;
                t.sim_valid_ = true;
                return t;
            }
        }
        panguc_sim::Fail(loc, panguc_sim::Str("AllocTensor beyond the queue's buffer count: all ", sim_num_,
                                              " buffers of this TPosition::", PosName(Pos()),
                                              " queue are allocated (missing FreeTensor?)"));
    }

    template <typename T> bool EnQue(const LocalTensor<T>& t, SrcLoc loc = SrcLoc::Here()) {
        SimCheckInited(loc, "EnQue");
        t.SimCheckLive(loc, "EnQue");
        if (!t.sim_slot_ || t.sim_slot_->owner != this) {
            panguc_sim::Fail(loc, "EnQue of a tensor that was not allocated from this queue");
        }
        if (static_cast<int32_t>(sim_fifo_.size()) >= SimDepth()) {
            panguc_sim::Fail(loc, panguc_sim::Str("EnQue beyond queue depth: the TPosition::", PosName(Pos()),
                                                  " queue already holds ", sim_fifo_.size(), " tensor(s) (depth ", depth,
                                                  "); DeQue first"));
        }
        t.sim_slot_->state = sim::BufSlot::Queued;
        sim_fifo_.push_back(Entry{static_cast<uint32_t>(t.sim_slot_ - sim_slots_.data()), t.sim_addr_, t.GetLength(),
                                  panguc_sim::Snapshot(sim::Producer(srcPos)),
                                  panguc_sim::timing::ReadyTime(sim::Producer(srcPos))});
        return true;
    }

    template <typename T> LocalTensor<T> DeQue(SrcLoc loc = SrcLoc::Here()) {
        SimCheckInited(loc, "DeQue");
        if (sim_fifo_.empty()) {
            panguc_sim::Fail(loc, panguc_sim::Str("DeQue on empty queue (TPosition::", PosName(Pos()),
                                                  "): no tensor was enqueued (missing EnQue?)"));
        }
        const Entry e = sim_fifo_.front();
        sim_fifo_.pop_front();
        // The sync EnQue/DeQue imply on hardware: the consumer pipe waits
        // for the producer pipe of the enqueue.
        panguc_sim::ctx().view[static_cast<int>(sim::Consumer(dstPos))].Merge(e.producer);
        panguc_sim::timing::WaitUntil(sim::Consumer(dstPos), e.readyAt);
        sim::BufSlot& s = sim_slots_[e.slot];
        s.state = sim::BufSlot::Allocated;
        LocalTensor<T> t;
        t.sim_mem_ = sim_mem_;
        t.sim_pos_ = Pos();
        t.sim_addr_ = e.addr;
        t.sim_size_ = e.bytes / uint32_t(sizeof(T));
        t.sim_slot_ = &s;
        t.sim_gen_ = s.gen;
        t.sim_valid_ = true;
        return t;
    }

    template <typename T> void FreeTensor(LocalTensor<T>& t, SrcLoc loc = SrcLoc::Here()) {
        SimCheckInited(loc, "FreeTensor");
        if (!t.sim_valid_ || !t.sim_slot_ || t.sim_slot_->owner != this) {
            panguc_sim::Fail(loc, "FreeTensor of a tensor that was not allocated from this queue");
        }
        sim::BufSlot& s = *t.sim_slot_;
        if (s.gen != t.sim_gen_ || s.state == sim::BufSlot::Free) {
            panguc_sim::Fail(loc, "FreeTensor: LocalTensor freed twice (it was already returned to its queue)");
        }
        if (s.state == sim::BufSlot::Queued) {
            panguc_sim::Fail(loc, "FreeTensor of a tensor that is still enqueued (DeQue it first)");
        }
        s.state = sim::BufSlot::Free;
        s.freeAt = panguc_sim::timing::ReadyTime(sim::Consumer(dstPos));
        ++s.gen;
    }

    bool VacantInQue() const { return static_cast<int32_t>(sim_fifo_.size()) < SimDepth(); }
    bool HasTensorInQue() const { return !sim_fifo_.empty(); }
    int32_t GetTensorCountInQue() const { return static_cast<int32_t>(sim_fifo_.size()); }
    bool HasIdleBuffer() const {
        for (const auto& s : sim_slots_) if (s.state == sim::BufSlot::Free) return true;
        return false;
    }

    // ---- simulation internals ----
    struct Entry {
        uint32_t slot;
        uint32_t addr;
        uint32_t bytes;
        panguc_sim::PipeView producer;  // what the producer pipe had done at EnQue
        double readyAt;                 // when the producer pipe got there (timing model)
    };
    static constexpr TPosition Pos() { return srcPos == TPosition::GM ? dstPos : srcPos; }
    static constexpr int32_t SimDepth() { return depth < 1 ? 1 : depth; }
    bool sim_inited_ = false;
    panguc_sim::Mem sim_mem_ = panguc_sim::Mem::None;
    uint32_t sim_base_ = 0, sim_num_ = 0, sim_len_ = 0, sim_next_ = 0;
    std::vector<sim::BufSlot> sim_slots_;
    std::deque<Entry> sim_fifo_;
    SrcLoc sim_loc_{"?", 0};

    void SimCheckInited(const SrcLoc& loc, const char* op) const {
        if (!sim_inited_) panguc_sim::Fail(loc, panguc_sim::Str(op, " on a queue that was never given memory by TPipe::InitBuffer"));
    }
};

template <TPosition pos, int32_t depth, auto mask = 0> using TQue = TQueBind<pos, pos, depth, mask>;

template <TPosition pos = TPosition::VECCALC> class TBuf {
public:
    TBuf() = default;
    TBuf(const TBuf&) = delete;
    TBuf& operator=(const TBuf&) = delete;

    template <typename T> LocalTensor<T> Get(SrcLoc loc = SrcLoc::Here()) {
        return Get<T>(sim_len_ / uint32_t(sizeof(T)), loc);
    }
    // len: number of elements (must fit the buffer).
    template <typename T> LocalTensor<T> Get(uint32_t len, SrcLoc loc = SrcLoc::Here()) {
        return GetWithOffset<T>(len, 0, loc);
    }
    // size: elements; bufOffset: bytes from the start of the buffer.
    template <typename T> LocalTensor<T> GetWithOffset(uint32_t size, uint32_t bufOffset, SrcLoc loc = SrcLoc::Here()) {
        if (!sim_inited_) panguc_sim::Fail(loc, "TBuf::Get on a buffer that was never given memory by TPipe::InitBuffer");
        sim::CheckDtype<T>(loc);
        if (uint64_t(bufOffset) + uint64_t(size) * sizeof(T) > sim_len_) {
            panguc_sim::Fail(loc, panguc_sim::Str("TBuf::Get: ", size, " elements of ", panguc_sim::TypeName<T>(), " at byte offset ",
                                                  bufOffset, " exceed the buffer of ", sim_len_, " bytes"));
        }
        LocalTensor<T> t;
        t.sim_mem_ = sim_mem_;
        t.sim_pos_ = pos;
        t.sim_addr_ = sim_base_ + bufOffset;
        t.sim_size_ = size;
        t.sim_valid_ = true;
        return t;
    }

    bool sim_inited_ = false;
    panguc_sim::Mem sim_mem_ = panguc_sim::Mem::None;
    uint32_t sim_base_ = 0, sim_len_ = 0;
};

namespace sim {
struct PipeUse {
    uint32_t used[panguc_sim::kMemCount] = {};
};
}  // namespace sim

class TPipe {
public:
    TPipe(SrcLoc loc = SrcLoc::Here()) : sim_loc_(loc) {
        panguc_sim::Ctx& c = panguc_sim::ctx();
        if (c.livePipe) {
            panguc_sim::Fail(loc, "a second TPipe was constructed while another is alive (one TPipe per kernel; call Destroy() first)");
        }
        c.livePipe = reinterpret_cast<panguc_sim::PipeState*>(this);
    }
    ~TPipe() { Destroy(); }
    TPipe(const TPipe&) = delete;
    TPipe& operator=(const TPipe&) = delete;

    void Init() {}
    void Destroy() {
        panguc_sim::Ctx& c = panguc_sim::ctx();
        if (c.livePipe == reinterpret_cast<panguc_sim::PipeState*>(this)) c.livePipe = nullptr;
        sim_use_ = sim::PipeUse{};
    }

    template <TPosition s, TPosition d, int32_t depth, auto mask>
    bool InitBuffer(TQueBind<s, d, depth, mask>& que, uint8_t num, uint32_t len, SrcLoc loc = SrcLoc::Here()) {
        if (que.sim_inited_) panguc_sim::Fail(loc, "InitBuffer called twice for the same queue");
        if (num == 0 || len == 0) panguc_sim::Fail(loc, panguc_sim::Str("InitBuffer with num=", int(num), " len=", len, ": both must be > 0"));
        constexpr TPosition pos = TQueBind<s, d, depth, mask>::Pos();
        const uint32_t alen = Round32(len);
        que.sim_mem_ = sim::PosMem(pos, loc);
        que.sim_base_ = Reserve(que.sim_mem_, uint64_t(alen) * num, pos, loc,
                                panguc_sim::Str("InitBuffer(queue, ", int(num), ", ", len, ")"));
        que.sim_num_ = num;
        que.sim_len_ = alen;
        que.sim_slots_.assign(num, sim::BufSlot{});
        for (auto& sl : que.sim_slots_) sl.owner = &que;
        que.sim_inited_ = true;
        que.sim_loc_ = loc;
        return true;
    }
    template <TPosition pos>
    bool InitBuffer(TBuf<pos>& buf, uint32_t len, SrcLoc loc = SrcLoc::Here()) {
        if (buf.sim_inited_) panguc_sim::Fail(loc, "InitBuffer called twice for the same TBuf");
        if (len == 0) panguc_sim::Fail(loc, "InitBuffer(TBuf, 0): length must be > 0");
        const uint32_t alen = Round32(len);
        buf.sim_mem_ = sim::PosMem(pos, loc);
        buf.sim_base_ = Reserve(buf.sim_mem_, alen, pos, loc, panguc_sim::Str("InitBuffer(TBuf, ", len, ")"));
        buf.sim_len_ = alen;
        buf.sim_inited_ = true;
        return true;
    }

    template <HardEvent evt> TEventID AllocEventID() { return 0; }
    template <HardEvent evt> void ReleaseEventID(TEventID) {}
    TEventID FetchEventID(HardEvent) { return 0; }
    template <HardEvent evt> TEventID FetchEventID() { return 0; }

private:
    static uint32_t Round32(uint32_t n) { return (n + 31u) / 32u * 32u; }

    uint32_t Reserve(panguc_sim::Mem m, uint64_t bytes, TPosition pos, const SrcLoc& loc, const std::string& what) {
        using namespace panguc_sim;
        Ctx& c = ctx();
        const bool cube = m != Mem::UB;
        (cube ? c.usedCube : c.usedVector) = true;
        if (PANGUC_SIM_910B && c.usedCube && c.usedVector) {
            Fail(loc, Str(what, ": 910B has separate cube (AIC) and vector (AIV) cores, so a kernel cannot use both "
                                "vector (UB) buffers and cube (L1/L0) buffers; split it into a cube kernel and a vector "
                                "kernel (mix kernels are not supported by the simulation)"));
        }
        uint32_t& used = sim_use_.used[static_cast<int>(m)];
        const uint64_t cap = MemCapacity(m);
        if (used + bytes > cap) {
            Fail(loc, Str(MemName(m), " over-allocation: ", what, " for TPosition::", PosName(pos), " needs ", bytes,
                          " bytes (rounded up to 32 B) on top of ", used, " already allocated, but the ", SocName(), " ",
                          MemName(m), " has ", cap, " bytes"));
        }
        const uint32_t base = used;
        used += static_cast<uint32_t>(bytes);
        MemBase(m);
        return base;
    }

    sim::PipeUse sim_use_;
    SrcLoc sim_loc_;
};

inline TPipe* GetTPipePtr() { return reinterpret_cast<TPipe*>(panguc_sim::ctx().livePipe); }

inline int64_t GetBlockIdx() { return panguc_sim::ctx().blockIdx; }
inline int64_t GetBlockNum() { return panguc_sim::ctx().blockDim; }
inline int64_t GetSubBlockIdx() { return 0; }
inline int64_t GetTaskRation() { return 1; }
// The simulation reserves no system workspace: the user workspace is the
// whole workspace argument.
inline GM_ADDR GetUserWorkspace(GM_ADDR workspace) { return workspace; }

template <typename T, typename U> struct IsSameType : std::is_same<T, U> {};

// Kernel-side printf; output goes to the simulation's stdout (logged by the
// Rust harness at debug level), prefixed with the block index.
template <typename... Args> inline void PRINTF(const char* fmt, Args... args) {
    std::printf("[block %lld] ", static_cast<long long>(panguc_sim::ctx().blockIdx));
    std::printf(fmt, args...);
}

constexpr int32_t ONE_BLK_SIZE = 32;
constexpr int32_t ONE_REPEAT_BYTE_SIZE = 256;
constexpr int32_t BLOCK_CUBE = 16;
constexpr int32_t CUBE_MAX_SIZE = 256;
constexpr int32_t MAX_REPEAT_TIMES = 255;

}  // namespace AscendC

// ---- tiling ---------------------------------------------------------------
namespace panguc_sim {
// Copy a tiling struct out of the GM tiling argument (GET_TILING_DATA).
inline void LoadTiling(void* dst, size_t bytes, const uint8_t* tiling, const SrcLoc& loc) {
    GmBuffer* b = FindGm(tiling, 0);
    if (!b) Fail(loc, "GET_TILING_DATA: the tiling pointer does not point into a kernel argument buffer");
    const uint64_t avail = b->base + b->size - tiling;
    if (bytes > avail) {
        Fail(loc, Str("GET_TILING_DATA: tiling struct is ", bytes, " bytes but only ", avail, " bytes of ",
                      GmDesc(b), " are available"));
    }
    GmRead(b, tiling, bytes, loc, "GET_TILING_DATA");
    std::memcpy(dst, tiling, bytes);
}
}  // namespace panguc_sim

#define REGISTER_TILING_DEFAULT(T) using panguc_sim_default_tiling_t = T
#define GET_TILING_DATA_WITH_STRUCT(T, var, tiling) \
    T var;                                          \
    ::panguc_sim::LoadTiling(&var, sizeof(T), (const uint8_t*)(tiling), ::panguc_sim::SrcLoc::Here())
#define GET_TILING_DATA(var, tiling) GET_TILING_DATA_WITH_STRUCT(panguc_sim_default_tiling_t, var, tiling)
#define KERNEL_TASK_TYPE_DEFAULT(x)

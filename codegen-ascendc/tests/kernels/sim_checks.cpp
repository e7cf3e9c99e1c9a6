// Deliberately wrong kernels, one per simulation check, selected by
// tiling.caseId so that a single compile serves every case.
// Arguments: x (input, 4096 B), y (output, 4096 B), workspace, tiling.
#include "kernel_operator.h"

using namespace AscendC;

struct CheckTiling {
    uint32_t caseId;
    uint32_t reserved[3];
};

namespace {

__aicore__ inline void UbOverAllocation(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 2, 100 * 1024);  // 200 KiB > 192 KiB - 256 B on 910B (fits 310P's 256 KiB)
}

__aicore__ inline void L1OverAllocation(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::A1, 1> q;
    pipe.InitBuffer(q, 1, 1100 * 1024);
}

__aicore__ inline void MisalignedUb(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 1024);
    LocalTensor<float> t = b.Get<float>();
    Duplicate(t, 1.0f, 256);
    Add(t[3], t, t, 16);  // 12-byte offset
}

__aicore__ inline void CopyNot32(GM_ADDR x, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, 1024);
    LocalTensor<float> t = q.AllocTensor<float>();
    DataCopy(t, xGm, 10);  // 40 bytes
}

__aicore__ inline void GmOutOfRange(GM_ADDR x, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, 64);
    LocalTensor<float> t = q.AllocTensor<float>();
    DataCopy(t, xGm[56], 16);  // elements 56..71 of 64
}

__aicore__ inline void GmGetValueOutOfRange(GM_ADDR x, GM_ADDR)
{
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, 64);
    (void)xGm.GetValue(100);
}

__aicore__ inline void SetGlobalBufferTooLong(GM_ADDR x, GM_ADDR)
{
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x + 1000, 100);  // the input has 1024 floats
}

__aicore__ inline void DeQueEmpty(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    LocalTensor<float> t = q.DeQue<float>();
}

__aicore__ inline void EnQueBeyondDepth(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 2, 1024);
    LocalTensor<float> a = q.AllocTensor<float>();
    LocalTensor<float> b = q.AllocTensor<float>();
    q.EnQue(a);
    q.EnQue(b);
}

__aicore__ inline void AllocBeyondCount(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 2> q;
    pipe.InitBuffer(q, 1, 1024);
    LocalTensor<float> a = q.AllocTensor<float>();
    LocalTensor<float> b = q.AllocTensor<float>();
}

__aicore__ inline void FreeTwice(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    LocalTensor<float> a = q.AllocTensor<float>();
    q.FreeTensor(a);
    q.FreeTensor(a);
}

__aicore__ inline void FreeForeign(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q1;
    TQue<TPosition::VECOUT, 1> q2;
    pipe.InitBuffer(q1, 1, 1024);
    pipe.InitBuffer(q2, 1, 1024);
    LocalTensor<float> a = q1.AllocTensor<float>();
    q2.FreeTensor(a);
}

__aicore__ inline void CountExceedsSize(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 256 * sizeof(float));
    LocalTensor<float> t = b.Get<float>();
    Duplicate(t, 0.0f, 300);
}

__aicore__ inline void RepeatOver255(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 64 * 1024);
    LocalTensor<float> t = b.Get<float>();
    Duplicate(t, 0.0f, 16384);
    Add(t, t, t, 64, 300, BinaryRepeatParams());
}

__aicore__ inline void CompareNot256(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b, m;
    pipe.InitBuffer(b, 1024);
    pipe.InitBuffer(m, 256);
    LocalTensor<float> t = b.Get<float>();
    LocalTensor<uint8_t> mask = m.Get<uint8_t>();
    Duplicate(t, 0.0f, 256);
    Compare(mask, t, t, CMPMODE::LT, 48);  // 192 bytes
}

__aicore__ inline void CubeBuffers(TPipe& pipe, TQue<TPosition::A2, 1>& qa, TQue<TPosition::B2, 1>& qb,
                                   TQue<TPosition::CO1, 1>& qc)
{
    pipe.InitBuffer(qa, 1, 16 * 1024);
    pipe.InitBuffer(qb, 1, 16 * 1024);
    pipe.InitBuffer(qc, 1, 64 * 1024);
}

__aicore__ inline void MmadTooLarge(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::A2, 1> qa;
    TQue<TPosition::B2, 1> qb;
    TQue<TPosition::CO1, 1> qc;
    CubeBuffers(pipe, qa, qb, qc);
    LocalTensor<half> a = qa.AllocTensor<half>();
    LocalTensor<half> b = qb.AllocTensor<half>();
    LocalTensor<float> c = qc.AllocTensor<float>();
    MmadParams p;
    p.m = 5000;
    p.n = 16;
    p.k = 16;
    Mmad(c, a, b, p);
}

__aicore__ inline void MisalignedL0A(GM_ADDR x, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::A1, 1> q1;
    TQue<TPosition::A2, 1> q2;
    pipe.InitBuffer(q1, 1, 4096);
    pipe.InitBuffer(q2, 1, 4096);
    GlobalTensor<half> xGm;
    xGm.SetGlobalBuffer((__gm__ half*)x, 2048);
    LocalTensor<half> a1 = q1.AllocTensor<half>();
    LocalTensor<half> a2 = q2.AllocTensor<half>();
    DataCopy(a1, xGm, 2048);
    LoadData2DParams p;
    p.repeatTimes = 1;
    LoadData(a2[16], a1, p);  // 32-byte offset; L0A needs 512
}

__aicore__ inline void MisalignedL0C(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::A2, 1> qa;
    TQue<TPosition::B2, 1> qb;
    TQue<TPosition::CO1, 1> qc;
    CubeBuffers(pipe, qa, qb, qc);
    LocalTensor<half> a = qa.AllocTensor<half>();
    LocalTensor<half> b = qb.AllocTensor<half>();
    LocalTensor<float> c = qc.AllocTensor<float>();
    MmadParams p;
    p.m = 16;
    p.n = 16;
    p.k = 16;
    Mmad(c[16], a, b, p);  // 64-byte offset; L0C needs 1024
}

__aicore__ inline void WriteBlock0(GlobalTensor<float>& yGm, TQue<TPosition::VECOUT, 1>& q)
{
    LocalTensor<float> t = q.AllocTensor<float>();
    Duplicate(t, 1.0f, 8);
    q.EnQue(t);
    t = q.DeQue<float>();
    DataCopy(yGm, t, 8);
    q.FreeTensor(t);
}

__aicore__ inline void CrossBlockRead(GM_ADDR, GM_ADDR y)
{
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> yGm;
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    if (GetBlockIdx() == 0) {
        WriteBlock0(yGm, q);
    } else {
        LocalTensor<float> t = q.AllocTensor<float>();
        DataCopy(t, yGm, 8);  // reads what block 0 wrote
        q.FreeTensor(t);
    }
}

__aicore__ inline void CrossBlockWrite(GM_ADDR, GM_ADDR y)
{
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> yGm;
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    WriteBlock0(yGm, q);  // every block writes the same 32 bytes
}

__aicore__ inline void UninitRead(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 1024);
    LocalTensor<float> t = b.Get<float>();
    Add(t, t, t, 64);
}

__aicore__ inline void UseAfterFree(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    LocalTensor<float> t = q.AllocTensor<float>();
    Duplicate(t, 1.0f, 64);
    q.FreeTensor(t);
    Adds(t, t, 1.0f, 64);
}

__aicore__ inline void UseWhileEnqueued(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    LocalTensor<float> t = q.AllocTensor<float>();
    q.EnQue(t);
    Duplicate(t, 1.0f, 64);
}

__aicore__ inline void MixVectorCube(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> qv;
    TQue<TPosition::A1, 1> qc;
    pipe.InitBuffer(qv, 1, 1024);
    pipe.InitBuffer(qc, 1, 1024);
}

__aicore__ inline void WriteInput(GM_ADDR x, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, 1024);
    LocalTensor<float> t = q.AllocTensor<float>();
    Duplicate(t, 1.0f, 8);
    q.EnQue(t);
    t = q.DeQue<float>();
    DataCopy(xGm, t, 8);
}

__aicore__ inline void PadCopy(GM_ADDR x, GM_ADDR y)
{
    TPipe pipe;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 1> q;  // MTE2 in, MTE3 out
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> xGm, yGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, 1024);
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    LocalTensor<float> t = q.AllocTensor<float>();
    DataCopyExtParams p{1, 5 * sizeof(float), 0, 0, 0};
    DataCopyPadExtParams<float> pad{true, 0, 3, -1.0f};
    DataCopyPad(t, xGm, p, pad);
    q.EnQue(t);
    t = q.DeQue<float>();
    DataCopyPad(yGm, t, p);
    q.FreeTensor(t);
}

__aicore__ inline void Bf16Tensor(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 1024);
    LocalTensor<bfloat16_t> t = b.Get<bfloat16_t>();
    Duplicate(t, bfloat16_t(1.0f), 16);
}

__aicore__ inline void FixpipeCall(GM_ADDR, GM_ADDR y)
{
    TPipe pipe;
    TQue<TPosition::CO1, 1> qc;
    pipe.InitBuffer(qc, 1, 4096);
    GlobalTensor<float> yGm;
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    LocalTensor<float> c = qc.AllocTensor<float>();
    FixpipeParamsV220 f;
    f.nSize = 16;
    f.mSize = 16;
    f.srcStride = 16;
    f.dstStride = 16;
    Fixpipe(yGm, c, f);
}

__aicore__ inline void LeftEnqueued(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    LocalTensor<float> t = q.AllocTensor<float>();
    q.EnQue(t);  // never dequeued: a warning, not an error
}

__aicore__ inline void CastUnsupportedMode(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 1024);
    LocalTensor<float> f = b.Get<float>();
    Duplicate(f, 1.5f, 64);
#if PANGUC_SIM_310P
    LocalTensor<half> h = f[64].ReinterpretCast<half>();
    Cast(h, f, RoundMode::CAST_RINT, 64);  // 310P float -> half: CAST_NONE or CAST_ODD only
#else
    LocalTensor<bfloat16_t> h = f[64].ReinterpretCast<bfloat16_t>();
    Cast(h, f, RoundMode::CAST_NONE, 64);  // float -> bf16 has no CAST_NONE
#endif
}

__aicore__ inline void ScalarStoreSharedLine(GM_ADDR, GM_ADDR y)
{
    GlobalTensor<float> yGm;
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    // Each block owns 4 floats (16 bytes): different bytes, one 64-byte line.
    yGm.SetValue(GetBlockIdx() * 4, 1.0f);
}

__aicore__ inline void DmaIntoScalarLine(GM_ADDR, GM_ADDR y)
{
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> q;
    pipe.InitBuffer(q, 1, 1024);
    GlobalTensor<float> yGm;
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    if (GetBlockIdx() == 0) {
        yGm.SetValue(0, 1.0f);  // bytes 0..3 through the data cache
    } else {
        LocalTensor<float> t = q.AllocTensor<float>();
        Duplicate(t, 2.0f, 8);
        q.EnQue(t);
        t = q.DeQue<float>();
        DataCopy(yGm[8], t, 8);  // bytes 32..63: same line, by DMA
        q.FreeTensor(t);
    }
}

__aicore__ inline void UbOverReserved(GM_ADDR, GM_ADDR)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 190 * 1024);  // fits 192 KiB - 256 B, not the 8 KiB the library reserves on 910B
}

// GM -> UB on MTE2, then the vector unit reads it with no MTE2 -> V sync.
__aicore__ inline void MissingMte2V(GM_ADDR x, GM_ADDR, bool sync)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 1024);
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, 1024);
    LocalTensor<float> t = b.Get<float>();
    DataCopy(t, xGm, 64);
    if (sync) {
        SetFlag<HardEvent::MTE2_V>(EVENT_ID0);
        WaitFlag<HardEvent::MTE2_V>(EVENT_ID0);
    }
    Adds(t[64], t, 1.0f, 64);
}

// The vector unit writes UB, then MTE3 copies it out with no V -> MTE3 sync.
__aicore__ inline void MissingVMte3(GM_ADDR, GM_ADDR y)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 1024);
    GlobalTensor<float> yGm;
    yGm.SetGlobalBuffer((__gm__ float*)y, 1024);
    LocalTensor<float> t = b.Get<float>();
    Duplicate(t, 2.0f, 64);
    DataCopy(yGm, t, 64);
}

__aicore__ inline void WaitWithoutSet(GM_ADDR, GM_ADDR)
{
    WaitFlag<HardEvent::V_S>(EVENT_ID1);
}

}  // namespace

extern "C" __global__ __aicore__ void sim_checks(GM_ADDR x, GM_ADDR y, GM_ADDR workspace, CheckTiling tiling)
{
    switch (tiling.caseId) {
        case 1: UbOverAllocation(x, y); break;
        case 2: L1OverAllocation(x, y); break;
        case 3: MisalignedUb(x, y); break;
        case 4: CopyNot32(x, y); break;
        case 5: GmOutOfRange(x, y); break;
        case 6: GmGetValueOutOfRange(x, y); break;
        case 7: SetGlobalBufferTooLong(x, y); break;
        case 8: DeQueEmpty(x, y); break;
        case 9: EnQueBeyondDepth(x, y); break;
        case 10: AllocBeyondCount(x, y); break;
        case 11: FreeTwice(x, y); break;
        case 12: FreeForeign(x, y); break;
        case 13: CountExceedsSize(x, y); break;
        case 14: RepeatOver255(x, y); break;
        case 15: CompareNot256(x, y); break;
        case 16: MmadTooLarge(x, y); break;
        case 17: MisalignedL0A(x, y); break;
        case 18: MisalignedL0C(x, y); break;
        case 19: CrossBlockRead(x, y); break;
        case 20: CrossBlockWrite(x, y); break;
        case 21: UninitRead(x, y); break;
        case 22: UseAfterFree(x, y); break;
        case 23: UseWhileEnqueued(x, y); break;
        case 24: MixVectorCube(x, y); break;
        case 25: WriteInput(x, y); break;
        case 26: PadCopy(x, y); break;
        case 27: Bf16Tensor(x, y); break;
        case 28: FixpipeCall(x, y); break;
        case 29: LeftEnqueued(x, y); break;
        case 30: CastUnsupportedMode(x, y); break;
        case 31: ScalarStoreSharedLine(x, y); break;
        case 32: DmaIntoScalarLine(x, y); break;
        case 33: UbOverReserved(x, y); break;
        case 34: MissingMte2V(x, y, false); break;
        case 35: MissingVMte3(x, y); break;
        case 36: WaitWithoutSet(x, y); break;
        case 37: MissingMte2V(x, y, true); break;
        default: break;
    }
}

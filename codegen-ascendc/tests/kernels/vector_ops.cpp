// A tour of the vector API subset, checked value by value from Rust:
// block 0 computes several ops on x, y (256 floats each) into `out`; every
// block then atomically adds x into `acc` (SetAtomicAdd), so acc = acc0 + blockDim * x.
#include "kernel_operator.h"

using namespace AscendC;

constexpr uint32_t N = 256;

// The vector results are complete before MTE3 copies them out.
__aicore__ inline void VToMte3()
{
    SetFlag<HardEvent::V_MTE3>(EVENT_ID0);
    WaitFlag<HardEvent::V_MTE3>(EVENT_ID0);
}

extern "C" __global__ __aicore__ void vector_ops(GM_ADDR x, GM_ADDR y, GM_ADDR out, GM_ADDR acc, GM_ADDR workspace,
                                                 GM_ADDR tiling)
{
    TPipe pipe;
    TBuf<TPosition::VECCALC> bx, by, b0, b1, bmask, bwork, bsmall, bhalf, bint;
    pipe.InitBuffer(bx, N * 4);
    pipe.InitBuffer(by, N * 4);
    pipe.InitBuffer(b0, N * 4);
    pipe.InitBuffer(b1, N * 4);
    pipe.InitBuffer(bmask, 64);
    pipe.InitBuffer(bwork, N * 4);
    pipe.InitBuffer(bsmall, 32);
    pipe.InitBuffer(bhalf, N * 2);
    pipe.InitBuffer(bint, N * 4);
    GlobalTensor<float> xGm, yGm, outGm, accGm;
    xGm.SetGlobalBuffer((__gm__ float*)x, N);
    yGm.SetGlobalBuffer((__gm__ float*)y, N);
    outGm.SetGlobalBuffer((__gm__ float*)out);
    accGm.SetGlobalBuffer((__gm__ float*)acc, N);
    LocalTensor<float> tx = bx.Get<float>(), ty = by.Get<float>(), t0 = b0.Get<float>(), t1 = b1.Get<float>();
    LocalTensor<float> work = bwork.Get<float>(), small = bsmall.Get<float>();
    LocalTensor<uint8_t> mask = bmask.Get<uint8_t>();
    DataCopy(tx, xGm, N);
    DataCopy(ty, yGm, N);
    PipeBarrier<PIPE_ALL>();  // the loads (MTE2) complete before any other pipe reads them

    if (GetBlockIdx() == 0) {
        // [0, 256): exp(x)
        Exp(t0, tx, N);
        VToMte3();
        DataCopy(outGm[0], t0, N);
        // [256, 384): x as half (RINT), 128 floats' worth of bytes
        LocalTensor<half> th = bhalf.Get<half>();
        Cast(th, tx, RoundMode::CAST_RINT, N);
        GlobalTensor<half> outHalf;
        outHalf.SetGlobalBuffer((__gm__ half*)out + 2 * 256, N);
        VToMte3();
        DataCopy(outHalf, th, N);
        // [384, 640): floor(10 x) as int32
        Muls(t0, tx, 10.0f, N);
        LocalTensor<int32_t> ti = bint.Get<int32_t>();
        Cast(ti, t0, RoundMode::CAST_FLOOR, N);
        GlobalTensor<int32_t> outInt;
        outInt.SetGlobalBuffer((__gm__ int32_t*)out + 384, N);
        VToMte3();
        DataCopy(outInt, ti, N);
        // [640, 896): min(x, y) via Compare + Select
        Compare(mask, tx, ty, CMPMODE::LT, N);
        Select(t0, mask, tx, ty, SELMODE::VSEL_TENSOR_TENSOR_MODE, N);
        VToMte3();
        DataCopy(outGm[640], t0, N);
        // [896, 904): max(x) and its index
        Duplicate(small, 0.0f, 8);
        ReduceMax(small, tx, work, N, true);
        VToMte3();
        DataCopy(outGm[896], small, 8);
        // [904, 1160): repeat form: the first 32 lanes of each 64-float repeat get max(x, y), others stay 7
        Duplicate(t1, 7.0f, N);
        Max(t1, tx, ty, 32, 4, BinaryRepeatParams());
        VToMte3();
        DataCopy(outGm[904], t1, N);
        // [1160, 1416): silu(x)
        Silu(t0, tx, N);
        VToMte3();
        DataCopy(outGm[1160], t0, N);
        // [1416, 1672): sqrt(relu(x)) + 0.5, then divided by (y*y + 1)
        Relu(t0, tx, N);
        Sqrt(t0, t0, N);
        Adds(t0, t0, 0.5f, N);
        Mul(t1, ty, ty, N);
        Adds(t1, t1, 1.0f, N);
        Div(t0, t0, t1, N);
        VToMte3();
        DataCopy(outGm[1416], t0, N);
        // [1672, 1680): sum(x) via ReduceSum
        Duplicate(small, 0.0f, 8);
        ReduceSum(small, tx, work, N);
        VToMte3();
        DataCopy(outGm[1672], small, 8);
    }

    SetAtomicAdd<float>();
    DataCopy(accGm, tx, N);
    SetAtomicNone();
}

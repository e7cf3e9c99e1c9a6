// Kernels with hand-computable timing under the simulation's per-pipe
// timing model (tests/sim_timing.rs).
#include "kernel_operator.h"

using namespace AscendC;

struct CopyTiling {
    uint32_t len;  // floats per block
    uint32_t reserved;
};

// Pure MTE2: every block copies its `len` floats GM -> UB and stops.
extern "C" __global__ __aicore__ void timing_copy(GM_ADDR x, GM_ADDR workspace, CopyTiling t)
{
    (void)workspace;
    GlobalTensor<float> xGm;
    xGm.SetGlobalBuffer((__gm__ float*)x + GetBlockIdx() * t.len, t.len);
    TPipe pipe;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, t.len * sizeof(float));
    LocalTensor<float> u = buf.Get<float>();
    DataCopy(u, xGm, t.len);
}

struct PingPongTiling {
    uint32_t tileLen;    // floats per tile (a 32-byte multiple)
    uint32_t tiles;      // tiles per block
    uint32_t adds;       // vector instructions per tile
    uint32_t serialize;  // 1: PipeBarrier<PIPE_ALL> after every tile
};

// CopyIn / Compute / CopyOut over `tiles` tiles with double-buffered queues:
// y = x + adds. With serialize = 1 a full barrier ends every tile, so no two
// pipes ever overlap.
extern "C" __global__ __aicore__ void timing_pingpong(GM_ADDR x, GM_ADDR y, GM_ADDR workspace, PingPongTiling t)
{
    (void)workspace;
    const uint64_t base = uint64_t(GetBlockIdx()) * t.tiles * t.tileLen;
    GlobalTensor<float> xGm, yGm;
    xGm.SetGlobalBuffer((__gm__ float*)x + base, t.tiles * t.tileLen);
    yGm.SetGlobalBuffer((__gm__ float*)y + base, t.tiles * t.tileLen);
    TPipe pipe;
    TQue<TPosition::VECIN, 2> inQ;
    TQue<TPosition::VECOUT, 2> outQ;
    pipe.InitBuffer(inQ, 2, t.tileLen * sizeof(float));
    pipe.InitBuffer(outQ, 2, t.tileLen * sizeof(float));
    for (uint32_t i = 0; i < t.tiles; ++i) {
        LocalTensor<float> a = inQ.AllocTensor<float>();
        DataCopy(a, xGm[i * t.tileLen], t.tileLen);
        inQ.EnQue(a);

        LocalTensor<float> xi = inQ.DeQue<float>();
        LocalTensor<float> yo = outQ.AllocTensor<float>();
        Adds(yo, xi, 1.0f, t.tileLen);
        for (uint32_t k = 1; k < t.adds; ++k) Adds(yo, yo, 1.0f, t.tileLen);
        outQ.EnQue(yo);
        inQ.FreeTensor(xi);

        LocalTensor<float> o = outQ.DeQue<float>();
        DataCopy(yGm[i * t.tileLen], o, t.tileLen);
        outQ.FreeTensor(o);
        if (t.serialize) PipeBarrier<PIPE_ALL>();
    }
}

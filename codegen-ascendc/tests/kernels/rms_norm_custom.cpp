// RMSNorm over rows of a float matrix: y = x / sqrt(mean(x^2) + eps) * gamma.
// Rows are dealt round-robin to blocks; each row goes through a double-buffered
// CopyIn / Compute / CopyOut pipeline. Tiling comes through GM (op-package
// style, GET_TILING_DATA).
#include "kernel_operator.h"

using namespace AscendC;

struct RmsNormTiling {
    uint32_t rows;
    uint32_t cols;  // cols * sizeof(float) must be a multiple of 32
    float eps;
    uint32_t reserved;
};

class KernelRmsNorm {
public:
    __aicore__ inline KernelRmsNorm() {}
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR gamma, GM_ADDR y, const RmsNormTiling& t)
    {
        rows = t.rows;
        cols = t.cols;
        eps = t.eps;
        xGm.SetGlobalBuffer((__gm__ float*)x, rows * cols);
        gammaGm.SetGlobalBuffer((__gm__ float*)gamma, cols);
        yGm.SetGlobalBuffer((__gm__ float*)y, rows * cols);
        pipe.InitBuffer(inQueueX, 2, cols * sizeof(float));
        pipe.InitBuffer(outQueueY, 2, cols * sizeof(float));
        pipe.InitBuffer(gammaBuf, cols * sizeof(float));
        pipe.InitBuffer(sqBuf, cols * sizeof(float));
        pipe.InitBuffer(workBuf, 256 * sizeof(float));
        pipe.InitBuffer(sumBuf, 32);
    }
    __aicore__ inline void Process()
    {
        LocalTensor<float> gamma = gammaBuf.Get<float>();
        DataCopy(gamma, gammaGm, cols);
        event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::MTE2_V));
        SetFlag<HardEvent::MTE2_V>(e);
        WaitFlag<HardEvent::MTE2_V>(e);
        for (uint32_t r = GetBlockIdx(); r < rows; r += GetBlockNum()) {
            CopyIn(r);
            Compute(gamma);
            CopyOut(r);
        }
    }

private:
    __aicore__ inline void CopyIn(uint32_t r)
    {
        LocalTensor<float> x = inQueueX.AllocTensor<float>();
        DataCopy(x, xGm[r * cols], cols);
        inQueueX.EnQue(x);
    }
    __aicore__ inline void Compute(const LocalTensor<float>& gamma)
    {
        LocalTensor<float> x = inQueueX.DeQue<float>();
        LocalTensor<float> y = outQueueY.AllocTensor<float>();
        LocalTensor<float> sq = sqBuf.Get<float>();
        LocalTensor<float> work = workBuf.Get<float>();
        LocalTensor<float> sum = sumBuf.Get<float>();
        Mul(sq, x, x, cols);
        PipeBarrier<PIPE_V>();
        ReduceSum(sum, sq, work, cols);
        PipeBarrier<PIPE_V>();
        // rstd = 1 / sqrt(sum / cols + eps), on the vector unit (one element).
        Muls(sum, sum, 1.0f / static_cast<float>(cols), 1);
        PipeBarrier<PIPE_V>();
        Adds(sum, sum, eps, 1);
        PipeBarrier<PIPE_V>();
        Rsqrt(sum, sum, 1);
        event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(e);
        WaitFlag<HardEvent::V_S>(e);
        const float rstd = sum.GetValue(0);
        Muls(y, x, rstd, cols);
        PipeBarrier<PIPE_V>();
        Mul(y, y, gamma, cols);
        outQueueY.EnQue(y);
        inQueueX.FreeTensor(x);
    }
    __aicore__ inline void CopyOut(uint32_t r)
    {
        LocalTensor<float> y = outQueueY.DeQue<float>();
        DataCopy(yGm[r * cols], y, cols);
        outQueueY.FreeTensor(y);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, 2> inQueueX;
    TQue<TPosition::VECOUT, 2> outQueueY;
    TBuf<TPosition::VECCALC> gammaBuf, sqBuf, workBuf, sumBuf;
    GlobalTensor<float> xGm, gammaGm, yGm;
    uint32_t rows = 0, cols = 0;
    float eps = 0.0f;
};

extern "C" __global__ __aicore__ void rms_norm_custom(GM_ADDR x, GM_ADDR gamma, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT(RmsNormTiling);
    GET_TILING_DATA(t, tiling);
    KernelRmsNorm op;
    op.Init(x, gamma, y, t);
    op.Process();
}

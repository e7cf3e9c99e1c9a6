// Elementwise z = x + y in the canonical CopyIn / Compute / CopyOut style
// with double buffering. Each block takes a contiguous 32-byte-aligned chunk;
// the last tile of the last block may be unaligned, which 910B copies with
// DataCopyPad (310P has none, so the host keeps lengths aligned there).
// The tiling struct is passed by value (direct-launch style); `dtype` selects
// half (0) or float (1), like a tiling key.
#include "kernel_operator.h"

using namespace AscendC;

struct AddTiling {
    uint32_t totalLength;
    uint32_t tileLength;  // elements per tile, a multiple of 32 bytes
    uint32_t dtype;
    uint32_t reserved;
};

constexpr int32_t BUFFER_NUM = 2;

template <typename T>
class KernelAdd {
public:
    __aicore__ inline KernelAdd() {}
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR y, GM_ADDR z, const AddTiling& t)
    {
        constexpr uint32_t elemsPerBlock = 32 / sizeof(T);
        uint32_t perCore = (t.totalLength + GetBlockNum() - 1) / GetBlockNum();
        perCore = (perCore + elemsPerBlock - 1) / elemsPerBlock * elemsPerBlock;
        const uint32_t start = perCore * GetBlockIdx();
        length = start >= t.totalLength ? 0 : (t.totalLength - start < perCore ? t.totalLength - start : perCore);
        tileLength = t.tileLength;
        if (length == 0) return;
        xGm.SetGlobalBuffer((__gm__ T*)x + start, length);
        yGm.SetGlobalBuffer((__gm__ T*)y + start, length);
        zGm.SetGlobalBuffer((__gm__ T*)z + start, length);
        pipe.InitBuffer(inQueueX, BUFFER_NUM, tileLength * sizeof(T));
        pipe.InitBuffer(inQueueY, BUFFER_NUM, tileLength * sizeof(T));
        pipe.InitBuffer(outQueueZ, BUFFER_NUM, tileLength * sizeof(T));
    }
    __aicore__ inline void Process()
    {
        if (length == 0) return;
        const uint32_t tiles = (length + tileLength - 1) / tileLength;
        for (uint32_t i = 0; i < tiles; i++) {
            const uint32_t n = (length - i * tileLength) < tileLength ? (length - i * tileLength) : tileLength;
            CopyIn(i, n);
            Compute(n);
            CopyOut(i, n);
        }
    }

private:
    __aicore__ inline void CopyIn(uint32_t i, uint32_t n)
    {
        LocalTensor<T> xLocal = inQueueX.AllocTensor<T>();
        LocalTensor<T> yLocal = inQueueY.AllocTensor<T>();
        if ((n * sizeof(T)) % 32 == 0) {
            DataCopy(xLocal, xGm[i * tileLength], n);
            DataCopy(yLocal, yGm[i * tileLength], n);
        } else {
#if __CCE_AICORE__ == 220
            DataCopyExtParams params{1, static_cast<uint32_t>(n * sizeof(T)), 0, 0, 0};
            DataCopyPadExtParams<T> pad{false, 0, 0, static_cast<T>(0)};
            DataCopyPad(xLocal, xGm[i * tileLength], params, pad);
            DataCopyPad(yLocal, yGm[i * tileLength], params, pad);
#else
            DataCopy(xLocal, xGm[i * tileLength], n);  // rejected by the simulation: not 32-byte aligned
            DataCopy(yLocal, yGm[i * tileLength], n);
#endif
        }
        inQueueX.EnQue(xLocal);
        inQueueY.EnQue(yLocal);
    }
    __aicore__ inline void Compute(uint32_t n)
    {
        LocalTensor<T> xLocal = inQueueX.DeQue<T>();
        LocalTensor<T> yLocal = inQueueY.DeQue<T>();
        LocalTensor<T> zLocal = outQueueZ.AllocTensor<T>();
        Add(zLocal, xLocal, yLocal, n);
        outQueueZ.EnQue<T>(zLocal);
        inQueueX.FreeTensor(xLocal);
        inQueueY.FreeTensor(yLocal);
    }
    __aicore__ inline void CopyOut(uint32_t i, uint32_t n)
    {
        LocalTensor<T> zLocal = outQueueZ.DeQue<T>();
        if ((n * sizeof(T)) % 32 == 0) {
            DataCopy(zGm[i * tileLength], zLocal, n);
        } else {
#if __CCE_AICORE__ == 220
            DataCopyExtParams params{1, static_cast<uint32_t>(n * sizeof(T)), 0, 0, 0};
            DataCopyPad(zGm[i * tileLength], zLocal, params);
#else
            DataCopy(zGm[i * tileLength], zLocal, n);
#endif
        }
        outQueueZ.FreeTensor(zLocal);
    }

    TPipe pipe;
    TQue<TPosition::VECIN, BUFFER_NUM> inQueueX, inQueueY;
    TQue<TPosition::VECOUT, BUFFER_NUM> outQueueZ;
    GlobalTensor<T> xGm, yGm, zGm;
    uint32_t length = 0;
    uint32_t tileLength = 0;
};

extern "C" __global__ __aicore__ void add_custom(GM_ADDR x, GM_ADDR y, GM_ADDR z, GM_ADDR workspace, AddTiling tiling)
{
    if (tiling.dtype == 0) {
        KernelAdd<half> op;
        op.Init(x, y, z, tiling);
        op.Process();
    } else {
        KernelAdd<float> op;
        op.Init(x, y, z, tiling);
        op.Process();
    }
}

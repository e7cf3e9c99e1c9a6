// C[M, N] (float) = A[M, K] (half) x B[K, N] (half) on the cube unit,
// low-level path: GM -(Nd2Nz)-> A1/B1 -(LoadData)-> A2/B2 -(Mmad)-> CO1, then
//   910B: -(Fixpipe, NZ->ND)-> GM
//   310P: -(DataCopy CO1->CO2, BLOCK_MODE_MATRIX)-> UB -(strided DataCopy,
//         NZ->ND)-> GM (needs N and baseN multiples of 16).
// Each block computes one baseM x baseN tile of C and loops over K in baseK
// steps, accumulating in L0C. Edge tiles are smaller; B is K x N, so its
// fractals are transposed on the way to L0B.
#include "kernel_operator.h"

using namespace AscendC;

struct MatmulTiling {
    uint32_t M, N, K;
    uint32_t baseM, baseN, baseK;  // multiples of 16
};

__aicore__ inline uint32_t CeilCube(uint32_t x) { return (x + 15) / 16 * 16; }
__aicore__ inline uint32_t MinU(uint32_t a, uint32_t b) { return a < b ? a : b; }

class KernelMatmul {
public:
    __aicore__ inline KernelMatmul() {}
    __aicore__ inline bool Init(GM_ADDR a, GM_ADDR b, GM_ADDR c, const MatmulTiling& t)
    {
        tiling = t;
        const uint32_t mTiles = (t.M + t.baseM - 1) / t.baseM;
        const uint32_t nTiles = (t.N + t.baseN - 1) / t.baseN;
        const uint32_t tile = GetBlockIdx();
        if (tile >= mTiles * nTiles) return false;
        m0 = (tile / nTiles) * t.baseM;
        n0 = (tile % nTiles) * t.baseN;
        mLen = MinU(t.baseM, t.M - m0);
        nLen = MinU(t.baseN, t.N - n0);
        aGm.SetGlobalBuffer((__gm__ half*)a, t.M * t.K);
        bGm.SetGlobalBuffer((__gm__ half*)b, t.K * t.N);
        cGm.SetGlobalBuffer((__gm__ float*)c, t.M * t.N);
        pipe.InitBuffer(inQueueA1, 1, t.baseM * t.baseK * sizeof(half));
        pipe.InitBuffer(inQueueB1, 1, t.baseK * t.baseN * sizeof(half));
        pipe.InitBuffer(inQueueA2, 1, t.baseM * t.baseK * sizeof(half));
        pipe.InitBuffer(inQueueB2, 1, t.baseK * t.baseN * sizeof(half));
        pipe.InitBuffer(outQueueCO1, 1, t.baseM * t.baseN * sizeof(float));
#if __CCE_AICORE__ != 220
        pipe.InitBuffer(outQueueCO2, 1, t.baseM * t.baseN * sizeof(float));
#endif
        return true;
    }
    __aicore__ inline void Process()
    {
        LocalTensor<float> c1 = outQueueCO1.AllocTensor<float>();
        for (uint32_t k0 = 0; k0 < tiling.K; k0 += tiling.baseK) {
            const uint32_t kLen = MinU(tiling.baseK, tiling.K - k0);
            CopyIn(k0, kLen);
            SplitA(kLen);
            SplitB(kLen);
            Compute(c1, kLen, k0 == 0);
        }
        outQueueCO1.EnQue(c1);
        CopyOut();
    }

private:
    __aicore__ inline void CopyIn(uint32_t k0, uint32_t kLen)
    {
        LocalTensor<half> a1 = inQueueA1.AllocTensor<half>();
        LocalTensor<half> b1 = inQueueB1.AllocTensor<half>();
        Nd2NzParams pa;
        pa.ndNum = 1;
        pa.nValue = mLen;
        pa.dValue = kLen;
        pa.srcNdMatrixStride = 0;
        pa.srcDValue = tiling.K;
        pa.dstNzC0Stride = CeilCube(mLen);
        pa.dstNzNStride = 1;
        pa.dstNzMatrixStride = 0;
        DataCopy(a1, aGm[m0 * tiling.K + k0], pa);
        Nd2NzParams pb;
        pb.ndNum = 1;
        pb.nValue = kLen;
        pb.dValue = nLen;
        pb.srcNdMatrixStride = 0;
        pb.srcDValue = tiling.N;
        pb.dstNzC0Stride = CeilCube(kLen);
        pb.dstNzNStride = 1;
        pb.dstNzMatrixStride = 0;
        DataCopy(b1, bGm[k0 * tiling.N + n0], pb);
        inQueueA1.EnQue(a1);
        inQueueB1.EnQue(b1);
    }
    __aicore__ inline void SplitA(uint32_t kLen)
    {
        LocalTensor<half> a1 = inQueueA1.DeQue<half>();
        LocalTensor<half> a2 = inQueueA2.AllocTensor<half>();
        const uint32_t mBlocks = CeilCube(mLen) / 16, kBlocks = CeilCube(kLen) / 16;
        for (uint32_t mb = 0; mb < mBlocks; mb++) {
            LoadData2DParams p;
            p.startIndex = mb;
            p.repeatTimes = kBlocks;
            p.srcStride = mBlocks;
            p.ifTranspose = false;
            LoadData(a2[mb * kBlocks * 256], a1, p);
        }
        inQueueA2.EnQue(a2);
        inQueueA1.FreeTensor(a1);
    }
    __aicore__ inline void SplitB(uint32_t kLen)
    {
        LocalTensor<half> b1 = inQueueB1.DeQue<half>();
        LocalTensor<half> b2 = inQueueB2.AllocTensor<half>();
        const uint32_t kBlocks = CeilCube(kLen) / 16, nBlocks = CeilCube(nLen) / 16;
        for (uint32_t kb = 0; kb < kBlocks; kb++) {
            LoadData2DParams p;
            p.startIndex = kb;
            p.repeatTimes = nBlocks;
            p.srcStride = kBlocks;
            p.ifTranspose = true;
            LoadData(b2[kb * nBlocks * 256], b1, p);
        }
        inQueueB2.EnQue(b2);
        inQueueB1.FreeTensor(b1);
    }
    __aicore__ inline void Compute(LocalTensor<float>& c1, uint32_t kLen, bool first)
    {
        LocalTensor<half> a2 = inQueueA2.DeQue<half>();
        LocalTensor<half> b2 = inQueueB2.DeQue<half>();
        MmadParams p;
        p.m = mLen;
        p.n = nLen;
        p.k = kLen;
        p.cmatrixInitVal = first;
        Mmad(c1, a2, b2, p);
        inQueueA2.FreeTensor(a2);
        inQueueB2.FreeTensor(b2);
    }
    __aicore__ inline void CopyOut()
    {
        LocalTensor<float> c1 = outQueueCO1.DeQue<float>();
#if __CCE_AICORE__ == 220
        FixpipeParamsV220 f;
        f.nSize = nLen;
        f.mSize = mLen;
        f.srcStride = CeilCube(mLen);
        f.dstStride = tiling.N;
        f.ndNum = 1;
        f.srcNdStride = 0;
        f.dstNdStride = 0;
        Fixpipe(cGm[m0 * tiling.N + n0], c1, f);
        outQueueCO1.FreeTensor(c1);
#else
        const uint32_t mBlocks = CeilCube(mLen) / 16, nBlocks = CeilCube(nLen) / 16;
        LocalTensor<float> c2 = outQueueCO2.AllocTensor<float>();
        DataCopyParams p;
        p.blockCount = 1;
        p.blockLen = mBlocks * nBlocks;  // 16x16 fractals
        DataCopyEnhancedParams e;
        e.blockMode = BlockMode::BLOCK_MODE_MATRIX;
        DataCopy(c2, c1, p, e);
        outQueueCO1.FreeTensor(c1);
        outQueueCO2.EnQue(c2);
        c2 = outQueueCO2.DeQue<float>();
        // Column block nb of the NZ tile holds rows 0..mLen-1, 16 floats each,
        // contiguously: one strided copy writes them as 64-byte row pieces.
        for (uint32_t nb = 0; nb < nBlocks; nb++) {
            DataCopyParams q;
            q.blockCount = mLen;
            q.blockLen = 16 * sizeof(float) / 32;
            q.srcStride = 0;
            q.dstStride = (tiling.N - 16) * sizeof(float) / 32;
            DataCopy(cGm[m0 * tiling.N + n0 + nb * 16], c2[nb * mBlocks * 256], q);
        }
        outQueueCO2.FreeTensor(c2);
#endif
    }

    TPipe pipe;
    TQue<TPosition::A1, 1> inQueueA1;
    TQue<TPosition::B1, 1> inQueueB1;
    TQue<TPosition::A2, 1> inQueueA2;
    TQue<TPosition::B2, 1> inQueueB2;
    TQue<TPosition::CO1, 1> outQueueCO1;
#if __CCE_AICORE__ != 220
    TQue<TPosition::CO2, 1> outQueueCO2;
#endif
    GlobalTensor<half> aGm, bGm;
    GlobalTensor<float> cGm;
    MatmulTiling tiling;
    uint32_t m0 = 0, n0 = 0, mLen = 0, nLen = 0;
};

extern "C" __global__ __aicore__ void matmul_custom(GM_ADDR a, GM_ADDR b, GM_ADDR c, GM_ADDR workspace, GM_ADDR tilingGm)
{
    GET_TILING_DATA_WITH_STRUCT(MatmulTiling, t, tilingGm);
    KernelMatmul op;
    if (op.Init(a, b, c, t)) {
        op.Process();
    }
}

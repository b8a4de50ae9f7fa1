// Skinny GEMM for decode: y[m, n] = x[m, k] · w[n, k]ᵀ with m <= 8 rows, bf16
// in and out, f32 accumulation. At decode batch sizes a projection is a read
// of its weight matrix; cuBLAS spends ~10 us on the small ones (2B's q|k|v
// and o read 4–6 MB, 1–1.5 us of HBM time), so the weights are streamed here
// with 16-byte loads, many in flight, each weight element read once.
//
// Block: 8 warps. `ksplit` warps share one output column j (a row of w), each
// taking a contiguous slice of k; a block covers 8 / ksplit columns. Each
// lane loads 8 weights at a time and multiplies them against the same 8
// elements of every x row (x is small and stays in L1/L2). The partial sums
// are reduced across the warp with shuffles, then across the ksplit warps in
// shared memory. Requires k % 8 == 0 and 16-byte-aligned x and w (the
// launcher checks). m, ksplit are runtime values (m <= 8, ksplit in 1,2,4,8).
#include "common.cuh"

#define GEMV_MAX_M 8
#define GEMV_WARPS 8

__device__ __forceinline__ void fma8(float* acc, const uint4& wv, const uint4& xv) {
    const bf16* w = reinterpret_cast<const bf16*>(&wv);
    const bf16* x = reinterpret_cast<const bf16*>(&xv);
#pragma unroll
    for (int e = 0; e < 8; ++e) *acc = fmaf(__bfloat162float(w[e]), __bfloat162float(x[e]), *acc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16(bf16* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w, int m, int n, int k,
              int ksplit) {
    __shared__ float part[GEMV_WARPS][GEMV_MAX_M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cols_per_block = GEMV_WARPS / ksplit;
    const int j = blockIdx.x * cols_per_block + warp / ksplit;  // output column
    const int slice = warp % ksplit;
    const int k8 = k >> 3;                         // 16-byte groups per row
    const int per = (k8 + ksplit - 1) / ksplit;    // groups in this warp's slice
    const int g0 = slice * per, g1 = min(k8, g0 + per);

    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[r] = 0.f;
    if (j < n) {
        const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)j * k);
        const uint4* xr = reinterpret_cast<const uint4*>(x);
        int g = g0 + lane;
        // Four loads in flight per lane, then the tail.
        for (; g + 96 < g1; g += 128) {
            uint4 wv[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) wv[u] = __ldg(wr + g + 32 * u);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
#pragma unroll
                for (int r = 0; r < GEMV_MAX_M; ++r)
                    if (r < m) fma8(&acc[r], wv[u], __ldg(xr + (size_t)r * k8 + g + 32 * u));
            }
        }
        for (; g < g1; g += 32) {
            const uint4 wv = __ldg(wr + g);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_M; ++r)
                if (r < m) fma8(&acc[r], wv, __ldg(xr + (size_t)r * k8 + g));
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; ++r) part[warp][r] = acc[r];
    }
    __syncthreads();
    // The first warp of each column's group sums the slices and writes.
    if (slice == 0 && lane < m && j < n) {
        float s = 0.f;
        for (int q = 0; q < ksplit; ++q) s += part[warp + q][lane];
        y[(size_t)lane * n + j] = __float2bfloat16_rn(s);
    }
}

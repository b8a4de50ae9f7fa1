// Argmax over the last dimension, torch.argmax(x, -1): greedy decoding.
// One block per row; each thread scans its strided columns, then a
// (value, index) reduction over the warp and the block. T is bf16 or f32;
// comparisons are on the exact f32 values.
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// torch's order (ATen GreaterOrNan): NaN beats every number, the lowest index
// wins among NaNs and among equal values (-0 == +0), else the larger value.
// A strict total order on (value, index) pairs with distinct indices, so every
// lane of a butterfly reduction ends with the same winner.
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) {
    if (isnan(a)) return !isnan(b) || ia < ib;
    return a == b ? ia < ib : a > b;
}

// Loses to every real element, -inf included (by index), and to NaN.
#define ARGMAX_NONE 0x7fffffff

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (beats(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// out[r] = index of the largest x[r, :]. blockDim.x: a multiple of 32, <= 1024.
template <typename T>
__device__ void argmax(int* __restrict__ out,       // (rows,)
                       const T* __restrict__ x,     // (rows, cols), cols >= 1
                       int cols) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    float v = -INFINITY;
    int i = ARGMAX_NONE;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float y = to_float(xr[c]);
        if (beats(y, c, v, i)) {
            v = y;
            i = c;
        }
    }
    warp_argmax(v, i);
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? sv[lane] : -INFINITY;
        i = lane < nwarps ? si[lane] : ARGMAX_NONE;
        warp_argmax(v, i);
        if (lane == 0) out[row] = i;
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points

#define ARGMAX_KERNELS(T, S)                                                                           \
    extern "C" __global__ void argmax_##S(int* out, const T* x, int cols) { argmax<T>(out, x, cols); }
FOR_FLOAT_TYPES(ARGMAX_KERNELS)

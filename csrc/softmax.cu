// Softmax over the last dimension: exp(x - max) / sum, torch.softmax(x, -1).
// One block per row, three passes over the row (max, sum, write; the row of a
// 152k-vocab logit vector stays in L2 between them); fp32 internally; T is
// bf16 or f32. A row that is -inf everywhere comes out NaN, as in torch.
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

template <typename T>
__device__ void softmax(T* __restrict__ out,        // (rows, cols)
                        const T* __restrict__ x,    // (rows, cols)
                        int cols) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    T* orow = out + row * cols;
    // fmaxf skips NaN, as the CPU reference's f32::max does; a NaN then
    // poisons the sum, so the whole row is NaN on both backends.
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, to_float(xr[c]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += expf(to_float(xr[c]) - m);
    const float inv = 1.f / block_sum(s, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) orow[c] = from_float<T>(expf(to_float(xr[c]) - m) * inv);
}

// ----------------------------------------------------------------------------
// Unmangled entry points

#define SOFTMAX_KERNELS(T, S)                                                                          \
    extern "C" __global__ void softmax_##S(T* out, const T* x, int cols) { softmax<T>(out, x, cols); }
FOR_FLOAT_TYPES(SOFTMAX_KERNELS)

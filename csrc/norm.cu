// RMSNorm, fused residual-add + RMSNorm, and LayerNorm.
// One block per row; fp32 statistics; T is bf16 or f32.
// Mirrors transformers Qwen2RMSNorm and nn.LayerNorm (Qwen2-VL vision blocks).
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w
template <typename T>
__device__ void rms_norm(T* __restrict__ out,        // (rows, cols)
                         const T* __restrict__ x,    // (rows, cols)
                         const T* __restrict__ w,    // (cols,)
                         int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_float(xr[c]);
        ss += v * v;
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = from_float<T>(to_float(xr[c]) * rstd * to_float(w[c]));
}

// residual[r, :] += x[r, :] (stored in T, as the model's residual stream is);
// out[r, :] = rms_norm(residual[r, :]) * w.
template <typename T>
__device__ void add_rms_norm(T* __restrict__ out,       // (rows, cols)
                             T* __restrict__ residual,  // (rows, cols), updated in place
                             const T* __restrict__ x,   // (rows, cols)
                             const T* __restrict__ w,   // (cols,)
                             int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    T* rr = residual + row * cols;
    const T* xr = x + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        T s = from_float<T>(to_float(rr[c]) + to_float(xr[c]));
        rr[c] = s;
        float v = to_float(s);
        ss += v * v;
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / cols + eps);
    // Each thread re-reads only the elements it wrote itself: no barrier needed.
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = from_float<T>(to_float(rr[c]) * rstd * to_float(w[c]));
}

// out[r, :] = (x - mean) / sqrt(var + eps) * w + b, two passes for accuracy.
template <typename T>
__device__ void layer_norm(T* __restrict__ out,        // (rows, cols)
                           const T* __restrict__ x,    // (rows, cols)
                           const T* __restrict__ w,    // (cols,)
                           const T* __restrict__ b,    // (cols,)
                           int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += to_float(xr[c]);
    const float mean = block_sum(s, scratch) / cols;
    float sq = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = to_float(xr[c]) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = from_float<T>((to_float(xr[c]) - mean) * rstd * to_float(w[c]) + to_float(b[c]));
}

// ----------------------------------------------------------------------------
// Unmangled entry points

#define NORM_KERNELS(T, S)                                                                      \
    extern "C" __global__ void rms_norm_##S(T* out, const T* x, const T* w, int cols, float eps) { \
        rms_norm<T>(out, x, w, cols, eps);                                                      \
    }                                                                                           \
    extern "C" __global__ void add_rms_norm_##S(T* out, T* residual, const T* x, const T* w,   \
                                                int cols, float eps) {                          \
        add_rms_norm<T>(out, residual, x, w, cols, eps);                                        \
    }                                                                                           \
    extern "C" __global__ void layer_norm_##S(T* out, const T* x, const T* w, const T* b,      \
                                              int cols, float eps) {                            \
        layer_norm<T>(out, x, w, b, cols, eps);                                                 \
    }
FOR_FLOAT_TYPES(NORM_KERNELS)

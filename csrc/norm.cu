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

// bf16 rows in 16-byte chunks (cols % 8 == 0, 16-byte-aligned rows; the
// launcher checks): eight elements per load and store instead of one, which
// is what it takes to approach the copy bandwidth. Same formulas and the
// same rounding per element as the scalar kernels; only the order in which
// the sum of squares is accumulated differs. Each thread re-reads only the
// chunks it read (or wrote) itself.
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
    const bf16* h = reinterpret_cast<const bf16*>(&v);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __bfloat162float(h[e]);
}

__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 v;
    bf16* h = reinterpret_cast<bf16*>(&v);
#pragma unroll
    for (int e = 0; e < 8; ++e) h[e] = __float2bfloat16_rn(f[e]);
    return v;
}

extern "C" __global__ void rms_norm_v8_bf16(bf16* __restrict__ out, const bf16* __restrict__ x,
                                            const bf16* __restrict__ w, int cols, float eps) {
    __shared__ float scratch[32];
    const int n8 = cols >> 3;
    const size_t row = blockIdx.x;
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * cols);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    uint4* orow = reinterpret_cast<uint4*>(out + row * cols);
    float ss = 0.f, f[8], g[8];
    for (int c = threadIdx.x; c < n8; c += blockDim.x) {
        unpack8(xr[c], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += f[e] * f[e];
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < n8; c += blockDim.x) {
        unpack8(xr[c], f);
        unpack8(__ldg(wr + c), g);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = f[e] * rstd * g[e];
        orow[c] = pack8(f);
    }
}

extern "C" __global__ void add_rms_norm_v8_bf16(bf16* __restrict__ out, bf16* __restrict__ residual,
                                                const bf16* __restrict__ x, const bf16* __restrict__ w, int cols,
                                                float eps) {
    __shared__ float scratch[32];
    const int n8 = cols >> 3;
    const size_t row = blockIdx.x;
    uint4* rr = reinterpret_cast<uint4*>(residual + row * cols);
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * cols);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    uint4* orow = reinterpret_cast<uint4*>(out + row * cols);
    float ss = 0.f, f[8], g[8];
    for (int c = threadIdx.x; c < n8; c += blockDim.x) {
        unpack8(rr[c], f);
        unpack8(xr[c], g);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = f[e] + g[e];
        const uint4 sum = pack8(f);  // the residual stream is stored in bf16
        rr[c] = sum;
        unpack8(sum, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += f[e] * f[e];
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < n8; c += blockDim.x) {
        unpack8(rr[c], f);
        unpack8(__ldg(wr + c), g);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = f[e] * rstd * g[e];
        orow[c] = pack8(f);
    }
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

// Elementwise ops: SiLU-and-mul (Qwen2 MLP), GELU (erf and tanh forms),
// QuickGELU (Qwen2-VL vision MLP), bias add, add.
// One element per thread; T is bf16 or f32, arithmetic in f32 with the
// accurate expf/erff/tanhf (the build does not pass --use_fast_math), one
// rounding to T at the end. n counts elements (< 2^31, checked by the
// launchers); offsets are size_t.
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// g * sigmoid(g); for g -> -inf, expf(-g) = inf and the quotient is -0, not NaN.
__device__ __forceinline__ float silu_f(float g) { return g / (1.f + expf(-g)); }

// torch nn.GELU(): 0.5 x (1 + erf(x / sqrt(2)))
__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

// torch nn.GELU(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
__device__ __forceinline__ float gelu_tanh_f(float x) {
    return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

// transformers QuickGELUActivation: x * sigmoid(1.702 x)
__device__ __forceinline__ float quick_gelu_f(float x) { return x / (1.f + expf(-1.702f * x)); }

// out[r, c] = silu(x[r, c]) * x[r, inter + c]
template <typename T>
__device__ void silu_and_mul(T* __restrict__ out,       // (rows, inter)
                             const T* __restrict__ x,   // (rows, 2 * inter): [gate | up]
                             int n,                     // rows * inter
                             int inter) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n) return;
    const size_t r = i / inter, c = i % inter;
    const T* xr = x + r * 2 * inter;
    out[i] = from_float<T>(silu_f(to_float(xr[c])) * to_float(xr[inter + c]));
}

// out[i] = F(x[i]) for one of the scalar functions above
template <typename T, float (*F)(float)>
__device__ void unary(T* __restrict__ out,       // (n,)
                      const T* __restrict__ x,   // (n,)
                      int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) out[i] = from_float<T>(F(to_float(x[i])));
}

// x[r, c] += bias[c], in place
template <typename T>
__device__ void bias_add(T* __restrict__ x,            // (rows, cols)
                         const T* __restrict__ bias,   // (cols,)
                         int n,                        // rows * cols
                         int cols) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n) return;
    x[i] = from_float<T>(to_float(x[i]) + to_float(bias[i % cols]));
}

// out[i] = a[i] + b[i]. Not __restrict__: each thread reads its element before
// writing it, so out may alias a or b.
template <typename T>
__device__ void add(T* out,        // (n,)
                    const T* a,    // (n,)
                    const T* b,    // (n,)
                    int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

// ----------------------------------------------------------------------------
// Unmangled entry points

#define ACTIVATION_KERNELS(T, S)                                                                        \
    extern "C" __global__ void silu_and_mul_##S(T* out, const T* x, int n, int inter) {                 \
        silu_and_mul<T>(out, x, n, inter);                                                              \
    }                                                                                                   \
    extern "C" __global__ void gelu_##S(T* out, const T* x, int n) { unary<T, gelu_f>(out, x, n); }     \
    extern "C" __global__ void gelu_tanh_##S(T* out, const T* x, int n) {                               \
        unary<T, gelu_tanh_f>(out, x, n);                                                               \
    }                                                                                                   \
    extern "C" __global__ void quick_gelu_##S(T* out, const T* x, int n) {                              \
        unary<T, quick_gelu_f>(out, x, n);                                                              \
    }                                                                                                   \
    extern "C" __global__ void bias_add_##S(T* x, const T* bias, int n, int cols) {                     \
        bias_add<T>(x, bias, n, cols);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void add_##S(T* out, const T* a, const T* b, int n) { add<T>(out, a, b, n); }
FOR_FLOAT_TYPES(ACTIVATION_KERNELS)

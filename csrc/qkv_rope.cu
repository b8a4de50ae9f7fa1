// The front of a Qwen2-VL decoder layer's attention in one pass: the q, k, v
// projection biases, M-RoPE on q and k, and the paged KV-cache write. The
// projections themselves are one GEMM over the concatenated q | k | v weights
// (src/model/qwen2_vl/text.rs), without bias; this kernel takes its output.
// It computes what the separate kernels do in sequence (activation.cu
// bias_add, rope.cu mrope on q and on k, kv_cache.cu kv_cache_write), with the
// same roundings: the biased value is rounded to T before it is rotated, as
// bias_add stores it; the rotation and the angles come from rope.cuh, so the
// result is bit-identical to that sequence on the GPU. It saves four launches
// and three round trips of q, k and v through memory per layer.
//
// Layout: row t of qkv holds heads q heads, then kv_heads k heads, then
// kv_heads v heads, each of head_dim = 2 * half values (transformers'
// q_proj, k_proj, v_proj outputs side by side). Slots as kv_cache.cu: < 0 is
// padding, and a slot past the cache is skipped too (the CPU reference makes
// it an error), so bad device data cannot write outside the cache; q is
// written for every token.
//
// One block per token (grid-striding), threadIdx.x the frequency i in
// [0, half), threadIdx.y over heads: each thread forms its angle and sincos
// once and turns the pair (i, i + half) of every q and k head it visits; the
// v heads are copied by all threads of the block, flat. Every element is read
// and written by one thread: no barrier.
//
// Frequencies: theta^(-i / half) (rope.cuh inv_freq), or, when `table` is not
// null, the token's row of per-sequence tables with cos and sin scaled by
// mscale (rope.cu rope_table; Phi-3's longrope).
//
// Kernel names: qkv_rope_cache_{f32,bf16}.
#include "rope.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// grid (min(n, 65535),), block (half, y). Shapes with d = 2 * half.
template <typename T>
__device__ void qkv_rope_cache(T* __restrict__ q,               // (n, heads, d)
                               T* __restrict__ k_cache,         // (num_slots, kv_heads, d)
                               T* __restrict__ v_cache,         // (num_slots, kv_heads, d)
                               const T* __restrict__ qkv,       // (n, (heads + 2 * kv_heads) * d)
                               const T* __restrict__ bias,      // ((heads + 2 * kv_heads) * d,)
                               const int* __restrict__ pos,     // (3, n): temporal, height, width
                               const int* __restrict__ slots,   // (n,) cache row of each token, < 0 to skip
                               int n, int heads, int kv_heads, int half, int s0, int s1, float theta,
                               const float* __restrict__ table,  // (tables, half) or null: see below
                               int tables, float mscale, int num_slots) {
    const int i = threadIdx.x;  // blockDim.x == half
    const int64_t d = 2 * (int64_t)half, kv_row = kv_heads * d;
    const int64_t width = (heads + 2 * (int64_t)kv_heads) * d;
    const float freq = inv_freq(theta, i, half);
    const int row = mrope_row(i, s0, s1);
    for (int t = blockIdx.x; t < n; t += gridDim.x) {
        const int slot = slots[t];
        const bool cached = slot >= 0 && slot < num_slots;  // block-uniform
        const T* x = qkv + (int64_t)t * width;
        // With frequency tables (longrope; sections are then [half, 0, 0]):
        // the token's table is its position row 1, and cos, sin are scaled.
        const float f = table ? table_freq(table, tables, pos[n + t], i, half) : freq;
        float s, c;
        sincosf((float)pos[(int64_t)row * n + t] * f, &s, &c);
        s *= mscale;
        c *= mscale;
        // q heads, then k heads (as one run of heads + kv_heads rotated heads).
        for (int h = threadIdx.y; h < heads + kv_heads; h += blockDim.y) {
            const int64_t e = h * d + i;  // element i of head h within the row
            // Biased and rounded to T, as bias_add leaves them for mrope.
            const float a = to_float(from_float<T>(to_float(x[e]) + to_float(bias[e])));
            const float b = to_float(from_float<T>(to_float(x[e + half]) + to_float(bias[e + half])));
            const float2 r = rotate_pair(a, b, c, s);
            T* dst;
            if (h < heads) {
                dst = q + ((int64_t)t * heads + h) * d;
            } else if (cached) {
                dst = k_cache + (int64_t)slot * kv_row + (h - heads) * d;
            } else {
                continue;
            }
            dst[i] = from_float<T>(r.x);
            dst[i + half] = from_float<T>(r.y);
        }
        if (!cached) continue;
        // v heads: biased, not rotated.
        const int64_t v0 = (heads + (int64_t)kv_heads) * d;
        T* vd = v_cache + (int64_t)slot * kv_row;
        for (int64_t e = threadIdx.y * blockDim.x + i; e < kv_row; e += (int64_t)blockDim.x * blockDim.y)
            vd[e] = from_float<T>(to_float(x[v0 + e]) + to_float(bias[v0 + e]));
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points: qkv_rope_cache_{f32,bf16}

#define QKV_ROPE_KERNELS(T, S)                                                                         \
    extern "C" __global__ void qkv_rope_cache_##S(T* q, T* k_cache, T* v_cache, const T* qkv,         \
                                                  const T* bias, const int* pos, const int* slots,    \
                                                  int n, int heads, int kv_heads, int half, int s0,   \
                                                  int s1, float theta, const float* table, int tables, \
                                                  float mscale, int num_slots) {                      \
        qkv_rope_cache<T>(q, k_cache, v_cache, qkv, bias, pos, slots, n, heads, kv_heads, half, s0, s1, \
                          theta, table, tables, mscale, num_slots);                                    \
    }
FOR_FLOAT_TYPES(QKV_ROPE_KERNELS)

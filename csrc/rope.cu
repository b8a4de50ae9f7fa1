// Rotary position embeddings, applied in place: 1-D RoPE (Qwen2 LM), M-RoPE
// (Qwen2-VL LM: temporal / height / width sections), RoPE from per-sequence
// frequency tables with a cos/sin scale (Phi-3's longrope) and the 2-D RoPE of
// the Qwen2-VL vision tower. T is bf16 or f32; angles and rotation are in f32.
// Mirrors transformers modeling_qwen2_vl.py: Qwen2VLRotaryEmbedding +
// apply_multimodal_rotary_pos_emb, VisionRotaryEmbedding + rot_pos_emb +
// apply_rotary_pos_emb_vision (see src/ops/rope.rs for the index mapping).
//
// All three use the rotate_half (GPT-NeoX) layout: with half = head_dim / 2,
// element i < half of a head pairs with element i + half and both rotate by
// the same angle a_i:
//   x'[i]        = x[i] cos a_i - x[i + half] sin a_i
//   x'[i + half] = x[i + half] cos a_i + x[i] sin a_i
//
// One block per token. threadIdx.x is the frequency index i in [0, half);
// threadIdx.y strides over heads. A thread computes its angle and sincos once
// and rotates the pair (i, i + half) of every head it visits, so the
// transcendental work is per (token, i), not per element. Each element is read
// and written by exactly one thread: no barrier is needed for the in-place update.
#include "rope.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// Rotates the pair (i, i + half) of every head of one token by `angle`, with
// cos and sin scaled by `mscale` (1 but for longrope; x * 1.0f is exact).
// sincosf, not __sincosf: see rope.cuh.
template <typename T>
__device__ __forceinline__ void rotate_heads(T* __restrict__ xt,  // (heads, 2 * half): one token
                                             int heads, int half, int i, float angle, float mscale = 1.0f) {
    float s, c;
    sincosf(angle, &s, &c);
    s *= mscale;
    c *= mscale;
    const size_t d = 2 * (size_t)half;
    for (int h = threadIdx.y; h < heads; h += blockDim.y) {
        T* xh = xt + (size_t)h * d;
        const float2 r = rotate_pair(to_float(xh[i]), to_float(xh[i + half]), c, s);
        xh[i] = from_float<T>(r.x);
        xh[i + half] = from_float<T>(r.y);
    }
}

// 1-D RoPE: a_i = pos[t] * theta^(-i / half).
template <typename T>
__device__ void rope(T* __restrict__ x,             // (tokens, heads, 2 * half), updated in place
                     const int* __restrict__ pos,   // (tokens,)
                     int heads, int half, float theta) {
    const int i = threadIdx.x;
    if (i >= half) return;
    const size_t t = blockIdx.x;
    const float angle = (float)pos[t] * inv_freq(theta, i, half);
    rotate_heads<T>(x + t * heads * (2 * (size_t)half), heads, half, i, angle);
}

// M-RoPE: as rope, but frequency i takes its position from row 0 (temporal)
// for i < s0, row 1 (height) for s0 <= i < s0 + s1, row 2 (width) after.
template <typename T>
__device__ void mrope(T* __restrict__ x,            // (tokens, heads, 2 * half), updated in place
                      const int* __restrict__ pos,  // (3, tokens): temporal, height, width
                      int tokens, int heads, int half, int s0, int s1, float theta) {
    const int i = threadIdx.x;
    if (i >= half) return;
    const size_t t = blockIdx.x;
    const float angle = (float)pos[(size_t)mrope_row(i, s0, s1) * tokens + t] * inv_freq(theta, i, half);
    rotate_heads<T>(x + t * heads * (2 * (size_t)half), heads, half, i, angle);
}

// Table RoPE (longrope): a_i = pos[0, t] * table[pos[1, t], i]; cos and sin
// scaled by mscale.
template <typename T>
__device__ void rope_table(T* __restrict__ x,               // (tokens, heads, 2 * half), updated in place
                           const int* __restrict__ pos,     // (3, tokens): position, table, unused
                           const float* __restrict__ table, // (tables, half) inverse frequencies
                           int tables, int tokens, int heads, int half, float mscale) {
    const int i = threadIdx.x;
    if (i >= half) return;
    const size_t t = blockIdx.x;
    const float angle = (float)pos[t] * table_freq(table, tables, pos[tokens + t], i, half);
    rotate_heads<T>(x + t * heads * (2 * (size_t)half), heads, half, i, angle, mscale);
}

// Vision 2-D RoPE, q = half / 2 frequencies theta^(-j / q): i < q rotates by
// row * inv_freq[i], q <= i < half by col * inv_freq[i - q].
template <typename T>
__device__ void vision_rope(T* __restrict__ x,            // (tokens, heads, 2 * half), updated in place
                            const int* __restrict__ pos,  // (tokens, 2): (row, col) of each patch
                            int heads, int half, float theta) {
    const int i = threadIdx.x;
    if (i >= half) return;
    const size_t t = blockIdx.x;
    const int q = half / 2;
    const bool by_row = i < q;
    const int j = by_row ? i : i - q;
    const float angle = (float)pos[2 * t + (by_row ? 0 : 1)] * inv_freq(theta, j, q);
    rotate_heads<T>(x + t * heads * (2 * (size_t)half), heads, half, i, angle);
}

// ----------------------------------------------------------------------------
// Unmangled entry points

#define ROPE_KERNELS(T, S)                                                                          \
    extern "C" __global__ void rope_##S(T* x, const int* pos, int heads, int half, float theta) {    \
        rope<T>(x, pos, heads, half, theta);                                                        \
    }                                                                                               \
    extern "C" __global__ void mrope_##S(T* x, const int* pos, int tokens, int heads, int half,     \
                                         int s0, int s1, float theta) {                             \
        mrope<T>(x, pos, tokens, heads, half, s0, s1, theta);                                       \
    }                                                                                               \
    extern "C" __global__ void rope_table_##S(T* x, const int* pos, const float* table, int tables,  \
                                              int tokens, int heads, int half, float mscale) {      \
        rope_table<T>(x, pos, table, tables, tokens, heads, half, mscale);                          \
    }                                                                                               \
    extern "C" __global__ void vision_rope_##S(T* x, const int* pos, int heads, int half,           \
                                               float theta) {                                       \
        vision_rope<T>(x, pos, heads, half, theta);                                                 \
    }
FOR_FLOAT_TYPES(ROPE_KERNELS)

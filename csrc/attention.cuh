// What the two attention kernels (attention.cu, the simple CUDA-core kernel;
// flash_attention.cu, the tensor-core one) share: where a sequence's keys are.
//
// Key addressing policies: bind(seq) returns sequence seq's key count Lk (and
// remembers the sequence); row(j), for j < Lk, is the row of key j in k and v
// viewed as (rows, n_kv_heads, D). Both clamp what they read from device
// memory, so bad offsets, lengths or block ids give wrong keys, never an
// access outside the tensors. A kernel body is a template over the policy, so
// the packed and the paged op run the same lines and give bit-identical
// results on the same keys.
#pragma once
#include "common.cuh"

// The head dims both attention kernels are compiled for, one X-macro list
// that attention.cu and flash_attention.cu instantiate from and that build.rs
// reads to generate the Rust `HEAD_DIMS` (src/ops/attention.rs), so the
// launchers cannot ask for a kernel that was not built. Only the served
// families' dims (compile time and binary size grow with each): 64 CLIP
// ViT-L/14, 72 SigLIP-so400m, 80 the Qwen2-VL ViT, 96 Phi-3, 128 the
// Qwen2/Llama language models. Each must be a multiple of 8 (16-byte bf16
// rows; build.rs checks); plain `M(<integer>)` items on one line.
#define ATTN_HEAD_DIMS(M) M(64) M(72) M(80) M(96) M(128)

// attention_varlen: sequence b owns the packed key rows cu_k[b]..cu_k[b+1].
struct PackedKeys {
    const int* __restrict__ cu_k;  // (batch + 1,) key offsets
    int total_k;                   // rows of k and v
    int k0;                        // first key row of the bound sequence

    __device__ __forceinline__ int bind(int seq) {
        k0 = min(max(cu_k[seq], 0), total_k);
        return min(max(cu_k[seq + 1], k0), total_k) - k0;
    }
    __device__ __forceinline__ int64_t row(int j) const { return (int64_t)k0 + j; }
};

// paged_attention: key j of sequence b is in block block_tables[b, j / block_size]
// of the cache, at offset j % block_size. num_blocks, block_size >= 1 (the launcher checks).
struct PagedKeys {
    const int* __restrict__ block_tables;  // (batch, max_blocks) block ids
    const int* __restrict__ seq_lens;      // (batch,) keys per sequence
    int max_blocks, block_size, num_blocks;
    const int* __restrict__ table;  // the bound sequence's row of block_tables

    __device__ __forceinline__ int bind(int seq) {
        table = block_tables + (int64_t)seq * max_blocks;
        const int64_t held = (int64_t)max_blocks * block_size;  // keys the table row can address
        return (int)min(max((int64_t)seq_lens[seq], (int64_t)0), held);
    }
    __device__ __forceinline__ int64_t row(int j) const {
        const int block = min(max(table[j / block_size], 0), num_blocks - 1);
        return (int64_t)block * block_size + j % block_size;
    }
};

// Query rows of sequence seq: [q0, q0 + Lq) of the packed q and out, clamped to [0, total_q].
__device__ __forceinline__ int2 query_range(const int* __restrict__ cu_q, int seq, int total_q) {
    const int q0 = min(max(cu_q[seq], 0), total_q);
    return make_int2(q0, min(max(cu_q[seq + 1], q0), total_q) - q0);
}

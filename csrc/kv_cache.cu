// Paged KV cache write: token i's keys and values go to cache row
// slot_mapping[i], a row being one (block, offset) of the cache viewed as
// (num_blocks * block_size, n_kv_heads, head_dim). Mirrors vLLM's
// reshape_and_cache_flash (csrc/cache_kernels.cu), with one K and one V
// tensor per layer in the (num_blocks, block_size, n_kv_heads, head_dim)
// layout flash-attn's paged kernels read; no fp8 cache, the cache has the
// activations' dtype. A bit-exact copy; T is bf16 or f32.
//
// Slots < 0 are padding and skipped, as in vLLM. A slot >= num_slots cannot be
// reported from here: it is skipped too, so bad device data cannot write
// outside the cache (the CPU reference makes it an error instead; the engine
// builds slot mappings from its own block tables). Two tokens with the same
// slot race (vLLM's scheduler never makes such a mapping).
//
// Kernel names: kv_cache_write_{f32,bf16}.
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// grid (min(n, 65535),), block up to 1024 threads; blocks grid-stride over tokens.
// Rows (row elements of T) are copied in 16-byte words when a row is a whole
// number of words and every base pointer is 16-byte aligned (then so is every
// row); otherwise element by element. Row offsets are int64: slot * row reaches
// past 2^31 elements for a cache of a few GB.
// Shapes below with row = n_kv_heads * D and num_slots = num_blocks * block_size.
template <typename T>
__device__ void kv_cache_write(T* __restrict__ k_cache,        // (num_slots, row)
                               T* __restrict__ v_cache,        // (num_slots, row)
                               const T* __restrict__ k,        // (n, row)
                               const T* __restrict__ v,        // (n, row)
                               const int* __restrict__ slots,  // (n,) cache row of each token, < 0 to skip
                               int n, int num_slots, int row) {
    const size_t row_bytes = (size_t)row * sizeof(T);
    const bool words = row_bytes % 16 == 0 &&
                       (((uintptr_t)k_cache | (uintptr_t)v_cache | (uintptr_t)k | (uintptr_t)v) % 16 == 0);
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const int slot = slots[i];
        if (slot < 0 || slot >= num_slots) continue;  // block-uniform: padding, or out of range
        const int64_t src = (int64_t)i * row, dst = (int64_t)slot * row;
        if (words) {
            const int nw = (int)(row_bytes / 16);
            const uint4* ks = reinterpret_cast<const uint4*>(k + src);
            const uint4* vs = reinterpret_cast<const uint4*>(v + src);
            uint4* kd = reinterpret_cast<uint4*>(k_cache + dst);
            uint4* vd = reinterpret_cast<uint4*>(v_cache + dst);
            for (int w = threadIdx.x; w < nw; w += blockDim.x) {
                kd[w] = ks[w];
                vd[w] = vs[w];
            }
        } else {
            for (int c = threadIdx.x; c < row; c += blockDim.x) {
                k_cache[dst + c] = k[src + c];
                v_cache[dst + c] = v[src + c];
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points: kv_cache_write_{f32,bf16}

#define KV_CACHE_KERNELS(T, S)                                                                         \
    extern "C" __global__ void kv_cache_write_##S(T* k_cache, T* v_cache, const T* k, const T* v,     \
                                                  const int* slots, int n, int num_slots, int row) {   \
        kv_cache_write<T>(k_cache, v_cache, k, v, slots, n, num_slots, row);                            \
    }
FOR_FLOAT_TYPES(KV_CACHE_KERNELS)

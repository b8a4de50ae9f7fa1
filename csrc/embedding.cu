// Token embedding: out[i, :] = table[ids[i], :], a bit-exact gather.
// Mirrors nn.Embedding (transformers Qwen2VLModel.embed_tokens).
// An id outside [0, vocab) cannot be reported from here: its row is written
// with zeros (the CPU reference does the same; the engine validates ids on
// the host first).
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// One block per id. Rows are copied in 16-byte words when a row is a whole
// number of words and both base pointers are 16-byte aligned (then so is every
// row); otherwise element by element. Offsets are size_t: id * hidden reaches
// 152064 * 3584 = 545M elements for the 7B table, and out grows with n.
template <typename T>
__device__ void embedding(T* __restrict__ out,            // (n, hidden)
                          const int* __restrict__ ids,    // (n,)
                          const T* __restrict__ table,    // (vocab, hidden)
                          int vocab, int hidden) {
    const size_t i = blockIdx.x;
    const int id = ids[i];
    const bool ok = id >= 0 && id < vocab;
    T* o = out + i * hidden;
    const T* src = table + (size_t)(ok ? id : 0) * hidden;
    const size_t row_bytes = (size_t)hidden * sizeof(T);
    if (row_bytes % 16 == 0 && ((uintptr_t)out % 16 == 0) && ((uintptr_t)table % 16 == 0)) {
        const int words = (int)(row_bytes / 16);
        uint4* o4 = reinterpret_cast<uint4*>(o);
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        for (int w = threadIdx.x; w < words; w += blockDim.x) o4[w] = ok ? s4[w] : make_uint4(0u, 0u, 0u, 0u);
    } else {
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = ok ? src[c] : from_float<T>(0.f);
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points

#define EMBEDDING_KERNELS(T, S)                                                                       \
    extern "C" __global__ void embedding_##S(T* out, const int* ids, const T* table, int vocab,      \
                                             int hidden) {                                            \
        embedding<T>(out, ids, table, vocab, hidden);                                                 \
    }
FOR_FLOAT_TYPES(EMBEDDING_KERNELS)

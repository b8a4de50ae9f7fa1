// Token bitmask for structured outputs (grammar-constrained sampling): every
// token a row's grammar forbids gets the logit -inf before sampling. The mask
// is llguidance's SimpleVob layout: bit (t % 32) of word (t / 32) set means
// token t is allowed; a token at or past words · 32 is forbidden. The twin of
// the CPU loop in src/ops/bitmask.rs, bit for bit: allowed logits (NaN
// included) are not touched, forbidden ones become -inf.
//
// Layout: grid (blocks per row, masked rows), BITMASK_THREADS threads, one
// 32-bit word (32 tokens) per thread. Each lane loads its word once
// (coalesced), then the warp walks its 32 words: word j is broadcast by a
// shuffle and lane l writes token 32·j + l, so every store instruction covers
// one 128-byte line of logits. Allowed tokens are skipped and a word of all
// ones skips the whole line: the kernel never reads the logits, only writes
// the forbidden ones (rows · vocab · 4 bytes at most, plus the masks).
//
// Tried in thought and left: one thread writing its own word's 32 logits
// (each store instruction then touches 32 lines); float4 stores (row starts
// are only 4-byte aligned when vocab is odd, and a partly allowed group of
// four would need a read; the scalar stores are already coalesced).
#include "common.cuh"

// Threads per block (one mask word each): 256 threads cover 8192 tokens.
// build.rs hands it to the launcher as launch_consts::BITMASK_THREADS.
constexpr int BITMASK_THREADS = 256;

#define FULL 0xffffffffu

extern "C" __global__ void __launch_bounds__(BITMASK_THREADS)
apply_token_bitmask_f32(float* __restrict__ logits,          // (R, vocab)
                        const int* __restrict__ rows,        // (n,) distinct, < R: mask i's logits row
                        const unsigned* __restrict__ masks,  // (n, words)
                        int vocab,                           // >= 1
                        int words) {                         // >= 1, the stride of masks
    const int i = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const long long row_words = (vocab + 31LL) / 32;
    // The first of this warp's 32 words; warp-uniform, so a whole warp leaves together.
    const long long w0 = (long long)blockIdx.x * BITMASK_THREADS + (threadIdx.x & ~31);
    if (w0 >= row_words) return;
    const long long w = w0 + lane;
    // Words past the mask forbid everything; lanes past the row load nothing
    // (their tokens are not written).
    const unsigned mine = (w < words && w < row_words) ? masks[(long long)i * words + w] : 0u;
    float* row = logits + (long long)rows[i] * vocab;
    const int n = (int)min(32LL, row_words - w0);
    for (int j = 0; j < n; ++j) {
        const unsigned m = __shfl_sync(FULL, mine, j);
        if (m == FULL) continue;  // all 32 allowed: nothing to write
        const long long t = (w0 + j) * 32 + lane;
        if (t < vocab && !((m >> lane) & 1u)) row[t] = -INFINITY;
    }
}

// Tensor-core attention for long query sequences (prefill, chunked prefill,
// the vision tower): flash-attention-2's forward pass, bf16 only, head dims
// of ATTN_HEAD_DIMS (attention.cuh: 64, 72, 80, 96, 128). Same operation,
// layouts and key-addressing policies (attention.cuh) as the simple kernel
// in attention.cu, whose header gives the semantics: packed varlen q/out
// (total_q, n_heads, D), keys packed by cu_seqlens_k or gathered per key
// through a paged cache's block tables, grouped-query heads, bottom-right
// causal masking, zeros for a row that sees no key. The launcher (src/ops/attention.rs) runs this kernel for the
// sequences with Lq >= long_from (FLASH_MIN_SEQLEN_Q) and the simple one for
// the others, each skipping the other's sequences on the device, so which
// kernel computes a sequence depends only on its own length.
//
// Design: one block of 4 warps per (tile of 64 queries, query head,
// sequence); warp w owns query rows 16w..16w+15 of the tile. The block walks
// the keys the tile may see in tiles of 64 (none above the causal diagonal),
// K and V tiles double-buffered in shared memory by cp.async: the next tile's
// 16-byte copies are issued before the current tile is used, each thread
// finding its keys' rows through the policy (for the paged cache one
// block-table read per 16-byte copy, cached in L1). Per key tile a warp does
//   S (16 x 64) = Q Kᵀ        mma.sync m16n8k16 bf16 -> f32; its Q fragments
//                             stay in registers for the whole tile loop;
//                             K fragments by ldmatrix
//   online softmax in registers: S scaled to log2 units, masked (causal / past
//                             Lk) to -inf, row max and sum over the 4 lanes of
//                             each row (quad shuffles), accumulator rescaled
//   O (16 x D) += P V         P rounded to bf16 and used straight from the S
//                             accumulator registers as the A operand (the C
//                             layout of two n8 tiles is the A layout of one
//                             k16 step); V fragments by ldmatrix.trans
// and at the end O / l goes through the warp's own rows of the Q buffer to
// 16-byte coalesced stores. Shared-memory rows are DP + 8 bf16 wide ((DP + 8) / 8
// is odd for every DP here), so the 8 rows an ldmatrix reads fall in distinct
// banks with no swizzle. DP is the head dim of the tiles: D when D is a
// multiple of 16, the mma's k (64, 80, 96, 128: their code is as before DP
// existed), else D rounded up to one with zero columns. Shared memory:
// (64 + 4 * 64) * (DP + 8) * 2 bytes = 45 KB (D 64) to 85 KB (D 128);
// registers (182 to 254 a thread, ptxas sm_90a) hold an SM to 2 blocks, 8
// warps, at every D.
//
// D = 72 (SigLIP-so400m) is padded to DP = 80. Natively it would take a k8
// mma step after four k16 ones in Q·Kᵀ, an odd n8 tile of O (ldmatrix .x2
// beside the .x4 pairs) and rows of 88 bf16 anyway (80 would be an even
// number of 16-byte words: 2-way ldmatrix conflicts), i.e. a second variant
// of every inner loop. Instead the Q, K and V tiles carry 8 zero columns
// (cp.async zero-fill: no memory read, no block-table lookup), which add
// exact zeros to S and give O columns that are never stored. Cost against a
// native D = 72: 11% more mma and ldmatrix work (5 k steps instead of 4.5,
// 10 n8 tiles of O instead of 9) and one more 16-byte copy instruction per
// row; the same shared memory (56 KB) and global traffic; D = 80's registers.
// Not measured yet: expect D = 72 to run at about D = 80's time per head.
//
// Measured (H200, kernel benchmarks): 206 TFLOP/s causal 4k d128 16/16 heads,
// 193 with 12/2, 257 non-causal 4k, 177 on the ViT's 4 x 1296 d80; 26% to 33%
// of cuBLAS's GEMM rate. What holds it there (ncu, causal 4k d128): issue is
// latency-bound at 2 warps per scheduler (4.8 cycles per issued instruction,
// tensor pipe 32% busy), HMMA is 16% of the instructions (the rest: softmax,
// rescaling, copy addresses), and SMs idled 21% of the time at the tail when
// blocks started in (tile, head) order (this grid, heads fastest, is meant
// to fix that; not yet measured on its own).
// Tile shapes 64x32, 128x64, 128x32 and 3 blocks per SM were all slower. A
// leaner variant (two threads per copied row, one barrier per key tile, FFMA
// exp2, lazy rescaling, heads-fastest grid) cut registers to 211 and fixed the
// tail, yet ran 10-25% slower with more short-scoreboard and MIO stalls: not
// understood yet. Next: wgmma (sm_90a) with warp specialisation.
//
// Numerics, as the naive bf16 baseline of the kernel suite: Q·Kᵀ exact
// products summed in f32, softmax in f32 (ex2.approx), P rounded to bf16 for
// the P·V product, f32 accumulation, output rounded to bf16 once.
//
// Independence: a sequence's tiles start at multiples of 64 of its own
// queries and keys and every row's arithmetic follows the same order, so its
// result does not depend on the batch, the grid (blocks grid-stride over the
// query tiles, latest tile first, so a grid sized from a too-small
// max_seqlen_q costs speed, not rows) or the key policy: paged and packed give
// bit-identical results on the same keys. q, out, k and v must be 16-byte
// aligned (the launcher checks).
//
// Kernel names: attention_varlen_flash_d{D}_bf16, paged_attention_flash_d{D}_bf16,
// with the simple kernels' argument lists.
#include "attention.cuh"

// build.rs reads FA_WARPS, FA_BN, FA_DIM_ALIGN and FA_ROW_PAD into the Rust launcher.
constexpr int FA_WARPS = 4;   // warps per block, 16 query rows each
constexpr int FA_BN = 64;     // keys per tile
constexpr int FA_MIN_BLOCKS = 2;  // per SM, for the register budget (255: no spills at any D)
constexpr int FA_DIM_ALIGN = 16;  // the tiles' head dim DP: D rounded up to a multiple of the mma's k
constexpr int FA_ROW_PAD = 8;     // bf16 past DP in each shared-memory row (odd 16-byte words a row)

// The tile shape: WARPS warps of 16 query rows, BN keys per K/V tile, head
// dim DP (D, or D padded with zero columns to a multiple of FA_DIM_ALIGN).
// Dynamic shared memory: Q (16 * WARPS rows), K and V (2 stages of BN rows
// each), rows of DP + FA_ROW_PAD bf16. The launcher computes the same size.
template <int D, int WARPS, int BN> struct FlashTile {
    static constexpr int DP = (D + FA_DIM_ALIGN - 1) / FA_DIM_ALIGN * FA_DIM_ALIGN;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int BM = 16 * WARPS;  // queries per tile
    static constexpr int ROW = DP + FA_ROW_PAD;
    static constexpr int Q = BM * ROW;   // elements of the Q tile
    static constexpr int KV = BN * ROW;  // elements of one K or V stage
    static constexpr int BYTES = (Q + 4 * KV) * 2;
};

// ----------------------------------------------------------------------------
// PTX wrappers (sm_80+)

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared, bypassing L1; full = false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c (16x8 f32) += a (16x16 bf16, row) * b (16x8 bf16, col).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats as a bf16 pair, lo in the low half (the lower column / k index).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// ----------------------------------------------------------------------------
// CUDA kernel

// grid (n_heads, query tiles, batch), block 32 * WARPS, FlashTile::BYTES of
// dynamic shared memory. Heads vary fastest, so blocks start in the order
// (sequence, tile from the last, head): in a causal prefill every head's
// longest tiles start first and the short ones fill the tail. Fragment layouts (PTX ISA, mma.m16n8k16): lane l is
// g = l / 4, t = l % 4; an accumulator holds rows g, g + 8 and columns 2t, 2t + 1.
template <int D, int WARPS, int BN, typename Keys>
__device__ void flash_attention(bf16* __restrict__ out,         // (total_q, n_heads, D)
                                const bf16* __restrict__ q,     // (total_q, n_heads, D)
                                const bf16* __restrict__ k,     // (rows, n_kv_heads, D), rows per `keys`
                                const bf16* __restrict__ v,     // (rows, n_kv_heads, D)
                                const int* __restrict__ cu_q,   // (batch + 1,) query offsets
                                Keys keys,                      // where each sequence's keys are
                                int total_q, int n_heads, int n_kv_heads, int causal, float scale,
                                int long_from) {  // sequences with Lq < long_from are the simple kernel's
    using Smem = FlashTile<D, WARPS, BN>;
    constexpr int DP = Smem::DP;      // head dim of the tiles: D, or D + zero columns (D = 72: 80)
    constexpr int ROW = Smem::ROW, FA_BM = Smem::BM, FA_THREADS = Smem::THREADS, FA_BN = BN;
    constexpr int CPR = D / 8;        // 16-byte chunks per Q/K/V/out row in global memory
    constexpr int CPT = DP / 8;       // 16-byte chunks per tile row: CPR, then CPT - CPR zero chunks
    constexpr int KD = DP / 16;       // k steps of Q·Kᵀ
    constexpr int ND = DP / 8;        // n8 tiles of O
    constexpr int NN = FA_BN / 8;     // n8 tiles of S
    static_assert(D % 8 == 0 && DP % 16 == 0, "16-byte rows; the tiles' head dim is whole mma k steps");
    static_assert(FA_BN % 16 == 0, "whole k16 steps of P·V");
    static_assert(((ROW * 2 / 16) & 1) == 1, "odd 16-byte words per row: conflict-free ldmatrix");

    extern __shared__ uint4 fa_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(fa_smem);  // (FA_BM, ROW)
    bf16* sK = sQ + Smem::Q;                      // 2 x (FA_BN, ROW)
    bf16* sV = sK + 2 * Smem::KV;                 // 2 x (FA_BN, ROW)

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int seq = blockIdx.z, h = blockIdx.x;
    const int kvh = h / (n_heads / n_kv_heads);
    const int2 qr = query_range(cu_q, seq, total_q);
    const int q0 = qr.x, Lq = qr.y;
    if (Lq < long_from) return;  // block-uniform: the simple kernel's sequence
    const int Lk = keys.bind(seq);
    const int64_t q_stride = (int64_t)n_heads * D;      // elements per token of q and out
    const int64_t kv_stride = (int64_t)n_kv_heads * D;  // elements per token of k and v
    const float sl2 = scale * 1.4426950408889634f;      // exp(scale * s) = exp2(sl2 * s)
    const int n_mt = (Lq + FA_BM - 1) / FA_BM;

    // Block-uniform loop over this sequence's query tiles; the barriers inside
    // are reached by every thread.
    for (int tile = blockIdx.y; tile < n_mt; tile += gridDim.y) {
        const int m0 = (n_mt - 1 - tile) * FA_BM;  // the last (longest causal) tiles first
        // Keys the tile may see: j < n_end (its last row sees the most).
        const int n_end = causal ? min(max(min(m0 + FA_BM, Lq) + Lk - Lq, 0), Lk) : Lk;
        const int n_tiles = (n_end + FA_BN - 1) / FA_BN;
        __syncthreads();  // the previous tile's output left sQ before it is refilled

        // K/V tile at key n0 into stage st: keys past n_end are zeros (never
        // NaN for P·V), and so are the columns past D.
        auto load_kv = [&](int n0, int st) {
            const uint32_t dk = smem_addr(sK + st * Smem::KV), dv = smem_addr(sV + st * Smem::KV);
#pragma unroll
            for (int i = 0; i < (FA_BN * CPT + FA_THREADS - 1) / FA_THREADS; ++i) {
                const int idx = tid + i * FA_THREADS, r = idx / CPT, c = idx % CPT;
                if (FA_BN * CPT % FA_THREADS != 0 && idx >= FA_BN * CPT) break;
                const bool ok = n0 + r < n_end && (CPT == CPR || c < CPR);
                const int64_t off = ok ? keys.row(n0 + r) * kv_stride + (int64_t)kvh * D + c * 8 : 0;
                const uint32_t so = (r * ROW + c * 8) * 2;
                cp_async16(dk + so, k + off, ok);
                cp_async16(dv + so, v + off, ok);
            }
        };
        if (n_tiles > 0) {
            // Q tile (rows past Lq and columns past D are zeros), then the
            // first K/V tile: one group.
#pragma unroll
            for (int i = 0; i < (FA_BM * CPT + FA_THREADS - 1) / FA_THREADS; ++i) {
                const int idx = tid + i * FA_THREADS, r = idx / CPT, c = idx % CPT;
                if (FA_BM * CPT % FA_THREADS != 0 && idx >= FA_BM * CPT) break;
                const bool ok = m0 + r < Lq && (CPT == CPR || c < CPR);
                const int64_t off = ok ? (int64_t)(q0 + m0 + r) * q_stride + (int64_t)h * D + c * 8 : 0;
                cp_async16(smem_addr(sQ + r * ROW + c * 8), q + off, ok);
            }
            load_kv(0, 0);
            cp_async_commit();
        }

        // This thread's rows r0 = m0 + 16 warp + g and r0 + 8 see keys j < lim0, lim1.
        const int r0 = m0 + warp * 16 + g;
        const int lim0 = causal ? min(max(r0 + 1 + Lk - Lq, 0), Lk) : Lk;
        const int lim1 = causal ? min(max(r0 + 9 + Lk - Lq, 0), Lk) : Lk;
        uint32_t qf[KD][4];  // A fragments of the warp's 16 query rows
        float o[ND][4];      // O accumulator (16 x DP), unnormalised; columns past D stay 0
#pragma unroll
        for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
        float m_run[2] = {-INFINITY, -INFINITY};  // running max of sl2 * s, rows r0, r0 + 8
        float l_run[2] = {0.f, 0.f};              // running sum of exp2, this thread's columns only

        for (int it = 0; it < n_tiles; ++it) {
            const int n0 = it * FA_BN, st = it & 1;
            if (it + 1 < n_tiles) {
                load_kv(n0 + FA_BN, st ^ 1);  // that stage was consumed before the last barrier
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();  // tile `it` (and Q) has landed for every thread

            if (it == 0) {
#pragma unroll
                for (int kk = 0; kk < KD; ++kk)
                    ldmatrix_x4(qf[kk], smem_addr(sQ + (warp * 16 + (lane & 15)) * ROW + kk * 16 + (lane >> 4) * 8));
            }
            const bf16* kt = sK + st * Smem::KV;
            const bf16* vt = sV + st * Smem::KV;

            // S = Q Kᵀ: per k step, one ldmatrix.x4 gives the B fragments of two n8 tiles.
            float s[NN][4];
#pragma unroll
            for (int n = 0; n < NN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
                for (int np = 0; np < NN / 2; ++np) {
                    uint32_t b[4];
                    const int key = np * 16 + (lane & 7) + (lane >> 4) * 8;
                    ldmatrix_x4(b, smem_addr(kt + key * ROW + kk * 16 + ((lane >> 3) & 1) * 8));
                    mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
                    mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
                }
            }

            // Scale to log2 units; mask keys a row may not see.
            const bool masked = n0 + FA_BN > lim0;  // lim0 <= lim1
#pragma unroll
            for (int n = 0; n < NN; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = n0 + n * 8 + 2 * t4 + (e & 1);
                    s[n][e] = (masked && key >= (e < 2 ? lim0 : lim1)) ? -INFINITY : s[n][e] * sl2;
                }
            }

            // Online softmax, rows r0 (e = 0, 1) and r0 + 8 (e = 2, 3).
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < NN; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_run[half], mx);
                // A row with no visible key yet keeps m = -inf: subtract 0, so exp2(-inf) = 0, not NaN.
                const float base = m_new == -INFINITY ? 0.f : m_new;
                const float alpha = fast_exp2(m_run[half] - base);
                m_run[half] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < NN; ++n) {
                    s[n][2 * half] = fast_exp2(s[n][2 * half] - base);
                    s[n][2 * half + 1] = fast_exp2(s[n][2 * half + 1] - base);
                    sum += s[n][2 * half] + s[n][2 * half + 1];
                }
                l_run[half] = l_run[half] * alpha + sum;
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    o[n][2 * half] *= alpha;
                    o[n][2 * half + 1] *= alpha;
                }
            }

            // O += P V: P's k16 step kc is S's n8 tiles 2kc, 2kc + 1; one
            // ldmatrix.x4.trans gives the B fragments of two n8 tiles of V.
#pragma unroll
            for (int kc = 0; kc < FA_BN / 16; ++kc) {
                const uint32_t a[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                       pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                       pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
                for (int dn = 0; dn < DP / 16; ++dn) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, smem_addr(vt + (kc * 16 + (lane & 15)) * ROW + dn * 16 + (lane >> 4) * 8));
                    mma_bf16(o[2 * dn], a, b[0], b[1]);
                    mma_bf16(o[2 * dn + 1], a, b[2], b[3]);
                }
            }
            __syncthreads();  // every warp is done with stage st before it is refilled
        }

        // O / l, through the warp's own 16 rows of sQ (only this warp read
        // them, and every copy into them has completed), to 16-byte stores
        // of the first D columns.
        float inv[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = l_run[half];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[half] = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros
        }
        bf16* so = sQ + warp * 16 * ROW;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            *reinterpret_cast<uint32_t*>(so + g * ROW + n * 8 + 2 * t4) = pack_bf16(o[n][0] * inv[0], o[n][1] * inv[0]);
            *reinterpret_cast<uint32_t*>(so + (g + 8) * ROW + n * 8 + 2 * t4) =
                pack_bf16(o[n][2] * inv[1], o[n][3] * inv[1]);
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < (16 * CPR + 31) / 32; ++i) {
            const int idx = lane + i * 32, r = idx / CPR, c = idx % CPR;
            if (16 * CPR % 32 != 0 && idx >= 16 * CPR) break;  // D = 72: 144 chunks, 4.5 rounds
            const int row = m0 + warp * 16 + r;
            if (row < Lq)
                *reinterpret_cast<uint4*>(out + (int64_t)(q0 + row) * q_stride + (int64_t)h * D + c * 8) =
                    *reinterpret_cast<const uint4*>(so + r * ROW + c * 8);
        }
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points: {attention_varlen,paged_attention}_flash_d{D}_bf16 for
// every D of ATTN_HEAD_DIMS (attention.cuh)

#define FLASH_KERNELS(NAME, D, WARPS, BN, MINB)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MINB) attention_varlen_##NAME##_bf16(          \
        bf16* out, const bf16* q, const bf16* k, const bf16* v, const int* cu_q, const int* cu_k,           \
        int total_q, int total_k, int n_heads, int n_kv_heads, int causal, float scale, int long_from) {    \
        flash_attention<D, WARPS, BN>(out, q, k, v, cu_q, PackedKeys{cu_k, total_k, 0}, total_q, n_heads,   \
                                      n_kv_heads, causal, scale, long_from);                                 \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MINB) paged_attention_##NAME##_bf16(           \
        bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache, const int* cu_q,                \
        const int* seq_lens_k, const int* block_tables, int total_q, int num_blocks, int block_size,        \
        int max_blocks, int n_heads, int n_kv_heads, float scale, int long_from) {                          \
        flash_attention<D, WARPS, BN>(out, q, k_cache, v_cache, cu_q,                                        \
                                      PagedKeys{block_tables, seq_lens_k, max_blocks, block_size, num_blocks, \
                                                nullptr},                                                    \
                                      total_q, n_heads, n_kv_heads, 1, scale, long_from);                    \
    }
#define FLASH(D) FLASH_KERNELS(flash_d##D, D, FA_WARPS, FA_BN, FA_MIN_BLOCKS)
ATTN_HEAD_DIMS(FLASH)


// Attention over variable-length packed sequences (flash-attn varlen layout):
// q, out (total_q, n_heads, D); k, v (total_k, n_kv_heads, D); sequence b owns
// query rows cu_q[b]..cu_q[b+1] and key rows cu_k[b]..cu_k[b+1]. Grouped-query:
// query head h reads kv head h / (n_heads / n_kv_heads). Causal masking is
// flash-attn's bottom-right alignment: query i of Lq sees key j of Lk iff
// j <= i + Lk - Lq (prefill, decode over a cache and chunked prefill alike).
// fp32 accumulation and an online softmax (running max and sum), so shared
// memory stays bounded for any sequence length. T is bf16 or f32.
//
// Design (the simple kernel; the tensor-core flash kernel is a later issue):
// one block of 8 warps per (tile of 8 rows, kv head, sequence), where a row is
// a (query, query head) pair and the rows of a tile are the query heads of one
// kv head for consecutive queries: row r is query r / group, head
// kv_head * group + r % group. So a decode step (Lq = 1) of Qwen2-VL-2B (group
// 6) fills 6 of the 8 warps and reads each K/V tile once for all of them,
// instead of one block per head re-reading the cache group times.
// The block walks the keys its rows may see in tiles of 32, staged in shared
// memory as f32 and shared by all 8 warps. Per tile, lane j of a warp scores
// key j against the warp's query (a D-long dot product out of shared memory,
// float4 reads, K rows padded to D + 4 floats so the 8 lanes of each
// quarter-warp hit distinct banks for every D here); the warp takes the tile
// max and sum with shuffles, rescales its accumulator, and adds P·V with each
// lane owning output dims lane, lane + 32, ... (p_j broadcast by shuffle).
// Why this shape: it is correct for any lengths, has no block-wide reductions,
// reuses each K/V tile 8 times, and needs 37 KB of static shared memory at most
// (D = 128), so no opt-in; at ~59 registers a thread (ptxas, sm_90a) an SM
// holds 4 blocks, 32 warps.
// What the fast version will change: Q·Kᵀ and P·V on tensor cores (mma /
// wgmma) over 64-128 query tiles per block in bf16 with P kept in registers,
// K/V tiles double-buffered with cp.async / TMA, causal tiles above the
// diagonal skipped per tile, and split-K over the cache for long decode.
//
// Robustness: the block grid-strides over its sequence's rows, so a launch
// grid sized from a too-small max_seqlen_q costs speed, not rows; offsets read
// from cu_seqlens are clamped to [0, total], so bad offsets cannot address
// outside the tensors; only rows that belong to a sequence are written, and a
// row that sees no key (causal with Lq > Lk, or Lk = 0) is written as zeros.
//
// Kernel names: attention_varlen_d{D}_{dtype}, e.g. attention_varlen_d128_bf16
// (the house rule <op>[_<variant>]_<dtype>, with the head dim in the variant).
#include "common.cuh"

constexpr int ATTN_WARPS = 8;  // rows (query, head) per block, one warp each; blockDim.x = 32 * ATTN_WARPS
constexpr int ATTN_KEYS = 32;  // keys per shared-memory tile, one per lane when scoring

// ----------------------------------------------------------------------------
// CUDA kernels

// grid (row tiles, n_kv_heads, batch), block 32 * ATTN_WARPS threads.
template <typename T, int D>
__device__ void attention_varlen(T* __restrict__ out,         // (total_q, n_heads, D)
                                 const T* __restrict__ q,     // (total_q, n_heads, D)
                                 const T* __restrict__ k,     // (total_k, n_kv_heads, D)
                                 const T* __restrict__ v,     // (total_k, n_kv_heads, D)
                                 const int* __restrict__ cu_q,  // (batch + 1,) query offsets
                                 const int* __restrict__ cu_k,  // (batch + 1,) key offsets
                                 int total_q, int total_k, int n_heads, int n_kv_heads, int causal,
                                 float scale) {
    static_assert(D % 32 == 0 || D % 32 == 16, "float4 rows and the K padding assume D = 16 mod 32 or 0 mod 32");
    constexpr int KS = D + 4;            // padded row of sK, in floats (16-byte aligned rows)
    constexpr int NV = (D + 31) / 32;    // output dims per lane
    __shared__ __align__(16) float sK[ATTN_KEYS * KS];  // (ATTN_KEYS, D) of this tile, padded
    __shared__ __align__(16) float sV[ATTN_KEYS * D];   // (ATTN_KEYS, D) of this tile
    __shared__ __align__(16) float sQ[ATTN_WARPS * D];  // (ATTN_WARPS, D): each warp's query, pre-scaled

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int seq = blockIdx.z, kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int q0 = min(max(cu_q[seq], 0), total_q), q1 = min(max(cu_q[seq + 1], q0), total_q);
    const int k0 = min(max(cu_k[seq], 0), total_k), k1 = min(max(cu_k[seq + 1], k0), total_k);
    const int Lq = q1 - q0, Lk = k1 - k0;
    const int64_t rows = (int64_t)Lq * group;
    const int64_t q_stride = (int64_t)n_heads * D;      // elements per token of q and out
    const int64_t kv_stride = (int64_t)n_kv_heads * D;  // elements per token of k and v
    // exp(scale * q.k - m) = exp2(q'.k - m') with q' = q * scale * log2(e).
    const float qscale = scale * 1.4426950408889634f;
    // Keys query i may see: j < visible(i).
    auto visible = [&](int i) { return causal ? min(max(i + (Lk - Lq) + 1, 0), Lk) : Lk; };

    // Block-uniform loop: every thread of the block runs the same iterations,
    // so the barriers inside are reached by all of them.
    for (int64_t base = (int64_t)blockIdx.x * ATTN_WARPS; base < rows; base += (int64_t)gridDim.x * ATTN_WARPS) {
        const int64_t row = base + warp;
        const bool active = row < rows;
        const int i = active ? (int)(row / group) : 0;  // query within the sequence
        const int h = kvh * group + (active ? (int)(row % group) : 0);
        const int n_vis = active ? visible(i) : 0;  // warp-uniform
        // The tile's last row has the largest query index, so it sees the most keys.
        const int64_t last = min(base + ATTN_WARPS, rows) - 1;
        const int n_block = visible((int)(last / group));  // block-uniform

        // Each warp reads back only its own sQ row; the first tile's barrier
        // orders these writes before the reads (and there are no reads without a tile).
        if (active) {
            const T* qr = q + (int64_t)(q0 + i) * q_stride + (int64_t)h * D;
            for (int d = lane; d < D; d += 32) sQ[warp * D + d] = to_float(qr[d]) * qscale;
        }

        float m = -INFINITY;  // running max of q'.k over the keys seen so far (warp-uniform)
        float l = 0.f;        // running sum of exp2(q'.k - m) (warp-uniform)
        float o[NV];          // running sum of exp2(q'.k - m) * v[:, lane + 32 c]
#pragma unroll
        for (int c = 0; c < NV; ++c) o[c] = 0.f;

        for (int kt = 0; kt < n_block; kt += ATTN_KEYS) {
            const int nk = min(ATTN_KEYS, n_block - kt);  // keys in this tile
            // Stage the tile; rows past nk are zeros so no thread reads unwritten memory.
            for (int idx = threadIdx.x; idx < ATTN_KEYS * D; idx += blockDim.x) {
                const int j = idx / D, d = idx % D;
                float kx = 0.f, vx = 0.f;
                if (j < nk) {
                    const int64_t off = (int64_t)(k0 + kt + j) * kv_stride + (int64_t)kvh * D + d;
                    kx = to_float(k[off]);
                    vx = to_float(v[off]);
                }
                sK[j * KS + d] = kx;
                sV[j * D + d] = vx;
            }
            __syncthreads();

            if (kt < n_vis) {  // warp-uniform; key kt is visible, so the tile max is finite
                const float4* qr = reinterpret_cast<const float4*>(sQ + warp * D);
                const float4* kr = reinterpret_cast<const float4*>(sK + lane * KS);
                float s = 0.f;
#pragma unroll
                for (int c = 0; c < D / 4; ++c) {
                    const float4 a = qr[c], b = kr[c];
                    s += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
                }
                // kt + lane < n_vis <= n_block implies lane < nk: a staged key.
                const bool valid = kt + lane < n_vis;
                s = valid ? s : -INFINITY;
                const float m_new = fmaxf(m, warp_max(s));
                const float alpha = exp2f(m - m_new);  // 0 on the first tile (m = -inf)
                const float p = valid ? exp2f(s - m_new) : 0.f;
                l = l * alpha + warp_sum(p);
#pragma unroll
                for (int c = 0; c < NV; ++c) o[c] *= alpha;
                const int nj = min(nk, n_vis - kt);  // visible keys of the tile, warp-uniform
                for (int j = 0; j < nj; ++j) {
                    const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                    for (int c = 0; c < NV; ++c) {
                        const int d = lane + 32 * c;
                        if (D % 32 == 0 || d < D) o[c] += pj * sV[j * D + d];
                    }
                }
                m = m_new;
            }
            __syncthreads();  // the tile is consumed before the next one overwrites it
        }

        if (active) {
            T* orow = out + (int64_t)(q0 + i) * q_stride + (int64_t)h * D;
            const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros
#pragma unroll
            for (int c = 0; c < NV; ++c) {
                const int d = lane + 32 * c;
                if (D % 32 == 0 || d < D) orow[d] = from_float<T>(o[c] * inv);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points: attention_varlen_d{64,80,96,128}_{f32,bf16}

#define ATTN_KERNEL(T, S, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_varlen_d##D##_##S(            \
        T* out, const T* q, const T* k, const T* v, const int* cu_q, const int* cu_k, int total_q,        \
        int total_k, int n_heads, int n_kv_heads, int causal, float scale) {                              \
        attention_varlen<T, D>(out, q, k, v, cu_q, cu_k, total_q, total_k, n_heads, n_kv_heads, causal,   \
                               scale);                                                                    \
    }
#define ATTN_KERNELS(T, S) ATTN_KERNEL(T, S, 64) ATTN_KERNEL(T, S, 80) ATTN_KERNEL(T, S, 96) ATTN_KERNEL(T, S, 128)
FOR_FLOAT_TYPES(ATTN_KERNELS)

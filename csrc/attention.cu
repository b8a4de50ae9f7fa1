// Attention over variable-length packed sequences (flash-attn varlen layout):
// q, out (total_q, n_heads, D); sequence b owns query rows cu_q[b]..cu_q[b+1].
// Its keys and values are found one of two ways (the `Keys` policies of
// attention.cuh, so both kernels share every line of the body below):
// - attention_varlen (flash_attn_varlen_func): k, v (total_k, n_kv_heads, D)
//   packed like q, sequence b owning key rows cu_k[b]..cu_k[b+1];
// - paged_attention (vLLM's paged KV cache, flash_attn_varlen_func with a
//   block_table): k_cache, v_cache (num_blocks, block_size, n_kv_heads, D),
//   viewed as (num_blocks * block_size, n_kv_heads, D) rows; sequence b has
//   seq_lens_k[b] keys and its key j is row
//   block_tables[b, j / block_size] * block_size + j % block_size. Always causal.
// Grouped-query: query head h reads kv head h / (n_heads / n_kv_heads). Causal
// masking is flash-attn's bottom-right alignment: query i of Lq sees key j of Lk iff
// j <= i + Lk - Lq (prefill, decode over a cache and chunked prefill alike).
// fp32 accumulation and an online softmax (running max and sum), so shared
// memory stays bounded for any sequence length. T is bf16 or f32.
//
// Which kernel runs a sequence: bf16 sequences of at least FLASH_MIN_SEQLEN_Q
// queries (src/ops/attention.rs) run on the tensor-core kernel in
// flash_attention.cu; this one runs the rest (decode steps, short chunks) and
// every f32 call. Both take `long_from`: this kernel leaves sequences with
// Lq >= long_from to the other (INT_MAX when the other is not launched), so
// the choice depends on the sequence's own length, never on the batch.
//
// Design (the simple kernel):
// one block of 8 warps per (tile of 8 rows, kv head, sequence), where a row is
// a (query, query head) pair and the rows of a tile are the query heads of one
// kv head for consecutive queries: row r is query r / group, head
// kv_head * group + r % group. So a decode step (Lq = 1) of Qwen2-VL-2B (group
// 6) fills 6 of the 8 warps and reads each K/V tile once for all of them,
// instead of one block per head re-reading the cache group times.
// The block walks the keys its rows may see in tiles of 32, staged in shared
// memory as f32 and shared by all 8 warps: 8 threads per key, each finding the
// key's row once (for the paged policy a division and a block-table read per
// key, not per element) and copying it in 16-byte words. Per tile, lane j of a
// warp scores key j against the warp's query (a D-long dot product out of shared memory,
// float4 reads, K rows padded to D + 4 floats so the 8 lanes of each
// quarter-warp hit distinct banks for every D that is a multiple of 8); the
// warp takes the tile max and sum with shuffles, rescales its accumulator,
// and adds P·V with each lane owning output dims lane, lane + 32, ... (p_j
// broadcast by shuffle; the last 32 are partial when D is not a multiple of
// 32: 8 lanes at D = 72).
// Head dims: those of ATTN_HEAD_DIMS (attention.cuh), any multiple of 8 for
// the code; D = 72 (bf16 rows of 9 words, 9 / 8 staging rounds) takes the
// same lines as D = 80, nothing is padded.
// Why this shape: it is correct for any lengths, has no block-wide reductions,
// reuses each K/V tile 8 times, and needs 37 KB of static shared memory at most
// (D = 128), so no opt-in; at 48 to 76 registers a thread (ptxas, sm_90a,
// depending on D, dtype and policy) an SM holds 3 to 5 blocks.
//
// Split-K (flash-decoding), paged_attention_split + paged_attention_combine:
// the simple kernel gives one block to a (sequence, kv head), so a decode
// step of a few sequences keeps a handful of SMs busy and reads the cache at a
// few percent of the chip's bandwidth. The split kernel runs the same body on
// grid (n_split, n_kv_heads, batch): block s takes the keys of partition s of
// its sequence (split_keys: Lk cut into n_split runs of a multiple of 32 keys,
// at least SPLIT_MIN_KEYS), walks every row tile of the sequence over them,
// and writes each row's unnormalised state (o, running max m, sum l: the
// warp's registers at the end of the key loop) as f32 to `part`; the combine
// kernel rescales the partitions of each row by exp2(m_s - max m) and
// divides by the rescaled sum (log-sum-exp). n_split comes from the host
// (batch shape only) and the partition length from the sequence's own Lk on
// the device, so a CUDA graph replays the same launch for any context length.
// With one partition the combine multiplies by exp2(0) = 1 and divides as the
// simple kernel does: bit-identical to it (tests/kernels/paged.rs checks).
//
// Robustness: the block grid-strides over its sequence's rows, so a launch
// grid sized from a too-small max_seqlen_q costs speed, not rows; offsets read
// from cu_seqlens are clamped to [0, total], seq_lens_k to [0, what the block
// table row holds] and block ids to [0, num_blocks), so bad device data cannot
// address outside the tensors (it gives wrong keys, not faults); only rows that
// belong to a sequence are written, and a row that sees no key (causal with
// Lq > Lk, or Lk = 0) is written as zeros. k and v (k_cache, v_cache) must be
// 16-byte aligned, which the launcher checks (every pool allocation is).
// Row independence: a (query, head) row's result depends only on its query,
// its sequence's keys and its causal bound (key tiles start at multiples of 32
// of its own sequence), never on the rest of the batch or the grid, so a
// sequence gives bit-identical output alone or in any batch, and the two
// policies give bit-identical output on the same keys.
//
// Kernel names: attention_varlen_d{D}_{dtype} and paged_attention_d{D}_{dtype},
// e.g. paged_attention_d128_bf16 (the house rule <op>[_<variant>]_<dtype>,
// with the head dim in the variant).
#include <climits>

#include "attention.cuh"

constexpr int ATTN_WARPS = 8;  // rows (query, head) per block, one warp each; blockDim.x = 32 * ATTN_WARPS
constexpr int ATTN_KEYS = 32;  // keys per shared-memory tile, one per lane when scoring
constexpr int ATTN_TPK = 32 * ATTN_WARPS / ATTN_KEYS;  // threads staging each key of a tile
constexpr int SPLIT_MIN_KEYS = 64;  // fewest keys of a split partition (src/ops/flash_decoding.rs)
constexpr int COMBINE_THREADS = 128;  // blockDim.x of the combine kernel

// Keys per partition when a sequence of Lk keys is split n_split ways: the
// split and the combine kernels both call this, so they agree on which
// partitions hold which keys. A multiple of ATTN_KEYS (partition tiles start
// where the unsplit kernel's do), at least SPLIT_MIN_KEYS, and n_split of them
// cover Lk; partition s holds keys [s * per, min((s + 1) * per, Lk)).
__device__ __forceinline__ int split_keys(int Lk, int n_split) {
    const int64_t per = ((int64_t)Lk + n_split - 1) / n_split;
    const int64_t tiles = (per + ATTN_KEYS - 1) / ATTN_KEYS * ATTN_KEYS;
    return (int)min(max(tiles, (int64_t)SPLIT_MIN_KEYS), (int64_t)INT_MAX);
}

// 16 bytes of T (16 / sizeof(T) values) widened to f32 at dst (16-byte aligned).
__device__ __forceinline__ void widen16(const float*, uint4 w, float* dst) {
    *reinterpret_cast<float4*>(dst) = make_float4(__uint_as_float(w.x), __uint_as_float(w.y),
                                                  __uint_as_float(w.z), __uint_as_float(w.w));
}
__device__ __forceinline__ void widen16(const bf16*, uint4 w, float* dst) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    const float2 c = __bfloat1622float2(h[2]), d = __bfloat1622float2(h[3]);
    reinterpret_cast<float4*>(dst)[0] = make_float4(a.x, a.y, b.x, b.y);
    reinterpret_cast<float4*>(dst)[1] = make_float4(c.x, c.y, d.x, d.y);
}

// ----------------------------------------------------------------------------
// CUDA kernels

// grid (row tiles, n_kv_heads, batch), block 32 * ATTN_WARPS threads; with
// SPLIT, grid (n_split, n_kv_heads, batch): block x takes partition x of the
// keys and every row tile, and writes `part` instead of `out`.
// k and v must be 16-byte aligned (rows are: D * sizeof(T) is a multiple of 16).
template <typename T, int D, bool SPLIT, typename Keys>
__device__ void attention_varlen(T* __restrict__ out,         // (total_q, n_heads, D); unused with SPLIT
                                 float* __restrict__ part,    // SPLIT: (total_q, n_heads, n_split, D + 2)
                                 const T* __restrict__ q,     // (total_q, n_heads, D)
                                 const T* __restrict__ k,     // (rows, n_kv_heads, D), rows per `keys`
                                 const T* __restrict__ v,     // (rows, n_kv_heads, D)
                                 const int* __restrict__ cu_q,  // (batch + 1,) query offsets
                                 Keys keys,                     // where each sequence's keys are
                                 int total_q, int n_heads, int n_kv_heads, int causal, float scale,
                                 int long_from,  // sequences with Lq >= long_from are not this kernel's
                                 int n_split) {  // SPLIT: partitions per sequence (gridDim.x)
    // float4 rows of sQ and sV need D % 4 == 0, whole 16-byte bf16 words D % 8 == 0,
    // and the K padding is conflict-free when KS / 4 = D / 4 + 1 is odd: D % 8 == 0.
    static_assert(D % 8 == 0, "float4 rows, 16-byte K/V words and the K padding need D % 8 == 0");
    constexpr int KS = D + 4;            // padded row of sK, in floats (16-byte aligned rows)
    constexpr int NV = (D + 31) / 32;    // output dims per lane
    constexpr int VEC = 16 / sizeof(T);  // values per 16-byte word of a K/V row
    static_assert(D % VEC == 0, "K/V rows are whole 16-byte words");
    constexpr int NW = D / VEC;                          // 16-byte words per K/V row
    constexpr int WPT = (NW + ATTN_TPK - 1) / ATTN_TPK;  // words of a row per staging thread
    __shared__ __align__(16) float sK[ATTN_KEYS * KS];  // (ATTN_KEYS, D) of this tile, padded
    __shared__ __align__(16) float sV[ATTN_KEYS * D];   // (ATTN_KEYS, D) of this tile
    __shared__ __align__(16) float sQ[ATTN_WARPS * D];  // (ATTN_WARPS, D): each warp's query, pre-scaled

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int seq = blockIdx.z, kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int2 qr = query_range(cu_q, seq, total_q);
    const int q0 = qr.x, Lq = qr.y;
    if (Lq >= long_from) return;  // block-uniform: the flash kernel's sequence
    const int Lk = keys.bind(seq);
    // The keys this block walks: all of them, or its partition of the sequence's.
    int k_begin = 0, k_end = Lk;
    if (SPLIT) {
        const int per = split_keys(Lk, n_split);
        const int64_t first = (int64_t)blockIdx.x * per;
        if (first >= Lk) return;  // block-uniform: an empty partition, which the combine never reads
        k_begin = (int)first;
        k_end = (int)min(first + per, (int64_t)Lk);
    }
    const int64_t rows = (int64_t)Lq * group;
    const int64_t q_stride = (int64_t)n_heads * D;      // elements per token of q and out
    const int64_t kv_stride = (int64_t)n_kv_heads * D;  // elements per token of k and v
    // exp(scale * q.k - m) = exp2(q'.k - m') with q' = q * scale * log2(e).
    const float qscale = scale * 1.4426950408889634f;
    // Keys query i may see: j < visible(i).
    auto visible = [&](int i) { return causal ? min(max(i + (Lk - Lq) + 1, 0), Lk) : Lk; };

    // Block-uniform loop: every thread of the block runs the same iterations,
    // so the barriers inside are reached by all of them.
    // The split kernel's block walks every row tile itself (blockIdx.x is its partition).
    const int64_t tile0 = SPLIT ? 0 : blockIdx.x, tiles_step = SPLIT ? 1 : gridDim.x;
    for (int64_t base = tile0 * ATTN_WARPS; base < rows; base += tiles_step * ATTN_WARPS) {
        const int64_t row = base + warp;
        const bool active = row < rows;
        const int i = active ? (int)(row / group) : 0;  // query within the sequence
        const int h = kvh * group + (active ? (int)(row % group) : 0);
        // Keys of [k_begin, n_vis) are the row's in this block (warp-uniform).
        const int n_vis = active ? min(visible(i), k_end) : 0;
        // The tile's last row has the largest query index, so it sees the most keys.
        const int64_t last = min(base + ATTN_WARPS, rows) - 1;
        const int n_block = min(visible((int)(last / group)), k_end);  // block-uniform

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

        for (int kt = k_begin; kt < n_block; kt += ATTN_KEYS) {
            const int nk = min(ATTN_KEYS, n_block - kt);  // keys in this tile
            // Stage the tile, ATTN_TPK threads per key, all loads of a thread
            // before its stores; rows past nk are zeros so no thread reads
            // unwritten memory.
            {
                const int j = threadIdx.x / ATTN_TPK, part = threadIdx.x % ATTN_TPK;
                const bool staged = j < nk;
                // Unconditional loads (of key nk - 1 for rows past nk; nk >= 1
                // here), zeroed after: ptxas then issues all of a thread's
                // loads before the first store. Guarded loads came out one
                // after another (SASS), a decode step 15% slower on an H200.
                const int64_t off = keys.row(kt + min(j, nk - 1)) * kv_stride + (int64_t)kvh * D;
                const uint4* kw = reinterpret_cast<const uint4*>(k + off);
                const uint4* vw = reinterpret_cast<const uint4*>(v + off);
                uint4 kx[WPT], vx[WPT];
#pragma unroll
                for (int c = 0; c < WPT; ++c) {
                    const int w = part + c * ATTN_TPK;
                    const bool ok = staged && (NW % ATTN_TPK == 0 || w < NW);
                    const int wc = NW % ATTN_TPK == 0 ? w : min(w, NW - 1);  // a word of the row
                    const uint4 kl = kw[wc], vl = vw[wc];
                    kx[c] = ok ? kl : make_uint4(0u, 0u, 0u, 0u);
                    vx[c] = ok ? vl : make_uint4(0u, 0u, 0u, 0u);
                }
#pragma unroll
                for (int c = 0; c < WPT; ++c) {
                    const int w = part + c * ATTN_TPK;
                    if (NW % ATTN_TPK == 0 || w < NW) {
                        widen16(k, kx[c], sK + j * KS + w * VEC);
                        widen16(v, vx[c], sV + j * D + w * VEC);
                    }
                }
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

        if (SPLIT) {
            // A row with a visible key here has a finite m; the combine reads
            // exactly the partitions that hold one of the row's visible keys.
            if (active && n_vis > k_begin) {
                float* rec = part + (((int64_t)(q0 + i) * n_heads + h) * n_split + blockIdx.x) * (D + 2);  // record: o[D], m, l
#pragma unroll
                for (int c = 0; c < NV; ++c) {
                    const int d = lane + 32 * c;
                    if (D % 32 == 0 || d < D) rec[d] = o[c];
                }
                if (lane == 0) rec[D] = m, rec[D + 1] = l;
            }
        } else if (active) {
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

// grid (n_heads, query tiles, batch), block COMBINE_THREADS: one block per
// (head, query) row of a sequence, grid-striding over the queries. Reads the
// partitions holding the row's visible keys, written by the split kernel.
template <typename T, int D, typename Keys>
__device__ void attention_combine(T* __restrict__ out,             // (total_q, n_heads, D)
                                  const float* __restrict__ part,  // (total_q, n_heads, n_split, D + 2)
                                  const int* __restrict__ cu_q,    // (batch + 1,) query offsets
                                  Keys keys, int total_q, int n_heads, int n_split) {
    const int h = blockIdx.x, seq = blockIdx.z;
    const int2 qr = query_range(cu_q, seq, total_q);
    const int q0 = qr.x, Lq = qr.y;
    const int Lk = keys.bind(seq);
    const int per = split_keys(Lk, n_split);
    constexpr int R = D + 2;  // floats per record: o[D], m, l
    for (int i = blockIdx.y; i < Lq; i += gridDim.y) {
        const int n_vis = min(max(i + (Lk - Lq) + 1, 0), Lk);  // causal, as the split kernel's visible(i)
        const int parts = n_vis == 0 ? 0 : (n_vis - 1) / per + 1;  // partitions with a visible key
        const float* rec = part + ((int64_t)(q0 + i) * n_heads + h) * n_split * R;
        float mx = -INFINITY;  // the largest partition max (finite when parts > 0)
        for (int s = 0; s < parts; ++s) mx = fmaxf(mx, rec[s * R + D]);
        T* orow = out + ((int64_t)(q0 + i) * n_heads + h) * D;
        for (int d = threadIdx.x; d < D; d += COMBINE_THREADS) {
            float acc = 0.f, l = 0.f;
            for (int s = 0; s < parts; ++s) {
                const float w = exp2f(rec[s * R + D] - mx);
                l += w * rec[s * R + D + 1];
                acc += w * rec[s * R + d];
            }
            const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros
            orow[d] = from_float<T>(acc * inv);
        }
    }
}

// ----------------------------------------------------------------------------
// Unmangled entry points: {attention_varlen,paged_attention,paged_attention_split,
// paged_attention_combine}_d{D}_{f32,bf16} for every D of ATTN_HEAD_DIMS (attention.cuh)

#define PAGED_KEYS PagedKeys{block_tables, seq_lens_k, max_blocks, block_size, num_blocks, nullptr}
#define ATTN_KERNEL(T, S, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_varlen_d##D##_##S(            \
        T* out, const T* q, const T* k, const T* v, const int* cu_q, const int* cu_k, int total_q,        \
        int total_k, int n_heads, int n_kv_heads, int causal, float scale, int long_from) {               \
        attention_varlen<T, D, false>(out, nullptr, q, k, v, cu_q, PackedKeys{cu_k, total_k, 0}, total_q, \
                                      n_heads, n_kv_heads, causal, scale, long_from, 1);                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) paged_attention_d##D##_##S(             \
        T* out, const T* q, const T* k_cache, const T* v_cache, const int* cu_q, const int* seq_lens_k,  \
        const int* block_tables, int total_q, int num_blocks, int block_size, int max_blocks,            \
        int n_heads, int n_kv_heads, float scale, int long_from) {                                        \
        attention_varlen<T, D, false>(out, nullptr, q, k_cache, v_cache, cu_q, PAGED_KEYS, total_q,       \
                                      n_heads, n_kv_heads, 1, scale, long_from, 1);                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) paged_attention_split_d##D##_##S(       \
        float* part, const T* q, const T* k_cache, const T* v_cache, const int* cu_q,                    \
        const int* seq_lens_k, const int* block_tables, int total_q, int num_blocks, int block_size,     \
        int max_blocks, int n_heads, int n_kv_heads, float scale, int n_split) {                          \
        attention_varlen<T, D, true>(nullptr, part, q, k_cache, v_cache, cu_q, PAGED_KEYS, total_q,       \
                                     n_heads, n_kv_heads, 1, scale, INT_MAX, n_split);                    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) paged_attention_combine_d##D##_##S(     \
        T* out, const float* part, const int* cu_q, const int* seq_lens_k, const int* block_tables,      \
        int total_q, int num_blocks, int block_size, int max_blocks, int n_heads, int n_split) {          \
        attention_combine<T, D>(out, part, cu_q, PAGED_KEYS, total_q, n_heads, n_split);                  \
    }
// Both float types (FOR_FLOAT_TYPES's) at each head dim of the list.
#define ATTN_KERNELS(D) ATTN_KERNEL(float, f32, D) ATTN_KERNEL(bf16, bf16, D)
ATTN_HEAD_DIMS(ATTN_KERNELS)

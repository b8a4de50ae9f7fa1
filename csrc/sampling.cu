// Sampling one token per row of f32 logits, on the device: the twin of the
// CPU sampler in src/engine/sampling.rs (vLLM v1 order), so that a seeded
// request draws the same tokens on either backend. One block per row:
//
//   1. edits: min_tokens bans (-inf), then repetition, frequency and presence
//      penalties, each listed token once, written back into the logits row;
//   2. argmax of the penalized row (NaN as -inf, first index on ties): the
//      greedy answer, and the max that every probability is taken against;
//   3. z = logit / temperature (f32 division, as the CPU does), and
//      e = exp(z - z_max) in f64: the unnormalized probability;
//   4. min_p keeps e >= min_p (the CPU's p >= min_p · p_max, times the sum);
//      top_k keeps z >= the k-th largest z (ties survive), found by a radix
//      select on counts; top_p keeps the smallest prefix in descending
//      probability (ties by lower id) whose mass reaches top_p of the
//      survivors' mass, found by a radix select on masses plus a count of
//      the boundary value's ties;
//   5. the draw: the first survivor, in TOKEN order as the CPU's inverse CDF
//      walks, whose running mass exceeds u · (survivors' mass), where u is
//      the uniform the host drew from the request's own PRNG.
//
// Where the GPU and the CPU may pick different tokens (all rounding, none
// systematic): running sums in f64 are added in another order (warp chunks
// here, one left-to-right loop there) and the device exp may differ from the
// host's by an ulp, so a u within ~1e-15 of a CDF boundary can land on the
// neighbouring token; likewise a min_p or top_p decision whose two sides
// agree to ~1e-15. top_p masses are added in fixed point (2^-44 per unit of
// e for a 152k vocabulary) so that they are exact and the same in every run;
// the rounding of each e to that grid (< 3e-14) moves the top_p boundary only
// when the kept mass is that close to top_p. Two distinct logits whose
// probabilities round to the same f64 count as a tie on the CPU (lower id
// first) and as ordered by logit here.
#include "common.cuh"

// One sampled row's settings (64-bit aligned, 48 bytes): the twin of
// `RowParams` in src/ops/sampling.rs.
struct SampleParams {
    double u;           // uniform in [0, 1) from the request's PRNG; unused when greedy
    int row;            // the logits row to sample
    int top_k;          // 0 = off, else 0 < top_k < vocab
    float temperature;  // 0 = greedy, else > 0
    float top_p;        // 1 = off, else in (0, 1)
    float min_p;        // 0 = off, else in (0, 1]
    float repetition;   // 1 = off
    float frequency;
    float presence;
    int edits_begin;    // this row's entries of `edits`: [edits_begin, edits_end)
    int edits_end;
};
static_assert(sizeof(SampleParams) == 48, "SampleParams must match RowParams in src/ops/sampling.rs");

#define FULL 0xffffffffu
#define RADIX_BUCKETS 2048  // 11 bits per level; three levels cover 32 (11 + 11 + 10)

// ----------------------------------------------------------------------------
// Helpers

// Order-preserving key of a non-NaN float: a < b as floats iff key(a) <
// key(b), with -0 and +0 one key (they tie, as IEEE comparison has them).
__device__ __forceinline__ unsigned key_of(float x) {
    const unsigned b = __float_as_uint(x == 0.f ? 0.f : x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float float_of(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ double warp_inclusive_scan(double v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(FULL, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// The index of the largest value, the first on ties; `none` (INT_MAX) loses
// to every element, so an all -inf row answers 0.
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// Block argmax of row[0, n) (NaN read as -inf). Every thread gets the index.
__device__ int row_argmax(const float* row, int n) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float v = -INFINITY;
    int i = INT_MAX;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const float x = isnan(row[c]) ? -INFINITY : row[c];
        if (beats(x, c, v, i)) v = x, i = c;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL, v, o);
        const int oi = __shfl_xor_sync(FULL, i, o);
        if (beats(ov, oi, v, i)) v = ov, i = oi;
    }
    __syncthreads();  // sv/si may be read by a previous call
    if (lane == 0) sv[warp] = v, si[warp] = i;
    __syncthreads();
    v = -INFINITY;
    i = INT_MAX;
    for (int w = 0; w < nwarps; ++w)
        if (beats(sv[w], si[w], v, i)) v = sv[w], i = si[w];
    return i;
}

// The first index i in [0, n), in token order, whose running sum of
// weight(i) over [0, i] exceeds target = frac · total + add (total: the sum
// over the row); when rounding leaves no such i, the last index of positive
// weight; -1 when every weight is 0. Every thread gets the answer.
//
// Warp w owns the chunk [w·chunk, (w+1)·chunk) (chunk a multiple of 32) and
// walks it 32 at a time with a warp scan. Pass 1 sums each chunk; thread 0
// finds the chunk where the target falls; pass 2 walks that chunk alone,
// with the same arithmetic as pass 1. weight(i) must be the same both times.
template <typename Weight>
__device__ int first_crossing(Weight weight, int n, double frac, double add) {
    __shared__ double s_sum[32];
    __shared__ int s_last[32];
    __shared__ int s_warp, s_answer;
    __shared__ double s_rest;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int chunk = ((n + nwarps - 1) / nwarps + 31) & ~31;
    const int begin = warp * chunk, end = min(n, begin + chunk);

    double run = 0.0;
    int last = -1;
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const double w = i < end ? weight(i) : 0.0;
        run += __shfl_sync(FULL, warp_inclusive_scan(w), 31);
        if (w > 0.0) last = i;
    }
    last = warp_max_int(last);
    __syncthreads();  // the shared slots may be read by a previous call
    if (lane == 0) s_sum[warp] = run, s_last[warp] = last;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < nwarps; ++w) total += s_sum[w];
        const double target = frac * total + add;
        double before = 0.0;
        int pick = -1, last_all = -1;
        for (int w = 0; w < nwarps; ++w) {
            last_all = max(last_all, s_last[w]);
            if (pick < 0 && target < before + s_sum[w]) pick = w;
            if (pick < 0) before += s_sum[w];
        }
        s_warp = pick;
        s_rest = target - before;
        s_answer = last_all;  // no chunk reaches the target: the last positive index
    }
    __syncthreads();
    if (warp == s_warp) {
        const double rest = s_rest;
        double run = 0.0;
        int found = -1;
        for (int base = begin; base < end && found < 0; base += 32) {
            const int i = base + lane;
            const double w = i < end ? weight(i) : 0.0;
            const double c = run + warp_inclusive_scan(w);
            const unsigned hit = __ballot_sync(FULL, w > 0.0 && rest < c);
            if (hit) found = base + __ffs(hit) - 1;
            run = __shfl_sync(FULL, c, 31);
        }
        // Rounding between the two passes' targets: the chunk's last positive index.
        if (lane == 0) s_answer = found >= 0 ? found : s_last[warp];
    }
    __syncthreads();
    return s_answer;
}

// Radix select: the largest key x such that the weight of the elements with
// key >= x reaches `target`, and in *above the weight of those with key > x.
// With frac > 0 the target is instead ceil(frac · total weight), clamped to
// [1, total], from the first level's histogram; it comes back in *target_out.
// The target must be in [1, total]: then each level's chosen bucket holds it.
//
// Three levels of a 2048-bucket histogram (key bits 31-21, 20-10, 9-0), each
// one pass over the elements whose key matches the digits chosen so far.
// Weights are integers (counts, or fixed-point masses), so the sums are
// exact and the choice is the same in every run.
template <typename Z, typename Weight>
__device__ unsigned radix_select(Z z_of, Weight weight, int n, unsigned long long target, double frac,
                                 unsigned long long* hist,  // shared, (RADIX_BUCKETS,)
                                 unsigned long long* above_out, unsigned long long* target_out) {
    __shared__ unsigned s_prefix;
    __shared__ unsigned long long s_above, s_target;
    unsigned prefix = 0, mask = 0;
    unsigned long long above = 0;
    for (int level = 0; level < 3; ++level) {
        const int shift = level == 0 ? 21 : level == 1 ? 10 : 0;
        const unsigned digit = level < 2 ? 0x7ffu : 0x3ffu;
        for (int b = threadIdx.x; b < RADIX_BUCKETS; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float z = z_of(i);
            const unsigned k = key_of(z);
            if ((k & mask) != prefix) continue;
            const unsigned long long w = weight(i, z);
            if (w) atomicAdd(&hist[(k >> shift) & digit], w);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane L owns buckets [64L, 64L + 64); s = weight of lanes >= L.
            const int lane = threadIdx.x;
            unsigned long long own = 0;
            for (int b = lane * 64; b < lane * 64 + 64; ++b) own += hist[b];
            unsigned long long s = own;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned long long t = __shfl_down_sync(FULL, s, o);
                if (lane + o < 32) s += t;
            }
            if (level == 0 && frac > 0.0) {
                const unsigned long long total = __shfl_sync(FULL, s, 0);
                const double t = ceil(frac * (double)total);
                target = t < 1.0 ? 1ull : t >= (double)total ? total : (unsigned long long)t;
            }
            const unsigned hit = __ballot_sync(FULL, above + s >= target);
            // hit is never 0 while the target is in range; lane 0 keeps it in bounds if it were.
            if (lane == (hit ? 31 - __clz(hit) : 0)) {
                unsigned long long acc = above + s - own;  // weight of the buckets above this lane's
                int b = lane * 64 + 63;
                while (b > lane * 64 && acc + hist[b] < target) acc += hist[b--];
                s_prefix = prefix | ((unsigned)b << shift);
                s_above = acc;
                s_target = target;
            }
        }
        __syncthreads();
        prefix = s_prefix;
        above = s_above;
        target = s_target;
        mask |= digit << shift;
    }
    *above_out = above;
    *target_out = target;
    return prefix;
}

// ----------------------------------------------------------------------------
// CUDA kernel

// out[r] = the token sampled for params[r], or -1 when its row has no finite
// logit. One block per entry of `params`; blockDim.x a multiple of 32, <= 1024.
// Entries name distinct rows (the edits write to them).
extern "C" __global__ void sample_f32(int* __restrict__ out,                   // (rows,)
                                      float* logits,                           // (logit_rows, vocab)
                                      const SampleParams* __restrict__ params, // (rows,)
                                      const int* __restrict__ edits,           // (E, 2): token, n
                                      int vocab) {
    __shared__ unsigned long long hist[RADIX_BUCKETS];
    const SampleParams p = params[blockIdx.x];
    float* row = logits + (size_t)p.row * vocab;

    // 1. Edits, each token listed once per row: n < 0 bans it (min_tokens);
    // n >= 0 is its count in the output, for a token of prompt ∪ output.
    // The same f32 operations as apply_penalties, unfused.
    for (int e = p.edits_begin + threadIdx.x; e < p.edits_end; e += blockDim.x) {
        const int t = edits[2 * e], n = edits[2 * e + 1];
        if (t < 0 || t >= vocab) continue;
        float x = row[t];
        if (n < 0) {
            x = -INFINITY;
        } else {
            if (p.repetition != 1.f) x = x > 0.f ? __fdiv_rn(x, p.repetition) : __fmul_rn(x, p.repetition);
            if (n > 0) {
                x = __fsub_rn(x, __fmul_rn(p.frequency, (float)n));
                x = __fsub_rn(x, p.presence);
            }
        }
        row[t] = x;
    }
    __syncthreads();  // the edited logits are visible to the whole block

    // 2. Argmax; a row without a finite maximum cannot be sampled.
    const int top = row_argmax(row, vocab);
    const float l_top = row[top];
    if (!(l_top > -INFINITY) || p.temperature <= 0.f) {
        if (threadIdx.x == 0) out[blockIdx.x] = l_top > -INFINITY ? top : -1;
        return;
    }

    // 3. Temperature; e(z) = exp(z - z_max) in f64, exactly 1 at the max (a
    // +inf max would otherwise give NaN).
    const float t = p.temperature;
    const float z_max = __fdiv_rn(l_top, t);
    const auto z_of = [&](int i) {
        const float l = row[i];
        return isnan(l) ? -INFINITY : __fdiv_rn(l, t);
    };
    const auto e_of = [&](float z) { return z == z_max ? 1.0 : exp((double)z - (double)z_max); };
    const double min_e = p.min_p;  // min_p: e >= min_p (e_max = 1)

    // 4a. top_k: the k-th largest z over the row, by count.
    float kth = -INFINITY;
    if (p.top_k > 0) {
        unsigned long long above, tgt;
        const auto one = [](int, float) { return 1ull; };
        kth = float_of(radix_select(z_of, one, vocab, (unsigned long long)p.top_k, 0.0, hist, &above, &tgt));
    }
    // Survivors of min_p and top_k: z >= kth and e >= min_p, e > 0 (the CPU
    // skips tokens whose probability underflows to 0).
    const auto survivor_e = [&](float z) {
        if (!(z >= kth)) return 0.0;
        const double e = e_of(z);
        return e >= min_e && e > 0.0 ? e : 0.0;
    };

    // 4b. top_p: boundary value v (mass above v < target <= mass at or above
    // v), then the boundary's ties in id order: keep the first j of them.
    const bool nucleus = p.top_p < 1.f;
    float v = -INFINITY;
    int cut = vocab;
    if (nucleus) {
        // e in fixed point: the sum over the row stays below 2^62.
        const int shift = 62 - (32 - __clz(vocab));
        const auto fixed = [=](double e) { return (unsigned long long)__double2ull_rn(ldexp(e, shift)); };
        const auto mass = [&](int, float z) { return fixed(survivor_e(z)); };
        unsigned long long above, target;
        v = float_of(radix_select(z_of, mass, vocab, 0, (double)p.top_p, hist, &above, &target));
        const unsigned long long ev = fixed(e_of(v));
        const unsigned long long j = ev > 0 ? (target - above + ev - 1) / ev : 1;
        const auto tie = [&](int i) { return z_of(i) == v ? 1.0 : 0.0; };
        cut = first_crossing(tie, vocab, 0.0, (double)(j - 1));
    }

    // 5. The draw over the kept tokens in token order.
    const auto kept_e = [&](int i) {
        const float z = z_of(i);
        if (nucleus && !(z > v || (z == v && i <= cut))) return 0.0;
        return survivor_e(z);
    };
    const int tok = first_crossing(kept_e, vocab, p.u, 0.0);
    if (threadIdx.x == 0) out[blockIdx.x] = tok;
}

//! The CPU sampler: one row of f32 logits in, one token (and its logprobs) out.
//!
//! Semantics follow OpenAI's API as vLLM v1 implements it. The order of
//! operations mirrors `vllm/v1/sample/sampler.py` (`Sampler.forward` /
//! `Sampler.sample`):
//!
//! 1. logprobs to return are taken from the RAW logits (vLLM's default
//!    `logprobs_mode = "raw_logprobs"`): log_softmax of what the model gave,
//!    before penalties and temperature.
//! 2. penalties on the raw logits (`vllm/model_executor/layers/utils.py`
//!    `apply_penalties`, called from `vllm/v1/sample/ops/penalties.py`):
//!    repetition (prompt ∪ output), then frequency, then presence (output only).
//! 3. greedy (argmax, first index on ties) when temperature < 1e-5
//!    (vLLM's `_SAMPLING_EPS`).
//! 4. divide by temperature.
//! 5. min_p (an "argmax-invariant logits processor" in v1, applied before
//!    top-k/top-p): drop tokens with p < min_p · p_max.
//! 6. top_k then top_p (`vllm/v1/sample/ops/topk_topp_sampler.py`
//!    `apply_top_k_top_p`): top-k keeps every token whose logit is >= the k-th
//!    largest (ties at the boundary survive); top-p is computed on the softmax
//!    of the top-k survivors and keeps the smallest prefix, in descending
//!    probability, whose mass reaches p (always at least one token).
//! 7. draw by inverse CDF over the survivors, in f64, with the request's own
//!    PRNG — so a seeded request's tokens depend only on its seed and logits,
//!    never on what else is in the batch.
//!
//! Where we differ from vLLM: its random path draws with exponential noise
//! (`probs / Exp(1)` argmax), we use the inverse CDF; both sample the same
//! distribution, the streams of tokens for a given seed differ.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Below this temperature a request is greedy (vLLM `_SAMPLING_EPS`).
pub const GREEDY_EPS: f32 = 1e-5;
/// Most top logprobs one request may ask for (OpenAI `top_logprobs` <= 20).
pub const MAX_LOGPROBS: usize = 20;

/// Per-request sampling settings, OpenAI names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy. OpenAI default 1.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the k most likely tokens; -1 or 0 = off.
    pub top_k: i32,
    /// Drop tokens with p < min_p · p_max; 0 = off.
    pub min_p: f32,
    /// Subtracted once from every token that occurs in the generated output. [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted once per occurrence in the generated output. [-2, 2].
    pub frequency_penalty: f32,
    /// > 1 discourages tokens seen in prompt or output: positive logits are
    /// divided by it, negative ones multiplied. 1 = off.
    pub repetition_penalty: f32,
    /// Fixes the request's random stream; None draws a fresh one.
    pub seed: Option<u64>,
    /// How many top logprobs (of the raw model distribution) to return.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with every other knob off.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// `Err(InvalidInput)` naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidInput(msg));
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return bad(format!("temperature must be a finite number >= 0, got {t}"));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {p}"));
        }
        if self.top_k < -1 {
            return bad(format!("top_k must be -1 (off), 0 (off) or a positive count, got {}", self.top_k));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return bad(format!("min_p must be in [0, 1], got {m}"));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return bad(format!("repetition_penalty must be a finite number > 0, got {r}"));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return bad(format!("logprobs must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_EPS
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// top_k as a count that actually filters a vocabulary of `vocab`, if any.
    pub fn effective_top_k(&self, vocab: usize) -> Option<usize> {
        let k = usize::try_from(self.top_k).ok().filter(|&k| k > 0)?;
        (k < vocab).then_some(k)
    }

    /// Apply penalties, temperature and the min_p / top_k / top_p filters to
    /// `logits` (V,) in place, and return the distribution that `sample` draws
    /// from: (V,) probabilities in f64, zero for filtered tokens, summing to 1.
    /// Greedy requests get a one-hot on the argmax.
    pub fn final_distribution(&self, logits: &mut [f32], prompt_ids: &[u32], output_ids: &[u32]) -> Result<Vec<f64>> {
        let p = self;
        let vocab = logits.len();
        crate::ensure_shape!(vocab > 0, "sample", "empty logits row");
        apply_penalties(logits, p, prompt_ids, output_ids);
        for l in logits.iter_mut().filter(|l| l.is_nan()) {
            *l = f32::NEG_INFINITY;
        }
        let Some(top) = argmax(logits).filter(|&i| logits[i] > f32::NEG_INFINITY) else {
            return Err(Error::Shape { op: "sample", msg: format!("every logit in a row of {vocab} is -inf or NaN") });
        };
        let mut probs = vec![0.0f64; vocab];
        if p.is_greedy() {
            probs[top] = 1.0;
            return Ok(probs);
        }
        if p.temperature != 1.0 {
            for l in logits.iter_mut() {
                *l /= p.temperature;
            }
        }
        let max = logits[top] as f64;
        for (q, &l) in probs.iter_mut().zip(logits.iter()) {
            *q = (l as f64 - max).exp();
        }
        normalize(&mut probs);

        // min_p: p_i < min_p · p_max is dropped. p_max is probs[top].
        if p.min_p > 0.0 {
            let thr = p.min_p as f64 * probs[top];
            for (q, l) in probs.iter_mut().zip(logits.iter_mut()) {
                if *q < thr {
                    *q = 0.0;
                    *l = f32::NEG_INFINITY;
                }
            }
            normalize(&mut probs);
        }

        // top_k: keep logits >= the k-th largest (ties at the boundary kept).
        if let Some(k) = p.effective_top_k(vocab) {
            let mut sorted: Vec<f32> = logits.to_vec();
            let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            for (q, l) in probs.iter_mut().zip(logits.iter_mut()) {
                if *l < kth {
                    *q = 0.0;
                    *l = f32::NEG_INFINITY;
                }
            }
            normalize(&mut probs);
        }

        // top_p: walk in descending probability (lower id first on ties) and
        // keep tokens until the kept mass reaches p; the one that crosses stays.
        if p.top_p < 1.0 {
            let mut order: Vec<usize> = (0..vocab).filter(|&i| probs[i] > 0.0).collect();
            order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let mut mass = 0.0f64;
            let mut keep = order.len();
            for (n, &i) in order.iter().enumerate() {
                mass += probs[i];
                if mass >= p.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            for &i in &order[keep..] {
                probs[i] = 0.0;
                logits[i] = f32::NEG_INFINITY;
            }
            normalize(&mut probs);
        }
        Ok(probs)
    }

    /// The token a final distribution gives for the uniform `u`: the one-hot's
    /// position when greedy, else the inverse CDF in token order.
    pub fn pick(&self, probs: &[f64], u: f64) -> usize {
        if self.is_greedy() {
            probs.iter().position(|&q| q == 1.0).unwrap_or(0)
        } else {
            inverse_cdf(probs, u)
        }
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Raw logprob of `token` under the model's distribution (before
    /// penalties and temperature), as vLLM's default `raw_logprobs`.
    pub logprob: f32,
    /// The `logprobs` most likely tokens of the raw distribution, most likely
    /// first (lower id first on ties); empty when logprobs is None.
    pub top: Vec<(u32, f32)>,
}

/// xoshiro256++ (Blackman & Vigna), seeded through SplitMix64. Small, fast and
/// good enough for drawing tokens; the state is per request.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn from_seed(seed: u64) -> Self {
        let mut x = seed;
        Rng { s: [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)] }
    }

    /// A stream that differs per call and per process: a process-wide counter
    /// hashed with std's randomly keyed SipHash.
    pub fn from_entropy() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        Rng::from_seed(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The tokens the penalties touch, each once, in id order: every id of
/// `prompt_ids` ∪ `output_ids` below `vocab`, with its count in `output_ids`
/// (0 for a prompt-only token). The GPU sampler gets this list per row.
pub fn penalized_tokens(vocab: usize, prompt_ids: &[u32], output_ids: &[u32]) -> Vec<(u32, u32)> {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for &t in prompt_ids.iter().filter(|&&t| (t as usize) < vocab) {
        counts.entry(t).or_insert(0);
    }
    for &t in output_ids.iter().filter(|&&t| (t as usize) < vocab) {
        *counts.entry(t).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// Apply repetition, frequency and presence penalties in place (vLLM
/// `apply_penalties`). Repetition applies to tokens in `prompt_ids` or
/// `output_ids`; frequency and presence count `output_ids` only. Ids outside
/// the vocabulary are ignored. Each token is edited on its own, so the order
/// between tokens does not matter; per token it is repetition, frequency,
/// presence (csrc/sampling.cu repeats these f32 operations).
pub fn apply_penalties(logits: &mut [f32], params: &SamplingParams, prompt_ids: &[u32], output_ids: &[u32]) {
    if !params.has_penalties() {
        return;
    }
    let r = params.repetition_penalty;
    for (t, c) in penalized_tokens(logits.len(), prompt_ids, output_ids) {
        let l = &mut logits[t as usize];
        if r != 1.0 {
            // vLLM: where(logits > 0, logits / r, logits * r)
            *l = if *l > 0.0 { *l / r } else { *l * r };
        }
        if c > 0 {
            *l -= params.frequency_penalty * c as f32;
            *l -= params.presence_penalty;
        }
    }
}

/// Index of the largest logit, the first one on ties; NaN never wins.
/// None when no logit is a number.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i)
}

/// log_softmax in f64. NaN logits get -inf.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().filter(|l| !l.is_nan()).map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| if l.is_nan() { f64::NEG_INFINITY } else { l as f64 - lse }).collect()
}

/// The `n` largest entries as (index, value), largest first, lower index first on ties.
fn top_n(values: &[f64], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i as u32, values[i] as f32)).collect()
}

/// A request's sampler: its settings and its random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// Validates `params`; seeds the stream from `params.seed` or fresh entropy.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::from_seed);
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// [`SamplingParams::final_distribution`] with this request's settings.
    pub fn final_distribution(&self, logits: &mut [f32], prompt_ids: &[u32], output_ids: &[u32]) -> Result<Vec<f64>> {
        self.params.final_distribution(logits, prompt_ids, output_ids)
    }

    /// The next uniform in [0, 1) of this request's stream: what `sample`
    /// draws for a non-greedy token. The GPU sampler gets it from here, so a
    /// seeded request's stream is the same on either backend.
    pub fn next_uniform(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// Sample one token from `logits` (V,) of this request's current position.
    /// `logits` is modified in place (penalties, temperature, filters).
    /// `prompt_ids` / `output_ids`: the request's prompt and the tokens it has
    /// generated so far (for penalties).
    pub fn sample(&mut self, logits: &mut [f32], prompt_ids: &[u32], output_ids: &[u32]) -> Result<Sampled> {
        crate::ensure_shape!(!logits.is_empty(), "sample", "empty logits row");
        crate::ensure_shape!(
            logits.len() <= u32::MAX as usize,
            "sample",
            "vocabulary of {} does not fit u32 ids",
            logits.len()
        );
        // Raw logprobs first: the model's own distribution (vLLM raw_logprobs).
        let raw = log_softmax(logits);
        let probs = self.params.final_distribution(logits, prompt_ids, output_ids)?;
        let u = if self.params.is_greedy() { 0.0 } else { self.rng.next_f64() };
        let token = self.params.pick(&probs, u);
        let top = self.params.logprobs.map_or_else(Vec::new, |n| top_n(&raw, n));
        Ok(Sampled { token: token as u32, logprob: raw[token] as f32, top })
    }
}

/// Scale `probs` to sum to 1 (no-op on an all-zero row, which cannot happen
/// after the argmax check: the max always survives every filter).
fn normalize(probs: &mut [f64]) {
    let s: f64 = probs.iter().sum();
    if s > 0.0 {
        for q in probs.iter_mut() {
            *q /= s;
        }
    }
}

/// The first index whose cumulative probability exceeds `u` in [0, 1);
/// falls back to the last nonzero entry when rounding leaves the sum short.
fn inverse_cdf(probs: &[f64], u: f64) -> usize {
    let mut c = 0.0;
    let mut last = 0;
    for (i, &q) in probs.iter().enumerate() {
        if q > 0.0 {
            c += q;
            last = i;
            if u < c {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_matches_reference_splitmix_and_is_uniformish() {
        // SplitMix64 from seed 0: first output is 0xE220A8397B1DCDAF (Vigna's
        // reference implementation, splitmix64.c).
        let mut x = 0u64;
        assert_eq!(splitmix64(&mut x), 0xE220_A839_7B1D_CDAF);
        let mut r = Rng::from_seed(7);
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        // sd of the mean of U(0,1) is sqrt(1/12/n) ≈ 9.1e-4; 5 sd.
        assert!((mean - 0.5).abs() < 5e-3, "mean {mean}");
    }

    #[test]
    fn inverse_cdf_edges() {
        let p = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(inverse_cdf(&p, 0.0), 1);
        assert_eq!(inverse_cdf(&p, 0.2499), 1);
        assert_eq!(inverse_cdf(&p, 0.25), 3);
        assert_eq!(inverse_cdf(&p, 0.999_999), 3);
        // sum short by rounding: the last nonzero entry.
        assert_eq!(inverse_cdf(&[0.5, 0.4999, 0.0], 0.99995), 1);
    }

    #[test]
    fn top_n_orders_and_breaks_ties_by_id() {
        let v = [0.1, 0.5, 0.5, -1.0, 0.3];
        let t = top_n(&v, 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(top_n(&v, 10).len(), 5);
        assert!(top_n(&v, 0).is_empty());
    }

    #[test]
    fn all_masked_row_is_an_error_not_a_panic() {
        let mut s = Sampler::new(SamplingParams { seed: Some(1), ..Default::default() }).unwrap();
        let mut l = [f32::NEG_INFINITY, f32::NAN];
        assert!(s.sample(&mut l, &[], &[]).is_err());
        assert!(s.sample(&mut [], &[], &[]).is_err());
    }
}

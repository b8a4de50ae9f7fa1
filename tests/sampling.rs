//! The CPU sampler against hand-computed cases and an independent softmax.
//! No expectation here is copied from the code under test: every golden value
//! is worked out in the comment beside it or by the plain helpers below.

use kestrel::engine::sampling::{apply_penalties, Sampler, SamplingParams};
use kestrel::Error;

/// Plain softmax in f64, written independently of the sampler.
fn softmax(logits: &[f64]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn seeded(p: SamplingParams, seed: u64) -> Sampler {
    Sampler::new(SamplingParams { seed: Some(seed), ..p }).unwrap()
}

fn draw(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
    (0..n).map(|_| s.sample(&mut logits.to_vec(), &[], &[]).unwrap().token).collect()
}

fn dist(s: &Sampler, logits: &[f32]) -> Vec<f64> {
    s.final_distribution(&mut logits.to_vec(), &[], &[]).unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "index {i}: got {g}, want {w} (all: {got:?})");
    }
}

/// Pearson chi-square of observed counts against probabilities; only over
/// categories with nonzero expected mass, and fails if a zero-mass one is hit.
fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let (mut x2, mut cats) = (0.0, 0);
    for (&c, &p) in counts.iter().zip(probs) {
        if p == 0.0 {
            assert_eq!(c, 0, "a token with zero probability was drawn");
            continue;
        }
        let e = p * n as f64;
        assert!(e >= 5.0, "expected count {e} too small for the chi-square approximation");
        x2 += (c as f64 - e).powi(2) / e;
        cats += 1;
    }
    (x2, cats - 1)
}

/// Upper 0.1% points of chi-square (standard tables), by degrees of freedom.
fn chi2_crit_999(df: usize) -> f64 {
    match df {
        1 => 10.828,
        2 => 13.816,
        3 => 16.266,
        4 => 18.467,
        7 => 24.322,
        _ => panic!("no table entry for df={df}"),
    }
}

fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u64> {
    let mut c = vec![0u64; logits.len()];
    for t in draw(s, logits, n) {
        c[t as usize] += 1;
    }
    c
}

// Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 placed at shuffled ids, as logits
// ln(p) + 3 (the offset must not matter).
const HAND_P: [f64; 5] = [0.15, 0.05, 0.5, 0.1, 0.2];
fn hand_logits() -> Vec<f32> {
    HAND_P.iter().map(|p| (p.ln() + 3.0) as f32).collect()
}

#[test]
fn greedy_picks_first_argmax() {
    let logits = [1.0f32, 3.0, -2.0, 3.0, 0.0];
    for t in [0.0f32, 1e-6] {
        let mut s = Sampler::new(SamplingParams { temperature: t, ..Default::default() }).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&mut logits.to_vec(), &[], &[]).unwrap().token, 1);
        }
    }
}

#[test]
fn greedy_logprob_is_raw_log_softmax() {
    let logits = [0.5f32, 2.0, -1.0];
    let mut s = Sampler::new(SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() }).unwrap();
    let out = s.sample(&mut logits.to_vec(), &[], &[]).unwrap();
    let lse = (0.5f64.exp() + 2.0f64.exp() + (-1.0f64).exp()).ln();
    assert_eq!(out.token, 1);
    assert!((out.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
    assert_eq!(out.top.len(), 2);
    assert_eq!((out.top[0].0, out.top[1].0), (1, 0));
    assert!((out.top[1].1 as f64 - (0.5 - lse)).abs() < 1e-6);
}

#[test]
fn logprobs_are_raw_before_penalties_and_temperature() {
    // vLLM's default logprobs_mode is raw_logprobs: temperature, filters and
    // penalties do not change what is reported.
    let logits = [1.0f32, 0.0, -0.5, 2.5];
    let want: Vec<f64> = softmax(&logits.map(|x| x as f64)).iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        temperature: 0.3,
        top_k: 2,
        repetition_penalty: 1.7,
        frequency_penalty: 1.0,
        logprobs: Some(4),
        ..Default::default()
    };
    let mut s = seeded(p, 3);
    for _ in 0..20 {
        let out = s.sample(&mut logits.to_vec(), &[0], &[3, 3]).unwrap();
        assert!((out.logprob as f64 - want[out.token as usize]).abs() < 1e-6);
        let ids: Vec<u32> = out.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![3, 0, 1, 2]);
        for (id, lp) in out.top {
            assert!((lp as f64 - want[id as usize]).abs() < 1e-6);
        }
    }
}

#[test]
fn temperature_to_zero_limit_is_argmax() {
    let logits = [0.0f32, 1.0, 0.5, -3.0];
    // At T = 0.01 the runner-up has weight e^{-0.5/0.01} = e^{-50} ≈ 2e-22.
    let mut s = seeded(SamplingParams { temperature: 0.01, ..Default::default() }, 11);
    assert!(draw(&mut s, &logits, 2000).iter().all(|&t| t == 1));
    let d = dist(&s, &logits);
    assert_close(&d, &[0.0, 1.0, 0.0, 0.0], 1e-15);
    // And at T = 0.5 the distribution is softmax(2·logits), independently computed.
    let s = seeded(SamplingParams { temperature: 0.5, ..Default::default() }, 11);
    assert_close(&dist(&s, &logits), &softmax(&logits.map(|x| 2.0 * x as f64)), 1e-6);
}

#[test]
fn top_k_1_is_greedy() {
    // A fixed pseudo-random row without ties (an LCG in the test, not the sampler's RNG).
    let mut x = 12345u64;
    let logits: Vec<f32> = (0..1000)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect();
    let (mut best, mut bi) = (f32::NEG_INFINITY, 0);
    for (i, &l) in logits.iter().enumerate() {
        if l > best {
            (best, bi) = (l, i);
        }
    }
    assert_eq!(logits.iter().filter(|&&l| l == best).count(), 1);
    for seed in 0..5 {
        let mut s = seeded(SamplingParams { temperature: 1.5, top_k: 1, ..Default::default() }, seed);
        assert!(draw(&mut s, &logits, 200).iter().all(|&t| t as usize == bi));
    }
}

#[test]
fn top_k_keeps_ties_at_the_boundary() {
    // vLLM masks logits < k-th largest, so both 2.0s survive top_k = 2.
    let logits = [3.0f32, 2.0, 2.0, 1.0];
    let s = seeded(SamplingParams { top_k: 2, ..Default::default() }, 0);
    let e = [3.0f64.exp(), 2.0f64.exp(), 2.0f64.exp()];
    let z: f64 = e.iter().sum();
    assert_close(&dist(&s, &logits), &[e[0] / z, e[1] / z, e[2] / z, 0.0], 1e-6);
    // top_k >= vocab is off.
    let s = seeded(SamplingParams { top_k: 4, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &softmax(&logits.map(|x| x as f64)), 1e-6);
}

#[test]
fn top_p_keeps_smallest_set_reaching_p() {
    let logits = hand_logits();
    // Descending 0.5, 0.2, 0.15, 0.1, 0.05; cumulative 0.5, 0.7, 0.85, 0.95, 1.
    // p = 0.8: 0.85 is the first to reach it -> {0.5, 0.2, 0.15}, renormalized by 0.85.
    let s = seeded(SamplingParams { top_p: 0.8, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &[0.15 / 0.85, 0.0, 0.5 / 0.85, 0.0, 0.2 / 0.85], 1e-6);
    // p = 0.6 -> {0.5, 0.2}; p = 0.3 -> {0.5} alone.
    let s = seeded(SamplingParams { top_p: 0.6, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &[0.0, 0.0, 0.5 / 0.7, 0.0, 0.2 / 0.7], 1e-6);
    let s = seeded(SamplingParams { top_p: 0.3, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &[0.0, 0.0, 1.0, 0.0, 0.0], 1e-12);
    // Draws stay in the nucleus and follow it (df = 2).
    let mut s = seeded(SamplingParams { top_p: 0.8, ..Default::default() }, 5);
    let c = histogram(&mut s, &logits, 20_000);
    let (x2, df) = chi_square(&c, &[0.15 / 0.85, 0.0, 0.5 / 0.85, 0.0, 0.2 / 0.85]);
    assert!(x2 < chi2_crit_999(df), "chi2 {x2} df {df} counts {c:?}");
}

#[test]
fn top_p_is_applied_after_top_k() {
    // top_k = 3 leaves 0.5, 0.2, 0.15 -> renormalized 0.588, 0.235, 0.176;
    // top_p = 0.8 on that: 0.588 + 0.235 = 0.824 >= 0.8 -> {0.5, 0.2}.
    // (Applied to the full distribution, p = 0.8 would have kept three.)
    let s = seeded(SamplingParams { top_k: 3, top_p: 0.8, ..Default::default() }, 0);
    assert_close(&dist(&s, &hand_logits()), &[0.0, 0.0, 0.5 / 0.7, 0.0, 0.2 / 0.7], 1e-6);
}

#[test]
fn min_p_hand_cases() {
    let logits = hand_logits();
    // min_p = 0.25: threshold 0.25 · 0.5 = 0.125 -> keep 0.5, 0.2, 0.15.
    let s = seeded(SamplingParams { min_p: 0.25, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &[0.15 / 0.85, 0.0, 0.5 / 0.85, 0.0, 0.2 / 0.85], 1e-6);
    // min_p = 0.35: threshold 0.175 -> keep 0.5, 0.2.
    let s = seeded(SamplingParams { min_p: 0.35, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &[0.0, 0.0, 0.5 / 0.7, 0.0, 0.2 / 0.7], 1e-6);
    // min_p acts after temperature: at T = 0.5 the weights are p², i.e.
    // 0.25, 0.04, 0.0225, 0.01, 0.0025; min_p = 0.1 drops below 0.1 · 0.25 =
    // 0.025, so 0.0225 goes although 0.15 > 0.1 · 0.5 at T = 1.
    let s = seeded(SamplingParams { min_p: 0.1, temperature: 0.5, ..Default::default() }, 0);
    assert_close(&dist(&s, &logits), &[0.0, 0.0, 0.25 / 0.29, 0.0, 0.04 / 0.29], 1e-6);
}

#[test]
fn repetition_penalty_divides_positive_multiplies_negative() {
    // Token 0 (+2.0) is in the prompt, token 1 (-2.0) in the output, token 2
    // (+1.0) nowhere, token 3 (0.0) in the prompt: 0 is not > 0, so 0 · 2 = 0.
    let mut l = vec![2.0f32, -2.0, 1.0, 0.0];
    let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
    apply_penalties(&mut l, &p, &[0, 3, 0], &[1]);
    assert_eq!(l, vec![1.0, -4.0, 1.0, 0.0]);
    // Ids outside the vocabulary are ignored, not a panic.
    apply_penalties(&mut l, &p, &[99], &[1000]);
    assert_eq!(l, vec![1.0, -4.0, 1.0, 0.0]);
}

#[test]
fn frequency_and_presence_count_output_only() {
    // Output [1, 3, 3]: token 1 once, token 3 twice; token 0 is only in the prompt.
    let base = vec![2.0f32, -2.0, 1.0, 0.5];
    let mut l = base.clone();
    let p = SamplingParams { frequency_penalty: 0.5, ..Default::default() };
    apply_penalties(&mut l, &p, &[0], &[1, 3, 3]);
    assert_eq!(l, vec![2.0, -2.5, 1.0, -0.5]); // -2 - 0.5·1, 0.5 - 0.5·2
    let mut l = base.clone();
    let p = SamplingParams { presence_penalty: 0.25, ..Default::default() };
    apply_penalties(&mut l, &p, &[0], &[1, 3, 3]);
    assert_eq!(l, vec![2.0, -2.25, 1.0, 0.25]);
    // Negative penalties encourage repeats.
    let mut l = base.clone();
    let p = SamplingParams { presence_penalty: -1.0, frequency_penalty: -0.5, ..Default::default() };
    apply_penalties(&mut l, &p, &[0], &[1, 3, 3]);
    assert_eq!(l, vec![2.0, -0.5, 1.0, 2.5]); // -2 + 0.5 + 1, 0.5 + 1 + 1
}

#[test]
fn penalties_combine_repetition_first() {
    // Token 3: 0.5 / 2 = 0.25, then - 0.5·2 - 0.25 = -1.0.
    // Token 1: -2 · 2 = -4, then - 0.5 - 0.25 = -4.75. Token 0 (prompt): 2 / 2 = 1.
    let mut l = vec![2.0f32, -2.0, 1.0, 0.5];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..Default::default()
    };
    apply_penalties(&mut l, &p, &[0], &[1, 3, 3]);
    assert_eq!(l, vec![1.0, -4.75, 1.0, -1.0]);
}

#[test]
fn penalties_apply_before_greedy() {
    // Raw argmax is token 0 (2.0); a repetition penalty of 3 on it (prompt)
    // makes it 0.667 < 1.0, so greedy picks token 2. Its logprob stays raw.
    let logits = [2.0f32, -2.0, 1.0];
    let mut s = Sampler::new(SamplingParams { repetition_penalty: 3.0, ..SamplingParams::greedy() }).unwrap();
    let out = s.sample(&mut logits.to_vec(), &[0], &[]).unwrap();
    assert_eq!(out.token, 2);
    let raw = softmax(&logits.map(|x| x as f64));
    assert!((out.logprob as f64 - raw[2].ln()).abs() < 1e-6);
}

#[test]
fn seeded_streams_are_reproducible_and_batch_independent() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
    let p = SamplingParams { temperature: 0.9, top_p: 0.95, ..Default::default() };
    let a = draw(&mut seeded(p.clone(), 42), &logits, 300);
    let b = draw(&mut seeded(p.clone(), 42), &logits, 300);
    assert_eq!(a, b);
    let c = draw(&mut seeded(p.clone(), 43), &logits, 300);
    assert_ne!(a, c);
    // Interleave the seed-42 request with two others on different rows: its
    // tokens must not change (per-request RNG, nothing shared).
    let mut r42 = seeded(p.clone(), 42);
    let mut other = seeded(p.clone(), 7);
    let mut unseeded = Sampler::new(p.clone()).unwrap();
    let other_row: Vec<f32> = logits.iter().rev().cloned().collect();
    let mut d = Vec::new();
    for i in 0..300 {
        for _ in 0..(i % 3) {
            other.sample(&mut other_row.clone(), &[], &[]).unwrap();
            unseeded.sample(&mut logits.clone(), &[], &[]).unwrap();
        }
        d.push(r42.sample(&mut logits.clone(), &[], &[]).unwrap().token);
    }
    assert_eq!(a, d);
    // Two unseeded requests get different streams.
    let u1 = draw(&mut Sampler::new(p.clone()).unwrap(), &logits, 100);
    let u2 = draw(&mut Sampler::new(p).unwrap(), &logits, 100);
    assert_ne!(u1, u2);
}

#[test]
fn empirical_distribution_matches_softmax() {
    // 8 tokens, 20k draws at T = 1. Smallest p here is ≈ 0.0045 -> expected
    // count ≈ 90, well above the >= 5 the chi-square approximation needs.
    // df = 7; the critical value 24.322 is the upper 0.1% point, so a correct
    // sampler fails a given seed with probability 1e-3; the seeds are fixed,
    // so the test is deterministic, and a sampler off by even 3% relative on
    // one of the larger classes lands far past it (stat grows ∝ n · bias²).
    let logits = [1.2f32, -0.7, 0.3, 2.0, -2.0, 0.0, 1.5, -1.1];
    let want = softmax(&logits.map(|x| x as f64));
    for seed in [1u64, 2, 3] {
        let mut s = seeded(SamplingParams::default(), seed);
        let c = histogram(&mut s, &logits, 20_000);
        let (x2, df) = chi_square(&c, &want);
        assert_eq!(df, 7);
        assert!(x2 < chi2_crit_999(df), "seed {seed}: chi2 {x2} counts {c:?}");
    }
}

#[test]
fn empirical_distribution_with_temperature_and_top_k() {
    // T = 0.7, top_k = 3: softmax(l / 0.7) over the three largest, zero elsewhere (df = 2).
    let logits = [1.2f32, -0.7, 0.3, 2.0, -2.0, 0.0, 1.5, -1.1];
    let top3 = [3usize, 6, 0];
    let sub = softmax(&top3.map(|i| logits[i] as f64 / 0.7));
    let mut want = vec![0.0; logits.len()];
    for (k, &i) in top3.iter().enumerate() {
        want[i] = sub[k];
    }
    let mut s = seeded(SamplingParams { temperature: 0.7, top_k: 3, ..Default::default() }, 9);
    let c = histogram(&mut s, &logits, 20_000);
    let (x2, df) = chi_square(&c, &want);
    assert!(x2 < chi2_crit_999(df), "chi2 {x2} counts {c:?}");
}

#[test]
fn validation_rejects_out_of_range() {
    let d = SamplingParams::default;
    let bad = [
        (SamplingParams { temperature: -0.1, ..d() }, "temperature"),
        (SamplingParams { temperature: f32::NAN, ..d() }, "temperature"),
        (SamplingParams { top_p: 0.0, ..d() }, "top_p"),
        (SamplingParams { top_p: 1.01, ..d() }, "top_p"),
        (SamplingParams { top_k: -2, ..d() }, "top_k"),
        (SamplingParams { min_p: -0.01, ..d() }, "min_p"),
        (SamplingParams { min_p: 1.5, ..d() }, "min_p"),
        (SamplingParams { repetition_penalty: 0.0, ..d() }, "repetition_penalty"),
        (SamplingParams { repetition_penalty: -1.0, ..d() }, "repetition_penalty"),
        (SamplingParams { presence_penalty: 2.5, ..d() }, "presence_penalty"),
        (SamplingParams { frequency_penalty: -2.01, ..d() }, "frequency_penalty"),
        (SamplingParams { frequency_penalty: f32::NAN, ..d() }, "frequency_penalty"),
        (SamplingParams { logprobs: Some(21), ..d() }, "logprobs"),
    ];
    for (p, field) in bad {
        match Sampler::new(p.clone()) {
            Err(Error::InvalidInput(msg)) => assert!(msg.contains(field), "{p:?}: message {msg:?}"),
            other => panic!("{p:?}: expected InvalidInput, got {other:?}"),
        }
    }
    let good = [
        d(),
        SamplingParams::greedy(),
        SamplingParams { top_k: 0, top_p: 1.0, min_p: 1.0, ..d() },
        SamplingParams { presence_penalty: -2.0, frequency_penalty: 2.0, repetition_penalty: 0.5, ..d() },
        SamplingParams { logprobs: Some(20), temperature: 2.0, ..d() },
    ];
    for p in good {
        assert!(p.validate().is_ok(), "{p:?}");
    }
}

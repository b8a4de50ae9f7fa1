//! The token bitmask (structured outputs), compared bit for bit.
//!
//! `cpu`: the op's CPU path against a per-token loop written here. `gpu`: the
//! kernel against the CPU path. The op only writes -inf or leaves a logit
//! alone, so both must match exactly, NaN payloads and rows that are not
//! masked included. The table's "max err" column counts the logits whose
//! bits differ (tolerance 0); a plain difference would call -inf - -inf NaN.
//!
//! Shapes: vocabularies of 1, 31, 32, 33, 1000, Qwen2-VL's 151936 and
//! 152064 + 7 (odd, so rows start off 16-byte alignment), each with masks of
//! exactly ceil(vocab / 32) words, shorter ones (the tokens past the mask are
//! forbidden) and longer ones (random bits past the vocabulary, ignored). Two
//! calls per shape: rows [3, 0] of 5, then every row in a shuffled order;
//! and 300 of 320 rows of 1000 in one call.
//! Masks cycle through random, sparse (1 bit in 16), all-zero, all-ones and
//! a mix of whole words (all ones, zero, random) that hits the kernel's
//! skipped lines; logits are normal with NaN, +inf and -inf sprinkled in.

use kestrel::ops::bitmask::apply_token_bitmask;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

/// Whether `mask` (one row's words) allows token `t`, written per token.
fn allowed(mask: &[u32], t: usize) -> bool {
    let (word, bit) = (t / 32, t % 32);
    word < mask.len() && mask[word] & (1u32 << bit) != 0
}

/// The expected logits: a copy of `x` with every forbidden token of each masked row at -inf.
fn reference(x: &[f32], vocab: usize, rows: &[usize], masks: &[u32], words: usize) -> Vec<f32> {
    let mut want = x.to_vec();
    for (i, &r) in rows.iter().enumerate() {
        let mask = &masks[i * words..(i + 1) * words];
        for t in 0..vocab {
            if !allowed(mask, t) {
                want[r * vocab + t] = f32::NEG_INFINITY;
            }
        }
    }
    want
}

/// One mask of `words` words; `kind` picks the pattern (see the module doc).
fn mask(rng: &mut Rng, kind: usize, words: usize) -> Vec<u32> {
    let word = |rng: &mut Rng| rng.next_u64() as u32;
    (0..words)
        .map(|_| match kind % 5 {
            0 => word(rng),
            1 => word(rng) & word(rng) & word(rng) & word(rng),
            2 => 0,
            3 => u32::MAX,
            _ => [u32::MAX, 0, word(rng)][rng.below(3)],
        })
        .collect()
}

/// Normal logits with a few NaN (two payloads), +inf and -inf.
fn logits(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = rng.normals(n, 4.0);
    for _ in 0..(n / 50).max(2) {
        let v = [f32::NAN, f32::from_bits(0x7fc0_1234), f32::INFINITY, f32::NEG_INFINITY][rng.below(4)];
        x[rng.below(n)] = v;
    }
    x
}

/// Positions whose bits differ (every position when the lengths differ), as
/// a table row with tolerance 0.
fn bitwise(backend: &'static str, label: &str, got: &[f32], want: &[f32]) -> Row {
    let differ = if got.len() == want.len() {
        got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count()
    } else {
        got.len().max(want.len())
    };
    Row {
        backend,
        op: "apply_token_bitmask".into(),
        shape: label.into(),
        dtype: "f32",
        max_err: differ as f64,
        tol: 0.0,
        rel_l2: differ as f64 / want.len().max(1) as f64,
        pass: differ == 0,
    }
}

/// The op on `rows` of random logits (n_rows, vocab) on both backends.
fn check(gpu: Option<&Device>, rng: &mut Rng, shape: [usize; 2], words: usize, rows: &[usize]) -> Vec<Row> {
    let [n_rows, vocab] = shape;
    let list = if rows.len() <= 5 { format!("{rows:?}").replace(' ', "") } else { format!("{} rows", rows.len()) };
    let label = format!("{list} of {n_rows}x{vocab} w{words}");
    let x = logits(rng, n_rows * vocab);
    let first = rng.below(5);
    let masks: Vec<u32> = (0..rows.len()).flat_map(|i| mask(rng, first + i, words)).collect();
    let want = reference(&x, vocab, rows, &masks, words);

    let mut lc = Tensor::from_f32(&Device::Cpu, &[n_rows, vocab], &x, DType::F32).unwrap();
    apply_token_bitmask(&mut lc, rows, &masks, words).unwrap();
    let cpu = lc.to_f32_vec().unwrap();
    let mut out = vec![bitwise("cpu", &label, &cpu, &want)];
    if let Some(g) = gpu {
        let mut lg = Tensor::from_f32(g, &[n_rows, vocab], &x, DType::F32).unwrap();
        apply_token_bitmask(&mut lg, rows, &masks, words).unwrap();
        out.push(bitwise("gpu", &label, &lg.to_f32_vec().unwrap(), &cpu));
    }
    out
}

/// 0..n in a random order.
fn shuffled(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for vocab in [1usize, 31, 32, 33, 1000, 151_936, 152_064 + 7] {
        let exact = vocab.div_ceil(32);
        let short = (exact * 2 / 3).max(1);
        let mut sizes = vec![("exact", exact), ("long", exact + 5)];
        if short < exact {
            sizes.push(("short", short));
        }
        for (kind, words) in sizes {
            v.push(Case::new(format!("bitmask {vocab} {kind}"), move |gpu, rng| {
                let all = shuffled(rng, 5);
                let mut out = check(gpu, rng, [5, vocab], words, &[3, 0]);
                out.extend(check(gpu, rng, [5, vocab], words, &all));
                out
            }));
        }
    }
    // A batch's worth of masked rows (the launch's second grid dimension):
    // 300 of 320 rows, in a random order.
    v.push(Case::new("bitmask 300 rows", |gpu, rng| {
        let rows: Vec<usize> = shuffled(rng, 320).into_iter().take(300).collect();
        check(gpu, rng, [320, 1000], 32, &rows)
    }));
    v
}

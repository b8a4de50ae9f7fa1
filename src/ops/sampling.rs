//! Sampling one token per row of f32 logits on the logits' device: the
//! engine's sampler (src/engine/sampling.rs, vLLM v1's order: min_tokens
//! bans, penalties, greedy, temperature, min_p, top_k, top_p, inverse-CDF
//! draw) as an op, so a step sends back token ids, not logits.
//! Kernel: csrc/sampling.cu.
//!
//! The host keeps each request's random stream: it draws the row's uniform
//! `u` (`Sampler::next_uniform`) and the device draws with it, so a seeded
//! request gives the same tokens on both backends, alone or in any batch. The
//! CPU path is the sampler itself (`SamplingParams::final_distribution` then
//! `pick`), the oracle for the kernel. The two agree exactly except where
//! float rounding decides: a `u` within ~1e-15 of a CDF boundary, a min_p or
//! top_p cut whose two sides agree to that precision (the kernel's header has
//! the list). Raw logprobs are not computed here; rows that want them stay on
//! the CPU sampler.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::{expect_dtype, f32s_mut, i32s_mut, placement, ptr, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::{Error, Result};
use crate::sampling::{penalized_tokens, SamplingParams};
use crate::tensor::{DType, Tensor};

/// `out` holds this for a row whose logits are all -inf or NaN (after bans
/// and penalties): it has no token to give.
pub const NO_TOKEN: i32 = -1;

/// The largest vocabulary the kernel takes: its fixed-point top_p masses
/// (each at most 2^(62 - bits(vocab))) must sum below 2^62.
pub const MAX_VOCAB: usize = 1 << 24;

/// Threads per row: the 152k-entry rows of Qwen2-VL want the whole block.
const THREADS: u32 = 1024;

/// One row to sample.
pub struct SampleRow<'a> {
    /// Which row of `logits`.
    pub row: usize,
    pub params: &'a SamplingParams,
    /// Uniform in [0, 1) from the request's stream; ignored when greedy.
    pub u: f64,
    /// The request's prompt and its output so far, for the penalties.
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    /// Ids set to -inf before anything else (min_tokens: EOS and stop ids).
    pub banned: Vec<u32>,
}

/// One row's settings as the kernel reads them: `SampleParams` in
/// csrc/sampling.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RowParams {
    u: f64,
    row: i32,
    /// 0 = off.
    top_k: i32,
    /// 0 = greedy.
    temperature: f32,
    top_p: f32,
    min_p: f32,
    repetition: f32,
    frequency: f32,
    presence: f32,
    /// This row's (token, n) pairs in the edits array: [edits_begin, edits_end).
    edits_begin: i32,
    edits_end: i32,
}
const _: () = assert!(std::mem::size_of::<RowParams>() == 48);

/// out[r] = the token sampled from logits[rows[r].row, :], or [`NO_TOKEN`].
/// logits: f32 (R, vocab); out: i32 (rows.len(),). Rows must be distinct.
/// The sampled rows of `logits` are scratch: the op changes them (bans and
/// penalties on both backends, temperature and filters on the CPU).
pub fn sample(out: &mut Tensor, logits: &mut Tensor, rows: &[SampleRow]) -> Result<()> {
    const OP: &str = "sample";
    let ls = logits.shape().to_vec();
    ensure_shape!(ls.len() == 2 && ls[1] > 0, OP, "logits {ls:?}: expected (rows, vocab) with vocab >= 1");
    let (n_rows, vocab) = (ls[0], ls[1]);
    ensure_shape!(vocab <= MAX_VOCAB, OP, "vocabulary of {vocab} is over the kernel's {MAX_VOCAB}");
    ensure_shape!(n_rows <= i32::MAX as usize, OP, "{n_rows} logits rows");
    ensure_shape!(out.shape() == [rows.len()], OP, "out {:?}, expected [{}]", out.shape(), rows.len());
    expect_dtype(OP, logits, DType::F32)?;
    expect_dtype(OP, out, DType::I32)?;
    let mut taken = vec![false; n_rows];
    for r in rows {
        ensure_shape!(r.row < n_rows, OP, "row {} of {n_rows} logits rows", r.row);
        ensure_shape!(!std::mem::replace(&mut taken[r.row], true), OP, "row {} sampled twice", r.row);
        r.params.validate()?;
        if !r.params.is_greedy() && !(0.0..1.0).contains(&r.u) {
            return Err(Error::InvalidInput(format!("the uniform draw must be in [0, 1), got {}", r.u)));
        }
    }
    match placement(OP, &[out, logits])? {
        On::Cpu => {
            let data = f32s_mut(OP, logits)?;
            let mut slots: Vec<Option<&mut [f32]>> = data.chunks_mut(vocab).map(Some).collect();
            let work: Vec<(&SampleRow, &mut [f32])> =
                rows.iter().map(|r| (r, slots[r.row].take().expect("rows are distinct"))).collect();
            let picked: Vec<i32> = work.into_par_iter().map(|(r, row)| sample_row(r, row)).collect();
            i32s_mut(OP, out)?.copy_from_slice(&picked);
            Ok(())
        }
        On::Cuda(gpu) => {
            if rows.is_empty() {
                return Ok(());
            }
            let mut params = Vec::with_capacity(rows.len());
            let mut edits: Vec<i32> = Vec::new();
            for r in rows {
                let begin = edits.len() / 2;
                for (t, n) in row_edits(r, vocab) {
                    edits.extend([t as i32, n]);
                }
                params.push(row_params(r, vocab, begin, edits.len() / 2)?);
            }
            ensure_shape!(edits.len() <= i32::MAX as usize, OP, "{} penalty entries", edits.len() / 2);
            let pbuf = gpu.alloc(std::mem::size_of_val(params.as_slice()))?;
            gpu.upload(&pbuf, &params)?;
            let ebuf = if edits.is_empty() { None } else { Some(gpu.alloc(edits.len() * 4)?) };
            if let Some(b) = &ebuf {
                gpu.upload(b, &edits)?;
            }
            let args = [
                Arg::Ptr(ptr(out)),
                Arg::Ptr(ptr(logits)),
                Arg::Ptr(pbuf.ptr()),
                Arg::Ptr(ebuf.as_ref().map_or(0, |b| b.ptr())),
                Arg::I32(vocab as i32),
            ];
            gpu.launch("sample_f32", (rows.len() as u32, 1, 1), (THREADS, 1, 1), 0, &args)
        }
    }
}

/// The CPU sampler on one row (the kernel's oracle).
fn sample_row(r: &SampleRow, row: &mut [f32]) -> i32 {
    for &t in &r.banned {
        if let Some(l) = row.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    match r.params.final_distribution(row, r.prompt, r.output) {
        Ok(probs) => r.params.pick(&probs, r.u) as i32,
        Err(_) => NO_TOKEN,
    }
}

/// A row's (token, n) edits for the kernel, each token once, in id order:
/// n >= 0 is a penalized token's count in the output, -1 a banned token.
fn row_edits(r: &SampleRow, vocab: usize) -> BTreeMap<u32, i32> {
    let mut edits = BTreeMap::new();
    if r.params.has_penalties() {
        for (t, c) in penalized_tokens(vocab, r.prompt, r.output) {
            edits.insert(t, i32::try_from(c).unwrap_or(i32::MAX));
        }
    }
    for &t in r.banned.iter().filter(|&&t| (t as usize) < vocab) {
        edits.insert(t, -1);
    }
    edits
}

fn row_params(r: &SampleRow, vocab: usize, begin: usize, end: usize) -> Result<RowParams> {
    let p = r.params;
    let to_i32 = |x: usize| i32::try_from(x).map_err(|_| Error::Shape { op: "sample", msg: format!("{x} too large") });
    Ok(RowParams {
        u: r.u,
        row: to_i32(r.row)?,
        top_k: p.effective_top_k(vocab).map_or(Ok(0), to_i32)?,
        temperature: if p.is_greedy() { 0.0 } else { p.temperature },
        top_p: p.top_p,
        min_p: p.min_p,
        repetition: p.repetition_penalty,
        frequency: p.frequency_penalty,
        presence: p.presence_penalty,
        edits_begin: to_i32(begin)?,
        edits_end: to_i32(end)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    fn run(logits: &[f32], vocab: usize, rows: &[SampleRow]) -> Vec<i32> {
        let mut l = Tensor::from_f32(&Device::Cpu, &[logits.len() / vocab, vocab], logits, DType::F32).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &[rows.len()], DType::I32).unwrap();
        sample(&mut out, &mut l, rows).unwrap();
        out.to_i32_vec().unwrap()
    }

    fn row<'a>(row: usize, params: &'a SamplingParams, u: f64) -> SampleRow<'a> {
        SampleRow { row, params, u, prompt: &[], output: &[], banned: Vec::new() }
    }

    #[test]
    fn draws_by_inverse_cdf_in_token_order_and_bans_first() {
        // probs of [ln 1, ln 3, -inf, ln 4] at T = 1: [1/8, 3/8, 0, 4/8].
        let l = [0.0, 3f32.ln(), f32::NEG_INFINITY, 4f32.ln()];
        let p = SamplingParams::default();
        let g = SamplingParams::greedy();
        let rows = [row(0, &p, 0.1), row(0, &p, 0.2), row(0, &p, 0.99), row(0, &g, 0.5)];
        for (r, want) in rows.into_iter().zip([0, 1, 3, 3]) {
            assert_eq!(run(&l, 4, &[r]), vec![want]);
        }
        // Banning token 3 leaves [1/4, 3/4]: u = 0.3 now lands on 1; greedy takes 1.
        let banned = |params| SampleRow { banned: vec![3, 99], ..row(0, params, 0.3) };
        assert_eq!(run(&l, 4, &[banned(&p)]), vec![1]);
        assert_eq!(run(&l, 4, &[banned(&g)]), vec![1]);
    }

    #[test]
    fn rows_are_independent_and_dead_rows_say_so() {
        let inf = f32::NEG_INFINITY;
        let l = [0.0, 1.0, 2.0, inf, f32::NAN, inf, 2.0, 1.0, 0.0];
        let g = SamplingParams::greedy();
        let rows = [row(2, &g, 0.0), row(1, &g, 0.0), row(0, &g, 0.0)];
        assert_eq!(run(&l, 3, &rows), vec![0, NO_TOKEN, 2]);
    }

    #[test]
    fn bad_calls_are_errors_not_panics() {
        let p = SamplingParams::default();
        let mut l = Tensor::from_f32(&Device::Cpu, &[2, 3], &[0.0; 6], DType::F32).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &[2], DType::I32).unwrap();
        let e = sample(&mut out, &mut l, &[row(0, &p, 0.5), row(0, &p, 0.5)]).unwrap_err().to_string();
        assert!(e.contains("row 0 sampled twice"), "{e}");
        let e = sample(&mut out, &mut l, &[row(0, &p, 0.5), row(2, &p, 0.5)]).unwrap_err().to_string();
        assert!(e.contains("row 2 of 2"), "{e}");
        let e = sample(&mut out, &mut l, &[row(0, &p, 1.0), row(1, &p, 0.5)]).unwrap_err().to_string();
        assert!(e.contains("[0, 1)"), "{e}");
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        let e = sample(&mut out, &mut l, &[row(0, &bad, 0.5), row(1, &p, 0.5)]).unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        let e = sample(&mut out, &mut l, &[row(0, &p, 0.5)]).unwrap_err().to_string();
        assert!(e.contains("out [2], expected [1]"), "{e}");
    }

    #[test]
    fn edits_list_each_token_once_with_bans_winning() {
        let p = SamplingParams { frequency_penalty: 0.5, ..Default::default() };
        let r = SampleRow { prompt: &[4, 2, 4, 70], output: &[2, 5, 2], banned: vec![5, 9, 9, 100], ..row(0, &p, 0.5) };
        let got: Vec<(u32, i32)> = row_edits(&r, 10).into_iter().collect();
        assert_eq!(got, vec![(2, 2), (4, 0), (5, -1), (9, -1)]);
        let q = SamplingParams::default();
        let r = SampleRow { params: &q, ..r };
        assert_eq!(row_edits(&r, 10).into_iter().collect::<Vec<_>>(), vec![(5, -1), (9, -1)]);
    }
}

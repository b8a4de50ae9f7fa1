//! Token bitmask for structured outputs (grammar-constrained sampling): before
//! a constrained row is sampled, every token its grammar forbids gets the
//! logit -inf, on the logits' device. Kernel: csrc/bitmask.cu.
//!
//! A mask is llguidance's `SimpleVob` layout: `words` u32 per row, bit
//! `t % 32` of word `t / 32` set means token t is allowed. A token at or past
//! `words · 32` is forbidden (a mask shorter than the vocabulary); bits past
//! the vocabulary are ignored (a longer one). Allowed logits are left as they
//! are, NaN included; forbidden ones become -inf. Nothing is rounded, so the
//! two backends agree bit for bit.

use rayon::prelude::*;

use super::launch_consts::BITMASK_THREADS;
use super::{expect_dtype, f32s_mut, placement, ptr, On};
use crate::cuda::{Arg, Gpu};
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

const OP: &str = "apply_token_bitmask";

/// logits[rows[i], t] = -inf for every token t that mask i forbids.
/// logits: f32 (R, vocab); rows: (n,) distinct, each < R; masks: (n, words),
/// mask i is `masks[i * words..(i + 1) * words]`. Rows not listed are not
/// touched; no rows is a no-op.
pub fn apply_token_bitmask(logits: &mut Tensor, rows: &[usize], masks: &[u32], words: usize) -> Result<()> {
    let ls = logits.shape().to_vec();
    ensure_shape!(ls.len() == 2 && ls[1] > 0, OP, "logits {ls:?}: expected (rows, vocab) with vocab >= 1");
    let (n_rows, vocab) = (ls[0], ls[1]);
    expect_dtype(OP, logits, DType::F32)?;
    ensure_shape!(rows.is_empty() || words > 0, OP, "masks of 0 words for {} rows", rows.len());
    ensure_shape!(
        rows.len().checked_mul(words) == Some(masks.len()),
        OP,
        "{} mask words for {} rows of {words} words",
        masks.len(),
        rows.len()
    );
    let mut taken = vec![false; n_rows];
    for &r in rows {
        ensure_shape!(r < n_rows, OP, "row {r} of {n_rows} logits rows");
        ensure_shape!(!std::mem::replace(&mut taken[r], true), OP, "row {r} masked twice");
    }
    if rows.is_empty() {
        return Ok(());
    }
    match placement(OP, &[logits])? {
        On::Cpu => {
            let data = f32s_mut(OP, logits)?;
            let mut slots: Vec<Option<&mut [f32]>> = data.chunks_mut(vocab).map(Some).collect();
            let work: Vec<(&mut [f32], &[u32])> = rows
                .iter()
                .zip(masks.chunks(words))
                .map(|(&r, m)| (slots[r].take().expect("rows are distinct"), m))
                .collect();
            work.into_par_iter().for_each(|(row, mask)| mask_row(row, mask));
            Ok(())
        }
        On::Cuda(gpu) => {
            ensure_shape!(
                n_rows <= i32::MAX as usize && vocab <= i32::MAX as usize && words <= i32::MAX as usize,
                OP,
                "logits ({n_rows}, {vocab}) with masks of {words} words: too large for the kernel's i32 sizes"
            );
            let row_ids: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
            let rbuf = gpu.alloc(std::mem::size_of_val(row_ids.as_slice()))?;
            gpu.upload(&rbuf, &row_ids)?;
            let mbuf = gpu.alloc(std::mem::size_of_val(masks))?;
            gpu.upload(&mbuf, masks)?;
            launch(&gpu, ptr(logits), rbuf.ptr(), mbuf.ptr(), rows.len(), vocab, words)
        }
    }
}

/// The CPU path, and the kernel's oracle: -inf for each token of `row` that
/// `mask` forbids (every token past the mask's last word).
fn mask_row(row: &mut [f32], mask: &[u32]) {
    for (w, chunk) in row.chunks_mut(32).enumerate() {
        let m = mask.get(w).copied().unwrap_or(0);
        if m == u32::MAX {
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if (m >> b) & 1 == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Queues `apply_token_bitmask_f32` over masks already on the device:
/// logits (R, vocab) f32, rows (n,) i32, masks (n, words) u32, all device
/// pointers the caller has checked (the op above; the benchmark, which times
/// the kernel without the uploads).
pub(crate) fn launch(
    gpu: &Gpu,
    logits: u64,
    rows: u64,
    masks: u64,
    n: usize,
    vocab: usize,
    words: usize,
) -> Result<()> {
    ensure_shape!(n <= 65535, OP, "{n} masked rows: the launch takes at most 65535");
    let per_row = vocab.div_ceil(32).div_ceil(BITMASK_THREADS) as u32;
    let args = [Arg::Ptr(logits), Arg::Ptr(rows), Arg::Ptr(masks), Arg::I32(vocab as i32), Arg::I32(words as i32)];
    gpu.launch("apply_token_bitmask_f32", (per_row, n as u32, 1), (BITMASK_THREADS as u32, 1, 1), 0, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::tensor::Device;

    fn logits(rows: usize, vocab: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * vocab).map(|i| i as f32 - 7.5).collect();
        Tensor::from_f32(&Device::Cpu, &[rows, vocab], &data, DType::F32).unwrap()
    }

    fn err(l: &mut Tensor, rows: &[usize], masks: &[u32], words: usize) -> String {
        match apply_token_bitmask(l, rows, masks, words) {
            Err(e @ Error::Shape { .. }) | Err(e @ Error::DType { .. }) => e.to_string(),
            other => panic!("expected a shape or dtype error, got {other:?}"),
        }
    }

    #[test]
    fn forbids_cleared_bits_and_tokens_past_the_mask() {
        let (inf, nan) = (f32::NEG_INFINITY, f32::NAN);
        // Three rows of 40 tokens; row 1 is not masked.
        let mut l = logits(3, 40);
        {
            let d = f32s_mut(OP, &mut l).unwrap();
            d[2 * 40 + 5] = nan; // allowed: stays NaN
            d[2 * 40 + 6] = nan; // forbidden: -inf
        }
        // Row 2: one word (tokens 32.. forbidden), tokens 0, 5, 31 allowed.
        // Row 0: three words (the third past the vocabulary, ignored), tokens 1 and 33 allowed.
        let before = l.to_f32_vec().unwrap();
        apply_token_bitmask(&mut l, &[2], &[1 | 1 << 5 | 1 << 31], 1).unwrap();
        apply_token_bitmask(&mut l, &[0], &[0b10, 0b10, u32::MAX], 3).unwrap();
        let got = l.to_f32_vec().unwrap();
        for t in 0..40 {
            let want0 = if t == 1 || t == 33 { before[t] } else { inf };
            assert_eq!(got[t].to_bits(), want0.to_bits(), "row 0 token {t}");
            assert_eq!(got[40 + t].to_bits(), before[40 + t].to_bits(), "row 1 token {t}");
            let want2 = if [0, 5, 31].contains(&t) { before[80 + t] } else { inf };
            assert_eq!(got[80 + t].to_bits(), want2.to_bits(), "row 2 token {t}");
        }
        assert!(got[85].is_nan());
    }

    #[test]
    fn no_rows_is_a_no_op() {
        let mut l = logits(2, 5);
        let before = l.to_f32_vec().unwrap();
        apply_token_bitmask(&mut l, &[], &[], 0).unwrap();
        apply_token_bitmask(&mut l, &[], &[], 4).unwrap();
        assert_eq!(l.to_f32_vec().unwrap(), before);
    }

    #[test]
    fn bad_calls_are_errors_not_panics() {
        let mut l = logits(5, 40);
        let e = err(&mut l, &[3, 0], &[0; 3], 2);
        assert!(e.contains("3 mask words for 2 rows of 2 words"), "{e}");
        let e = err(&mut l, &[3, 0], &[0; 2], 2);
        assert!(e.contains("2 mask words for 2 rows of 2 words"), "{e}");
        let e = err(&mut l, &[3], &[], 0);
        assert!(e.contains("0 words"), "{e}");
        let e = err(&mut l, &[3, 1, 3], &[0; 6], 2);
        assert!(e.contains("row 3 masked twice"), "{e}");
        let e = err(&mut l, &[0, 5], &[0; 4], 2);
        assert!(e.contains("row 5 of 5"), "{e}");
        let e = err(&mut l, &[usize::MAX], &[0; 2], 2);
        assert!(e.contains("of 5 logits rows"), "{e}");
        let e = err(&mut l, &[0, 1], &[0; 2], usize::MAX);
        assert!(e.contains("mask words"), "{e}");
        let mut flat = Tensor::from_f32(&Device::Cpu, &[40], &[0.0; 40], DType::F32).unwrap();
        let e = err(&mut flat, &[0], &[0; 2], 2);
        assert!(e.contains("expected (rows, vocab)"), "{e}");
        let mut ids = Tensor::from_i32(&Device::Cpu, &[1, 40], &[0; 40]).unwrap();
        let e = err(&mut ids, &[0], &[0; 2], 2);
        assert!(e.contains("I32"), "{e}");
        // A failed call changes nothing.
        assert_eq!(l.to_f32_vec().unwrap(), logits(5, 40).to_f32_vec().unwrap());
    }
}

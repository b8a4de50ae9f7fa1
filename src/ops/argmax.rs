//! Argmax over the last dimension: greedy decoding over logits. Mirrors
//! `torch.argmax(x, dim=-1)` (transformers' greedy search). Kernel: csrc/argmax.cu.
//!
//! The order is torch's (ATen `GreaterOrNan`), on both backends:
//! - ties go to the smallest index (the first maximal value), −0 and +0 tie;
//! - NaN is larger than every number, so a row with a NaN returns the index
//!   of its first NaN. A NaN logit is a bug upstream; this keeps the answer
//!   defined, in range and the same as torch's rather than silently skipping it.
//!
//! Every row has at least one element, so the result is always in [0, cols).

use rayon::prelude::*;

use super::{blocks, expect_dtype, f32s, float_dtype, i32s_mut, kernel, placement, ptr, row_threads, rows_cols, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// Whether (a, ia) comes before (b, ib): NaN first (lowest index among NaNs),
/// then larger values, then lower indices. The kernel's `beats` is its twin.
fn beats(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    if a.is_nan() {
        return !b.is_nan() || ia < ib;
    }
    if a == b {
        ia < ib
    } else {
        a > b
    }
}

/// out[r] = the index of the largest x[r, :] (first one on ties; first NaN if any).
/// x: (rows, cols) float; out: i32 (rows,), or x's shape without its last dim.
pub fn argmax(out: &mut Tensor, x: &Tensor) -> Result<()> {
    const OP: &str = "argmax";
    let (rows, cols) = rows_cols(x);
    let xs = x.shape();
    ensure_shape!(!xs.is_empty() && cols > 0, OP, "x {xs:?}: no last dim, or an empty one");
    ensure_shape!(out.shape() == &xs[..xs.len() - 1], OP, "out {:?}, expected {:?}", out.shape(), &xs[..xs.len() - 1]);
    ensure_shape!(cols <= i32::MAX as usize && rows <= i32::MAX as usize, OP, "too large: {rows}x{cols}");
    expect_dtype(OP, out, DType::I32)?;
    match placement(OP, &[out, x])? {
        On::Cpu => {
            let x = f32s(OP, x)?;
            i32s_mut(OP, out)?.par_iter_mut().zip(x.par_chunks(cols)).for_each(|(o, xr)| {
                let mut best = 0;
                for (c, &v) in xr.iter().enumerate().skip(1) {
                    if beats(v, c, xr[best], best) {
                        best = c;
                    }
                }
                *o = best as i32;
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[x])?;
            if rows == 0 {
                return Ok(());
            }
            let args = [Arg::Ptr(ptr(out)), Arg::Ptr(ptr(x)), Arg::I32(cols as i32)];
            gpu.launch(&kernel(OP, dt), (blocks(rows, 1), 1, 1), (row_threads(cols), 1, 1), 0, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    fn run(data: &[f32], shape: &[usize]) -> Vec<i32> {
        let x = Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &shape[..shape.len() - 1], DType::I32).unwrap();
        argmax(&mut out, &x).unwrap();
        out.to_i32_vec().unwrap()
    }

    #[test]
    fn first_of_ties_wins() {
        let inf = f32::INFINITY;
        #[rustfmt::skip]
        let x = [
            1.0, 3.0, 2.0, 3.0,    // tie between 1 and 3 → 1
            -0.0, 0.0, -1.0, 0.0,  // −0 and +0 tie → 0
            -inf, -inf, -inf, -inf, // all −∞ → 0
            1.0, 2.0, inf, inf,    // +∞ ties → 2
        ];
        assert_eq!(run(&x, &[4, 4]), vec![1, 0, 0, 2]);
    }

    #[test]
    fn nan_is_the_largest_as_in_torch() {
        let nan = f32::NAN;
        let x = [1.0, nan, 5.0, nan, f32::INFINITY, 0.0, nan, nan];
        assert_eq!(run(&x, &[2, 4]), vec![1, 2]);
    }

    #[test]
    fn one_column_and_3d() {
        assert_eq!(run(&[7.0, -7.0], &[2, 1]), vec![0, 0]);
        assert_eq!(run(&[0.0, 1.0, 3.0, 2.0, 5.0, 4.0], &[1, 3, 2]), vec![1, 0, 0]);
    }

    #[test]
    fn shape_and_dtype_errors_are_errors_not_panics() {
        let x = Tensor::from_f32(&Device::Cpu, &[2, 3], &[0.0; 6], DType::F32).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &[3], DType::I32).unwrap();
        let e = argmax(&mut out, &x).unwrap_err().to_string();
        assert!(e.contains("out [3], expected [2]"), "{e}");
        let mut out = Tensor::empty(&Device::Cpu, &[2], DType::F32).unwrap();
        let e = argmax(&mut out, &x).unwrap_err().to_string();
        assert!(e.contains("dtype F32"), "{e}");
    }
}

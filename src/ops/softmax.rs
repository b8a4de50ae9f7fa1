//! Softmax over the last dimension, numerically stable: exp(x − max) / Σ.
//! Mirrors `torch.softmax(x, dim=-1)` (sampling over logits, attention
//! probabilities in the reference paths). Kernel: csrc/softmax.cu.
//!
//! Non-finite inputs, the same on both backends: −∞ entries (masked) get
//! probability 0 as long as the row has a finite entry. A row that is −∞
//! everywhere is NaN (max − max = −∞ − −∞), as in torch; so is a row holding
//! +∞ or NaN. Callers that mask must leave a finite entry in every row.

use rayon::prelude::*;

use super::{blocks, f32s, f32s_mut, float_dtype, kernel, placement, ptr, row_threads, rows_cols, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::Tensor;

/// out[r, :] = exp(x[r, :] − max) / Σ exp(x[r, :] − max).  x, out: (rows, cols).
pub fn softmax(out: &mut Tensor, x: &Tensor) -> Result<()> {
    const OP: &str = "softmax";
    let (rows, cols) = rows_cols(x);
    ensure_shape!(out.shape() == x.shape(), OP, "out {:?} != x {:?}", out.shape(), x.shape());
    ensure_shape!(cols > 0, OP, "empty rows");
    ensure_shape!(cols <= i32::MAX as usize && rows <= i32::MAX as usize, OP, "too large: {rows}x{cols}");
    match placement(OP, &[out, x])? {
        On::Cpu => {
            let x = f32s(OP, x)?;
            f32s_mut(OP, out)?.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
                let m = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                for (o, &v) in o.iter_mut().zip(xr) {
                    *o = (v - m).exp();
                }
                let s: f32 = o.iter().sum();
                for o in o.iter_mut() {
                    *o /= s;
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, x])?;
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
    use crate::tensor::{DType, Device};

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    #[test]
    fn softmax_by_hand() {
        // [0, ln 2, ln 3] → [1, 2, 3] / 6; a masked entry gets 0; [1000, 1001,
        // 1000] → [1, e, 1] / (2 + e), which overflows exp without the max subtracted.
        let (l2, l3) = (2f32.ln(), 3f32.ln());
        let x = t(&[0.0, l2, l3, f32::NEG_INFINITY, 0.0, 0.0, 1000.0, 1001.0, 1000.0], &[3, 3]);
        let mut out = Tensor::empty(&Device::Cpu, &[3, 3], DType::F32).unwrap();
        softmax(&mut out, &x).unwrap();
        let got = out.to_f32_vec().unwrap();
        let e = std::f32::consts::E;
        let want = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0, 0.5, 0.5, 1.0 / (2.0 + e), e / (2.0 + e), 1.0 / (2.0 + e)];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(got[3], 0.0);
    }

    #[test]
    fn one_column_is_one() {
        let mut out = Tensor::empty(&Device::Cpu, &[2, 1], DType::F32).unwrap();
        softmax(&mut out, &t(&[-3.0, 1e30], &[2, 1])).unwrap();
        assert_eq!(out.to_f32_vec().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn shape_errors_are_errors_not_panics() {
        let mut out = Tensor::empty(&Device::Cpu, &[2, 3], DType::F32).unwrap();
        let e = softmax(&mut out, &t(&[0.0; 6], &[3, 2])).unwrap_err().to_string();
        assert!(e.contains("out [2, 3] != x [3, 2]"), "{e}");
        let mut out = Tensor::empty(&Device::Cpu, &[2, 0], DType::F32).unwrap();
        let e = softmax(&mut out, &t(&[], &[2, 0])).unwrap_err().to_string();
        assert!(e.contains("empty rows"), "{e}");
    }
}

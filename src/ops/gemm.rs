//! Matrix products through cuBLAS, with the convention of src/cuda/blas.rs:
//! row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` (PyTorch `Linear`, weight as stored
//! in checkpoints). The CPU reference is a plain dot product per output.

use rayon::prelude::*;

use super::{f32s, f32s_mut, placement, ptr, rows_cols, On};
use crate::ensure_shape;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// `y[.., n] = x[.., k] · w[n, k]ᵀ`. x may have any leading dims (rows =
/// numel / k); y has x's leading dims and n columns. On the GPU, x and w share
/// a dtype (bf16, f16 or f32) and y may be that dtype or f32 (f32 logits from
/// bf16 weights); accumulation is fp32 either way.
pub fn gemm(y: &mut Tensor, x: &Tensor, w: &Tensor) -> Result<()> {
    const OP: &str = "gemm";
    let (m, k) = rows_cols(x);
    ensure_shape!(
        w.shape().len() == 2 && w.shape()[1] == k,
        OP,
        "weight {:?} does not take x {:?} (k = {k})",
        w.shape(),
        x.shape()
    );
    let n = w.shape()[0];
    let (ym, yn) = rows_cols(y);
    ensure_shape!(
        ym == m && yn == n && y.shape().len() == x.shape().len(),
        OP,
        "y {:?}, expected {:?} with last dim {n}",
        y.shape(),
        x.shape()
    );
    ensure_shape!(
        m <= i32::MAX as usize && n <= i32::MAX as usize && k <= i32::MAX as usize,
        OP,
        "dims too large for cuBLAS: {m}x{n}x{k}"
    );
    match placement(OP, &[y, x, w])? {
        On::Cpu => {
            let (x, w) = (f32s(OP, x)?, f32s(OP, w)?);
            f32s_mut(OP, y)?.par_chunks_mut(n.max(1)).zip(x.par_chunks(k.max(1))).for_each(|(yr, xr)| {
                for (j, o) in yr.iter_mut().enumerate() {
                    *o = xr.iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            if x.dtype() != w.dtype() || !x.dtype().is_float() {
                return Err(Error::DType { op: OP, got: w.dtype(), supported: "x and w of one float dtype" });
            }
            if y.dtype() != x.dtype() && y.dtype() != DType::F32 {
                return Err(Error::DType { op: OP, got: y.dtype(), supported: "y of x's dtype, or f32" });
            }
            if m == 0 || n == 0 {
                return Ok(());
            }
            let name = if gpu.profiling() { format!("gemm (cuBLAS) n={n} k={k}") } else { String::new() };
            gpu.profiled(&name, || gpu.blas.gemm(ptr(y), ptr(x), ptr(w), m, n, k, x.dtype(), y.dtype()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    #[test]
    fn gemm_by_hand() {
        // x = [[1, 2, 3], [4, 5, 6]], w = [[1, 0, 0], [0, 1, 1]] -> y = [[1, 5], [4, 11]]
        let cpu = Device::Cpu;
        let x = Tensor::from_f32(&cpu, &[2, 3], &[1., 2., 3., 4., 5., 6.], DType::F32).unwrap();
        let w = Tensor::from_f32(&cpu, &[2, 3], &[1., 0., 0., 0., 1., 1.], DType::F32).unwrap();
        let mut y = Tensor::empty(&cpu, &[2, 2], DType::F32).unwrap();
        gemm(&mut y, &x, &w).unwrap();
        assert_eq!(y.to_f32_vec().unwrap(), vec![1., 5., 4., 11.]);
    }

    #[test]
    fn gemm_rejects_mismatched_k() {
        let cpu = Device::Cpu;
        let x = Tensor::from_f32(&cpu, &[2, 3], &[0.; 6], DType::F32).unwrap();
        let w = Tensor::from_f32(&cpu, &[2, 4], &[0.; 8], DType::F32).unwrap();
        let mut y = Tensor::empty(&cpu, &[2, 2], DType::F32).unwrap();
        let e = gemm(&mut y, &x, &w).unwrap_err().to_string();
        assert!(e.contains("does not take x"), "{e}");
    }
}

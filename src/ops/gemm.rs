//! Matrix products through cuBLAS (and, for decode's few rows in bf16, the
//! weight-streaming kernel of csrc/gemv.cu), with the convention of src/cuda/blas.rs:
//! row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` (PyTorch `Linear`, weight as stored
//! in checkpoints). The CPU reference is a plain dot product per output.

use rayon::prelude::*;

use super::{f32s, f32s_mut, placement, ptr, rows_cols, On};
use crate::cuda::Arg;
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
            if let Some(ksplit) = gemv_split(m, n, k, x.dtype(), y.dtype(), [ptr(x), ptr(w)], gpu.sm_count()) {
                let cols = (GEMV_WARPS / ksplit) as u32;
                let args = [
                    Arg::Ptr(ptr(y)),
                    Arg::Ptr(ptr(x)),
                    Arg::Ptr(ptr(w)),
                    Arg::I32(m as i32),
                    Arg::I32(n as i32),
                    Arg::I32(k as i32),
                    Arg::I32(ksplit as i32),
                ];
                return gpu.launch(
                    "gemv_bf16",
                    ((n as u32).div_ceil(cols), 1, 1),
                    (32 * GEMV_WARPS as u32, 1, 1),
                    0,
                    &args,
                );
            }
            let name = if gpu.profiling() { format!("gemm (cuBLAS) n={n} k={k}") } else { String::new() };
            gpu.profiled(&name, || gpu.blas.gemm(ptr(y), ptr(x), ptr(w), m, n, k, x.dtype(), y.dtype()))
        }
    }
}

/// Warps per block of csrc/gemv.cu.
const GEMV_WARPS: usize = 8;
/// Most rows the skinny kernel takes (csrc/gemv.cu GEMV_MAX_M).
pub const GEMV_MAX_M: usize = 8;

/// Whether a product goes to the skinny kernel (csrc/gemv.cu) rather than
/// cuBLAS, and with how many warps splitting each output's k: bf16 in and
/// out, at most GEMV_MAX_M rows, k in 16-byte groups, aligned operands, and
/// not the LM head (n ≥ 65536, where cuBLAS already reads at ~95% of the
/// copy bandwidth). The split is the smallest that gives every SM about four
/// blocks of warps while each warp keeps at least 32 groups of k.
fn gemv_split(m: usize, n: usize, k: usize, x: DType, y: DType, ptrs: [u64; 2], sms: i32) -> Option<usize> {
    let fits = x == DType::BF16 && y == DType::BF16 && (1..=GEMV_MAX_M).contains(&m) && k % 8 == 0 && k > 0;
    if !fits || n >= 65536 || ptrs.iter().any(|p| p % 16 != 0) {
        return None;
    }
    let want = 4 * GEMV_WARPS * sms.max(1) as usize;
    let mut ksplit = 1;
    while ksplit < GEMV_WARPS && n * ksplit < want && k / 8 / (2 * ksplit) >= 32 {
        ksplit *= 2;
    }
    Some(ksplit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    #[test]
    fn the_skinny_kernel_takes_decode_shapes_only() {
        let bf = DType::BF16;
        let ok = [256, 512];
        // 2B decode projections on 132 SMs: splits that fill the chip.
        assert_eq!(gemv_split(1, 2048, 1536, bf, bf, ok, 132), Some(4));
        assert_eq!(gemv_split(1, 17920, 1536, bf, bf, ok, 132), Some(1));
        assert_eq!(gemv_split(8, 1536, 8960, bf, bf, ok, 132), Some(4));
        // A short k is never split below 32 groups per warp.
        assert_eq!(gemv_split(1, 16, 256, bf, bf, ok, 132), Some(1));
        // Everything else stays with cuBLAS.
        assert_eq!(gemv_split(9, 2048, 1536, bf, bf, ok, 132), None);
        assert_eq!(gemv_split(1, 2048, 1001, bf, bf, ok, 132), None);
        assert_eq!(gemv_split(1, 151936, 1536, bf, bf, ok, 132), None);
        assert_eq!(gemv_split(1, 2048, 1536, bf, DType::F32, ok, 132), None);
        assert_eq!(gemv_split(1, 2048, 1536, DType::F32, DType::F32, ok, 132), None);
        assert_eq!(gemv_split(1, 2048, 1536, bf, bf, [256, 520], 132), None);
        assert_eq!(gemv_split(0, 2048, 1536, bf, bf, ok, 132), None);
    }

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

//! RMSNorm, fused residual-add + RMSNorm, LayerNorm over the last dimension.
//! Mirrors transformers `Qwen2RMSNorm` (modeling_qwen2_vl.py) and `nn.LayerNorm`
//! (the Qwen2-VL vision blocks and merger). Kernels: csrc/norm.cu.

use rayon::prelude::*;

use super::{blocks, f32s, f32s_mut, float_dtype, kernel, placement, ptr, row_threads, rows_cols, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::Tensor;

fn check(op: &'static str, out: &Tensor, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = rows_cols(x);
    ensure_shape!(out.shape() == x.shape(), op, "out {:?} != x {:?}", out.shape(), x.shape());
    ensure_shape!(w.shape() == [cols], op, "weight {:?}, expected [{cols}]", w.shape());
    ensure_shape!(cols > 0, op, "empty rows");
    ensure_shape!(cols <= i32::MAX as usize && rows <= u32::MAX as usize, op, "too large: {rows}x{cols}");
    Ok((rows, cols))
}

/// out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · w.  x, out: (rows, cols); w: (cols,).
pub fn rms_norm(out: &mut Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<()> {
    const OP: &str = "rms_norm";
    let (rows, cols) = check(OP, out, x, w)?;
    match placement(OP, &[out, x, w])? {
        On::Cpu => {
            let (x, w) = (f32s(OP, x)?, f32s(OP, w)?);
            f32s_mut(OP, out)?.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
                let rstd = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
                for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
                    *o = v * rstd * g;
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, x, w])?;
            let args = [Arg::Ptr(ptr(out)), Arg::Ptr(ptr(x)), Arg::Ptr(ptr(w)), Arg::I32(cols as i32), Arg::F32(eps)];
            gpu.launch(&kernel(OP, dt), (blocks(rows, 1), 1, 1), (row_threads(cols), 1, 1), 0, &args)
        }
    }
}

/// residual += x; out = rms_norm(residual) · w. The sum is stored in the
/// residual's dtype before the norm reads it, as the model's residual stream is.
pub fn add_rms_norm(out: &mut Tensor, residual: &mut Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<()> {
    const OP: &str = "add_rms_norm";
    let (rows, cols) = check(OP, out, x, w)?;
    ensure_shape!(residual.shape() == x.shape(), OP, "residual {:?} != x {:?}", residual.shape(), x.shape());
    match placement(OP, &[out, residual, x, w])? {
        On::Cpu => {
            let (x, w) = (f32s(OP, x)?, f32s(OP, w)?);
            let res = f32s_mut(OP, residual)?;
            f32s_mut(OP, out)?.par_chunks_mut(cols).zip(res.par_chunks_mut(cols)).zip(x.par_chunks(cols)).for_each(
                |((o, r), xr)| {
                    for (r, &v) in r.iter_mut().zip(xr) {
                        *r += v;
                    }
                    let rstd = 1.0 / (r.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
                    for ((o, &v), &g) in o.iter_mut().zip(r.iter()).zip(w) {
                        *o = v * rstd * g;
                    }
                },
            );
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, residual, x, w])?;
            let args = [
                Arg::Ptr(ptr(out)),
                Arg::Ptr(ptr(residual)),
                Arg::Ptr(ptr(x)),
                Arg::Ptr(ptr(w)),
                Arg::I32(cols as i32),
                Arg::F32(eps),
            ];
            gpu.launch(&kernel(OP, dt), (blocks(rows, 1), 1, 1), (row_threads(cols), 1, 1), 0, &args)
        }
    }
}

/// out[r, :] = (x[r, :] − mean) / sqrt(var + eps) · w + b (biased variance, as torch).
pub fn layer_norm(out: &mut Tensor, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<()> {
    const OP: &str = "layer_norm";
    let (rows, cols) = check(OP, out, x, w)?;
    ensure_shape!(b.shape() == [cols], OP, "bias {:?}, expected [{cols}]", b.shape());
    match placement(OP, &[out, x, w, b])? {
        On::Cpu => {
            let (x, w, b) = (f32s(OP, x)?, f32s(OP, w)?, f32s(OP, b)?);
            f32s_mut(OP, out)?.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
                let mean = xr.iter().sum::<f32>() / cols as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for (i, o) in o.iter_mut().enumerate() {
                    *o = (xr[i] - mean) * rstd * w[i] + b[i];
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, x, w, b])?;
            let args = [
                Arg::Ptr(ptr(out)),
                Arg::Ptr(ptr(x)),
                Arg::Ptr(ptr(w)),
                Arg::Ptr(ptr(b)),
                Arg::I32(cols as i32),
                Arg::F32(eps),
            ];
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
    fn rms_norm_by_hand() {
        // Row [3, 4]: mean square 12.5, rstd = 1/sqrt(12.5); w = [1, 2].
        let x = t(&[3.0, 4.0, 0.0, 0.0], &[2, 2]);
        let w = t(&[1.0, 2.0], &[2]);
        let mut out = Tensor::empty(&Device::Cpu, &[2, 2], DType::F32).unwrap();
        rms_norm(&mut out, &x, &w, 0.0).unwrap();
        let r = 1.0 / 12.5f32.sqrt();
        let got = out.to_f32_vec().unwrap();
        assert_eq!(&got[..2], &[3.0 * r, 8.0 * r]);
        assert!(got[2..].iter().all(|v| v.is_nan()), "0/0 with eps 0 is NaN, as in torch");
    }

    #[test]
    fn add_rms_norm_updates_residual_and_matches_two_steps() {
        let x = t(&[1.0, -2.0, 0.5, 4.0, 1.0, 1.0], &[2, 3]);
        let mut res = t(&[0.5, 0.5, 0.5, -1.0, 2.0, 3.0], &[2, 3]);
        let w = t(&[1.0, 0.5, 2.0], &[3]);
        let mut out = Tensor::empty(&Device::Cpu, &[2, 3], DType::F32).unwrap();
        add_rms_norm(&mut out, &mut res, &x, &w, 1e-6).unwrap();
        assert_eq!(res.to_f32_vec().unwrap(), vec![1.5, -1.5, 1.0, 3.0, 3.0, 4.0]);
        let mut two = Tensor::empty(&Device::Cpu, &[2, 3], DType::F32).unwrap();
        rms_norm(&mut two, &res, &w, 1e-6).unwrap();
        assert_eq!(out.to_f32_vec().unwrap(), two.to_f32_vec().unwrap());
    }

    #[test]
    fn layer_norm_by_hand() {
        // [1, 2, 3]: mean 2, var 2/3; normalised [-1.2247, 0, 1.2247].
        let x = t(&[1.0, 2.0, 3.0], &[1, 3]);
        let w = t(&[1.0, 1.0, 2.0], &[3]);
        let b = t(&[0.0, 5.0, 1.0], &[3]);
        let mut out = Tensor::empty(&Device::Cpu, &[1, 3], DType::F32).unwrap();
        layer_norm(&mut out, &x, &w, &b, 0.0).unwrap();
        let z = 1.5f32.sqrt();
        let got = out.to_f32_vec().unwrap();
        for (g, e) in got.iter().zip([-z, 5.0, 2.0 * z + 1.0]) {
            assert!((g - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn shape_errors_are_errors_not_panics() {
        let x = t(&[1.0; 6], &[2, 3]);
        let w = t(&[1.0; 2], &[2]);
        let mut out = Tensor::empty(&Device::Cpu, &[2, 3], DType::F32).unwrap();
        let e = rms_norm(&mut out, &x, &w, 1e-6).unwrap_err().to_string();
        assert!(e.contains("weight [2], expected [3]"), "{e}");
    }
}

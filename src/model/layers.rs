//! Building blocks shared by model families.

use crate::error::Result;
use crate::ops::{activation, gemm};
use crate::tensor::{Device, Tensor};

/// `y = x · wᵀ (+ b)`: torch `nn.Linear` with its checkpoint weight (out, in).
pub struct Linear {
    pub w: Tensor,         // (out, in)
    pub b: Option<Tensor>, // (out,)
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.w.shape()[0]
    }

    /// y (rows, out) = x (rows, in) · wᵀ + b, into a fresh tensor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
        let mut y = Tensor::empty(&x.device(), &[rows, self.out_features()], x.dtype())?;
        self.forward_into(&mut y, x)?;
        Ok(y)
    }

    pub fn forward_into(&self, y: &mut Tensor, x: &Tensor) -> Result<()> {
        gemm::gemm(y, x, &self.w)?;
        if let Some(b) = &self.b {
            activation::bias_add(y, b)?;
        }
        Ok(())
    }
}

/// Concatenates 2-D weights along their first dimension on the host, then
/// places the result on `dev` in its activation dtype: lets one GEMM do the
/// work of several (gate | up, q | k | v). Exact: bf16 → f32 → bf16 is lossless.
pub fn concat_rows(dev: &Device, parts: &[Tensor]) -> Result<Tensor> {
    let cols = parts[0].shape().last().copied().unwrap_or(1);
    let mut data = Vec::new();
    let mut rows = 0;
    for p in parts {
        crate::ensure_shape!(
            p.shape().len() == 2 && p.shape()[1] == cols,
            "concat_rows",
            "{:?} vs {cols} columns",
            p.shape()
        );
        rows += p.shape()[0];
        data.extend(p.to_f32_vec()?);
    }
    Tensor::from_f32(dev, &[rows, cols], &data, dev.activation_dtype())
}

/// Splits a host tensor into `n` equal parts along its first dimension and
/// places each on `dev` (qkv → q, k, v). Works for 1-D biases and 2-D weights.
pub fn split_rows(dev: &Device, t: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let rows = t.shape()[0];
    crate::ensure_shape!(n > 0 && rows % n == 0, "split_rows", "{rows} rows into {n} parts");
    let data = t.to_f32_vec()?;
    let part = data.len() / n;
    let mut shape = t.shape().to_vec();
    shape[0] = rows / n;
    (0..n).map(|i| Tensor::from_f32(dev, &shape, &data[i * part..(i + 1) * part], dev.activation_dtype())).collect()
}

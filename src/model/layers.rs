//! Building blocks shared by model families.

use crate::error::Result;
use crate::model::weights::Weights;
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

/// `name.weight` (out, inp) and, with `bias`, `name.bias` (out,).
pub fn linear(w: &Weights, dev: &Device, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    Ok(Linear {
        w: w.load(dev, &format!("{name}.weight"), &[out, inp])?,
        b: if bias { Some(w.load(dev, &format!("{name}.bias"), &[out])?) } else { None },
    })
}

/// A LayerNorm's weight and bias, (n,) each.
pub fn layer_norm_weights(w: &Weights, dev: &Device, name: &str, n: usize) -> Result<(Tensor, Tensor)> {
    Ok((w.load(dev, &format!("{name}.weight"), &[n])?, w.load(dev, &format!("{name}.bias"), &[n])?))
}

//! Vision encoders shared by the families: the Qwen2-VL ViT (native
//! resolution, 2-D RoPE) and CLIP (fixed size, learned positions, a chosen
//! feature layer). SigLIP follows with MiniCPM-V.

pub mod clip;
pub mod qwen;

use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::ops::activation;
use crate::tensor::Tensor;

/// The activation of a vision MLP (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionAct {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl VisionAct {
    /// From config.json's `hidden_act`; `what` names the field in errors.
    pub fn from_config(a: Activation, what: &str) -> Result<Self> {
        match a {
            Activation::QuickGelu => Ok(VisionAct::QuickGelu),
            Activation::Gelu => Ok(VisionAct::Gelu),
            Activation::GeluTanh => Ok(VisionAct::GeluTanh),
            other => Err(Error::Config(format!("{what} {other:?} is not supported in a vision tower"))),
        }
    }
}

/// act(x) into a fresh tensor.
pub fn act_forward(act: VisionAct, x: &Tensor) -> Result<Tensor> {
    let mut g = Tensor::empty(&x.device(), x.shape(), x.dtype())?;
    match act {
        VisionAct::QuickGelu => activation::quick_gelu(&mut g, x)?,
        VisionAct::Gelu => activation::gelu(&mut g, x)?,
        VisionAct::GeluTanh => activation::gelu_tanh(&mut g, x)?,
    }
    Ok(g)
}

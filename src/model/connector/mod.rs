//! Connectors from a vision tower to the decoder's hidden size: the
//! two-layer MLP projector (LLaVA's `multi_modal_projector`, Phi-3.5-V's
//! `img_projection`) and Qwen2-VL's patch merger (LayerNorm, merge² patches
//! per row, the same MLP).

use crate::error::Result;
use crate::model::layers::{layer_norm_weights, linear, Linear};
use crate::model::vision::{act_forward, VisionAct};
use crate::model::weights::Weights;
use crate::ops::norm;
use crate::tensor::{Device, Tensor};

/// linear → act → linear (with biases unless the config says otherwise). Mirrors transformers
/// `LlavaMultiModalProjector` and the MLP of `PatchMerger`.
pub struct MlpProjector {
    pub fc1: Linear, // (hidden, in)
    pub fc2: Linear, // (out, hidden)
    pub act: VisionAct,
}

impl MlpProjector {
    /// `names` are the two linears' canonical names (without `.weight`),
    /// `dims` (in, hidden, out).
    pub fn load(
        w: &Weights,
        dev: &Device,
        names: (&str, &str),
        dims: (usize, usize, usize),
        act: VisionAct,
        bias: bool,
    ) -> Result<Self> {
        let (inp, hidden, out) = dims;
        Ok(Self {
            fc1: linear(w, dev, names.0, hidden, inp, bias)?,
            fc2: linear(w, dev, names.1, out, hidden, bias)?,
            act,
        })
    }

    /// (rows, in) → (rows, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        self.fc2.forward(&act_forward(self.act, &h)?)
    }
}

/// Qwen2-VL's `PatchMerger`: LayerNorm per patch, each merge×merge window
/// (consecutive rows, as the processor orders patches) as one row, then
/// linear → GELU → linear to the LM's hidden size.
pub struct PatchMerger {
    ln_q: (Tensor, Tensor), // (embed,)
    mlp: MlpProjector,      // (embed·merge²) → (embed·merge²) → out_hidden
    embed: usize,
    groups: usize,
    eps: f32,
}

impl PatchMerger {
    /// `pre` is the merger's canonical prefix (`model.visual.merger`).
    pub fn load(
        w: &Weights,
        dev: &Device,
        pre: &str,
        embed: usize,
        merge: usize,
        out_hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        let m = embed * merge * merge;
        let names = (format!("{pre}.mlp.0"), format!("{pre}.mlp.2"));
        Ok(Self {
            ln_q: layer_norm_weights(w, dev, &format!("{pre}.ln_q"), embed)?,
            mlp: MlpProjector::load(w, dev, (&names.0, &names.1), (m, m, out_hidden), VisionAct::Gelu, true)?,
            embed,
            groups: merge * merge,
            eps,
        })
    }

    /// (patches, embed) → (patches / merge², out_hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.shape()[0];
        crate::ensure_shape!(
            n % self.groups == 0,
            "vision",
            "{n} patches do not fill {}-patch merge windows",
            self.groups
        );
        let mut h = Tensor::empty(&x.device(), x.shape(), x.dtype())?;
        norm::layer_norm(&mut h, x, &self.ln_q.0, &self.ln_q.1, self.eps)?;
        self.mlp.forward(&h.reshape(&[n / self.groups, self.embed * self.groups])?)
    }
}

//! The CLIP vision tower (LLaVA-1.5's ViT-L/14-336; Phi-3.5-vision uses the
//! same): patch embedding (a Conv2d without bias), a learned class token and
//! learned positions, the pre-LayerNorm, and pre-LN encoder layers with
//! full attention inside each image. Mirrors transformers
//! `models/clip/modeling_clip.py`: `CLIPVisionEmbeddings`,
//! `CLIPVisionTransformer` (`pre_layrnorm`, the encoder), `CLIPEncoderLayer`,
//! `CLIPAttention`, `CLIPMLP`.
//!
//! Families take the hidden state of one layer (`vision_feature_layer`, −2
//! for LLaVA: the output of the second-to-last layer), so only the layers up
//! to it are loaded and run, as vLLM does; the post-LayerNorm is never used.

use super::{act_forward, VisionAct};
use crate::error::{Error, Result};
use crate::model::layers::{layer_norm_weights, linear, Linear};
use crate::model::weights::Weights;
use crate::ops::{activation, attention, gemm, norm};
use crate::tensor::{Device, Tensor};

/// What the tower needs from `vision_config` (transformers `CLIPVisionConfig`).
#[derive(Clone, Debug)]
pub struct ClipDims {
    pub hidden: usize,       // 1024
    pub intermediate: usize, // 4096
    pub layers: usize,       // num_hidden_layers (24)
    pub heads: usize,        // 16 → head dim 64
    pub image_size: usize,   // 336
    pub patch: usize,        // 14
    pub channels: usize,     // 3
    pub eps: f32,            // layer_norm_eps
    pub act: VisionAct,      // hidden_act (quick_gelu)
}

impl ClipDims {
    /// Patches per side (24) and per image (576).
    pub fn side(&self) -> usize {
        self.image_size / self.patch
    }
    pub fn patches(&self) -> usize {
        self.side() * self.side()
    }
    /// Values of one flattened patch: C · P · P.
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    /// Layers to run for `feature_layer` (HF indexes `hidden_states`, whose
    /// entry 0 is the embeddings: k ≥ 0 is after k layers, −1 after all).
    pub fn layers_for(&self, feature_layer: i64) -> Result<usize> {
        let n = self.layers as i64;
        let k = if feature_layer < 0 { n + 1 + feature_layer } else { feature_layer };
        if !(0..=n).contains(&k) {
            return Err(Error::Config(format!(
                "vision_feature_layer {feature_layer} is outside the tower's {n} layers"
            )));
        }
        Ok(k as usize)
    }
}

struct Layer {
    ln1: (Tensor, Tensor), // (hidden,)
    ln2: (Tensor, Tensor),
    q: Linear, // (hidden, hidden) each, with biases
    k: Linear,
    v: Linear,
    o: Linear,
    fc1: Linear, // (intermediate, hidden)
    fc2: Linear, // (hidden, intermediate)
}

pub struct ClipVision {
    pub dims: ClipDims,
    patch_embed: Tensor,     // (hidden, C·P·P): the Conv2d weight flattened
    class_embedding: Tensor, // (1, hidden)
    positions: Tensor,       // (patches + 1, hidden)
    pre_ln: (Tensor, Tensor),
    layers: Vec<Layer>, // the first `run` layers only
}

impl ClipVision {
    /// Loads the embeddings, the pre-LayerNorm and the first `run` layers
    /// under the canonical prefix `pre` (`model.vision_tower.vision_model`).
    pub fn load(w: &Weights, dev: &Device, pre: &str, dims: ClipDims, run: usize) -> Result<Self> {
        let (d, p) = (dims.hidden, dims.patch);
        crate::ensure_shape!(
            dims.heads > 0 && d % dims.heads == 0 && p > 0 && dims.image_size % p == 0,
            "clip",
            "hidden {d} over {} heads, image {} over patch {p}",
            dims.heads,
            dims.image_size
        );
        let hd = d / dims.heads;
        let first = format!("{pre}.encoder.layers.0.self_attn.q_proj.weight");
        crate::ops::attention::check_head_dim(dev, hd, &format!("tensor `{first}` (head dim {hd})"))?;
        let e = format!("{pre}.embeddings");
        let conv = [d, dims.channels, p, p];
        let patch_embed =
            w.load(dev, &format!("{e}.patch_embedding.weight"), &conv)?.reshape(&[d, dims.patch_dim()])?;
        let class_embedding = w.load(dev, &format!("{e}.class_embedding"), &[d])?.reshape(&[1, d])?;
        let positions = w.load(dev, &format!("{e}.position_embedding.weight"), &[dims.patches() + 1, d])?;
        let mut layers = Vec::with_capacity(run);
        for i in 0..run {
            let l = format!("{pre}.encoder.layers.{i}");
            let lin = |name: &str, out: usize, inp: usize| linear(w, dev, &format!("{l}.{name}"), out, inp, true);
            layers.push(Layer {
                ln1: layer_norm_weights(w, dev, &format!("{l}.layer_norm1"), d)?,
                ln2: layer_norm_weights(w, dev, &format!("{l}.layer_norm2"), d)?,
                q: lin("self_attn.q_proj", d, d)?,
                k: lin("self_attn.k_proj", d, d)?,
                v: lin("self_attn.v_proj", d, d)?,
                o: lin("self_attn.out_proj", d, d)?,
                fc1: lin("mlp.fc1", dims.intermediate, d)?,
                fc2: lin("mlp.fc2", d, dims.intermediate)?,
            });
        }
        Ok(Self {
            patch_embed,
            class_embedding,
            positions,
            pre_ln: layer_norm_weights(w, dev, &format!("{pre}.pre_layrnorm"), d)?,
            layers,
            dims,
        })
    }

    /// Flattened patches (n·patches, C·P·P), rows in raster order, of `n`
    /// images given as pixel_values (n, C, S, S) row-major (host f32).
    pub fn patchify(&self, pixel_values: &[f32]) -> Vec<f32> {
        let (c, s, p, side) = (self.dims.channels, self.dims.image_size, self.dims.patch, self.dims.side());
        let n = pixel_values.len() / (c * s * s);
        let mut out = Vec::with_capacity(pixel_values.len());
        for img in pixel_values.chunks_exact(c * s * s).take(n) {
            for pr in 0..side {
                for pc in 0..side {
                    for ch in 0..c {
                        for y in 0..p {
                            let row = &img[ch * s * s + (pr * p + y) * s + pc * p..][..p];
                            out.extend_from_slice(row);
                        }
                    }
                }
            }
        }
        out
    }

    /// The hidden state after the loaded layers, (n·(patches + 1), hidden),
    /// class token first in each image, of `patches` (n·patches, C·P·P) in
    /// the device's activation dtype. `observe` sees `vision.embeddings`
    /// (after the pre-LayerNorm) and `vision.layer.{i}`.
    pub fn forward(&self, patches: &Tensor, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let d = &self.dims;
        let dev = patches.device();
        let dt = dev.activation_dtype();
        let per = d.patches();
        crate::ensure_shape!(
            patches.shape().len() == 2 && patches.shape()[1] == d.patch_dim() && patches.shape()[0] % per == 0,
            "clip",
            "patches {:?}, expected (images · {per}, {})",
            patches.shape(),
            d.patch_dim()
        );
        let images = patches.shape()[0] / per;
        let (seq, n) = (per + 1, images * (per + 1));
        let mut pe = Tensor::empty(&dev, &[images * per, d.hidden], dt)?;
        gemm::gemm(&mut pe, patches, &self.patch_embed)?;
        // [class; patches] + positions, per image.
        let mut emb = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        let mut pos = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        for i in 0..images {
            emb.copy_rows_from(i * seq, &self.class_embedding, 0, 1)?;
            emb.copy_rows_from(i * seq + 1, &pe, i * per, per)?;
            pos.copy_rows_from(i * seq, &self.positions, 0, seq)?;
        }
        let mut x0 = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        activation::add(&mut x0, &emb, &pos)?;
        let mut x = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        norm::layer_norm(&mut x, &x0, &self.pre_ln.0, &self.pre_ln.1, d.eps)?;
        observe("vision.embeddings", &x);

        let (heads, hd) = (d.heads, d.hidden / d.heads);
        let cu: Vec<i32> = (0..=images as i32).map(|i| i * seq as i32).collect();
        let cu = Tensor::from_i32(&dev, &[cu.len()], &cu)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        for (i, l) in self.layers.iter().enumerate() {
            norm::layer_norm(&mut h, &x, &l.ln1.0, &l.ln1.1, d.eps)?;
            let q = l.q.forward(&h)?.reshape(&[n, heads, hd])?;
            let k = l.k.forward(&h)?.reshape(&[n, heads, hd])?;
            let v = l.v.forward(&h)?.reshape(&[n, heads, hd])?;
            let mut a = Tensor::empty(&dev, &[n, heads, hd], dt)?;
            attention::attention(&mut a, &q, &k, &v, &cu, &cu, seq, false, scale)?;
            let o = l.o.forward(&a.reshape(&[n, d.hidden])?)?;
            let mut x2 = Tensor::empty(&dev, &[n, d.hidden], dt)?;
            activation::add(&mut x2, &x, &o)?;
            norm::layer_norm(&mut h, &x2, &l.ln2.0, &l.ln2.1, d.eps)?;
            let f = act_forward(d.act, &l.fc1.forward(&h)?)?;
            let f2 = l.fc2.forward(&f)?;
            activation::add(&mut x, &x2, &f2)?;
            observe(&format!("vision.layer.{i}"), &x);
        }
        Ok(x)
    }
}

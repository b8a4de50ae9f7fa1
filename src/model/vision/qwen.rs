//! The Qwen2-VL vision tower: patch embedding, blocks with 2-D RoPE attending
//! within each image (frame) via cu_seqlens, and the patch merger
//! (`connector::PatchMerger`).
//! Mirrors transformers modeling_qwen2_vl.py: `PatchEmbed`, `VisionAttention`,
//! `Qwen2VLVisionBlock`, `PatchMerger`, `Qwen2VisionTransformerPretrainedModel.forward`.

use super::act_forward;
use crate::error::Result;
use crate::model::connector::PatchMerger;
use crate::model::layers::{layer_norm_weights, linear, Linear};
use crate::model::weights::Weights;
use crate::ops::{activation, attention, norm, rope};
use crate::tensor::{Device, Tensor};

/// What the vision tower needs from vision_config.
#[derive(Clone, Debug)]
pub struct VisionDims {
    pub depth: usize,
    pub embed_dim: usize,      // ViT width (1280)
    pub num_heads: usize,      // 16 → head_dim 80
    pub mlp_hidden: usize,     // embed_dim · mlp_ratio
    pub out_hidden: usize,     // merger output = LM hidden size
    pub in_channels: usize,    // 3
    pub temporal_patch: usize, // 2
    pub patch: usize,          // 14
    pub merge: usize,          // spatial_merge_size (2)
    pub act: VisionAct,        // hidden_act of the block MLP
    pub rope_theta: f32,       // base of the 2-D RoPE (vision_config.rope_theta)
}

impl VisionDims {
    /// Values per patch row of pixel_values: C · T · P · P (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch * self.patch * self.patch
    }
}

pub use super::VisionAct;

const LN_EPS: f32 = 1e-6; // LayerNorm(eps=1e-6) in every block and the merger

struct Block {
    norm1: (Tensor, Tensor), // LayerNorm weight, bias (embed,)
    norm2: (Tensor, Tensor),
    q: Linear, // (embed, embed) each: rows of attn.qkv
    k: Linear,
    v: Linear,
    proj: Linear, // (embed, embed)
    fc1: Linear,  // (mlp_hidden, embed)
    fc2: Linear,  // (embed, mlp_hidden)
}

pub struct VisionTower {
    pub dims: VisionDims,
    patch_embed: Tensor, // (embed, patch_dim): Conv3d weight (embed, C, T, P, P) flattened
    blocks: Vec<Block>,
    merger: PatchMerger,
}

impl VisionTower {
    pub fn load(w: &Weights, dev: &Device, dims: VisionDims) -> Result<Self> {
        let e = dims.embed_dim;
        let pre = "model.visual";
        let hd = dims.embed_dim / dims.num_heads.max(1);
        crate::ops::attention::check_head_dim(
            dev,
            hd,
            &format!("tensor `{pre}.blocks.0.attn.qkv.weight` (head dim {hd})"),
        )?;
        // Conv3d with stride = kernel is a matrix product over flattened patches.
        let conv = [e, dims.in_channels, dims.temporal_patch, dims.patch, dims.patch];
        let patch_embed =
            w.load(dev, &format!("{pre}.patch_embed.proj.weight"), &conv)?.reshape(&[e, dims.patch_dim()])?;
        let mut blocks = Vec::with_capacity(dims.depth);
        for i in 0..dims.depth {
            let b = format!("{pre}.blocks.{i}");
            let (wn, bn) = (format!("{b}.attn.qkv.weight"), format!("{b}.attn.qkv.bias"));
            let part = |j: usize| -> Result<Linear> {
                Ok(Linear {
                    w: w.load_rows(dev, &wn, &[3 * e, e], j * e..(j + 1) * e)?,
                    b: Some(w.load_rows(dev, &bn, &[3 * e], j * e..(j + 1) * e)?),
                })
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            blocks.push(Block {
                norm1: layer_norm_weights(w, dev, &format!("{b}.norm1"), e)?,
                norm2: layer_norm_weights(w, dev, &format!("{b}.norm2"), e)?,
                q,
                k,
                v,
                proj: linear(w, dev, &format!("{b}.attn.proj"), e, e, true)?,
                fc1: linear(w, dev, &format!("{b}.mlp.fc1"), dims.mlp_hidden, e, true)?,
                fc2: linear(w, dev, &format!("{b}.mlp.fc2"), e, dims.mlp_hidden, true)?,
            });
        }
        let merger = PatchMerger::load(w, dev, &format!("{pre}.merger"), e, dims.merge, dims.out_hidden, LN_EPS)?;
        Ok(Self { patch_embed, blocks, merger, dims })
    }

    /// pixel_values (patches, patch_dim) in the processor's patch order, in
    /// the device's activation dtype;
    /// grids [t, h, w] per image or video, in patches; `positions` (patches, 2)
    /// i32 = (row, col) per patch (mrope::vision_position_ids). Returns
    /// (patches / merge², out_hidden). `observe` sees each stage's output.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
        positions: &Tensor,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let d = &self.dims;
        let dev = pixel_values.device();
        let n = pixel_values.shape()[0];
        let heads = d.num_heads;
        let hd = d.embed_dim / heads;
        // Every temporal slice of every image is its own attention sequence.
        let mut cu = vec![0i32];
        let mut max_len = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                cu.push(cu.last().unwrap() + (h * w) as i32);
                max_len = max_len.max(h * w);
            }
        }
        crate::ensure_shape!(
            *cu.last().unwrap() as usize == n,
            "vision",
            "grids cover {} patches, pixel_values has {n}",
            cu.last().unwrap()
        );
        let cu = Tensor::from_i32(&dev, &[cu.len()], &cu)?;

        let dt = dev.activation_dtype();
        let mut x = Tensor::empty(&dev, &[n, d.embed_dim], dt)?;
        crate::ops::gemm::gemm(&mut x, pixel_values, &self.patch_embed)?;
        observe("vision.patch_embed", &x);

        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = Tensor::empty(&dev, &[n, d.embed_dim], dt)?;
        for (i, b) in self.blocks.iter().enumerate() {
            norm::layer_norm(&mut h, &x, &b.norm1.0, &b.norm1.1, LN_EPS)?;
            let mut q = b.q.forward(&h)?.reshape(&[n, heads, hd])?;
            let mut k = b.k.forward(&h)?.reshape(&[n, heads, hd])?;
            let v = b.v.forward(&h)?.reshape(&[n, heads, hd])?;
            rope::vision_rope(&mut q, positions, d.rope_theta)?;
            rope::vision_rope(&mut k, positions, d.rope_theta)?;
            let mut a = Tensor::empty(&dev, &[n, heads, hd], dt)?;
            attention::attention(&mut a, &q, &k, &v, &cu, &cu, max_len, false, scale)?;
            let o = b.proj.forward(&a.reshape(&[n, d.embed_dim])?)?;
            let mut x2 = Tensor::empty(&dev, &[n, d.embed_dim], dt)?;
            activation::add(&mut x2, &x, &o)?;
            norm::layer_norm(&mut h, &x2, &b.norm2.0, &b.norm2.1, LN_EPS)?;
            let f = b.fc1.forward(&h)?;
            let g = act_forward(d.act, &f)?;
            let f2 = b.fc2.forward(&g)?;
            activation::add(&mut x, &x2, &f2)?;
            observe(&format!("vision.block.{i}"), &x);
        }

        let out = self.merger.forward(&x)?;
        observe("vision.merger", &out);
        Ok(out)
    }
}

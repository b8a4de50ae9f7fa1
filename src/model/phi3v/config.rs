//! Phi-3.5-vision `config.json` (the model's remote `Phi3VConfig`,
//! configuration_phi3_v.py: a Phi-3-mini decoder's fields at the top level,
//! `embd_layer` and `img_processor` for the image side).
//!
//! The remote code hard-codes the tower as CLIP ViT-L/14-336
//! (`CLIP_VIT_LARGE_PATCH14_336_CONFIG`); `img_processor.vision_config`, a
//! Kestrel-only key that only its tiny test fixtures carry, overrides those
//! fields. Everything the remote code asserts or does not implement
//! (another tower, `glb_sub` order, a linear projector, no HD transform) is
//! refused here by name rather than served differently.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::{parse_dir, parse_str, require_gqa, require_positive, Activation, Obj};
use crate::model::decoder::LongRope;
use crate::model::llava::config::ClipVisionConfig;

/// `architectures` values this family serves (VLM2Vec-Full has the same).
pub const SUPPORTED_ARCHITECTURES: [&str; 1] = ["Phi3VForCausalLM"];

/// The Phi-3 decoder's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Phi3TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The "su" / "longrope" scaling, when the config has one.
    pub longrope: Option<LongRope>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Phi3VConfig {
    pub text_config: Phi3TextConfig,
    pub vision_config: ClipVisionConfig,
    /// Index into the tower's hidden states (`img_processor.layer_idx`, −2).
    pub layer_idx: i64,
    /// Tokens per 336² crop after the 2×2 merge (`num_img_tokens`, 144).
    pub num_img_tokens: usize,
    pub bos_token_id: u32,
    pub eos_token_id: Vec<u32>,
}

impl Phi3VConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        parse_dir(dir, Self::from_value)
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        parse_str(s, Self::from_value)
    }

    pub fn from_value(root: &Value) -> Result<Self> {
        let top = Obj::new(root, "")?;
        let text_config = phi3(&top)?;
        let embd = match top.get("embd_layer") {
            Some(v) => Obj::new(v, "embd_layer.")?,
            None => return Err(Error::Config("`embd_layer` is missing; a Phi-3-vision config has one".into())),
        };
        for (key, want) in [("embedding_cls", "image"), ("hd_transform_order", "sub_glb"), ("projection_cls", "mlp")] {
            let got = embd.str(key)?.unwrap_or(if key == "projection_cls" { "linear" } else { want });
            if got != want {
                return Err(Error::Config(format!(
                    "`embd_layer.{key}` is `{got}`; Phi-3.5-vision has `{want}`, the only form implemented"
                )));
            }
        }
        for key in ["use_hd_transform", "with_learnable_separator"] {
            if embd.bool(key)? != Some(true) {
                return Err(Error::Config(format!(
                    "`embd_layer.{key}` is not true; only the HD transform with learned separators is implemented"
                )));
            }
        }
        let ip = match top.get("img_processor") {
            Some(v) => Obj::new(v, "img_processor.")?,
            None => return Err(Error::Config("`img_processor` is missing; a Phi-3-vision config has one".into())),
        };
        if let Some(name) = ip.str("name")? {
            if name != "clip_vision_model" {
                return Err(Error::Config(format!(
                    "`img_processor.name` is `{name}`; only the CLIP tower is implemented"
                )));
            }
        }
        if let Some(t) = ip.str("type_feature")? {
            if t != "patch" {
                return Err(Error::Config(format!(
                    "`img_processor.type_feature` is `{t}`; only `patch` is implemented"
                )));
            }
        }
        let vision_config = match ip.get("vision_config") {
            Some(v) => clip_l14_336(&Obj::new(v, "img_processor.vision_config.")?)?,
            None => clip_l14_336(&Obj::empty("img_processor.vision_config."))?,
        };
        let image_dim_out = ip.usize("image_dim_out")?.unwrap_or(vision_config.hidden_size);
        if image_dim_out != vision_config.hidden_size {
            return Err(Error::Config(format!(
                "`img_processor.image_dim_out` ({image_dim_out}) differs from the tower's width ({})",
                vision_config.hidden_size
            )));
        }
        let layer_idx = match ip.get("layer_idx") {
            None => -2,
            Some(v) => v.as_i64().ok_or_else(|| ip.bad("layer_idx", "an integer", v))?,
        };
        let bos_token_id = top.u32("bos_token_id")?.unwrap_or(1);
        let mut eos_token_id = top.ids("eos_token_id")?;
        if eos_token_id.is_empty() {
            eos_token_id = vec![2];
        }
        let cfg = Self {
            text_config,
            vision_config,
            layer_idx,
            num_img_tokens: ip.usize("num_img_tokens")?.unwrap_or(144),
            bos_token_id,
            eos_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let (t, v) = (&self.text_config, &self.vision_config);
        require_positive(&[
            ("hidden_size", t.hidden_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("intermediate_size", t.intermediate_size),
            ("vocab_size", t.vocab_size),
            ("img_processor.vision_config.hidden_size", v.hidden_size),
            ("img_processor.vision_config.num_attention_heads", v.num_attention_heads),
        ])?;
        require_gqa(("num_attention_heads", t.num_attention_heads), ("num_key_value_heads", t.num_key_value_heads))?;
        if t.head_dim % 2 != 0 {
            return Err(Error::Config(format!("head dim {} must be even for RoPE", t.head_dim)));
        }
        // The HD transform cuts 336² crops; the 2×2 merge needs an even
        // patch grid, and num_img_tokens must be what the merge gives.
        let side = v.image_size / v.patch_size.max(1);
        if v.image_size != 336 || !v.image_size.is_multiple_of(v.patch_size) || side % 2 != 0 {
            return Err(Error::Config(format!(
                "the tower takes {0}×{0} images in {1}-pixel patches; the HD transform needs 336² crops cut \
                 into an even number of patches per side",
                v.image_size, v.patch_size
            )));
        }
        if self.num_img_tokens != (side / 2) * (side / 2) {
            return Err(Error::Config(format!(
                "`img_processor.num_img_tokens` is {}, but a {side}×{side} patch grid merged 2×2 gives {}",
                self.num_img_tokens,
                (side / 2) * (side / 2)
            )));
        }
        Ok(())
    }

    /// Patches per crop side (24) and merged tokens per side (12).
    pub fn merged_side(&self) -> usize {
        self.vision_config.image_size / self.vision_config.patch_size / 2
    }
}

fn phi3(t: &Obj) -> Result<Phi3TextConfig> {
    let hidden_size = t.usize("hidden_size")?.unwrap_or(3072);
    let num_attention_heads = t.usize("num_attention_heads")?.unwrap_or(32);
    let num_key_value_heads = t.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    let head_dim = hidden_size / num_attention_heads.max(1);
    if let Some(act) = t.str("hidden_act")? {
        if act != "silu" {
            return Err(Error::Config(format!("`hidden_act` is `{act}`; the Phi-3 MLP here is silu")));
        }
    }
    if let Some(f) = t.f64("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(Error::Config(format!(
                "`partial_rotary_factor` is {f}; only full rotary (1.0) is implemented"
            )));
        }
    }
    let rope_theta = t.f64("rope_theta")?.unwrap_or(10000.0);
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(Error::Config(format!("`rope_theta` is {rope_theta}; expected a finite value > 0")));
    }
    let max_position_embeddings = t.usize("max_position_embeddings")?.unwrap_or(4096);
    let longrope = match t.get("rope_scaling").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(longrope(&Obj::new(v, "rope_scaling.")?, t, head_dim, max_position_embeddings)?),
    };
    Ok(Phi3TextConfig {
        hidden_size,
        intermediate_size: t.usize("intermediate_size")?.unwrap_or(8192),
        num_hidden_layers: t.usize("num_hidden_layers")?.unwrap_or(32),
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: t.usize("vocab_size")?.unwrap_or(32064),
        rms_norm_eps: t.f64("rms_norm_eps")?.unwrap_or(1e-5),
        rope_theta,
        max_position_embeddings,
        tie_word_embeddings: t.bool("tie_word_embeddings")?.unwrap_or(false),
        longrope,
    })
}

/// `rope_scaling: {"type": "su" | "longrope", "short_factor": [..],
/// "long_factor": [..]}` with `original_max_position_embeddings` beside the
/// other fields (or inside the dict). The attention factor is the config's
/// `attention_factor` if given, else √(1 + ln s / ln original) with s =
/// max / original positions (1 when s ≤ 1), as transformers'
/// `_compute_longrope_parameters` and the remote `Phi3SuScaledRotaryEmbedding`.
fn longrope(r: &Obj, top: &Obj, head_dim: usize, max_positions: usize) -> Result<LongRope> {
    let kind = r.str("rope_type")?.or(r.str("type")?).unwrap_or("default");
    if kind != "su" && kind != "longrope" {
        return Err(Error::Config(format!(
            "`rope_scaling` asks for `{kind}` RoPE scaling; Phi-3.5-vision's `su` (longrope) is the one implemented"
        )));
    }
    let factors = |key: &str| -> Result<Vec<f32>> {
        let v = r.get(key).ok_or_else(|| Error::Config(format!("`rope_scaling.{key}` is missing")))?;
        let list = v.as_array().ok_or_else(|| r.bad(key, "a list of numbers", v))?;
        let out: Vec<f32> = list.iter().filter_map(|x| x.as_f64()).map(|x| x as f32).collect();
        if out.len() != list.len() || out.len() != head_dim / 2 || out.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(Error::Config(format!(
                "`rope_scaling.{key}` must hold {} positive numbers (head dim {head_dim} / 2); it has {} entries",
                head_dim / 2,
                list.len()
            )));
        }
        Ok(out)
    };
    let original = match r.usize("original_max_position_embeddings")? {
        Some(o) => o,
        None => top.usize("original_max_position_embeddings")?.ok_or_else(|| {
            Error::Config("longrope needs `original_max_position_embeddings`, which is missing".into())
        })?,
    };
    if original == 0 {
        return Err(Error::Config("`original_max_position_embeddings` is 0".into()));
    }
    let scale = max_positions as f64 / original as f64;
    let attention_factor = match r.f64("attention_factor")? {
        Some(a) => a,
        None if scale <= 1.0 => 1.0,
        None => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_positions: original,
        attention_factor: attention_factor as f32,
    })
}

/// The remote code's `CLIP_VIT_LARGE_PATCH14_336_CONFIG`, field by field
/// overridable (tiny fixtures only).
fn clip_l14_336(v: &Obj) -> Result<ClipVisionConfig> {
    let act = v.str("hidden_act")?.unwrap_or("quick_gelu");
    let hidden_act = Activation::from_hf(act)
        .filter(|a| *a != Activation::Silu)
        .ok_or_else(|| Error::Config(format!("`img_processor.vision_config.hidden_act` `{act}` is not supported")))?;
    Ok(ClipVisionConfig {
        hidden_size: v.usize("hidden_size")?.unwrap_or(1024),
        intermediate_size: v.usize("intermediate_size")?.unwrap_or(4096),
        num_hidden_layers: v.usize("num_hidden_layers")?.unwrap_or(24),
        num_attention_heads: v.usize("num_attention_heads")?.unwrap_or(16),
        num_channels: v.usize("num_channels")?.unwrap_or(3),
        image_size: v.usize("image_size")?.unwrap_or(336),
        patch_size: v.usize("patch_size")?.unwrap_or(14),
        hidden_act,
        layer_norm_eps: v.f64("layer_norm_eps")?.unwrap_or(1e-5),
    })
}

#[cfg(test)]
mod tests;

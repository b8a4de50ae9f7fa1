//! LLaVA-1.5 `config.json` (transformers `models/llava/configuration_llava.py`
//! `LlavaConfig`, with a Llama `text_config` and a CLIP `vision_config`).
//!
//! The published llava-hf files store only what differs from the Llama and
//! CLIP class defaults (llava-1.5-7b-hf's `text_config` names no hidden
//! size at all), so absent fields take those defaults exactly as HF does:
//! `LlamaConfig` (hidden 4096, intermediate 11008, 32 layers, 32 heads, kv
//! heads = heads, eps 1e-6, rope_theta 10000, 2048 positions, untied) and,
//! when `vision_config` is absent, LLaVA's own CLIP-L/14-336 defaults.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::{parse_dir, parse_str, require_gqa, require_positive, Activation, Obj};
use crate::model::vision::clip::ClipDims;
use crate::model::vision::VisionAct;

/// `architectures` values this family serves.
pub const SUPPORTED_ARCHITECTURES: [&str; 1] = ["LlavaForConditionalGeneration"];

/// The Llama decoder's fields (transformers `LlamaConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaTextConfig {
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
    pub attention_bias: bool,
}

/// The CLIP tower's fields (transformers `CLIPVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// The tower's shape; `act_field` names `hidden_act` in errors.
    pub fn dims(&self, act_field: &str) -> Result<ClipDims> {
        Ok(ClipDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            image_size: self.image_size,
            patch: self.patch_size,
            channels: self.num_channels,
            eps: self.layer_norm_eps as f32,
            act: VisionAct::from_config(self.hidden_act, act_field)?,
        })
    }

    /// Flops of the patch embedding and the first `layers` layers on one
    /// image: per layer 4 hidden² + 2 hidden·intermediate MACs per row and
    /// full attention over the image's rows (patches + the class token).
    pub fn image_flops(&self, layers: usize) -> f64 {
        let side = self.image_size / self.patch_size;
        let patches = (side * side) as f64;
        let rows = patches + 1.0;
        let (e, m) = (self.hidden_size as f64, self.intermediate_size as f64);
        let embed = 2.0 * patches * (self.num_channels * self.patch_size * self.patch_size) as f64 * e;
        let layer = 2.0 * rows * (4.0 * e * e + 2.0 * e * m) + 4.0 * rows * rows * e;
        embed + layers as f64 * layer
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    pub text_config: LlamaTextConfig,
    pub vision_config: ClipVisionConfig,
    /// `image_token_id` (transformers 5) or `image_token_index` (4).
    pub image_token_id: u32,
    /// Index into the tower's hidden states (−2: the second-to-last layer).
    pub vision_feature_layer: i64,
    /// "default" drops the class token; "full" keeps it.
    pub vision_feature_select_strategy: String,
    pub projector_hidden_act: Activation,
    pub multimodal_projector_bias: bool,
    pub eos_token_id: Vec<u32>,
}

impl LlavaConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        parse_dir(dir, Self::from_value)
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        parse_str(s, Self::from_value)
    }

    pub fn from_value(root: &Value) -> Result<Self> {
        let top = Obj::new(root, "")?;
        let t = match top.get("text_config") {
            Some(v) => Obj::new(v, "text_config.")?,
            None => Obj::empty("text_config."),
        };
        if let Some(mt) = t.str("model_type")? {
            if mt != "llama" {
                return Err(Error::Config(format!(
                    "`text_config.model_type` is `{mt}`; this build serves LLaVA with a Llama decoder"
                )));
            }
        }
        let text_config = llama(&t)?;
        let vision_config = match top.get("vision_config") {
            Some(v) => clip(&Obj::new(v, "vision_config.")?, false)?,
            None => clip(&Obj::empty("vision_config."), true)?,
        };
        let image_token_id = match top.u32("image_token_id")? {
            Some(v) => v,
            None => top.u32("image_token_index")?.unwrap_or(32000),
        };
        let vision_feature_layer = match top.get("vision_feature_layer") {
            None => -2,
            Some(v) => v.as_i64().ok_or_else(|| {
                Error::Config(format!(
                    "`vision_feature_layer` must be one integer, found {v} (several feature layers are not supported)"
                ))
            })?,
        };
        let strategy = top.str("vision_feature_select_strategy")?.unwrap_or("default").to_string();
        if strategy != "default" && strategy != "full" {
            return Err(Error::Config(format!(
                "`vision_feature_select_strategy` is `{strategy}`; expected `default` or `full`"
            )));
        }
        let act = top.str("projector_hidden_act")?.unwrap_or("gelu");
        let projector_hidden_act = Activation::from_hf(act)
            .filter(|a| *a != Activation::Silu)
            .ok_or_else(|| Error::Config(format!("`projector_hidden_act` `{act}` is not supported")))?;
        let mut eos_token_id = top.ids("eos_token_id")?;
        if eos_token_id.is_empty() {
            eos_token_id = t.ids("eos_token_id")?;
        }
        if eos_token_id.is_empty() {
            eos_token_id = vec![2]; // LlamaConfig's default
        }
        let cfg = Self {
            text_config,
            vision_config,
            image_token_id,
            vision_feature_layer,
            vision_feature_select_strategy: strategy,
            projector_hidden_act,
            multimodal_projector_bias: top.bool("multimodal_projector_bias")?.unwrap_or(true),
            eos_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let (t, v) = (&self.text_config, &self.vision_config);
        require_positive(&[
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.vocab_size", t.vocab_size),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
        ])?;
        require_gqa(
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
        )?;
        if t.head_dim % 2 != 0 {
            return Err(Error::Config(format!("text head dim {} must be even for RoPE", t.head_dim)));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(Error::Config(format!(
                "vision_config: hidden_size {} must divide by num_attention_heads {}, image_size {} by patch_size {}",
                v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size
            )));
        }
        if self.image_token_id as usize >= t.vocab_size {
            return Err(Error::Config(format!(
                "image token id {} is outside the vocabulary ({})",
                self.image_token_id, t.vocab_size
            )));
        }
        Ok(())
    }

    /// Image tokens per image: the tower's patches, plus the class token
    /// for the "full" strategy (`LlavaProcessor`'s `num_image_tokens`).
    pub fn image_tokens(&self) -> usize {
        let side = self.vision_config.image_size / self.vision_config.patch_size;
        side * side + usize::from(self.vision_feature_select_strategy == "full")
    }
}

fn llama(t: &Obj) -> Result<LlamaTextConfig> {
    let hidden_size = t.usize("hidden_size")?.unwrap_or(4096);
    let num_attention_heads = t.usize("num_attention_heads")?.unwrap_or(32);
    let num_key_value_heads = t.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    let head_dim = t.usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
    if let Some(act) = t.str("hidden_act")? {
        if act != "silu" {
            return Err(Error::Config(format!("`text_config.hidden_act` is `{act}`; the Llama MLP here is silu")));
        }
    }
    // rope: `rope_theta` beside the fields (4.x) or in `rope_parameters` (5);
    // any scaling is refused rather than silently ignored.
    let mut rope_theta = t.f64("rope_theta")?.unwrap_or(10000.0);
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = t.get(key) else { continue };
        let o = Obj::new(v, &format!("text_config.{key}."))?;
        let kind = o.str("rope_type")?.or(o.str("type")?).unwrap_or("default");
        if kind != "default" {
            return Err(Error::Config(format!(
                "`text_config.{key}` asks for `{kind}` RoPE scaling, which is not implemented for LLaVA"
            )));
        }
        if let Some(theta) = o.f64("rope_theta")? {
            rope_theta = theta;
        }
    }
    if t.bool("mlp_bias")?.unwrap_or(false) {
        return Err(Error::Config("`text_config.mlp_bias` is true; the shared decoder has no MLP biases".into()));
    }
    Ok(LlamaTextConfig {
        hidden_size,
        intermediate_size: t.usize("intermediate_size")?.unwrap_or(11008),
        num_hidden_layers: t.usize("num_hidden_layers")?.unwrap_or(32),
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: t.usize("vocab_size")?.unwrap_or(32000),
        rms_norm_eps: t.f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        max_position_embeddings: t.usize("max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: t.bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: t.bool("attention_bias")?.unwrap_or(false),
    })
}

/// `llava_default`: LlavaConfig's own CLIP-L/14-336 when `vision_config`
/// is absent; else `CLIPVisionConfig`'s class defaults for absent fields.
fn clip(v: &Obj, llava_default: bool) -> Result<ClipVisionConfig> {
    let d = |big: usize, small: usize| if llava_default { big } else { small };
    let act = v.str("hidden_act")?.unwrap_or("quick_gelu");
    let hidden_act = Activation::from_hf(act)
        .filter(|a| *a != Activation::Silu)
        .ok_or_else(|| Error::Config(format!("`vision_config.hidden_act` `{act}` is not supported")))?;
    Ok(ClipVisionConfig {
        hidden_size: v.usize("hidden_size")?.unwrap_or(d(1024, 768)),
        intermediate_size: v.usize("intermediate_size")?.unwrap_or(d(4096, 3072)),
        num_hidden_layers: v.usize("num_hidden_layers")?.unwrap_or(d(24, 12)),
        num_attention_heads: v.usize("num_attention_heads")?.unwrap_or(d(16, 12)),
        num_channels: v.usize("num_channels")?.unwrap_or(3),
        image_size: v.usize("image_size")?.unwrap_or(d(336, 224)),
        patch_size: v.usize("patch_size")?.unwrap_or(d(14, 32)),
        hidden_act,
        layer_norm_eps: v.f64("layer_norm_eps")?.unwrap_or(1e-5),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-hf/llava-1.5-7b-hf's config.json as published: the Llama sizes
    /// come from LlamaConfig's defaults.
    #[test]
    fn the_published_7b_config_takes_llama_defaults() {
        let c = LlavaConfig::from_json_str(
            r#"{"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
            "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
            "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
              "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
              "torch_dtype": "float16", "vocab_size": 32064},
            "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
              "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
              "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#,
        )
        .unwrap();
        let t = &c.text_config;
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size),
            (4096, 32, 32, 11008)
        );
        assert_eq!(
            (t.num_key_value_heads, t.head_dim, t.vocab_size, t.max_position_embeddings),
            (32, 128, 32064, 4096)
        );
        assert_eq!((t.rms_norm_eps, t.rope_theta, t.tie_word_embeddings), (1e-5, 10000.0, false));
        assert_eq!((c.image_token_id, c.vision_feature_layer, c.image_tokens()), (32000, -2, 576));
        assert_eq!(c.vision_config.hidden_act, Activation::QuickGelu);
        assert_eq!(c.eos_token_id, vec![2]);
    }

    #[test]
    fn scaling_and_bad_fields_are_refused_by_name() {
        let e = |s: &str| LlavaConfig::from_json_str(s).unwrap_err().to_string();
        let m = e(r#"{"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}"#);
        assert!(m.contains("rope_scaling") && m.contains("linear"), "{m}");
        let m = e(r#"{"vision_feature_select_strategy": "cls"}"#);
        assert!(m.contains("vision_feature_select_strategy"), "{m}");
        let m = e(r#"{"text_config": {"model_type": "mistral"}}"#);
        assert!(m.contains("mistral"), "{m}");
        let m = e(r#"{"vision_feature_layer": [-2, -5]}"#);
        assert!(m.contains("vision_feature_layer"), "{m}");
    }
}

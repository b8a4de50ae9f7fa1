//! Phi-3.5-vision (`microsoft/Phi-3.5-vision-instruct`, remote code
//! `Phi3VForCausalLM`; VLM2Vec-Full is the same model served for
//! embeddings): the HD transform cuts each image into up to `num_crops`
//! 336² crops plus a 336² global view, CLIP ViT-L/14-336 runs on every one
//! to its second-to-last layer, 2×2 patches merge into 144 tokens per crop,
//! learned separators end each row and split the crops from the global
//! view, a linear–GELU–linear projector maps them to the decoder, and the
//! shared decoder runs as Phi-3-mini (fused q|k|v and gate|up, no biases,
//! head dim 96, longrope). Each `<|image_N|>` tag becomes that image's run
//! of placeholder tokens.
//!
//! The reference is the model's own remote code (configuration_phi3_v.py,
//! image_processing_phi3_v.py, processing_phi3_v.py,
//! image_embedding_phi3_v.py), composed for the tests by
//! tools/phi3v_reference.py from transformers' `Phi3ForCausalLM` and
//! `CLIPVisionModel`.

pub mod config;
pub mod hd;
pub mod model;
pub mod processor;

use std::path::Path;

pub use model::Phi3V;

use crate::error::Result;
use crate::model::contract::{Family, Model, ModelSpec};
use crate::model::decoder::{DecoderDims, Head};
use crate::model::weights::{PrefixRules, Weights};
use crate::tensor::Device;
use config::Phi3VConfig;

pub static FAMILY: Family = Family {
    name: "phi3_v",
    architectures: &config::SUPPORTED_ARCHITECTURES,
    model_types: &["phi3_v"],
    examples: &["microsoft/Phi-3.5-vision-instruct", "microsoft/Phi-3-vision-128k-instruct", "TIGER-Lab/VLM2Vec-Full"],
    tasks: "generate, embedding; image",
    chat_template: Some(include_str!("chat_template.jinja")),
    embedding_template: Some(include_str!("vlm2vec_template.jinja")),
    embedding_template_name: "VLM2Vec",
    placeholder: |n| format!("<|image_{n}|>"),
    tool_parser: None,
    tool_template: None,
    processor: processor::Phi3VProcessor::from_dir,
    load: load_boxed,
    weights: open_weights,
};

/// Canonical prefix of the image embedding (tower, separators, projector),
/// as the checkpoint stores it.
pub const VISION_PREFIX: &str = "model.vision_embed_tokens";

/// The decoder's canonical names (`model.language_model.*`) are stored
/// as `model.*`; the image side keeps its own names.
pub const NAME_MAP: &PrefixRules = &[
    ("model.language_model.", &["model.language_model.", "model."]),
    ("lm_head.", &["lm_head."]),
    ("model.vision_embed_tokens.", &["model.vision_embed_tokens."]),
];

pub fn open_weights(dir: &Path) -> Result<Weights> {
    Weights::open_with(dir, NAME_MAP)
}

fn load_boxed(dir: &Path, dev: &Device) -> Result<Box<dyn Model>> {
    Ok(Box::new(Phi3V::load(dir, dev)?))
}

/// The family-neutral facts; `image_token_id` is `<|image|>` (32044 in the
/// published tokenizer, which the remote code replaces by negative ids).
pub fn spec(c: &Phi3VConfig, image_token_id: u32) -> ModelSpec {
    let t = &c.text_config;
    ModelSpec {
        family: "phi3_v",
        decoder: DecoderDims {
            hidden: t.hidden_size,
            layers: t.num_hidden_layers,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            intermediate: t.intermediate_size,
            vocab: t.vocab_size,
            eps: t.rms_norm_eps as f32,
            rope_theta: t.rope_theta as f32,
            mrope_section: DecoderDims::rope_1d_sections(t.head_dim),
            qkv_bias: false,
            longrope: t.longrope.clone(),
            head: if t.tie_word_embeddings { Head::Tied } else { Head::Own },
        },
        max_position_embeddings: t.max_position_embeddings,
        eos_token_id: c.eos_token_id.clone(),
        image_token_id,
        video_token_id: None,
        media_token_ids: vec![image_token_id],
    }
}

/// Flops of the image side on one image of `crops` = h·w crops: the tower
/// (the layers run) on 1 + crops views of (patches + 1) rows, and the
/// projector on every image token.
pub fn vision_flops(c: &Phi3VConfig, crops: [usize; 2], tokens: usize) -> f64 {
    let v = &c.vision_config;
    let layers = model::clip_dims(c).and_then(|d| d.layers_for(c.layer_idx)).unwrap_or(v.num_hidden_layers);
    let views = (1 + crops[0] * crops[1]) as f64;
    let (e, th) = (v.hidden_size as f64, c.text_config.hidden_size as f64);
    let projector = 2.0 * tokens as f64 * (4.0 * e * th + th * th);
    views * v.image_flops(layers) + projector
}

//! LLaVA-1.5 (transformers `models/llava/`, `LlavaForConditionalGeneration`):
//! the CLIP ViT-L/14-336 tower to its second-to-last layer, the class token
//! dropped, a linear–GELU–linear projector, and the shared decoder as
//! Llama-2 (no biases, 1-D RoPE, untied head). Each `<image>` in the prompt
//! becomes 576 image tokens.

pub mod config;
pub mod model;
pub mod processor;

use std::path::Path;

pub use model::Llava;

use crate::error::Result;
use crate::model::contract::{Family, Model, ModelSpec};
use crate::model::decoder::{DecoderDims, Head};
use crate::model::weights::{PrefixRules, Weights};
use crate::tensor::Device;
use config::LlavaConfig;

pub static FAMILY: Family = Family {
    name: "llava",
    architectures: &config::SUPPORTED_ARCHITECTURES,
    model_types: &["llava"],
    examples: &["llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"],
    tasks: "generate, embedding; image",
    chat_template: Some(include_str!("chat_template.jinja")),
    embedding_template: None,
    embedding_template_name: "",
    placeholder: |_| "<image>".into(),
    tool_parser: None,
    tool_template: None,
    processor: processor::LlavaProcessor::from_dir,
    load: load_boxed,
    weights: open_weights,
};

/// Canonical prefix of the vision tower.
pub const VISION_PREFIX: &str = "model.vision_tower.vision_model";

/// Names as transformers ≥ 4.52 saves them (canonical) and as the
/// published llava-hf checkpoints store them (`language_model.model.*`,
/// `language_model.lm_head.*`, `vision_tower.vision_model.*`,
/// `multi_modal_projector.*`), as transformers' `_checkpoint_conversion_mapping`
/// for Llava maps them; transformers 5.17 itself writes the CLIP tower
/// without its `vision_model.` level, which maps to the same.
pub const NAME_MAP: &PrefixRules = &[
    ("model.language_model.", &["model.language_model.", "language_model.model."]),
    ("lm_head.", &["lm_head.", "language_model.lm_head."]),
    (
        "model.vision_tower.vision_model.",
        &["model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.", "vision_tower."],
    ),
    ("model.multi_modal_projector.", &["model.multi_modal_projector.", "multi_modal_projector."]),
];

pub fn open_weights(dir: &Path) -> Result<Weights> {
    Weights::open_with(dir, NAME_MAP)
}

fn load_boxed(dir: &Path, dev: &Device) -> Result<Box<dyn Model>> {
    Ok(Box::new(Llava::load(dir, dev)?))
}

/// The family-neutral facts: a Llama decoder with 1-D RoPE.
pub fn spec(c: &LlavaConfig) -> ModelSpec {
    let t = &c.text_config;
    ModelSpec {
        family: "llava",
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
            qkv_bias: t.attention_bias,
            longrope: None,
            head: if t.tie_word_embeddings { Head::Tied } else { Head::Own },
        },
        max_position_embeddings: t.max_position_embeddings,
        eos_token_id: c.eos_token_id.clone(),
        image_token_id: c.image_token_id,
        video_token_id: None,
        media_token_ids: vec![c.image_token_id],
    }
}

/// Flops of the tower (the layers run) and the projector on one image:
/// patch embedding, per layer 4 hidden² + 2 hidden·intermediate MACs per
/// row and full attention over the image's rows, then the projector.
pub fn vision_flops(c: &LlavaConfig) -> f64 {
    let v = &c.vision_config;
    let layers = model::clip_dims(c).and_then(|d| d.layers_for(c.vision_feature_layer)).unwrap_or(v.num_hidden_layers);
    let (e, th) = (v.hidden_size as f64, c.text_config.hidden_size as f64);
    let projector = 2.0 * c.image_tokens() as f64 * (e * th + th * th);
    v.image_flops(layers) + projector
}

//! Qwen2-VL (transformers `models/qwen2_vl/`): the Qwen ViT with its patch
//! merger, M-RoPE positions, `<|image_pad|>` / `<|video_pad|>` runs, and the
//! shared decoder with q/k/v biases. DSE-Qwen2 is this family with the
//! embedding task.

pub mod config;
pub mod inputs;
pub mod model;
pub mod mrope;
pub mod processor;

use std::path::Path;

pub use model::Qwen2Vl;

use crate::error::Result;
use crate::model::contract::{Family, Model};
use crate::model::weights::Weights;
use crate::tensor::Device;
use config::VisionConfig;

/// Qwen2-VL's chat template with Qwen2.5's Hermes function calling
/// (`<tools>` in the system turn, `<tool_call>` and `<tool_response>`
/// blocks); renders what the built-in template renders when the
/// conversation has no tools, tool calls or tool messages.
pub const TOOL_CHAT_TEMPLATE: &str = include_str!("tool_chat_template.jinja");

pub static FAMILY: Family = Family {
    name: "qwen2_vl",
    architectures: &config::SUPPORTED_ARCHITECTURES,
    model_types: &["qwen2_vl"],
    examples: &["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "MrLight/dse-qwen2-2b-mrl-v1"],
    tasks: "generate, embedding; image, video",
    chat_template: Some(include_str!("chat_template.jinja")),
    embedding_template: None,
    embedding_template_name: "",
    placeholder: |_| "<|vision_start|><|image_pad|><|vision_end|>".into(),
    tool_parser: Some("hermes"),
    tool_template: Some(TOOL_CHAT_TEMPLATE),
    processor: inputs::Qwen2VlProcessor::from_dir,
    load: load_boxed,
    weights: |dir: &Path| Weights::open(dir),
};

#[cfg(test)]
mod tool_template_tests;

fn load_boxed(dir: &Path, dev: &Device) -> Result<Box<dyn Model>> {
    Ok(Box::new(Qwen2Vl::load(dir, dev)?))
}

/// Flops of the vision tower on one image or video of `grid` = [t, h, w]
/// patches: patch embed (a Conv3d without bias), `depth` blocks (LayerNorms,
/// qkv and proj with biases, fc1/fc2; attention within each frame), and the
/// merger (LayerNorm, two linears over merge² patches). Follows
/// `modeling_qwen2_vl.py`; a GEMM of (m, k)·(k, n) is 2·m·k·n flops and
/// attention 4·head_dim flops per (query, key, head).
pub fn vision_flops(v: &VisionConfig, grid: [usize; 3]) -> f64 {
    let [t, h, w] = grid;
    let (frame, e, m) = ((h * w) as f64, v.embed_dim as f64, v.mlp_hidden_dim as f64);
    let n = t as f64 * frame;
    let embed = 2.0 * n * v.patch_dim() as f64 * e;
    let block_linear = 2.0 * n * (4.0 * e * e + 2.0 * e * m);
    let block_attn = t as f64 * 4.0 * frame * frame * e;
    let merge = (v.spatial_merge_size * v.spatial_merge_size) as f64;
    let mh = v.merger_hidden_size() as f64;
    let merger = 2.0 * (n / merge) * (mh * mh + mh * v.hidden_size as f64);
    embed + v.depth as f64 * (block_linear + block_attn) + merger
}

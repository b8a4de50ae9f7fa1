//! `kestrel generate`: one prompt, optional images, greedy answer on stdout.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::model::qwen2_vl::inputs::{prepare_chat, Media, Processors};
use crate::model::qwen2_vl::Qwen2Vl;
use crate::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use crate::tensor::Device;
use crate::text::{chat_template::ChatTemplate, tokenizer::Tokenizer};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model folder as downloaded from Hugging Face (default: the built-in tiny model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// An image file (PNG, JPEG, WebP, GIF, BMP); repeat for several, in order.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// cuda, cpu, or auto (cuda when a GPU is usable).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Chat template file (or template text) instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<String>,
}

/// Picks the device: `cuda` must work, `auto` falls back to the CPU (and says so).
pub fn device(choice: &str) -> Result<Device> {
    Device::choose(choice)
}

/// The model folder to use: the one given, or the built-in model.
pub fn model_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => crate::model::builtin::materialize(),
    }
}

pub fn run(args: &GenerateArgs) -> Result<String> {
    let dir = model_dir(&args.model)?;
    let dev = device(&args.device)?;
    let model = Qwen2Vl::load(&dir, &dev)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let template = ChatTemplate::load(&dir, args.chat_template.as_deref())?;
    let procs = Processors::from_dir(&dir)?;
    let mut media = Vec::new();
    let mut content = Vec::new();
    for path in &args.images {
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        media.push(Media::Image(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS)?));
        content.push(serde_json::json!({"type": "image"}));
    }
    content.push(serde_json::json!({"type": "text", "text": args.prompt}));
    let messages = serde_json::json!([{"role": "user", "content": content}]);
    let input = prepare_chat(&model.config, &tok, &template, &procs, &messages, &media)?;
    let mut stop = model.config.eos_token_id.clone();
    stop.extend_from_slice(tok.eos_token_ids());
    let out = model.generate_greedy(&input, args.max_tokens, &stop)?;
    tok.decode(&out, true)
}

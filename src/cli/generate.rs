//! `kestrel generate`: one prompt, optional images, greedy answer on stdout;
//! or, with `--batch`, a JSONL file of OpenAI chat requests run on the
//! engine (see `cli::batch`).

use std::path::PathBuf;

use crate::cli::{batch, engine_args::EngineArgs};
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
    /// The user's message (required unless --batch).
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub prompt: Option<String>,
    /// Most tokens to generate for --prompt.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// A JSONL file of chat completion requests (OpenAI Batch API lines or bare
    /// request bodies) to run on the engine instead of --prompt; results go to --output.
    /// The engine flags below apply to it (--prompt uses only --device and --chat-template).
    #[arg(long, requires = "output", conflicts_with = "images")]
    pub batch: Option<PathBuf>,
    /// Where --batch writes its results (JSONL, one line per request, in order).
    #[arg(long, requires = "batch")]
    pub output: Option<PathBuf>,
    /// Boxed: the flags are many, and `Command` holds these args inline.
    #[command(flatten)]
    pub engine: Box<EngineArgs>,
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

/// What `kestrel generate` prints: the answer, or a batch's summary.
pub fn run(args: &GenerateArgs) -> Result<String> {
    if let (Some(input), Some(output)) = (&args.batch, &args.output) {
        let s = batch::run(&args.engine, &args.model, input, output)?;
        return Ok(format!(
            "{} requests: {} succeeded, {} failed; results in {}",
            s.total,
            s.succeeded,
            s.total - s.succeeded,
            output.display()
        ));
    }
    let Some(prompt) = &args.prompt else {
        return Err(Error::InvalidInput("give --prompt (or --batch with --output)".into()));
    };
    let dir = model_dir(&args.model)?;
    let dev = device(&args.engine.device)?;
    let model = Qwen2Vl::load(&dir, &dev)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let template = ChatTemplate::load(&dir, args.engine.chat_template.as_deref())?;
    let procs = Processors::from_dir(&dir)?;
    let mut media = Vec::new();
    let mut content = Vec::new();
    for path in &args.images {
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        media.push(Media::Image(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS)?));
        content.push(serde_json::json!({"type": "image"}));
    }
    content.push(serde_json::json!({"type": "text", "text": prompt}));
    let messages = serde_json::json!([{"role": "user", "content": content}]);
    let input = prepare_chat(&model.config, &tok, &template, &procs, &messages, &media)?;
    let mut stop = model.config.eos_token_id.clone();
    stop.extend_from_slice(tok.eos_token_ids());
    let out = model.generate_greedy(&input, args.max_tokens, &stop)?;
    tok.decode(&out, true)
}

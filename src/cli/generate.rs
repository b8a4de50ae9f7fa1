//! `kestrel generate`: one prompt, optional images, greedy answer on stdout
//! (held to a JSON schema, regex, choices or grammar with the flags that say
//! so, through the engine); or, with `--batch`, a JSONL file of OpenAI chat
//! requests run on the engine (see `cli::batch`).

use std::path::PathBuf;

use crate::cli::{batch, engine_args::EngineArgs, model_args::ModelArgs};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

use crate::engine::request::RequestParams;
use crate::engine::sampling::SamplingParams;
use crate::engine::{Engine, Request};
use crate::model::{registry, seq, Model, Processor};
use crate::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use crate::multimodal::Media;
use crate::structured::{Constraint, JsonOptions};
use crate::tensor::Device;
use crate::text::{chat_template::ChatTemplate, tokenizer::Tokenizer};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    /// Hold the answer to the JSON schema in this file (as `response_format`
    /// json_schema; any whitespace, vLLM's default).
    #[arg(long, conflicts_with_all = ["batch", "regex", "choice", "grammar"])]
    pub json_schema: Option<PathBuf>,
    /// With --json-schema: compact JSON, no whitespace between tokens
    /// (vLLM's `disable_any_whitespace`).
    #[arg(long, requires = "json_schema")]
    pub disable_any_whitespace: bool,
    /// Hold the answer to this regular expression.
    #[arg(long, conflicts_with_all = ["batch", "choice", "grammar"])]
    pub regex: Option<String>,
    /// Hold the answer to one of the choices (repeat the flag for each).
    #[arg(long = "choice", conflicts_with_all = ["batch", "grammar"])]
    pub choice: Vec<String>,
    /// Hold the answer to the grammar in this file (Lark, or llama.cpp's GBNF).
    #[arg(long, conflicts_with = "batch")]
    pub grammar: Option<PathBuf>,
    /// Boxed: the flags are many, and `Command` holds these args inline.
    #[command(flatten)]
    pub engine: Box<EngineArgs>,
}

/// Picks the device: `cuda` must work, `auto` falls back to the CPU (and says so).
pub fn device(choice: &str) -> Result<Device> {
    Device::choose(choice)
}

/// A model folder loaded for one-off use (no engine): the model on `dev`,
/// its tokenizer, chat template (`chat_template`, else the folder's, else
/// the family's built-in one) and processor.
pub struct Offline {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub processor: Arc<dyn Processor>,
}

impl Offline {
    pub fn load(
        dir: &Path,
        dev: &Device,
        chat_template: Option<&str>,
        kwargs: &crate::model::ProcessorKwargs,
    ) -> Result<Self> {
        let family = registry::detect(dir)?;
        let builtin = family.chat_template.map(|t| (family.name, t));
        Ok(Self {
            model: (family.load)(dir, dev)?,
            tokenizer: Tokenizer::from_dir(dir)?,
            template: ChatTemplate::load_or(dir, chat_template, builtin)?.with_string_content(family.placeholder),
            processor: (family.processor)(dir, kwargs)?,
        })
    }

    /// Renders `messages` and prepares them with `media`.
    pub fn prepare_chat(
        &self,
        messages: &serde_json::Value,
        media: &[Media],
    ) -> Result<crate::model::inputs::PreparedInput> {
        let prompt = self.template.render(messages, true)?;
        self.processor.prepare_prompt(&self.tokenizer, prompt, media)
    }

    /// The ids generation stops after: the config's and the tokenizer's eos.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut stop = self.model.spec().eos_token_id.clone();
        stop.extend_from_slice(self.tokenizer.eos_token_ids());
        stop
    }
}

/// What `kestrel generate` prints: the answer, or a batch's summary.
pub fn run(args: &GenerateArgs) -> Result<String> {
    if let (Some(input), Some(output)) = (&args.batch, &args.output) {
        let s = batch::run(&args.engine, &args.model.dir()?, input, output)?;
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
    let dir = args.model.dir()?;
    if let Some(constraint) = constraint(args)? {
        return constrained(args, &dir, prompt, constraint);
    }
    let dev = device(&args.engine.device)?;
    let off = Offline::load(&dir, &dev, args.engine.chat_template.as_deref(), &args.engine.processor_kwargs()?)?;
    let (messages, media) = user_message(args, prompt)?;
    let input = off.prepare_chat(&messages, &media)?;
    let out = seq::generate_greedy(off.model.as_ref(), &input, args.max_tokens, &off.stop_ids())?;
    off.tokenizer.decode(&out, true)
}

/// The user's message: the --image files in order, then the prompt; and
/// the decoded images.
fn user_message(args: &GenerateArgs, prompt: &str) -> Result<(serde_json::Value, Vec<Media>)> {
    let mut media = Vec::new();
    let mut content = Vec::new();
    for path in &args.images {
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        media.push(Media::Image(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS)?));
        content.push(serde_json::json!({"type": "image"}));
    }
    content.push(serde_json::json!({"type": "text", "text": prompt}));
    Ok((serde_json::json!([{"role": "user", "content": content}]), media))
}

/// The output constraint the flags ask for, if any.
fn constraint(args: &GenerateArgs) -> Result<Option<Constraint>> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| Error::Io { path: p.display().to_string(), source: e });
    Ok(if let Some(p) = &args.json_schema {
        let schema = serde_json::from_str(&read(p)?)
            .map_err(|e| Error::InvalidInput(format!("{}: not JSON: {e}", p.display())))?;
        let options = JsonOptions { any_whitespace: !args.disable_any_whitespace, ..JsonOptions::default() };
        Some(Constraint::Json { schema, options })
    } else if let Some(rx) = &args.regex {
        Some(Constraint::Regex(rx.clone()))
    } else if !args.choice.is_empty() {
        Some(Constraint::Choice(args.choice.clone()))
    } else if let Some(p) = &args.grammar {
        Some(Constraint::Grammar(read(p)?))
    } else {
        None
    })
}

/// `--prompt` with a constraint: through the engine, which follows the
/// grammar token by token (greedy, as the unconstrained path).
fn constrained(args: &GenerateArgs, dir: &Path, prompt: &str, constraint: Constraint) -> Result<String> {
    let engine = Engine::start(args.engine.engine_config(dir.to_path_buf())?)?;
    let fe = engine.frontend();
    let grammar = fe.grammars.compile(&constraint)?;
    let (messages, media) = user_message(args, prompt)?;
    let input = fe.prepare_chat(&messages, &media)?;
    let params = RequestParams {
        sampling: SamplingParams::greedy(),
        max_tokens: args.max_tokens.min(fe.room(input.input_ids.len()).max(1)),
        grammar: Some(grammar),
        ..Default::default()
    };
    let out = engine.generate(vec![Request { input, params }]).pop().expect("one result per request")?;
    Ok(out.choices.into_iter().next().map(|c| c.text).unwrap_or_default())
}

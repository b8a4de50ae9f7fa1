//! `kestrel serve [MODEL]`: the OpenAI-compatible HTTP server, started as
//! `vllm serve MODEL` is (vllm/entrypoints/cli/serve.py,
//! vllm/entrypoints/openai/cli_args.py): the engine flags of `EngineArgs`
//! plus the server's own, under vLLM's names and defaults. A command line
//! from vLLM's docs runs with `vllm serve` replaced by `kestrel serve`;
//! flags of vLLM's that change nothing here (`--trust-remote-code`) are
//! accepted, and the rest of vLLM's that Kestrel knows are implemented or
//! refused with the reason (`cli::vllm_flags`).
//!
//! MODEL is a model folder, or a Hugging Face id (`Qwen/Qwen2-VL-2B-Instruct`)
//! taken from the local Hugging Face cache or downloaded into it at
//! `--revision` (`hub`). Without it, the built-in tiny model is served.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::engine_args::EngineArgs;
use crate::cli::model_args::model_dir;
use crate::cli::tool_flags::ToolFlags;
use crate::cli::vllm_flags::{self, DtypeArg, VllmFlags};
use crate::engine::{Engine, EngineConfig, Pooling, Task};
use crate::error::{Error, Result};
use crate::hub;
use crate::multimodal::fetch::MediaFetcher;
use crate::server::shutdown::Signals;
use crate::server::{bind, MediaLimits, Server, ServerConfig, DEFAULT_MAX_BODY_BYTES};

/// Environment variables holding the API key when --api-key is not given
/// (ours, then vLLM's).
pub const API_KEY_ENV: [&str; 2] = [vllm_flags::ENV_ALIASES[0].0, vllm_flags::ENV_ALIASES[0].1];

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Model folder, or a Hugging Face id (org/name) taken from the local
    /// Hugging Face cache or downloaded into it (default: the built-in tiny model).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_tag: Option<String>,
    /// The model, as a flag (vLLM's older spelling).
    #[arg(long)]
    pub model: Option<String>,
    /// Address to listen on (vLLM listens on all interfaces by default).
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the ready line says which).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1 routes (also from
    /// KESTREL_API_KEY or VLLM_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most media items per prompt, per kind: `image=2,video=1` or
    /// `{"image": 2, "video": 1}` (default: 999 each, vLLM V1's default).
    #[arg(long, value_parser = parse_limits)]
    pub limit_mm_per_prompt: Option<MediaLimits>,
    /// What the model is served for: generate (chat and text completions) or
    /// embedding (/v1/embeddings; `embed` too).
    #[arg(long, value_enum, default_value = "generate")]
    pub task: TaskArg,
    /// How token states become one embedding (embedding task; default: the
    /// model's own setting).
    #[arg(long, value_enum)]
    pub pooling: Option<PoolingArg>,
    /// Accepted for vLLM compatibility; Kestrel runs no model code from the model folder.
    #[arg(long)]
    pub trust_remote_code: bool,
    /// HTTP worker threads; each handles one request at a time, so this also
    /// bounds the requests the engine sees at once (default: --max-num-seqs
    /// plus 2 per CPU core, so the engine's batch can fill while others fetch
    /// media or wait; at most 1024).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Generation and embedding requests in flight before more are answered
    /// 429 with Retry-After (default: no bound beyond --workers).
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// Client connections open at once; past it a new one is answered 503
    /// and closed (each holds a thread and three file descriptors).
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a whole request head (from connecting,
    /// or from its previous answer); an idle connection is closed then.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub http_header_timeout: Duration,
    /// Seconds a client has to send a request body (from its first read),
    /// and that one write of an answer may block on a client not reading.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    pub http_body_timeout: Duration,
    /// Seconds the engine may spend in one iteration before /health answers
    /// 503 (vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S); above the longest step.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    pub engine_iteration_timeout: Duration,
    /// Seconds requests in flight have to finish after SIGTERM or SIGINT
    /// before they are stopped (25: done before Kubernetes' default 30 s
    /// grace period ends in SIGKILL).
    #[arg(long, default_value = "25", value_parser = parse_secs)]
    pub shutdown_timeout: Duration,
    #[command(flatten)]
    pub engine: Box<EngineArgs>,
    #[command(flatten)]
    pub vllm: VllmFlags,
    #[command(flatten)]
    pub tools: ToolFlags,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskArg {
    #[value(alias = "auto")]
    Generate,
    #[value(alias = "embed")]
    Embedding,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolingArg {
    Last,
    Mean,
    Cls,
}

/// `image=2,video=1`, or the JSON form `{"image": 2}` (a value may also be
/// `{"count": 2}`, vLLM's newer form). Kinds left out keep their default.
pub fn parse_limits(s: &str) -> std::result::Result<MediaLimits, String> {
    let mut limits = MediaLimits::default();
    let pairs: Vec<(String, u64)> = if s.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = v.as_object().ok_or("expected a JSON object such as {\"image\": 2}")?;
        obj.iter()
            .map(|(k, v)| {
                let n = v.as_u64().or_else(|| v.get("count").and_then(|c| c.as_u64()));
                n.map(|n| (k.clone(), n)).ok_or_else(|| format!("{k}: expected a non-negative integer"))
            })
            .collect::<std::result::Result<_, _>>()?
    } else {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').ok_or_else(|| format!("{p:?}: expected KIND=N, e.g. image=2"))?;
                let n = v.trim().parse().map_err(|_| format!("{p:?}: expected a non-negative integer"))?;
                Ok((k.trim().to_owned(), n))
            })
            .collect::<std::result::Result<_, String>>()?
    };
    for (kind, n) in pairs {
        let n = usize::try_from(n).map_err(|_| format!("{kind}: {n} is too large"))?;
        match kind.as_str() {
            "image" => limits.image = n,
            "video" => limits.video = n,
            other => return Err(format!("{other:?}: this model takes image and video")),
        }
    }
    Ok(limits)
}

/// A positive number of seconds.
fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?}: expected a positive number of seconds")),
    }
}

/// The tokenizer folder, when it is not MODEL's own: `--tokenizer` (a
/// folder, or a Hub id at `--tokenizer-revision`), or MODEL's tokenizer
/// files at `--tokenizer-revision` when MODEL is a Hub id.
fn tokenizer_dir(model: Option<&str>, vllm: &VllmFlags) -> Result<Option<PathBuf>> {
    let rev = vllm.tokenizer_revision.as_deref();
    let spec = match (&vllm.tokenizer, model) {
        (Some(t), _) => t.as_str(),
        (None, Some(m)) if rev.is_some() && !std::path::Path::new(m).is_dir() => m,
        _ => return Ok(None),
    };
    hub::resolve_with(&hub::HubConfig::from_env(), spec, rev, hub::Want::Tokenizer).map(Some)
}

/// Default HTTP workers: enough to keep `max_num_seqs` requests in the
/// engine while 2 per core fetch and preprocess media; at most 1024 (each is
/// a thread, mostly waiting).
fn default_workers(max_num_seqs: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    (max_num_seqs + 2 * cores).min(1024)
}

/// The limits on each client connection.
fn cfg_connection(args: &ServeArgs) -> tiny_http::Limits {
    tiny_http::Limits {
        head_timeout: args.http_header_timeout,
        body_timeout: args.http_body_timeout,
        write_timeout: args.http_body_timeout,
        max_connections: args.max_connections.max(1),
        ..Default::default()
    }
}

/// Loads the model, listens, prints the ready line and serves until SIGTERM
/// or SIGINT, then stops gracefully (`Server::shutdown`).
pub fn run(args: &ServeArgs) -> Result<()> {
    let model = args.model_tag.clone().or_else(|| args.model.clone());
    let root = model.clone().unwrap_or_else(|| crate::model::builtin::NAME.to_owned());
    let task = match args.task {
        TaskArg::Generate => Task::Generate,
        TaskArg::Embedding => Task::Embed,
    };
    if args.pooling.is_some() && args.task != TaskArg::Embedding {
        return Err(Error::InvalidInput("--pooling applies to --task embedding".into()));
    }
    let pooling = args.pooling.map(|p| match p {
        PoolingArg::Last => Pooling::Last,
        PoolingArg::Mean => Pooling::Mean,
        PoolingArg::Cls => Pooling::Cls,
    });
    let model_is_folder = model.as_deref().is_none_or(|m| std::path::Path::new(m).is_dir());
    // Only --dtype float32 depends on the device; opening it costs little.
    let gpu = args.vllm.dtype == Some(DtypeArg::Float32)
        && crate::tensor::Device::choose(&args.engine.device).is_ok_and(|d| d.is_cuda());
    let notes = args.vllm.check_notes(model_is_folder, gpu)?;
    for w in notes.into_iter().chain(vllm_flags::env_warnings(|k| std::env::var(k).ok())) {
        eprintln!("{w}");
    }
    let fetcher = MediaFetcher::new(args.engine.fetch_settings()?)?;
    // Listen first, so a taken port fails before the model is fetched and loads.
    let http = bind(&args.host, args.port, cfg_connection(args))?;
    let dir = model_dir(model.as_deref(), args.vllm.revision.as_deref())?;
    let tool_parser = args.tools.parser(crate::model::registry::detect(&dir)?.tool_parser)?;
    let tokenizer_dir = tokenizer_dir(model.as_deref(), &args.vllm)?;
    // After the download: until here Ctrl-C stops at once (a partial file resumes next time).
    let mut signals = Signals::install()?;
    let mut engine_cfg = EngineConfig { task, pooling, tokenizer_dir, ..args.engine.engine_config(dir)? };
    // vLLM serves a model under the name it was given on the command line.
    if engine_cfg.model_name.is_none() && model.is_some() {
        engine_cfg.model_name = Some(root.clone());
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| vllm_flags::env_alias(API_KEY_ENV[0]).map(|(_, v)| v))
        .filter(|k| !k.is_empty());
    let cfg = ServerConfig {
        api_key,
        limits: args.limit_mm_per_prompt.unwrap_or_default(),
        workers: args.workers.unwrap_or_else(|| default_workers(engine_cfg.max_num_seqs)).max(1),
        max_queue: args.max_queue,
        max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        model_root: root,
        connection: cfg_connection(args),
        engine_iteration_timeout: args.engine_iteration_timeout,
        default_seed: args.vllm.seed,
        request_log: args.vllm.request_log(),
        tool_parser,
    };
    let engine = Engine::start(engine_cfg)?;
    let (name, device) = (engine.frontend().model_name.clone(), engine.frontend().device.clone());
    let server = Server::new(http, engine, fetcher, cfg);
    let port = server.local_addr().map_or(args.port, |a| a.port());
    println!("kestrel: serving {name} on http://{}:{port} (device {device})", args.host);
    std::thread::scope(|s| {
        s.spawn(|| server.run());
        signals.wait();
        let grace = args.shutdown_timeout;
        eprintln!("kestrel: stopping: no new requests; those in flight have {} s to finish", grace.as_secs_f64());
        std::thread::spawn(move || {
            signals.wait();
            eprintln!("kestrel: a second signal: exiting now");
            std::process::exit(1);
        });
        server.shutdown(grace);
    });
    eprintln!("kestrel: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn limits_take_both_forms() {
        let l = |s: &str| parse_limits(s);
        assert_eq!(l("image=2,video=1"), Ok(MediaLimits { image: 2, video: 1 }));
        assert_eq!(l("image=3"), Ok(MediaLimits { image: 3, video: 999 }));
        assert_eq!(l(r#"{"image":2}"#), Ok(MediaLimits { image: 2, video: 999 }));
        assert_eq!(l(r#"{"video": {"count": 0}}"#), Ok(MediaLimits { image: 999, video: 0 }));
        assert!(l("audio=1").unwrap_err().contains("image and video"));
        assert!(l("image").unwrap_err().contains("KIND=N"));
        assert!(l(r#"{"image": -1}"#).unwrap_err().contains("non-negative"));
        assert!(l("{").unwrap_err().contains("invalid JSON"));
    }

    #[test]
    fn vllm_command_lines_parse() {
        let cli = Cli::parse_from([
            "serve",
            "some-org/some-vlm",
            "--max-model-len",
            "4096",
            "--limit-mm-per-prompt",
            r#"{"image":2}"#,
            "--trust-remote-code",
        ]);
        let s = cli.serve;
        assert_eq!(s.model_tag.as_deref(), Some("some-org/some-vlm"));
        assert_eq!(
            (s.engine.max_model_len, s.limit_mm_per_prompt),
            (Some(4096), Some(MediaLimits { image: 2, video: 999 }))
        );
        assert!(s.trust_remote_code);
        assert_eq!((s.host.as_str(), s.port, s.task), ("0.0.0.0", 8000, TaskArg::Generate));

        let s =
            Cli::parse_from(["serve", "--model", "m", "--task", "embed", "--pooling", "last", "--api-key", "k"]).serve;
        assert_eq!((s.model.as_deref(), s.task, s.pooling), (Some("m"), TaskArg::Embedding, Some(PoolingArg::Last)));
        assert_eq!(s.api_key.as_deref(), Some("k"));
        assert!(Cli::try_parse_from(["serve", "a", "--model", "b"]).is_err());
        assert!(Cli::try_parse_from(["serve", "--task", "classify"]).is_err());
    }
}

//! Flags of `vllm serve` that Kestrel takes for a vLLM user's command line
//! (vllm/engine/arg_utils.py, vllm/entrypoints/openai/cli_args.py). Each is
//! implemented or refused at start with the reason (`VllmFlags::check`);
//! none is accepted and then ignored. The README's "vLLM flags" table lists
//! them, and tests/cli.rs checks the table against `kestrel serve --help`.
//!
//! Also here: vLLM's environment variables that alias Kestrel's
//! (`env_alias`); Kestrel's own wins when both are set.

use std::path::Path;

use crate::error::{Error, Result};

/// vLLM's names for the environment variables Kestrel reads: (ours, vLLM's).
pub const ENV_ALIASES: [(&str, &str); 3] = [
    ("KESTREL_API_KEY", "VLLM_API_KEY"),
    ("KESTREL_IMAGE_FETCH_TIMEOUT", "VLLM_IMAGE_FETCH_TIMEOUT"),
    ("KESTREL_VIDEO_FETCH_TIMEOUT", "VLLM_VIDEO_FETCH_TIMEOUT"),
];

/// vLLM variables Kestrel has no counterpart for; a warning names each one
/// set, so none is silently ignored. (None today.)
pub const ENV_UNSUPPORTED: [(&str, &str); 0] = [];

/// The value of `ours`, else of its vLLM alias: (the variable read, its value).
pub fn env_alias(ours: &str) -> Option<(&'static str, String)> {
    let (o, v) = ENV_ALIASES.iter().find(|(o, _)| *o == ours)?;
    env_alias_with(o, v, |k| std::env::var(k).ok())
}

/// `env_alias` over any lookup (tests pass a map).
pub fn env_alias_with(
    ours: &'static str,
    vllm: &'static str,
    get: impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, String)> {
    get(ours).map(|v| (ours, v)).or_else(|| get(vllm).map(|v| (vllm, v)))
}

/// Warnings for set vLLM variables that Kestrel does not honour.
pub fn env_warnings(get: impl Fn(&str) -> Option<String>) -> Vec<String> {
    ENV_UNSUPPORTED
        .iter()
        .filter(|(name, _)| get(name).is_some())
        .map(|(name, why)| format!("kestrel: warning: {name} is set but not used: {why}"))
        .collect()
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    Auto,
    #[value(alias = "bf16")]
    Bfloat16,
    #[value(alias = "half")]
    Float16,
    #[value(alias = "float")]
    Float32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Critical,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

/// What the request log writes (one stderr line per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestLog {
    Off,
    /// Every request.
    All,
    /// Requests answered with status 400 or above.
    Failures,
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct VllmFlags {
    /// Weights and activations dtype. auto and bfloat16 (bf16): bf16 on the
    /// GPU, f32 on the CPU reference. float32 (float): CPU only (what the CPU
    /// runs); refused on the GPU, which computes in bf16. float16 (half):
    /// refused, the GPU path computes in bf16 end to end.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Default seed of requests that give none: each unseeded request samples
    /// from a generator derived from (this seed, the request's arrival
    /// number), so unseeded sampling repeats across restarts for the same
    /// request order. Without it, unseeded requests draw fresh entropy.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Tokenizer folder or Hugging Face id instead of the model's
    /// (tokenizer.json and its tokenizer_config.json); the chat template is
    /// taken from it when it has one, else from the model.
    #[arg(long, value_name = "DIR_OR_ID")]
    pub tokenizer: Option<String>,
    /// Branch, tag or commit of a Hugging Face MODEL (default: main). With
    /// a local folder it has no effect, as in vLLM (a note says so).
    #[arg(long)]
    pub revision: Option<String>,
    /// Branch, tag or commit of the tokenizer: of --tokenizer when it is a
    /// Hugging Face id, else of MODEL's tokenizer files (default: main).
    /// With a local folder it has no effect (a note says so).
    #[arg(long)]
    pub tokenizer_revision: Option<String>,
    /// Accepted without effect (a note says so): Kestrel runs no code from
    /// the model repo.
    #[arg(long)]
    pub code_revision: Option<String>,
    /// Refused: Kestrel has no prefix cache yet.
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Accepted: no prefix caching is what Kestrel does.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Turn the request log off (one stderr line per request, on by default).
    #[arg(long, conflicts_with = "enable_log_requests")]
    pub disable_log_requests: bool,
    /// Turn the request log on (the default).
    #[arg(long)]
    pub enable_log_requests: bool,
    /// Request log verbosity: info, debug, trace: a line per request;
    /// warning, error, critical: only requests answered 400 or above.
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub uvicorn_log_level: Option<LogLevel>,
    /// KV cache dtype: auto (the activation dtype) only; fp8, fp8_e4m3 and
    /// fp8_e5m2 are refused (no fp8 KV cache kernels).
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// Refused: Kestrel serves bf16/f16/f32 checkpoints only.
    #[arg(long, short = 'q')]
    pub quantization: Option<String>,
    /// 1 only: Kestrel runs one GPU per process; more is refused (also -tp).
    #[arg(long)]
    pub tensor_parallel_size: Option<usize>,
}

/// vLLM's one-dash long spelling `-tp N` (argparse takes it; clap has no
/// multi-letter short flags) as `--tensor-parallel-size N`.
pub fn rewrite_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-tp") => "--tensor-parallel-size".into(),
            Some(s) if s.starts_with("-tp=") => format!("--tensor-parallel-size={}", &s[4..]).into(),
            _ => a,
        })
        .collect()
}

impl VllmFlags {
    /// Refuses what Kestrel cannot do, with the reason. `model_is_folder`:
    /// MODEL names a local folder (or is left out: the built-in model);
    /// `gpu`: the engine will run on the GPU.
    pub fn check(&self, model_is_folder: bool, gpu: bool) -> Result<()> {
        self.check_notes(model_is_folder, gpu).map(|_| ())
    }

    /// `check`, and the notes to print for flags accepted without effect.
    pub fn check_notes(&self, model_is_folder: bool, gpu: bool) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let refuse = |msg: String| Err(Error::InvalidInput(msg));
        match self.dtype {
            Some(DtypeArg::Float16) => {
                return refuse(
                    "--dtype float16 is not supported: Kestrel's GPU path computes in bfloat16 end to end \
                     (use --dtype auto or bfloat16)"
                        .into(),
                )
            }
            Some(DtypeArg::Float32) if gpu => {
                return refuse(
                    "--dtype float32 is not supported on the GPU, which computes in bfloat16; \
                     float32 is what --device cpu runs"
                        .into(),
                )
            }
            _ => {}
        }
        let tokenizer_is_folder = self.tokenizer.as_ref().map_or(model_is_folder, |t| Path::new(t).is_dir());
        if self.revision.is_some() && model_is_folder {
            notes.push("kestrel: note: --revision has no effect: MODEL is a local folder, served as it is".into());
        }
        if self.tokenizer_revision.is_some() && tokenizer_is_folder {
            notes.push("kestrel: note: --tokenizer-revision has no effect: the tokenizer is a local folder".into());
        }
        if self.code_revision.is_some() {
            notes.push("kestrel: note: --code-revision has no effect: Kestrel runs no code from the model repo".into());
        }
        if self.enable_prefix_caching {
            return refuse("--enable-prefix-caching is not supported: Kestrel has no prefix cache yet".into());
        }
        match self.kv_cache_dtype.as_deref() {
            None | Some("auto") => {}
            Some(d @ ("fp8" | "fp8_e4m3" | "fp8_e5m2")) => {
                return refuse(format!(
                    "--kv-cache-dtype {d} is not supported: Kestrel's KV cache holds the activation dtype \
                     (use auto)"
                ))
            }
            Some(d) => return refuse(format!("--kv-cache-dtype {d:?}: expected auto, fp8, fp8_e4m3 or fp8_e5m2")),
        }
        if let Some(q) = &self.quantization {
            return refuse(format!(
                "--quantization {q} is not supported: Kestrel serves bf16/f16/f32 checkpoints only"
            ));
        }
        match self.tensor_parallel_size {
            None | Some(1) => {}
            Some(n) => {
                return refuse(format!(
                    "--tensor-parallel-size {n} is not supported: Kestrel runs one GPU per process (use 1)"
                ))
            }
        }
        Ok(notes)
    }

    /// The request log these flags ask for.
    pub fn request_log(&self) -> RequestLog {
        if self.disable_log_requests {
            return RequestLog::Off;
        }
        match self.uvicorn_log_level {
            Some(LogLevel::Warning | LogLevel::Error | LogLevel::Critical) => RequestLog::Failures,
            _ => RequestLog::All,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        f: VllmFlags,
    }

    fn parse(args: &[&str]) -> VllmFlags {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().f
    }

    /// The refusal of `args` (folder model, on the CPU unless `gpu`).
    fn refusal(args: &[&str], folder: bool, gpu: bool) -> String {
        parse(args).check(folder, gpu).unwrap_err().to_string()
    }

    fn ok(args: &[&str], folder: bool, gpu: bool) {
        parse(args).check(folder, gpu).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }

    #[test]
    fn dtype() {
        for d in ["auto", "bfloat16", "bf16"] {
            ok(&["--dtype", d], true, true);
            ok(&["--dtype", d], true, false);
        }
        ok(&["--dtype", "float32"], true, false);
        ok(&["--dtype", "float"], true, false);
        assert!(refusal(&["--dtype", "float32"], true, true).contains("bfloat16"));
        for d in ["float16", "half"] {
            assert!(refusal(&["--dtype", d], true, false).contains("end to end"));
        }
        assert!(Cli::try_parse_from(["x", "--dtype", "int8"]).is_err());
    }

    #[test]
    fn revisions_apply_to_hub_ids_and_say_when_they_do_not() {
        for f in ["--revision", "--tokenizer-revision", "--code-revision"] {
            let notes = parse(&[f, "main"]).check_notes(true, false).unwrap();
            assert!(notes.len() == 1 && notes[0].contains(f) && notes[0].contains("no effect"), "{notes:?}");
        }
        for f in ["--revision", "--tokenizer-revision"] {
            assert_eq!(parse(&[f, "v1"]).check_notes(false, false).unwrap(), Vec::<String>::new());
        }
        // A folder tokenizer takes no revision, whatever MODEL is.
        let tmp = std::env::temp_dir();
        let notes = parse(&["--tokenizer", tmp.to_str().unwrap(), "--tokenizer-revision", "v1"]);
        assert!(notes.check_notes(false, false).unwrap()[0].contains("tokenizer is a local folder"));
        let notes = parse(&["--code-revision", "v1"]).check_notes(false, false).unwrap();
        assert!(notes[0].contains("runs no code"), "{notes:?}");
    }

    #[test]
    fn prefix_caching() {
        assert!(refusal(&["--enable-prefix-caching"], true, false).contains("no prefix cache"));
        ok(&["--no-enable-prefix-caching"], true, false);
        // The last of the pair wins, as with vLLM's BooleanOptionalAction.
        ok(&["--enable-prefix-caching", "--no-enable-prefix-caching"], true, false);
    }

    #[test]
    fn kv_cache_dtype_quantization_tp() {
        ok(&["--kv-cache-dtype", "auto"], true, true);
        for d in ["fp8", "fp8_e4m3", "fp8_e5m2"] {
            assert!(refusal(&["--kv-cache-dtype", d], true, true).contains("activation dtype"));
        }
        assert!(refusal(&["--kv-cache-dtype", "int4"], true, true).contains("expected auto"));
        assert!(refusal(&["--quantization", "awq"], true, true).contains("bf16/f16/f32"));
        assert!(refusal(&["-q", "fp8"], true, true).contains("bf16/f16/f32"));
        ok(&["--tensor-parallel-size", "1"], true, true);
        let tp = |args: &[&str]| {
            let argv = rewrite_args(["x"].iter().chain(args).map(|s| std::ffi::OsString::from(*s)));
            Cli::try_parse_from(argv).unwrap().f.check(true, true)
        };
        tp(&["-tp", "1"]).unwrap();
        tp(&["-tp=1"]).unwrap();
        assert!(refusal(&["--tensor-parallel-size", "2"], true, true).contains("one GPU per process"));
        assert!(tp(&["-tp", "4"]).unwrap_err().to_string().contains("one GPU per process"));
    }

    #[test]
    fn request_log_levels() {
        assert_eq!(parse(&[]).request_log(), RequestLog::All);
        assert_eq!(parse(&["--enable-log-requests"]).request_log(), RequestLog::All);
        assert_eq!(parse(&["--disable-log-requests"]).request_log(), RequestLog::Off);
        assert!(Cli::try_parse_from(["x", "--disable-log-requests", "--enable-log-requests"]).is_err());
        for (l, want) in [
            ("critical", RequestLog::Failures),
            ("error", RequestLog::Failures),
            ("warning", RequestLog::Failures),
            ("info", RequestLog::All),
            ("debug", RequestLog::All),
            ("trace", RequestLog::All),
        ] {
            assert_eq!(parse(&["--uvicorn-log-level", l]).request_log(), want, "{l}");
        }
        let f = parse(&["--uvicorn-log-level", "info", "--disable-log-requests"]);
        assert_eq!(f.request_log(), RequestLog::Off);
    }

    #[test]
    fn seed_and_tokenizer_parse() {
        let f = parse(&["--seed", "42", "--tokenizer", "/t"]);
        assert_eq!((f.seed, f.tokenizer.as_deref()), (Some(42), Some("/t")));
        ok(&["--seed", "42"], true, true);
    }

    #[test]
    fn env_aliases_ours_wins() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let (o, v) = ("KESTREL_IMAGE_FETCH_TIMEOUT", "VLLM_IMAGE_FETCH_TIMEOUT");
        assert_eq!(env_alias_with(o, v, env(&[("VLLM_IMAGE_FETCH_TIMEOUT", "3")])), Some((v, "3".into())));
        let both = env(&[("VLLM_IMAGE_FETCH_TIMEOUT", "3"), ("KESTREL_IMAGE_FETCH_TIMEOUT", "7")]);
        assert_eq!(env_alias_with(o, v, both), Some((o, "7".into())));
        assert_eq!(env_alias_with(o, v, env(&[])), None);
        // The video timeout is an alias now, so no longer warned about.
        let (o, v) = ("KESTREL_VIDEO_FETCH_TIMEOUT", "VLLM_VIDEO_FETCH_TIMEOUT");
        assert_eq!(env_alias_with(o, v, env(&[("VLLM_VIDEO_FETCH_TIMEOUT", "3")])), Some((v, "3".into())));
        assert!(env_warnings(env(&[("VLLM_VIDEO_FETCH_TIMEOUT", "3")])).is_empty());
        assert!(env_warnings(env(&[])).is_empty());
    }
}

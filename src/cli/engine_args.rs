//! Engine and media flags shared by `kestrel generate` and `kestrel
//! serve`, under vLLM's names (`vllm serve --help`, vllm/engine/arg_utils.py
//! `EngineArgs`). A flag left out keeps `EngineConfig::default()`.

use std::path::PathBuf;

use crate::engine::EngineConfig;
use crate::error::Result;
use crate::multimodal::fetch::FetchSettings;
use crate::multimodal::video::VideoSampling;

#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// cuda, cpu, or auto (cuda when a GPU is usable).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Name the model is reported under (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest prompt + completion in tokens (default: the model's, capped by the KV cache).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens (prompt chunks + decodes) in one step.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV cache block.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Share of GPU memory the engine may use (weights, activations, KV cache), in (0, 1].
    #[arg(long)]
    pub gpu_memory_utilization: Option<f32>,
    /// KV cache size on the CPU backend, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
    #[arg(long, default_value_t = 4.0)]
    pub cpu_kv_cache_space: f64,
    /// Chat template file (or template text) instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Run every step eagerly: no CUDA graphs for decode steps.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Directory that file:// URLs and absolute paths in requests may read media from
    /// (default: local media is refused).
    #[arg(long)]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Hosts that http(s) media URLs may name (default: any).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub allowed_media_domains: Option<Vec<String>>,
    /// Settings over the model's processor config, as JSON (per family:
    /// Qwen2-VL `min_pixels`/`max_pixels`, Phi-3.5-vision `num_crops`;
    /// LLaVA none). Unknown keys are refused.
    #[arg(long, value_name = "JSON")]
    pub mm_processor_kwargs: Option<String>,
    /// Let http(s) media URLs reach loopback, private and link-local addresses
    /// (default: only public addresses; cloud metadata endpoints are always refused).
    #[arg(long)]
    pub allow_private_media_urls: bool,
    /// How media files are loaded, per modality, as JSON: video files take
    /// `num_frames` (frames kept, spread evenly; -1 all; default 32) and
    /// `fps` (most frames kept per second; default no cap), e.g.
    /// '{"video": {"num_frames": 16}}'. Other keys are refused.
    #[arg(long, value_name = "JSON")]
    pub media_io_kwargs: Option<String>,
}

impl EngineArgs {
    /// The engine settings for the model in `model_dir`.
    pub fn engine_config(&self, model_dir: PathBuf) -> Result<EngineConfig> {
        let d = EngineConfig::default();
        let space = self.cpu_kv_cache_space;
        if !(space.is_finite() && space > 0.0) {
            return Err(crate::Error::InvalidInput(format!(
                "--cpu-kv-cache-space must be a positive number of GiB, got {space}"
            )));
        }
        Ok(EngineConfig {
            model_dir,
            model_name: self.served_model_name.clone(),
            device: self.device.clone(),
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs.unwrap_or(d.max_num_seqs),
            max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(d.max_num_batched_tokens),
            block_size: self.block_size.unwrap_or(d.block_size),
            gpu_memory_utilization: self.gpu_memory_utilization.unwrap_or(d.gpu_memory_utilization),
            cpu_kv_cache_bytes: (space * (1u64 << 30) as f64) as usize,
            chat_template: self.chat_template.clone(),
            enforce_eager: self.enforce_eager,
            mm_processor_kwargs: self.processor_kwargs()?,
            ..d
        })
    }

    /// `--mm-processor-kwargs` as a JSON object (empty when absent).
    pub fn processor_kwargs(&self) -> Result<crate::model::ProcessorKwargs> {
        let Some(j) = &self.mm_processor_kwargs else { return Ok(Default::default()) };
        let bad = |m: String| crate::Error::InvalidInput(format!("--mm-processor-kwargs: {m}"));
        match serde_json::from_str::<serde_json::Value>(j).map_err(|e| bad(format!("not valid JSON ({e})")))? {
            serde_json::Value::Object(o) => Ok(o),
            other => Err(bad(format!("expected a JSON object such as {{\"num_crops\": 4}}, got {other}"))),
        }
    }

    /// Where request media may come from and how video files are sampled:
    /// these flags, and the fetch timeouts from KESTREL_IMAGE_FETCH_TIMEOUT
    /// and KESTREL_VIDEO_FETCH_TIMEOUT.
    pub fn fetch_settings(&self) -> Result<FetchSettings> {
        let video_sampling = match &self.media_io_kwargs {
            Some(j) => video_sampling(j).map_err(|m| crate::Error::InvalidInput(format!("--media-io-kwargs: {m}")))?,
            None => VideoSampling::default(),
        };
        Ok(FetchSettings {
            allowed_local_media_path: self.allowed_local_media_path.clone(),
            allowed_domains: self.allowed_media_domains.clone(),
            allow_private_addresses: self.allow_private_media_urls,
            video_sampling,
            ..FetchSettings::from_env()?
        })
    }
}

/// vLLM's `--media-io-kwargs` (a JSON object of per-modality objects, the
/// keyword arguments of `VideoMediaIO` and the loader's `load_bytes`): the
/// `video` keys Kestrel implements, `num_frames` and `fps`; every other key
/// is refused by name with the reason.
fn video_sampling(json: &str) -> std::result::Result<VideoSampling, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or_else(|| format!("expected a JSON object such as {EXAMPLE}, got {v}"))?;
    let mut out = VideoSampling::default();
    for (modality, kwargs) in obj {
        if modality != "video" {
            return Err(format!(
                "{modality:?}: Kestrel has loading options for video files only (`video`: num_frames, fps)"
            ));
        }
        let kwargs = kwargs.as_object().ok_or_else(|| format!("`video` must be an object such as {EXAMPLE}"))?;
        for (k, val) in kwargs {
            match k.as_str() {
                "num_frames" => match val.as_i64() {
                    Some(n) if n == -1 || n > 0 => out.num_frames = n,
                    _ => return Err(format!("video num_frames must be an integer > 0, or -1 for all, got {val}")),
                },
                "fps" => match val.as_f64() {
                    Some(f) if f > 0.0 || f == -1.0 => out.fps = f,
                    _ => return Err(format!("video fps must be a number > 0, or -1 for no cap, got {val}")),
                },
                "video_backend" => return Err("video video_backend: Kestrel has one video decoder (OpenH264)".into()),
                "max_duration" | "frame_recovery" => {
                    return Err(format!(
                        "video {k}: not implemented (only vLLM's opencv_dynamic/recovery loaders take it)"
                    ))
                }
                other => return Err(format!("video {other:?}: unknown; Kestrel takes num_frames and fps")),
            }
        }
    }
    Ok(out)
}

const EXAMPLE: &str = r#"{"video": {"num_frames": 16}}"#;

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn flags_map_onto_the_config() {
        let cli = Cli::parse_from([
            "x",
            "--device",
            "cpu",
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "512",
            "--block-size",
            "32",
            "--gpu-memory-utilization",
            "0.5",
            "--cpu-kv-cache-space",
            "0.5",
            "--chat-template",
            "t.jinja",
            "--served-model-name",
            "tiny",
            "--allowed-media-domains",
            "a.com,b.org",
            "--allow-private-media-urls",
        ]);
        let c = cli.engine.engine_config(PathBuf::from("/m")).unwrap();
        assert_eq!(c.model_dir, PathBuf::from("/m"));
        assert_eq!((c.device.as_str(), c.model_name.as_deref()), ("cpu", Some("tiny")));
        assert_eq!((c.max_model_len, c.max_num_seqs, c.max_num_batched_tokens), (Some(2048), 8, 512));
        assert_eq!((c.block_size, c.gpu_memory_utilization, c.cpu_kv_cache_bytes), (32, 0.5, 512 << 20));
        assert_eq!(c.chat_template.as_deref(), Some("t.jinja"));
        let f = cli.engine.fetch_settings().unwrap();
        assert_eq!(f.allowed_domains, Some(vec!["a.com".to_string(), "b.org".to_string()]));
        assert_eq!(f.allowed_local_media_path, None);
        assert!(f.allow_private_addresses);
        assert_eq!(f.video_sampling, VideoSampling::default());
    }

    #[test]
    fn media_io_kwargs_set_video_sampling_and_refuse_the_rest() {
        let s = |j: &str| Cli::parse_from(["x", "--media-io-kwargs", j]).engine.fetch_settings();
        let got = s(r#"{"video": {"num_frames": 8, "fps": 2}}"#).unwrap().video_sampling;
        assert_eq!(got, VideoSampling { num_frames: 8, fps: 2.0 });
        assert_eq!(s(r#"{"video": {"num_frames": -1}}"#).unwrap().video_sampling.num_frames, -1);
        for (j, why) in [
            ("[1]", "expected a JSON object"),
            ("{", "not valid JSON"),
            (r#"{"image": {}}"#, "\"image\": Kestrel has loading options for video files only"),
            (r#"{"video": 3}"#, "`video` must be an object"),
            (r#"{"video": {"num_frames": 0}}"#, "num_frames must be an integer > 0, or -1"),
            (r#"{"video": {"num_frames": 2.5}}"#, "num_frames must be an integer"),
            (r#"{"video": {"fps": 0}}"#, "fps must be a number > 0"),
            (r#"{"video": {"video_backend": "opencv"}}"#, "one video decoder"),
            (r#"{"video": {"max_duration": 10}}"#, "max_duration: not implemented"),
            (r#"{"video": {"frames": 10}}"#, "\"frames\": unknown"),
        ] {
            let e = s(j).unwrap_err().to_string();
            assert!(e.starts_with("--media-io-kwargs: ") && e.contains(why), "{j}: {e}");
        }
    }

    #[test]
    fn left_out_flags_keep_the_defaults() {
        let c = Cli::parse_from(["x"]).engine.engine_config(PathBuf::from("/m")).unwrap();
        let d = EngineConfig::default();
        assert_eq!((c.device.as_str(), c.max_model_len, c.max_num_seqs), ("auto", None, d.max_num_seqs));
        assert_eq!((c.block_size, c.gpu_memory_utilization), (d.block_size, d.gpu_memory_utilization));
        assert_eq!(c.cpu_kv_cache_bytes, 4 << 30);
        assert!(!Cli::parse_from(["x"]).engine.fetch_settings().unwrap().allow_private_addresses);
        let bad = Cli::parse_from(["x", "--cpu-kv-cache-space", "0"]).engine.engine_config(PathBuf::new());
        assert!(bad.unwrap_err().to_string().contains("--cpu-kv-cache-space"));
    }
}

//! The OpenAI-compatible HTTP server behind `kestrel serve`, mirroring vLLM's
//! (vllm/entrypoints/openai/api_server.py and the serving_*.py handlers):
//! the same routes, request fields, response shapes and error statuses.
//!
//! ```text
//! tiny_http listener ─► N worker threads, each looping on recv():
//!   route ─► API key ─► in-flight bound (429) ─► body (cap, 413) ─► JSON
//!   ─► model/task/limits ─► media: fetch, decode, preprocess ─► engine.submit
//!   ─► wait on the request's event channel ─► JSON, or SSE chunks as they come
//! engine thread (owns the device): steps the batch, sends each request's events
//! ```
//!
//! - `routes`   dispatch, auth, the in-flight bound, catch_unwind → 500
//! - `http`     bodies, replies, errors, the SSE writer
//! - `generate` /v1/chat/completions and /v1/completions, streaming or not
//! - `embed`    /v1/embeddings
//! - `info`     /v1/models, /health, /version, /tokenize, /detokenize
//! - `metrics`  /metrics (Prometheus text)
//!
//! A worker holds its request from accept to the last byte written, so at
//! most `workers` requests are handled at once: that is also how many the
//! engine can batch from HTTP clients.

mod embed;
mod generate;
mod http;
mod info;
pub mod metrics;
mod routes;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::{Engine, Frontend, Task};
use crate::error::{Error, Result};
use crate::model::qwen2_vl::inputs::{Pixels, PreparedInput};
use crate::model::qwen2_vl::mrope::rope_index;
use crate::multimodal::fetch::MediaFetcher;
use crate::openai::MediaRef;
use http::ApiError;
use metrics::Metrics;

/// Largest request body read (checked from Content-Length and while reading).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

/// Most media items of each kind one prompt may hold (vLLM's
/// `--limit-mm-per-prompt`). vLLM V1 defaults to 999 per modality, and so
/// do we.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaLimits {
    pub image: usize,
    pub video: usize,
}

impl Default for MediaLimits {
    fn default() -> Self {
        MediaLimits { image: 999, video: 999 }
    }
}

/// Server settings (the engine's are in `EngineConfig`).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// When set, /v1 routes need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub limits: MediaLimits,
    /// HTTP worker threads.
    pub workers: usize,
    /// Generation and embedding requests handled at once before more are
    /// answered 429; None: no bound beyond `workers`.
    pub max_queue: Option<usize>,
    pub max_body_bytes: usize,
    /// The model as given on the command line (/v1/models `root`).
    pub model_root: String,
}

/// What every worker shares.
pub(crate) struct State {
    pub engine: Engine,
    pub fetcher: MediaFetcher,
    pub cfg: ServerConfig,
    pub metrics: Metrics,
    /// Generation and embedding requests being handled now.
    pub in_flight: AtomicUsize,
    /// Unix seconds at start (/v1/models `created`).
    pub started: u64,
    id_prefix: String,
    next_id: AtomicU64,
}

/// Unix time in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl State {
    pub fn frontend(&self) -> &Frontend {
        self.engine.frontend()
    }

    /// A fresh response id: `prefix-<start time><counter>` in hex.
    pub fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}{:08x}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// 404 unless `model` is absent or the served name (vLLM `_check_model`).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.frontend().model_name => {
                Err(ApiError::new(404, format!("The model `{m}` does not exist."), Some("model_not_found")))
            }
            _ => Ok(()),
        }
    }

    /// 400 when the engine runs the other task. `api` names the endpoint.
    pub fn check_task(&self, want: Task, api: &str) -> Result<(), ApiError> {
        let msg = match (self.frontend().task, want) {
            (Task::Embed, Task::Generate) => format!(
                "The model does not support the {api}: this server runs it for the embedding task \
                 (--task embedding); use /v1/embeddings, or start it with --task generate"
            ),
            (Task::Generate, Task::Embed) => format!(
                "The model does not support the {api}: this server runs it for the generate task; \
                 start it with --task embedding to serve embeddings"
            ),
            _ => return Ok(()),
        };
        Err(ApiError::bad_request(msg))
    }

    /// 400 when a prompt holds more media of a kind than allowed; checked
    /// before anything is fetched.
    pub fn check_media_limits(&self, media: &[MediaRef]) -> Result<(), ApiError> {
        let images = media.iter().filter(|m| matches!(m, MediaRef::Image(_) | MediaRef::ImageEmbeds(_))).count();
        let videos = media.iter().filter(|m| matches!(m, MediaRef::Video(_))).count();
        for (kind, n, limit) in [("image", images, self.cfg.limits.image), ("video", videos, self.cfg.limits.video)] {
            if n > limit {
                return Err(ApiError::bad_request(format!(
                    "At most {limit} {kind}(s) may be provided in one prompt; this request has {n} \
                     (--limit-mm-per-prompt)"
                )));
            }
        }
        Ok(())
    }

    /// Engine input for a text-only prompt given as token ids: ids must be
    /// in the model's vocabulary and hold no image or video placeholders.
    pub fn token_input(&self, ids: Vec<u32>) -> Result<PreparedInput, ApiError> {
        let f = self.frontend();
        let vocab = f.config.text_config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::bad_request(format!("token id {bad} is out of vocabulary (size {vocab})")));
        }
        if ids.iter().any(|&id| id == f.config.image_token_id || id == f.config.video_token_id) {
            return Err(ApiError::bad_request(
                "a text prompt may not hold image or video placeholder tokens; send media as content parts".into(),
            ));
        }
        let c = &f.config;
        let (positions, rope_delta) =
            rope_index(&ids, &[], &[], f.merge, c.image_token_id, c.video_token_id, c.vision_start_token_id)?;
        let prompt = f.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok(PreparedInput {
            prompt,
            input_ids: ids,
            positions,
            rope_delta,
            images: Pixels::default(),
            image_embeds: Vec::new(),
            videos: Pixels::default(),
        })
    }

    /// Engine input for a text-only prompt.
    pub fn text_input(&self, text: &str, add_special_tokens: bool) -> Result<PreparedInput, ApiError> {
        let ids = self.frontend().tokenizer.encode_with(text, add_special_tokens)?;
        self.token_input(ids)
    }
}

/// The bound listener.
pub fn bind(host: &str, port: u16) -> Result<tiny_http::Server> {
    let addr = format!("{host}:{port}");
    tiny_http::Server::http(&addr)
        .map_err(|e| Error::Io { path: format!("listening on {addr}"), source: std::io::Error::other(e.to_string()) })
}

/// A listener, the engine, and the workers that join them.
pub struct Server {
    http: tiny_http::Server,
    state: Arc<State>,
    stopping: AtomicBool,
}

impl Server {
    pub fn new(http: tiny_http::Server, engine: Engine, fetcher: MediaFetcher, cfg: ServerConfig) -> Server {
        let metrics = Metrics::new(&engine.frontend().model_name);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let state = State {
            engine,
            fetcher,
            cfg,
            metrics,
            in_flight: AtomicUsize::new(0),
            started: unix_now(),
            id_prefix: format!("{nanos:x}"),
            next_id: AtomicU64::new(0),
        };
        Server { http, state: Arc::new(state), stopping: AtomicBool::new(false) }
    }

    /// The address the listener is bound to (the real port when 0 was asked).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.server_addr().to_ip()
    }

    /// Serves on `workers` threads until `stop` is called.
    pub fn run(&self) {
        let workers = self.state.cfg.workers.max(1);
        std::thread::scope(|s| {
            for i in 0..workers {
                let spawned =
                    std::thread::Builder::new().name(format!("kestrel-http-{i}")).spawn_scoped(s, || self.worker());
                if let Err(e) = spawned {
                    eprintln!("kestrel: could not start HTTP worker {i}: {e}");
                }
            }
        });
    }

    /// Makes `run` return once the requests in hand are answered.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..self.state.cfg.workers.max(1) {
            self.http.unblock();
        }
    }

    fn worker(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            match self.http.recv() {
                Ok(rq) => {
                    // routes::handle catches panics of the request's own
                    // handling; this one keeps the worker alive whatever happens.
                    let state = &self.state;
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| routes::handle(state, rq))).is_err() {
                        eprintln!("kestrel: a request's handling panicked; the worker goes on");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Accept errors (out of file descriptors, ...): wait a little and go on.
                    eprintln!("kestrel: accepting a connection failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}

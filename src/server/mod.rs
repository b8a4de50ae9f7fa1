//! The OpenAI-compatible HTTP server behind `kestrel serve`, mirroring vLLM's
//! (vllm/entrypoints/openai/api_server.py and the serving_*.py handlers):
//! the same routes, request fields, response shapes and error statuses.
//!
//! ```text
//! tiny_http listener: a thread per connection reads request heads (size
//!   cap 431, deadline 408, at most --max-connections open, 503 past it)
//! ─► N worker threads, each looping on recv():
//!   route ─► draining (503) ─► API key ─► in-flight bound (429)
//!   ─► body (cap 413, deadline 408) ─► JSON
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
//! - `shutdown` SIGTERM/SIGINT: stop accepting, drain, abort past the grace
//!
//! A worker holds its request from accept to the last byte written, so at
//! most `workers` requests are handled at once: that is also how many the
//! engine can batch from HTTP clients. A slow client holds a worker only
//! while its body arrives (at most the body timeout); one slow to send its
//! head holds only its connection's thread. A non-streaming request whose
//! client closes the connection is aborted in the engine within a poll
//! interval; a stream's, at its next write.

mod embed;
mod generate;
mod http;
mod info;
pub mod metrics;
mod routes;
pub mod shutdown;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::{Engine, Frontend, Task};
use crate::error::{Error, Result};
use crate::model::inputs::PreparedInput;
use crate::multimodal::fetch::MediaFetcher;
use crate::openai::MediaRef;
use http::ApiError;
use metrics::Metrics;

pub use crate::cli::vllm_flags::RequestLog;

/// What the request log says of the request a worker thread handles now:
/// filled in by the handlers as they learn it, written by `routes::handle`
/// after the answer. Never the prompt's text.
#[derive(Clone, Debug, Default)]
pub(crate) struct LogNote {
    pub id: Option<String>,
    pub prompt_tokens: Option<usize>,
    pub output_tokens: Option<usize>,
    pub media: usize,
    pub ttft: Option<Duration>,
}

thread_local! {
    static NOTE: std::cell::RefCell<LogNote> = std::cell::RefCell::default();
}

/// Updates the log note of this thread's request.
pub(crate) fn note(f: impl FnOnce(&mut LogNote)) {
    NOTE.with(|n| f(&mut n.borrow_mut()));
}

/// Takes this thread's log note, leaving an empty one.
pub(crate) fn take_note() -> LogNote {
    NOTE.with(|n| std::mem::take(&mut *n.borrow_mut()))
}

/// The seed of the `n`th unseeded request under server seed `seed`
/// (SplitMix64 of the pair: distinct per request, the same across restarts).
pub fn derived_seed(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

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
    /// What one client connection may hold (head size and time, body time,
    /// connections open).
    pub connection: tiny_http::Limits,
    /// /health answers 503 once the engine thread has spent this long in one
    /// iteration (vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S, 60 s).
    pub engine_iteration_timeout: Duration,
    /// vLLM's `--seed`: unseeded requests sample with a seed derived from
    /// (this, the request's arrival number); None: fresh entropy.
    pub default_seed: Option<u64>,
    /// The request log on stderr (vLLM's `--disable-log-requests`,
    /// `--uvicorn-log-level`).
    pub request_log: RequestLog,
    /// How `tool_choice: "auto"` answers are read for calls (`hermes`);
    /// None: such requests are refused.
    pub tool_parser: Option<&'static str>,
}

/// What every worker shares.
pub(crate) struct State {
    pub engine: Engine,
    pub fetcher: MediaFetcher,
    pub cfg: ServerConfig,
    pub metrics: Metrics,
    /// Generation and embedding requests being handled now.
    pub in_flight: AtomicUsize,
    /// Set on SIGTERM/SIGINT: new requests are answered 503.
    pub draining: AtomicBool,
    /// Unix seconds at start (/v1/models `created`).
    pub started: u64,
    id_prefix: String,
    next_id: AtomicU64,
    /// Unseeded generation requests so far (with `default_seed`).
    pub unseeded: AtomicU64,
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
        let id = format!("{prefix}-{}{:08x}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed));
        note(|n| n.id = Some(id.clone()));
        id
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
        note(|n| n.media = media.len());
        let images = media.iter().filter(|m| matches!(m, MediaRef::Image(_) | MediaRef::ImageEmbeds(_))).count();
        let videos = media.iter().filter(|m| matches!(m, MediaRef::Video(_) | MediaRef::VideoFile(_))).count();
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
        let vocab = f.spec().vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::bad_request(format!("token id {bad} is out of vocabulary (size {vocab})")));
        }
        if let Some(&id) = ids.iter().find(|id| self.media_tokens().contains(id)) {
            let token = f.tokenizer.id_token(id).unwrap_or_else(|| format!("token {id}"));
            return Err(ApiError::bad_request(format!(
                "a text prompt may not hold the media token {token}, which only the server places; \
                 send images and videos as content parts"
            )));
        }
        let prompt = f.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok(f.processor.text_input(prompt, ids))
    }

    /// The tokens that mark media in a prompt (placeholders, start and end).
    fn media_tokens(&self) -> &[u32] {
        &self.frontend().spec().media_token_ids
    }

    /// 400 when a chat message's text holds a media token's text
    /// (`<|image_pad|>` typed by hand): the template would pass it through
    /// as the special token and the prompt's media would not line up.
    pub fn check_no_media_tokens(&self, messages: &serde_json::Value) -> Result<(), ApiError> {
        let f = self.frontend();
        let tokens: Vec<String> =
            self.media_tokens().iter().filter_map(|&id| f.tokenizer.id_token(id)).filter(|t| !t.is_empty()).collect();
        let messages = messages.as_array().map_or(&[][..], Vec::as_slice);
        for (i, m) in messages.iter().enumerate() {
            let texts: Vec<&str> = match &m["content"] {
                serde_json::Value::String(s) => vec![s.as_str()],
                serde_json::Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
                _ => Vec::new(),
            };
            if let Some(t) = tokens.iter().find(|t| texts.iter().any(|x| x.contains(t.as_str()))) {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content holds {t}, a media token only the server places; \
                     send images as image_url parts and videos as video parts"
                )));
            }
        }
        Ok(())
    }

    /// Engine input for a text-only prompt.
    pub fn text_input(&self, text: &str, add_special_tokens: bool) -> Result<PreparedInput, ApiError> {
        let ids = self.frontend().tokenizer.encode_with(text, add_special_tokens)?;
        self.token_input(ids)
    }
}

/// The bound listener, its connections held to `limits`.
pub fn bind(host: &str, port: u16, limits: tiny_http::Limits) -> Result<tiny_http::Server> {
    let addr = format!("{host}:{port}");
    let err = |e: &dyn std::fmt::Display| Error::Io {
        path: format!("listening on {addr}"),
        source: std::io::Error::other(e.to_string()),
    };
    let listen = tiny_http::ConfigListenAddr::from_socket_addrs(addr.as_str()).map_err(|e| err(&e))?;
    tiny_http::Server::new(tiny_http::ServerConfig { addr: listen, ssl: None, limits }).map_err(|e| err(&e))
}

/// A listener, the engine, and the workers that join them.
pub struct Server {
    http: tiny_http::Server,
    state: Arc<State>,
    stopping: AtomicBool,
    /// Requests of any route a worker holds now (what a shutdown waits for).
    active: AtomicUsize,
}

impl Server {
    pub fn new(http: tiny_http::Server, engine: Engine, fetcher: MediaFetcher, cfg: ServerConfig) -> Server {
        let metrics = Metrics::new(&engine.frontend().model_name);
        if engine.frontend().task == Task::Generate {
            // The grammar engine's token trie, built beside serving, not on the first constrained request.
            engine.frontend().grammars.warm();
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let state = State {
            engine,
            fetcher,
            cfg,
            metrics,
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            started: unix_now(),
            id_prefix: format!("{nanos:x}"),
            next_id: AtomicU64::new(0),
            unseeded: AtomicU64::new(0),
        };
        Server { http, state: Arc::new(state), stopping: AtomicBool::new(false), active: AtomicUsize::new(0) }
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

    /// Stops gracefully: new connections are refused and new requests on
    /// open ones answered 503; the requests in hand get `grace` to finish,
    /// then the engine fails what is left; then `run` returns.
    pub fn shutdown(&self, grace: Duration) {
        self.state.draining.store(true, Ordering::SeqCst);
        self.http.stop_accepting();
        let idle = |within: Duration| {
            let end = Instant::now() + within;
            while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.active.load(Ordering::SeqCst) == 0
        };
        if !idle(grace) {
            let n = self.active.load(Ordering::SeqCst);
            eprintln!(
                "kestrel: {n} request(s) still running after the {}s grace period; stopping them",
                grace.as_secs_f64()
            );
            self.state.engine.abort_all();
            // Aborted requests end at once; a worker stuck elsewhere (a
            // media fetch) ends at its own timeout.
            idle(Duration::from_secs(30));
        }
        self.stop();
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
                    self.active.fetch_add(1, Ordering::SeqCst);
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| routes::handle(state, rq))).is_err() {
                        eprintln!("kestrel: a request's handling panicked; the worker goes on");
                    }
                    self.active.fetch_sub(1, Ordering::SeqCst);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // `stop` unblocked this worker.
                Err(_) if self.stopping.load(Ordering::SeqCst) => break,
                Err(e) => {
                    // Accept errors (out of file descriptors, ...): wait a little and go on.
                    eprintln!("kestrel: accepting a connection failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}

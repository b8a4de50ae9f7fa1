//! The engine thread and its handle. One thread owns the device: it loads the
//! model, sizes the KV cache, and then loops — take new requests and aborts
//! from a channel, run one step, send each request's events down its own
//! channel. Callers (server workers, the offline API) never touch the
//! device: they prepare inputs with the `Frontend` (tokenizer, chat template,
//! image processor) and exchange plain data with the thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::core::{check_embed_fits, check_fits, CoreConfig, EngineCore};
use super::pooling::{Pooling, PoolingConfig, Task};
use super::request::{Collector, Event, Request, RequestId, RequestOutput, RequestParams};
use super::runner::{CacheConfig, Runner};
use super::scheduler::SchedulerConfig;
use crate::error::{Error, Result};
use crate::model::inputs::PreparedInput;
use crate::model::{registry, ModelSpec, Processor};
use crate::multimodal::Media;
use crate::structured::Grammars;
use crate::tensor::Device;
use crate::text::{chat_template::ChatTemplate, tokenizer::Tokenizer};

/// Engine settings, with vLLM's names and defaults where it has them.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Model folder (config.json, safetensors, tokenizer, processor configs).
    pub model_dir: PathBuf,
    /// Name the model is served under (default: the folder's name).
    pub model_name: Option<String>,
    /// cuda, cpu, or auto (cuda when a GPU is usable).
    pub device: String,
    /// Longest prompt + completion (default: the model's, capped by the KV cache).
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub gpu_memory_utilization: f32,
    pub cpu_kv_cache_bytes: usize,
    /// Chat template file or text instead of the model's own.
    pub chat_template: Option<String>,
    /// Generation, or embeddings (vLLM's `--task`).
    pub task: Task,
    /// Embedding task: overrides the model folder's pooling type.
    pub pooling: Option<Pooling>,
    /// Never replay decode steps from CUDA graphs (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    /// Tokenizer folder instead of `model_dir` (vLLM's `--tokenizer`); the
    /// chat template comes from it when it holds one.
    pub tokenizer_dir: Option<PathBuf>,
    /// `--mm-processor-kwargs`: settings over the processor config.
    pub mm_processor_kwargs: crate::model::ProcessorKwargs,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model_dir: PathBuf::new(),
            model_name: None,
            device: "auto".into(),
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_bytes: 4 << 30,
            chat_template: None,
            task: Task::Generate,
            pooling: None,
            enforce_eager: false,
            tokenizer_dir: None,
            mm_processor_kwargs: Default::default(),
        }
    }
}

/// Everything a caller needs to turn a chat request into engine input,
/// shared by all threads (read-only).
pub struct Frontend {
    pub model_name: String,
    /// The model family's name (`qwen2_vl`, `llava`).
    pub family: &'static str,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// The family's tool-aware template, for requests with tools when
    /// `template` does not render them (and was not chosen by the user).
    pub tool_template: Option<ChatTemplate>,
    /// The family's prompt side: placeholders, preprocessing, positions,
    /// precomputed embeddings.
    pub processor: Arc<dyn Processor>,
    pub max_model_len: usize,
    /// KV cache: blocks and tokens per block.
    pub num_blocks: usize,
    pub block_size: usize,
    /// Device the engine runs on ("cpu", or the GPU's name).
    pub device: String,
    pub task: Task,
    /// The embedding task's pooling (None when generating).
    pub pooling: Option<PoolingConfig>,
    /// Most tokens one step computes (bounds an embedding input).
    pub max_num_batched_tokens: usize,
    /// Compiles requests' output constraints (structured outputs, tools).
    pub grammars: Arc<Grammars>,
    /// The family's tool-call format (a `--tool-call-parser` name), if any.
    pub tool_parser: Option<&'static str>,
}

impl Frontend {
    /// Renders `messages` with the chat template and prepares it with `media`
    /// (one entry per image or video part, in order).
    pub fn prepare_chat(&self, messages: &serde_json::Value, media: &[Media]) -> Result<PreparedInput> {
        let prompt = self.template.render(messages, true)?;
        self.prepare_prompt(prompt, media)
    }

    /// Prepares an already rendered prompt with its media.
    pub fn prepare_prompt(&self, prompt: String, media: &[Media]) -> Result<PreparedInput> {
        self.processor.prepare_prompt(&self.tokenizer, prompt, media)
    }

    /// The template for a request that sends tools: the model's own when it
    /// renders them, else the family's tool template; None when neither does.
    pub fn tools_template(&self) -> Option<&ChatTemplate> {
        if self.template.renders_tools() {
            Some(&self.template)
        } else {
            self.tool_template.as_ref()
        }
    }

    /// The model's family-neutral facts.
    pub fn spec(&self) -> &ModelSpec {
        self.processor.spec()
    }

    /// A token's text for logprobs (its vocabulary string when it has one).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).ok().or_else(|| self.tokenizer.id_token(id)).unwrap_or_default()
    }

    /// A token's raw bytes for logprobs (`Tokenizer::token_bytes`).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.tokenizer.token_bytes(id)
    }

    /// Room left for the completion after `prompt_tokens`.
    pub fn room(&self, prompt_tokens: usize) -> usize {
        self.max_model_len.saturating_sub(prompt_tokens)
    }
}

/// Load and activity figures of the engine thread, refreshed every step.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub free_blocks: usize,
    pub preemptions: u64,
    pub steps: u64,
    pub step_errors: u64,
    /// Steps replayed from a CUDA graph.
    pub graph_steps: u64,
    /// Structured outputs' cost on the engine thread.
    pub grammar: super::core::GrammarStats,
}

enum Msg {
    Add(RequestId, Box<Request>, Sender<Event>),
    Embed(RequestId, Box<PreparedInput>, Sender<Event>),
    Abort(RequestId),
    /// Fail every request (the server's shutdown, past its grace period).
    AbortAll,
}

/// When the engine thread began its current iteration, so that /health can
/// tell a thread that stopped answering from one waiting for work.
struct Heartbeat {
    epoch: Instant,
    /// Milliseconds from `epoch` to the iteration's start, plus 1; 0 while
    /// the thread waits for work.
    busy_since: AtomicU64,
}

impl Heartbeat {
    fn busy(&self) {
        self.busy_since.store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    fn idle(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    fn stalled_for(&self) -> Duration {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            b => self.epoch.elapsed().saturating_sub(Duration::from_millis(b - 1)),
        }
    }
}

/// What a caller of a request that failed inside the engine thread is told;
/// the server answers messages that start with "internal error" with a 500.
const PANICKED: &str = "internal error: the engine failed on this request (see the server log)";

pub struct Engine {
    tx: Option<Sender<Msg>>,
    frontend: Arc<Frontend>,
    next_id: AtomicU64,
    stats: Arc<Mutex<EngineStats>>,
    heartbeat: Arc<Heartbeat>,
    thread: Option<JoinHandle<()>>,
}

/// Loads the model and everything around it on this thread: the frontend
/// for callers and the core that will own the device. `Engine::start` runs
/// this on the engine thread; tests drive the core directly.
pub fn load(cfg: &EngineConfig) -> Result<(Frontend, EngineCore)> {
    if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
        return Err(Error::InvalidInput(
            "--block-size, --max-num-seqs and --max-num-batched-tokens must be positive".into(),
        ));
    }
    if !(cfg.gpu_memory_utilization > 0.0 && cfg.gpu_memory_utilization <= 1.0) {
        return Err(Error::InvalidInput(format!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            cfg.gpu_memory_utilization
        )));
    }
    let t0 = std::time::Instant::now();
    let dir = &cfg.model_dir;
    let family = registry::detect(dir)?;
    // The prompt side first: it is small (config and processor files), and
    // its spec says whether the task can run before the weights go up.
    let processor = (family.processor)(dir, &cfg.mm_processor_kwargs)?;
    let spec = processor.spec().clone();
    if cfg.task == Task::Generate && spec.decoder.head == crate::model::decoder::Head::None {
        return Err(Error::Config(format!(
            "{}: this checkpoint has no LM head (a base model); serve it with --task embedding",
            dir.display()
        )));
    }
    // The tokenizer and chat template load on a second thread while the
    // device opens and the weights go up.
    let (files, model) = std::thread::scope(|s| {
        let files = s.spawn(|| -> Result<_> {
            let tok_dir = cfg.tokenizer_dir.as_deref().unwrap_or(dir);
            let tokenizer = Arc::new(Tokenizer::from_dir(tok_dir)?);
            let builtin = match (cfg.task, family.embedding_template) {
                (Task::Embed, Some(t)) => Some((family.embedding_template_name, t)),
                _ => family.chat_template.map(|t| (family.name, t)),
            };
            let template_dir = match &cfg.tokenizer_dir {
                Some(t) if crate::text::chat_template::find_in_dir(t)?.is_some() => t.as_path(),
                _ => dir,
            };
            let template = ChatTemplate::load_or(template_dir, cfg.chat_template.as_deref(), builtin)?
                .with_string_content(family.placeholder);
            Ok((tokenizer, template, t0.elapsed()))
        });
        let model = (|| -> Result<_> {
            let dev = Device::choose(&cfg.device)?;
            let t_device = t0.elapsed();
            Ok(((family.load)(dir, &dev)?, dev, t_device))
        })();
        let files = files.join().unwrap_or_else(|_| Err(Error::Engine("loading the tokenizer panicked".into())));
        (files, model)
    });
    let (tokenizer, template, t_files) = files?;
    let tool_template = match family.tool_template {
        Some(src) if !template.renders_tools() && cfg.chat_template.is_none() => Some(
            ChatTemplate::new(src, &format!("{} tool template", family.name), template.special_tokens().clone())?
                .with_string_content(family.placeholder),
        ),
        _ => None,
    };
    let (model, dev, t_device) = model?;
    let t_weights = t0.elapsed();
    let eos = eos_ids(&spec, &tokenizer);
    let device = match &dev {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(g) => g.name().to_owned(),
    };
    let mut runner = Runner::new(
        model,
        &CacheConfig {
            block_size: cfg.block_size,
            gpu_memory_utilization: cfg.gpu_memory_utilization,
            cpu_kv_cache_bytes: cfg.cpu_kv_cache_bytes,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            max_image_pixels: processor.max_image_pixels(),
        },
    )?;
    let t_cache = t0.elapsed();
    let capacity = runner.num_blocks() * runner.block_size();
    let max_model_len = match cfg.max_model_len {
        Some(0) => return Err(Error::InvalidInput("--max-model-len must be positive".into())),
        Some(m) if m > capacity => {
            return Err(Error::Engine(format!(
                "--max-model-len {m} is more than the KV cache holds ({capacity} tokens); \
                 lower it or raise --gpu-memory-utilization"
            )))
        }
        Some(m) => m,
        None => spec.max_position_embeddings.min(capacity),
    };
    let graphs = if !cfg.enforce_eager && cfg.task == Task::Generate {
        runner.capture_graphs(cfg.max_num_seqs, max_model_len)?.len()
    } else {
        0
    };
    let t_graphs = t0.elapsed();
    let secs = |a: std::time::Duration, b: std::time::Duration| (b - a).as_secs_f64();
    eprintln!(
        "kestrel: loaded in {:.2} s: device {:.2} s, weights {:.2} s (tokenizer and processors beside them, \
         {:.2} s), KV cache sizing {:.2} s, CUDA graphs ({graphs} batch sizes) {:.2} s",
        t_graphs.as_secs_f64(),
        t_device.as_secs_f64(),
        secs(t_device, t_weights),
        t_files.as_secs_f64(),
        secs(t_weights, t_cache),
        secs(t_cache, t_graphs),
    );
    let model_name = cfg.model_name.clone().unwrap_or_else(|| {
        if crate::model::builtin::is_builtin(dir) {
            return crate::model::builtin::NAME.to_owned();
        }
        dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    });
    let pooling = match cfg.task {
        Task::Generate => None,
        Task::Embed => {
            let mut p = PoolingConfig::from_dir(dir)?;
            if let Some(kind) = cfg.pooling {
                p.pooling = kind;
            }
            Some(p)
        }
    };
    let core_cfg = CoreConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
        },
        max_model_len,
        eos,
        pooling,
    };
    let frontend = Frontend {
        model_name,
        family: family.name,
        tokenizer: tokenizer.clone(),
        template,
        tool_template,
        processor,
        max_model_len,
        num_blocks: runner.num_blocks(),
        block_size: runner.block_size(),
        device,
        task: cfg.task,
        pooling,
        max_num_batched_tokens: cfg.max_num_batched_tokens,
        grammars: Arc::new(Grammars::new(tokenizer.clone(), spec.vocab_size(), &core_cfg.eos)),
        tool_parser: family.tool_parser,
    };
    Ok((frontend, EngineCore::new(runner, tokenizer, core_cfg)))
}

/// The ids that end a choice: the model config's EOS ids and the
/// tokenizer's (`eos_token`, generation_config.json's), sorted, once each.
pub fn eos_ids(spec: &ModelSpec, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut eos = spec.eos_token_id.clone();
    eos.extend_from_slice(tokenizer.eos_token_ids());
    eos.sort_unstable();
    eos.dedup();
    eos
}

impl Engine {
    /// Loads the model on a new engine thread; returns when it is ready to serve.
    pub fn start(cfg: EngineConfig) -> Result<Engine> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Frontend>>();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let thread_stats = stats.clone();
        let heartbeat = Arc::new(Heartbeat { epoch: Instant::now(), busy_since: AtomicU64::new(0) });
        let thread_heartbeat = heartbeat.clone();
        let thread = std::thread::Builder::new()
            .name("kestrel-engine".into())
            .spawn(move || match load(&cfg) {
                Ok((frontend, core)) => {
                    let _ = ready_tx.send(Ok(frontend));
                    run(core, rx, &thread_stats, &thread_heartbeat);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Engine(format!("could not start the engine thread: {e}")))?;
        let frontend = match ready_rx.recv() {
            Ok(r) => r?,
            Err(_) => return Err(Error::Engine("the engine thread died while loading the model".into())),
        };
        Ok(Engine {
            tx: Some(tx),
            frontend: Arc::new(frontend),
            next_id: AtomicU64::new(1),
            stats,
            heartbeat,
            thread: Some(thread),
        })
    }

    pub fn frontend(&self) -> &Arc<Frontend> {
        &self.frontend
    }

    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request; its events arrive on the returned channel. Requests
    /// that cannot fit the context are refused here, before queueing.
    pub fn submit(&self, req: Request) -> Result<(RequestId, Receiver<Event>)> {
        if self.frontend.task != Task::Generate {
            return Err(Error::InvalidInput(
                "this model serves the embedding task; it cannot generate text (start it with --task generate)".into(),
            ));
        }
        check_fits(&req, self.frontend.max_model_len)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = mpsc::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(Msg::Add(id, Box::new(req), etx)).ok())
            .ok_or_else(|| Error::Engine("the engine has stopped".into()))?;
        Ok((id, erx))
    }

    /// Queues an embedding request (the embedding task only): its stream is
    /// `Embedding` then `Done`, or `Error`.
    pub fn submit_embed(&self, input: PreparedInput) -> Result<(RequestId, Receiver<Event>)> {
        if self.frontend.task != Task::Embed {
            return Err(Error::InvalidInput(
                "this model serves text generation; start it with --task embedding for embeddings".into(),
            ));
        }
        check_embed_fits(input.input_ids.len(), self.frontend.max_model_len, self.frontend.max_num_batched_tokens)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = mpsc::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(Msg::Embed(id, Box::new(input), etx)).ok())
            .ok_or_else(|| Error::Engine("the engine has stopped".into()))?;
        Ok((id, erx))
    }

    /// Embeds a batch of prompts (the offline API of the embedding task).
    pub fn embed(&self, inputs: Vec<PreparedInput>) -> Vec<Result<Vec<f32>>> {
        let pending: Vec<_> = inputs.into_iter().map(|i| self.submit_embed(i)).collect();
        pending
            .into_iter()
            .map(|p| {
                let (_, rx) = p?;
                let mut collector = Collector::new(&RequestParams { n: 0, ..Default::default() });
                for ev in rx.iter() {
                    if collector.push(ev) {
                        break;
                    }
                }
                collector.finish()?.embedding.ok_or_else(|| Error::Engine("no embedding came back".into()))
            })
            .collect()
    }

    /// Ends a request now (its KV blocks are freed at once); unknown or
    /// finished ids are ignored.
    pub fn abort(&self, id: RequestId) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Abort(id));
        }
    }

    /// Fails every request in the engine now (their blocks are freed).
    pub fn abort_all(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::AbortAll);
        }
    }

    /// Runs a batch of requests to completion (the offline API): all are
    /// queued at once and batched continuously; results come back in order.
    pub fn generate(&self, reqs: Vec<Request>) -> Vec<Result<RequestOutput>> {
        let pending: Vec<_> = reqs
            .into_iter()
            .map(|r| {
                let collector = Collector::new(&r.params);
                self.submit(r).map(|(_, rx)| (collector, rx))
            })
            .collect();
        pending
            .into_iter()
            .map(|p| {
                let (mut collector, rx) = p?;
                for ev in rx.iter() {
                    if collector.push(ev) {
                        break;
                    }
                }
                collector.finish()
            })
            .collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx = None; // the thread sees the channel close, fails what is left, and exits
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Engine {
    /// Whether the engine thread is still running (the server's /health).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// How long the engine thread has been in its current iteration (taking
    /// messages, one step); zero while it waits for work. A healthy engine
    /// stays under one step's time.
    pub fn stalled_for(&self) -> Duration {
        self.heartbeat.stalled_for()
    }
}

/// The engine thread's loop: block for messages while idle, else take what
/// has arrived and step.
fn run(mut core: EngineCore, rx: Receiver<Msg>, stats: &Mutex<EngineStats>, heartbeat: &Heartbeat) {
    let mut open = true;
    while open {
        heartbeat.busy();
        let first = if core.has_work() {
            match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            heartbeat.idle();
            let m = rx.recv();
            heartbeat.busy();
            match m {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        };
        let mut next = first;
        while let Some(m) = next {
            // A panic while admitting one request fails that request only.
            match m {
                Msg::Add(id, req, sink) => {
                    let added = catch_unwind(AssertUnwindSafe(|| {
                        inject_faults(&req.input.prompt);
                        core.add(id, *req, sink.clone())
                    }));
                    match added {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => drop(sink.send(Event::Error { message: e.to_string() })),
                        Err(_) => {
                            core.fail(id, PANICKED.into());
                            let _ = sink.send(Event::Error { message: PANICKED.into() });
                        }
                    }
                }
                Msg::Embed(id, input, sink) => {
                    let added = catch_unwind(AssertUnwindSafe(|| core.add_embed(id, *input, sink.clone())));
                    match added {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => drop(sink.send(Event::Error { message: e.to_string() })),
                        Err(_) => {
                            core.fail(id, PANICKED.into());
                            let _ = sink.send(Event::Error { message: PANICKED.into() });
                        }
                    }
                }
                Msg::Abort(id) => core.abort(id),
                Msg::AbortAll => core.fail_all("the server is shutting down; the request was stopped"),
            }
            next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    None
                }
            };
        }
        let mut failed = false;
        if core.has_work() {
            match catch_unwind(AssertUnwindSafe(|| core.step())) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    eprintln!("kestrel: engine step failed: {e}");
                    failed = true;
                }
                // Which request caused it is unknown: the batch fails, the engine goes on.
                Err(_) => {
                    core.fail_all("internal error: the engine failed while running the batch (see the server log)");
                    failed = true;
                }
            }
        }
        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
        s.running = core.num_running();
        s.waiting = core.num_waiting();
        s.kv_usage = core.pool().usage();
        s.free_blocks = core.pool().num_free();
        s.preemptions = core.preemptions();
        s.steps += 1;
        s.step_errors += failed as u64;
        s.graph_steps = core.runner().graph_replays();
        s.grammar = core.grammar_stats();
    }
    core.fail_all("the engine is shutting down");
    if let crate::tensor::Device::Cuda(gpu) = core.runner().model.device() {
        match gpu.profile_report() {
            Ok(Some(table)) => eprintln!("kestrel: GPU time per kernel (KESTREL_PROFILE=1):\n{table}"),
            Ok(None) => {}
            Err(e) => eprintln!("kestrel: no kernel profile: {e}"),
        }
    }
}

/// The test faults of `fault` that strike the engine thread (debug builds only).
fn inject_faults(prompt: &str) {
    if super::fault::hit("engine-panic", prompt) {
        panic!("fault injected by KESTREL_FAULT (engine-panic)");
    }
    if super::fault::hit("engine-hang", prompt) {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

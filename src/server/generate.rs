//! POST /v1/chat/completions and /v1/completions, as vLLM's
//! `OpenAIServingChat` and `OpenAIServingCompletion`
//! (vllm/entrypoints/openai/serving_chat.py, serving_completion.py): parse,
//! validate, prepare the prompt and its media on this worker thread, submit
//! to the engine, then answer with the whole result or stream chunks as the
//! engine's events arrive. A request dropped before its end (client gone,
//! panic) is aborted in the engine, which frees its KV blocks at once; a
//! non-streaming one watches its connection while it waits, so a client
//! that leaves stops its work within `PEER_POLL`.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{ApiError, EventStream, Reply};
use super::metrics::RequestTimes;
use super::{unix_now, State};
use crate::engine::fault;
use crate::engine::request::{Collector, Event, RequestId, RequestOutput, RequestParams};
use crate::engine::{Request, Task};
use crate::openai::completions::{CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt};
use crate::openai::prepare_timed;
use crate::openai::protocol::{
    chat_logprobs, resolve_max_tokens, stop_reason_json, ChatCompletionRequest, ChatCompletionResponse, ErrorResponse,
};
use crate::openai::stream::{chat_choice, completion_choice, ChunkHeader};
use crate::openai::tools::{ToolMode, ToolStream};
use crate::openai::MediaTimings;

/// How often a non-streaming request looks at whether its client is still there.
const PEER_POLL: Duration = Duration::from_millis(50);

/// Whether the request's client has closed its connection.
pub(crate) type ClientGone<'g> = &'g dyn Fn() -> bool;

/// POST /v1/chat/completions.
pub(crate) fn chat<'a>(
    state: &'a State,
    body: &str,
    arrival: Instant,
    gone: ClientGone<'_>,
) -> Result<Reply<'a>, ApiError> {
    let req = ChatCompletionRequest::from_json(body)?;
    state.check_model(req.model.as_deref())?;
    state.check_task(Task::Generate, "Chat Completions API")?;
    let input = req.to_chat_input()?;
    let tools = ToolMode::new(&input.tools, &input.tool_choice, state.cfg.tool_parser, input.parallel_tool_calls)?;
    state.check_media_limits(&input.media)?;
    state.check_no_media_tokens(&input.messages)?;
    let timings = MediaTimings::default();
    let prepared = prepare_timed(state.frontend(), &state.fetcher, &input, &timings);
    if !input.media.is_empty() {
        let (f, d, p) = timings.totals();
        state.metrics.media(f, d, p);
    }
    let request = prepared?;
    let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let kind = Kind::Chat(tools);
    run(state, request, kind, req.stream.unwrap_or(false), include_usage, arrival, gone)
}

/// POST /v1/completions.
pub(crate) fn completions<'a>(
    state: &'a State,
    body: &str,
    arrival: Instant,
    gone: ClientGone<'_>,
) -> Result<Reply<'a>, ApiError> {
    let req = CompletionRequest::from_json(body)?;
    state.check_model(req.model.as_deref())?;
    state.check_task(Task::Generate, "Completions API")?;
    let input = req.to_input()?;
    let grammar = input.constraint.as_ref().map(|c| state.frontend().grammars.compile(c)).transpose()?;
    let prepared = match input.prompt {
        Prompt::Text(text) => state.text_input(&text, true)?,
        Prompt::Tokens(ids) => state.token_input(ids)?,
    };
    let mut params = input.params;
    params.grammar = grammar;
    let f = state.frontend();
    params.max_tokens = resolve_max_tokens(Some(input.max_tokens), prepared.input_ids.len(), f.max_model_len)?;
    params.validate()?;
    let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let request = Request { input: prepared, params };
    run(state, request, Kind::Completion, req.stream.unwrap_or(false), include_usage, arrival, gone)
}

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    /// How the answers are read for tool calls.
    Chat(ToolMode),
    Completion,
}

/// Submits `request` and answers: the collected output, or a stream.
fn run<'a>(
    state: &'a State,
    request: Request,
    kind: Kind,
    stream: bool,
    include_usage: bool,
    arrival: Instant,
    gone: ClientGone<'_>,
) -> Result<Reply<'a>, ApiError> {
    if fault::hit("worker-panic", &request.input.prompt) {
        panic!("fault injected by KESTREL_FAULT (worker-panic)");
    }
    let mut request = request;
    if let (None, Some(seed)) = (request.params.sampling.seed, state.cfg.default_seed) {
        let n = state.unseeded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        request.params.sampling.seed = Some(super::derived_seed(seed, n));
    }
    let params = request.params.clone();
    let (id, rx) = state.engine.submit(request)?;
    let mut job = Job { state, id, rx, ended: false, times: Times::new(arrival) };
    let (prefix, object) = match kind {
        Kind::Chat(_) => ("chatcmpl", "chat.completion.chunk"),
        Kind::Completion => ("cmpl", "text_completion"),
    };
    let header = ChunkHeader {
        id: state.new_id(prefix),
        object,
        created: unix_now(),
        model: state.frontend().model_name.clone(),
        include_usage,
    };
    if stream {
        let offsets = vec![0; params.n];
        let tools = match &kind {
            Kind::Chat(mode) => (0..params.n).map(|_| ToolStream::new(mode)).collect(),
            Kind::Completion => Vec::new(),
        };
        return Ok(Reply::Stream(Box::new(Stream { job, header, kind, params, started: false, offsets, tools })));
    }
    let out = job.collect(&params, gone)?;
    let token_text = |t: u32| state.frontend().token_text(t);
    let token_bytes = |t: u32| state.frontend().token_bytes(t);
    Ok(match kind {
        Kind::Chat(mode) => Reply::json(
            200,
            &ChatCompletionResponse::new(
                header.id,
                header.model,
                header.created,
                &out,
                &mode,
                &token_text,
                &token_bytes,
            ),
        ),
        Kind::Completion => {
            Reply::json(200, &CompletionResponse::new(header.id, header.model, header.created, &out, &token_text))
        }
    })
}

/// Token timing of one request, for /metrics.
struct Times {
    arrival: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl Times {
    fn new(arrival: Instant) -> Self {
        Times { arrival, first: None, last: None, tokens: 0 }
    }

    fn observe(&mut self, ev: &Event) {
        if let Event::Delta { token_ids, .. } = ev {
            if !token_ids.is_empty() {
                let now = Instant::now();
                self.first.get_or_insert(now);
                self.last = Some(now);
                self.tokens += token_ids.len();
            }
        }
    }

    fn finish(&self) -> RequestTimes {
        let tpot = match (self.first, self.last) {
            (Some(f), Some(l)) if self.tokens > 1 => Some((l - f) / (self.tokens as u32 - 1)),
            _ => None,
        };
        RequestTimes { ttft: self.first.map(|f| f - self.arrival), tpot, e2e: self.arrival.elapsed() }
    }
}

/// A submitted request; aborted in the engine if dropped before its end.
struct Job<'a> {
    state: &'a State,
    id: RequestId,
    rx: Receiver<Event>,
    ended: bool,
    times: Times,
}

impl Job<'_> {
    /// The next event; an Error when the engine went away. Records metrics
    /// when the request ends.
    fn recv(&mut self) -> Event {
        let ev = self.rx.recv().unwrap_or_else(|_| Event::Error { message: "the engine stopped".into() });
        self.observe(ev)
    }

    fn observe(&mut self, ev: Event) -> Event {
        self.times.observe(&ev);
        match &ev {
            Event::Finished { reason, .. } => self.state.metrics.choice_finished(reason.as_str()),
            Event::Done { usage } => {
                self.ended = true;
                let times = self.times.finish();
                self.state.metrics.request_done(usage.prompt_tokens, usage.completion_tokens, times);
                super::note(|n| {
                    n.prompt_tokens = Some(usage.prompt_tokens);
                    n.output_tokens = Some(usage.completion_tokens);
                    n.ttft = times.ttft;
                });
            }
            Event::Error { .. } => self.ended = true,
            _ => {}
        }
        ev
    }

    /// Waits for the whole output, looking at the connection every
    /// `PEER_POLL`: a client that left aborts the request (answered 499,
    /// nginx's "client closed request", which no one reads).
    fn collect(&mut self, params: &RequestParams, gone: ClientGone<'_>) -> Result<RequestOutput, ApiError> {
        let mut c = Collector::new(params);
        let mut look_at = Instant::now() + PEER_POLL;
        loop {
            let ev = match self.rx.recv_timeout(look_at.saturating_duration_since(Instant::now())) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Event::Error { message: "the engine stopped".into() }),
            };
            if let Some(ev) = ev {
                if c.push(self.observe(ev)) {
                    break;
                }
            }
            if Instant::now() >= look_at {
                if gone() {
                    self.client_gone();
                    return Err(ApiError::new(499, "the client closed the connection", None));
                }
                look_at = Instant::now() + PEER_POLL;
            }
        }
        c.finish().map_err(engine_error)
    }

    /// The client went away: the engine stops the request and frees its blocks now.
    fn client_gone(&mut self) {
        if !self.ended {
            self.ended = true;
            self.state.engine.abort(self.id);
            self.state.metrics.client_disconnected();
        }
    }
}

/// A request the engine failed: 500 for its own faults (messages that start
/// with "internal error"), else what the error says (400 for bad input).
fn engine_error(e: crate::error::Error) -> ApiError {
    if e.to_string().starts_with("internal error") {
        eprintln!("kestrel: request failed: {e}");
        return ApiError::new(500, e.to_string(), None);
    }
    e.into()
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.state.engine.abort(self.id);
        }
    }
}

/// A streamed chat or text completion.
struct Stream<'a> {
    job: Job<'a>,
    header: ChunkHeader,
    kind: Kind,
    params: RequestParams,
    started: bool,
    /// Bytes of text sent so far per choice (completions' logprob offsets).
    offsets: Vec<usize>,
    /// Chat: each choice's text read for tool calls.
    tools: Vec<ToolStream>,
}

impl Stream<'_> {
    fn json(v: &Value) -> String {
        v.to_string()
    }

    fn finish_chunk(&self, index: usize, reason: &str, stop: Option<Value>) -> Value {
        let finish = Some((reason, stop));
        match self.kind {
            Kind::Chat(_) => self.header.chunk(chat_choice(index, json!({}), None, finish)),
            Kind::Completion => self.header.chunk(completion_choice(index, "", None, finish)),
        }
    }
}

impl EventStream for Stream<'_> {
    fn next(&mut self) -> Option<Vec<String>> {
        if !self.started {
            self.started = true;
            if matches!(self.kind, Kind::Chat(_)) {
                let roles = (0..self.params.n)
                    .map(|i| {
                        Self::json(&self.header.chunk(chat_choice(
                            i,
                            json!({"role": "assistant", "content": ""}),
                            None,
                            None,
                        )))
                    })
                    .collect();
                return Some(roles);
            }
        }
        if self.job.ended {
            return None;
        }
        let token_text = |t: u32| self.job.state.frontend().token_text(t);
        let token_bytes = |t: u32| self.job.state.frontend().token_bytes(t);
        let out = match self.job.recv() {
            Event::Delta { index, text, logprobs, .. } => {
                let want_logprobs = self.params.sampling.logprobs.is_some() && !logprobs.is_empty();
                if text.is_empty() && !want_logprobs {
                    return Some(Vec::new());
                }
                let chunk = match self.kind {
                    Kind::Chat(_) => {
                        let mut lp = want_logprobs.then(|| json!(chat_logprobs(&logprobs, &token_text, &token_bytes)));
                        let mut deltas = match self.tools.get_mut(index) {
                            Some(t) => t.push(&text),
                            None => vec![json!({"content": text})],
                        };
                        // Logprobs of text held back (a call being written) ride on an empty delta.
                        if deltas.is_empty() && lp.is_some() {
                            deltas.push(json!({}));
                        }
                        let chunks: Vec<String> = deltas
                            .into_iter()
                            .map(|d| Self::json(&self.header.chunk(chat_choice(index, d, lp.take(), None))))
                            .collect();
                        return Some(chunks);
                    }
                    Kind::Completion => {
                        let offset = self.offsets.get(index).copied().unwrap_or(0);
                        let lp = want_logprobs.then(|| json!(CompletionLogprobs::new(&logprobs, offset, &token_text)));
                        if let Some(o) = self.offsets.get_mut(index) {
                            *o += text.len();
                        }
                        completion_choice(index, &text, lp, None)
                    }
                };
                vec![Self::json(&self.header.chunk(chunk))]
            }
            Event::Finished { index, reason, stop_reason } => {
                let (deltas, reason) = match self.tools.get_mut(index) {
                    Some(t) => t.finish(reason.as_str()),
                    None => (Vec::new(), reason.as_str()),
                };
                let mut v: Vec<String> = deltas
                    .into_iter()
                    .map(|d| Self::json(&self.header.chunk(chat_choice(index, d, None, None))))
                    .collect();
                v.push(Self::json(&self.finish_chunk(index, reason, stop_reason_json(&stop_reason))));
                v
            }
            Event::Done { usage } => {
                let mut v = Vec::new();
                if self.header.include_usage {
                    v.push(Self::json(&self.header.usage_chunk(usage)));
                }
                v.push("[DONE]".to_owned());
                v
            }
            Event::Error { message } => {
                // vLLM's in-stream error: an error object as one event, then [DONE].
                let status = if message.starts_with("internal error") { 500 } else { 400 };
                let body = ErrorResponse::new(status, message, None);
                vec![serde_json::to_string(&body).unwrap_or_default(), "[DONE]".to_owned()]
            }
            // Generation requests never carry embeddings.
            Event::Embedding { .. } => Vec::new(),
        };
        Some(out)
    }

    fn client_gone(&mut self) {
        // Dropping the job aborts it; aborting now frees the blocks before the
        // worker finishes its bookkeeping.
        self.job.client_gone();
    }
}

//! OpenAI chat completion request and response bodies, as vLLM's
//! OpenAI-compatible server accepts and returns them
//! (vllm/entrypoints/openai/protocol.py: `ChatCompletionRequest`,
//! `ChatCompletionResponse`, `ErrorResponse`; content parts as
//! vllm/entrypoints/chat_utils.py parses them).
//!
//! A request becomes a `ChatInput`: the messages as the chat template wants
//! them (every media part replaced by `{"type": "image"}` or
//! `{"type": "video"}`), the media to fetch in prompt order, and the
//! engine's `RequestParams`. Unknown fields are ignored, as vLLM does by
//! default. Every problem with a request is `Error::InvalidInput` (a 400).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

use crate::engine::request::{RequestOutput, RequestParams, StopReason, TokenLogprob, Usage};
use crate::engine::sampling::{SamplingParams, MAX_LOGPROBS};
use crate::error::{Error, Result};
use crate::openai::tools::{
    named_schema, parse_tool_choice, parse_tools, postprocess_messages, required_schema, tools_for_template, Tool,
    ToolChoice, ToolMode,
};
use crate::structured::{Constraint, ConstraintFields, JsonOptions};
use crate::text::chat_template::ChatTemplate;

/// POST /v1/chat/completions body. Every sampling field is optional and
/// `null` means "not given".
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`, which wins
    /// when both are given (vLLM).
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub n: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub skip_special_tokens: Option<bool>,
    /// A Jinja chat template for this request instead of the server's.
    pub chat_template: Option<String>,
    /// Extra variables for the chat template (a JSON object).
    pub chat_template_kwargs: Option<Value>,
    /// Whether the template ends the prompt with the assistant's turn
    /// opener (default true).
    pub add_generation_prompt: Option<bool>,
    /// Continue the final (assistant) message instead of starting a new
    /// one; only `false` is supported.
    pub continue_final_message: Option<bool>,
    /// Functions the model may call (OpenAI's `tools`), `tool_choice` and
    /// `parallel_tool_calls` (default true).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Output constraints: `response_format`, `structured_outputs`, `guided_*`.
    #[serde(flatten)]
    pub constraint: ConstraintFields,
}

/// One chat message. Fields other than role and content (`name`,
/// `tool_calls`, `tool_call_id`, ...) are kept for the chat template.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, an array of content parts, or null.
    #[serde(default)]
    pub content: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Stop(pub Vec<String>);

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Stop(vec![s])),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(()),
                })
                .collect::<std::result::Result<_, _>>()
                .map(Stop)
                .map_err(|_| serde::de::Error::custom("stop must be a string or an array of strings")),
            _ => Err(serde::de::Error::custom("stop must be a string or an array of strings")),
        }
    }
}

/// A media item a request names, in prompt order; each is a URL the
/// `MediaFetcher` understands (http(s), data:, file:// or a local path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaRef {
    Image(String),
    /// A video given as its frames, in order.
    Video(Vec<String>),
    /// A video file (`video_url`): an H.264 MP4, decoded and sampled.
    VideoFile(String),
    /// A safetensors file of precomputed `image_embeds` + `image_grid_thw`
    /// (one image).
    ImageEmbeds(String),
}

/// What the engine side needs from a request.
#[derive(Clone, Debug)]
pub struct ChatInput {
    /// The messages for the chat template: media parts replaced by
    /// `{"type": "image"}` / `{"type": "video"}`, text parts and string
    /// content kept.
    pub messages: Value,
    /// One entry per media placeholder, in order.
    pub media: Vec<MediaRef>,
    /// `max_tokens` here is a placeholder until `resolve_max_tokens` has
    /// the prompt length; everything else is validated.
    pub params: RequestParams,
    /// What the request asked for (`max_completion_tokens`, else `max_tokens`).
    pub max_tokens: Option<usize>,
    /// The request's own chat template (`chat_template`), if any.
    pub chat_template: Option<String>,
    /// `chat_template_kwargs`: a JSON object, or null.
    pub chat_template_kwargs: Value,
    pub add_generation_prompt: bool,
    /// What the output is held to, compiled by `prepare` (`params.grammar`).
    pub constraint: Option<Constraint>,
    /// The request's tools (empty: none), what it lets the model do with
    /// them, and whether several calls may come in one answer.
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
impl ChatInput {
    /// `render` for a frontend: a request with tools is rendered with its
    /// own template, else with the model's when that renders tools, else
    /// with the family's tool template; when none renders them it is a 400
    /// (tools the model never sees would be accepted and ignored).
    pub fn render_for(&self, template: &ChatTemplate, tools_template: Option<&ChatTemplate>) -> Result<String> {
        if self.tools.is_empty() || self.chat_template.is_some() {
            return self.render(template);
        }
        match tools_template {
            Some(t) => self.render(t),
            None => Err(Error::InvalidInput(
                "this model's chat template does not render tools, and Kestrel has no tool template for its \
                 family; start the server with --chat-template FILE (or send chat_template) with one that does"
                    .into(),
            )),
        }
    }

    /// The prompt text: the messages rendered with the request's own
    /// `chat_template` if it gave one (compiled here; a syntax or render
    /// error in it is the request's fault, a 400), else with `template`
    /// (whose render errors are 400s too when the request gave variables).
    /// `chat_template_kwargs` are extra template variables. A `developer`
    /// message is a `system` one unless the template mentions the
    /// `developer` role itself (vLLM, OpenAI).
    pub fn render(&self, template: &ChatTemplate) -> Result<String> {
        // The request's tools (none for embeddings) go to whichever template renders.
        let tools = if self.tools.is_empty() { Value::Null } else { tools_for_template(&self.tools) };
        let own;
        let (tmpl, from_request) = match &self.chat_template {
            Some(src) => {
                let t = ChatTemplate::new(src.as_str(), "request chat_template", template.special_tokens().clone())
                    .map_err(request_template_error)?;
                own = match template.placeholder() {
                    Some(ph) => t.with_string_content(ph),
                    None => t,
                };
                (&own, true)
            }
            None => (template, false),
        };
        let rewritten;
        let mut messages = &self.messages;
        if !tmpl.source().contains("developer") {
            if let Value::Array(list) = &self.messages {
                rewritten = Value::Array(
                    list.iter()
                        .map(|m| {
                            let mut m = m.clone();
                            if m["role"] == "developer" {
                                m["role"] = Value::String("system".into());
                            }
                            m
                        })
                        .collect(),
                );
                messages = &rewritten;
            }
        }
        let out = tmpl.render_tools(messages, self.add_generation_prompt, &self.chat_template_kwargs, &tools);
        // With the request's own template or variables, a failure is the
        // request's to fix (a 400); with neither, it is the server's.
        let kwargs = self.chat_template_kwargs.as_object().is_some_and(|m| !m.is_empty());
        if from_request || kwargs {
            out.map_err(request_template_error)
        } else {
            out
        }
    }
}

/// A problem with the request's own chat template is a 400.
fn request_template_error(e: Error) -> Error {
    match e {
        Error::Template(m) => Error::InvalidInput(format!("chat_template: {m}")),
        e => e,
    }
}

impl ChatCompletionRequest {
    /// Parses a request body; a body that is not valid JSON or does not fit
    /// the schema is `InvalidInput` with serde's description (field and
    /// position).
    pub fn from_json(body: &str) -> Result<Self> {
        crate::openai::parse_body(body)
    }

    pub fn from_value(body: Value) -> Result<Self> {
        serde_json::from_value(body).map_err(|e| Error::InvalidInput(format!("invalid request body: {e}")))
    }

    /// The asked-for completion length (`max_completion_tokens` wins).
    pub fn requested_max_tokens(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Validates the request and splits it into template messages, media
    /// references and engine parameters.
    pub fn to_chat_input(&self) -> Result<ChatInput> {
        let bad = |msg: String| Err(Error::InvalidInput(msg));
        if self.messages.is_empty() {
            return bad("messages must hold at least one message".into());
        }
        let mut media = Vec::new();
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return bad(format!(
                    "messages[{i}].role {:?} is not supported; expected system, developer, user, assistant or tool",
                    m.role
                ));
            }
            let content = template_content(&m.content, i, &mut media)?;
            let mut out = Map::new();
            out.insert("role".into(), Value::String(m.role.clone()));
            out.insert("content".into(), content);
            for (k, v) in &m.extra {
                out.entry(k.clone()).or_insert_with(|| v.clone());
            }
            messages.push(Value::Object(out));
        }

        if self.continue_final_message == Some(true) {
            return bad("continue_final_message is not supported".into());
        }
        let chat_template_kwargs = match &self.chat_template_kwargs {
            None | Some(Value::Null) => Value::Null,
            Some(v @ Value::Object(_)) => v.clone(),
            Some(other) => return bad(format!("chat_template_kwargs must be a JSON object, got {other}")),
        };

        let max_tokens = self.requested_max_tokens();
        if max_tokens == Some(0) {
            return bad("max_tokens must be at least 1".into());
        }
        let want_logprobs = self.logprobs.unwrap_or(false);
        let top = match self.top_logprobs {
            None => None,
            Some(t) if (0..=MAX_LOGPROBS as i64).contains(&t) => Some(t as usize),
            Some(t) => return bad(format!("top_logprobs must be between 0 and {MAX_LOGPROBS}, got {t}")),
        };
        if top.is_some_and(|t| t > 0) && !want_logprobs {
            return bad("top_logprobs needs logprobs set to true".into());
        }

        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            min_p: self.min_p.unwrap_or(d.min_p),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            // vLLM takes any 64-bit integer; its bits seed the generator.
            seed: self.seed.map(|s| s as u64),
            logprobs: want_logprobs.then(|| top.unwrap_or(0)),
        };
        let d = RequestParams::default();
        let params = RequestParams {
            sampling,
            // Stands in until the prompt length is known; large enough that
            // validate() checks min_tokens only against a real max_tokens.
            max_tokens: max_tokens.unwrap_or(usize::MAX),
            min_tokens: self.min_tokens.unwrap_or(d.min_tokens),
            stop: self.stop.clone().map(|s| s.0).unwrap_or_default(),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(d.ignore_eos),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(d.skip_special_tokens),
            n: self.n.unwrap_or(d.n),
            grammar: None,
        };
        params.validate()?;
        let tools = parse_tools(self.tools.as_ref().unwrap_or(&Value::Null))?;
        let tool_choice = parse_tool_choice(self.tool_choice.as_ref(), &tools)?;
        let parallel_tool_calls = self.parallel_tool_calls.unwrap_or(true);
        // tool_choice "required" or a named function holds the output to a
        // schema, as vLLM does; then no other constraint may be given.
        let tool_schema = match &tool_choice {
            ToolChoice::Named(n) => tools.iter().find(|t| &t.name == n).map(named_schema),
            ToolChoice::Required => Some(required_schema(&tools, parallel_tool_calls)?),
            _ => None,
        };
        let constraint = match (self.constraint.constraint()?, tool_schema) {
            (Some(_), Some(_)) => {
                return bad("tool_choice \"required\" or a named function already constrains the output; \
                            response_format, structured_outputs and guided_* cannot be added to it"
                    .into())
            }
            (c, None) => c,
            // vLLM lets the JSON take any whitespace; a call's arguments are written as
            // `json.dumps` writes them instead (`JsonOptions::tool_calls`).
            (None, Some(schema)) => Some(Constraint::Json { schema, options: JsonOptions::tool_calls() }),
        };
        let mut messages = Value::Array(messages);
        postprocess_messages(&mut messages);
        Ok(ChatInput {
            messages,
            media,
            params,
            max_tokens,
            chat_template: self.chat_template.clone(),
            chat_template_kwargs,
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
            constraint,
            tools,
            tool_choice,
            parallel_tool_calls,
        })
    }
}

/// The completion length for a prompt of `prompt_tokens` tokens: what was
/// asked for, or the room left in the context. Errors as vLLM's
/// `_validate_input` does when the prompt or the request does not fit.
pub fn resolve_max_tokens(requested: Option<usize>, prompt_tokens: usize, max_model_len: usize) -> Result<usize> {
    if prompt_tokens >= max_model_len {
        return Err(Error::InvalidInput(format!(
            "This model's maximum context length is {max_model_len} tokens. However, your request has \
             {prompt_tokens} input tokens. Please reduce the length of the input messages."
        )));
    }
    let room = max_model_len - prompt_tokens;
    match requested {
        None => Ok(room),
        Some(m) if m <= room => Ok(m),
        Some(m) => Err(Error::InvalidInput(format!(
            "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context length \
             is {max_model_len} tokens and your request has {prompt_tokens} input tokens \
             ({m} > {max_model_len} - {prompt_tokens})."
        ))),
    }
}

/// A message's content for the chat template; media parts are pushed to
/// `media` and replaced by their placeholder part.
fn template_content(content: &Value, msg: usize, media: &mut Vec<MediaRef>) -> Result<Value> {
    let parts = match content {
        Value::Null => return Ok(Value::String(String::new())),
        Value::String(_) => return Ok(content.clone()),
        Value::Array(parts) => parts,
        _ => {
            return Err(Error::InvalidInput(format!(
                "messages[{msg}].content must be a string or an array of content parts"
            )))
        }
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let at = format!("messages[{msg}].content[{j}]");
        let bad = |what: &str| Error::InvalidInput(format!("{at}: {what}"));
        let obj = part.as_object().ok_or_else(|| bad("a content part must be an object"))?;
        let string = |key: &str| match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(bad(&format!("`{key}` must be a string"))),
        };
        // vLLM infers a missing type from the one payload key present.
        let kind = match obj.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(_) => return Err(bad("`type` must be a string")),
            None => ["text", "image_url", "image_embeds", "video", "video_url"]
                .into_iter()
                .find(|k| obj.contains_key(*k))
                .ok_or_else(|| bad("a content part needs a `type`"))?,
        };
        match kind {
            "text" => out.push(json!({"type": "text", "text": string("text")?})),
            "image_url" => {
                // Either {"url": ..., "detail": ...} (detail is accepted and
                // ignored, as vLLM does) or the URL string itself.
                media.push(MediaRef::Image(url_of(obj, "image_url").map_err(|m| bad(&m))?));
                out.push(json!({"type": "image"}));
            }
            "image_embeds" => {
                media.push(MediaRef::ImageEmbeds(string("image_embeds")?));
                out.push(json!({"type": "image"}));
            }
            "video" => {
                let frames = match obj.get("video") {
                    Some(Value::Array(items)) if !items.is_empty() => items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad("`video` must be an array of frame URLs (strings)"))?,
                    _ => return Err(bad("`video` must be a non-empty array of frame URLs")),
                };
                media.push(MediaRef::Video(frames));
                out.push(json!({"type": "video"}));
            }
            "video_url" => {
                // An MP4 file (http(s), data:video/mp4;base64, or local),
                // decoded and sampled when the media is loaded.
                media.push(MediaRef::VideoFile(url_of(obj, "video_url").map_err(|m| bad(&m))?));
                out.push(json!({"type": "video"}));
            }
            other => {
                return Err(bad(&format!(
                    "unknown content part type {other:?}; expected text, image_url, image_embeds, video or video_url"
                )))
            }
        }
    }
    Ok(Value::Array(out))
}

/// The URL of an `image_url` / `video_url` part: `{"url": ...}` (other
/// keys such as `detail` ignored, as vLLM does) or the URL string itself.
fn url_of(obj: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(format!("`{key}.url` must be a string")),
        },
        _ => Err(format!("`{key}` must be an object {{\"url\": ...}} or a URL string")),
    }
}

// ---- response ----

/// POST /v1/chat/completions answer (non-streaming).
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageInfo,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// Present (not null) when the request asked for logprobs.
    pub logprobs: Option<ChoiceLogprobs>,
    /// "stop", "length", "tool_calls" or "abort".
    pub finish_reason: &'static str,
    /// vLLM's extension: the stop token id (a number) or stop string that
    /// ended the choice; null for EOS or any other end.
    pub stop_reason: Option<Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// Null when the answer is only tool calls.
    pub content: Option<String>,
    /// OpenAI's `{"id", "type": "function", "function": {"name",
    /// "arguments"}}` entries; empty without calls (vLLM sends `[]`).
    pub tool_calls: Vec<Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprobJson>,
}

/// One generated token with its log-probability and the top alternatives.
#[derive(Clone, Debug, Serialize)]
pub struct TokenLogprobJson {
    pub token: String,
    pub logprob: f32,
    /// The token's raw bytes (not always valid UTF-8 alone: a token may
    /// hold part of a character).
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprobJson>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopLogprobJson {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct UsageInfo {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// vLLM clamps -inf logprobs to this so the JSON stays numeric.
const MIN_LOGPROB: f32 = -9999.0;

/// A logprob as JSON carries it: -inf clamped to vLLM's floor.
pub fn clamp_logprob(lp: f32) -> f32 {
    lp.max(MIN_LOGPROB)
}

/// Chat-style logprobs (`{"content": [...]}`) of some generated tokens.
/// `token_text` turns a token id into its text (the tokenizer's decode of
/// that one id), `token_bytes` into its raw bytes (`Tokenizer::token_bytes`:
/// part of a character for a token that splits one).
pub fn chat_logprobs(
    lps: &[TokenLogprob],
    token_text: &dyn Fn(u32) -> String,
    token_bytes: &dyn Fn(u32) -> Vec<u8>,
) -> ChoiceLogprobs {
    let entry = |id: u32, lp: f32| {
        let token = token_text(id);
        let bytes = token_bytes(id);
        (token, clamp_logprob(lp), bytes)
    };
    ChoiceLogprobs {
        content: lps
            .iter()
            .map(|t| {
                let (token, logprob, bytes) = entry(t.token, t.logprob);
                let top_logprobs = t
                    .top
                    .iter()
                    .map(|&(id, lp)| {
                        let (token, logprob, bytes) = entry(id, lp);
                        TopLogprobJson { token, logprob, bytes }
                    })
                    .collect();
                TokenLogprobJson { token, logprob, bytes, top_logprobs }
            })
            .collect(),
    }
}

/// vLLM's `stop_reason`: the stop token id (a number) or the stop string.
pub fn stop_reason_json(r: &Option<StopReason>) -> Option<Value> {
    r.as_ref().map(|r| match r {
        StopReason::Token(t) => json!(t),
        StopReason::String(s) => json!(s),
    })
}

impl UsageInfo {
    pub fn new(u: Usage) -> Self {
        UsageInfo {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

impl ChatCompletionResponse {
    /// The response for a finished request; `tools` says how its text is
    /// read for tool calls. `token_text` turns a token id into its text
    /// (the tokenizer's decode of that one id) for logprobs.
    pub fn new(
        id: String,
        model: String,
        created: u64,
        out: &RequestOutput,
        tools: &ToolMode,
        token_text: &dyn Fn(u32) -> String,
        token_bytes: &dyn Fn(u32) -> Vec<u8>,
    ) -> Self {
        let choices = out
            .choices
            .iter()
            .map(|c| {
                let a = tools.answer(&c.text, c.finish_reason.as_str());
                ChatChoice {
                    index: c.index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: a.content,
                        tool_calls: a.calls.iter().map(|t| t.to_json()).collect(),
                    },
                    logprobs: c.logprobs.as_deref().map(|l| chat_logprobs(l, token_text, token_bytes)),
                    finish_reason: a.finish_reason,
                    stop_reason: stop_reason_json(&c.stop_reason),
                }
            })
            .collect();
        ChatCompletionResponse {
            id,
            object: "chat.completion",
            created,
            model,
            choices,
            usage: UsageInfo::new(out.usage),
        }
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
/// vLLM answers with the same shape (`ErrorResponse` in
/// vllm/entrypoints/openai/protocol.py); `type` and `code` here take
/// OpenAI's values (`invalid_request_error`, `model_not_found`, ...) where
/// vLLM puts an exception name and the status number.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorResponse {
    pub error: ErrorInfo,
}

#[derive(Clone, Debug, Serialize)]
pub struct ErrorInfo {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorResponse {
    /// An error body for HTTP `status`, with the `type` OpenAI uses for it.
    pub fn new(status: u16, message: impl Into<String>, code: Option<&str>) -> ErrorResponse {
        let kind = match status {
            401 => "authentication_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        ErrorResponse { error: ErrorInfo { message: message.into(), kind, param: None, code: code.map(str::to_owned) } }
    }

    /// The HTTP status and body for an error: what the user sent
    /// (`InvalidInput`) is a 400, media that could not be fetched
    /// (`MediaFetch`) a 422, anything else a 500 `server_error`.
    pub fn from_error(e: &Error) -> (u16, ErrorResponse) {
        let (status, code) = match e {
            Error::InvalidInput(_) => (400, None),
            Error::MediaFetch(_) => (422, Some("media_fetch_failed")),
            _ => (500, None),
        };
        (status, ErrorResponse::new(status, e.to_string(), code))
    }
}

#[cfg(test)]
mod tests;

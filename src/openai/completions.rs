//! OpenAI (legacy) text completions, as vLLM's OpenAI-compatible server
//! accepts and returns them (vllm/entrypoints/openai/protocol.py:
//! `CompletionRequest`, `CompletionResponse`, `CompletionLogProbs`).
//!
//! One prompt per request: a string, or a list of token ids (also each
//! wrapped in a one-element list). vLLM also takes several prompts in one
//! request; here that is a 400. `echo` and `suffix` are refused as vLLM
//! refuses `suffix`; `best_of` must equal `n` when given. Sampling fields
//! mean what they mean in chat completions, except `logprobs`, which is the
//! number of top alternatives (0 to 20) and switches logprobs on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::protocol::{
    clamp_logprob, stop_reason_json, ChatCompletionRequest, ChatMessage, Stop, StreamOptions, UsageInfo,
};
use crate::engine::request::{RequestOutput, RequestParams, TokenLogprob};
use crate::error::{Error, Result};
use crate::structured::{Constraint, ConstraintFields};

/// vLLM's default `max_tokens` for completions (chat's default is "the rest
/// of the context").
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// POST /v1/completions body. `null` means "not given" everywhere.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub max_tokens: Option<usize>,
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
    /// Number of top alternatives per token (0..=20); given at all, it turns
    /// logprobs on.
    pub logprobs: Option<i64>,
    pub n: Option<usize>,
    pub best_of: Option<usize>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub skip_special_tokens: Option<bool>,
    /// Output constraints: `response_format`, `structured_outputs`, `guided_*`.
    #[serde(flatten)]
    pub constraint: ConstraintFields,
}

/// The one prompt of a completion request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated completion request.
#[derive(Clone, Debug)]
pub struct CompletionInput {
    pub prompt: Prompt,
    /// `max_tokens` is a placeholder until the prompt length is known.
    pub params: RequestParams,
    /// What the request asked for (default 16).
    pub max_tokens: usize,
    /// What the output is held to (compiled into `params.grammar` by the server).
    pub constraint: Option<Constraint>,
}

impl CompletionRequest {
    /// Parses a body; errors carry serde's position (line and column).
    pub fn from_json(body: &str) -> Result<Self> {
        super::parse_body(body)
    }

    /// Validates the request: its prompt and its engine parameters. The
    /// sampling fields go through chat's validation, so both APIs accept and
    /// refuse the same values.
    pub fn to_input(&self) -> Result<CompletionInput> {
        let bad = |msg: &str| Err(Error::InvalidInput(msg.into()));
        if self.echo == Some(true) {
            return bad("echo is not supported");
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return bad("suffix is not currently supported");
        }
        if self.best_of.is_some_and(|b| b != self.n.unwrap_or(1)) {
            return bad("best_of must equal n (beam search and best-of sampling are not supported)");
        }
        let prompt = parse_prompt(&self.prompt)?;
        let top = match self.logprobs {
            None => None,
            Some(t) if t >= 0 => Some(t),
            Some(t) => return Err(Error::InvalidInput(format!("logprobs must be between 0 and 20, got {t}"))),
        };
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let chat = ChatCompletionRequest {
            messages: vec![ChatMessage { role: "user".into(), content: Value::Null, extra: Map::new() }],
            max_tokens: Some(max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            logprobs: Some(top.is_some()),
            top_logprobs: top,
            n: self.n,
            skip_special_tokens: self.skip_special_tokens,
            constraint: self.constraint.clone(),
            ..Default::default()
        };
        let input = chat.to_chat_input().map_err(|e| match e {
            // Chat's wording for the one field whose name differs here.
            Error::InvalidInput(m) => Error::InvalidInput(m.replace("top_logprobs", "logprobs")),
            e => e,
        })?;
        Ok(CompletionInput { prompt, params: input.params, max_tokens, constraint: input.constraint })
    }
}

/// `prompt`: a string or token ids, alone or as the one element of a list.
fn parse_prompt(v: &Value) -> Result<Prompt> {
    let bad = |msg: String| Err(Error::InvalidInput(msg));
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) if items.is_empty() => bad("prompt must not be empty".into()),
        Value::Array(items) if items.iter().all(Value::is_number) => token_ids(items).map(Prompt::Tokens),
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(ids) if !ids.is_empty() => token_ids(ids).map(Prompt::Tokens),
            _ => bad("prompt must be a string, a list of token ids, or a list holding one of them".into()),
        },
        Value::Array(items) => bad(format!("one prompt per request is supported, got a list of {}", items.len())),
        Value::Null => bad("prompt is required".into()),
        _ => bad("prompt must be a string or a list of token ids".into()),
    }
}

/// Token ids from JSON numbers (each must fit a u32).
pub fn token_ids(items: &[Value]) -> Result<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::InvalidInput("token ids must be non-negative integers".into()))
}

// ---- response ----

/// POST /v1/completions answer (non-streaming).
#[derive(Clone, Debug, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: UsageInfo,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: &'static str,
    pub stop_reason: Option<Value>,
}

/// The completions API's logprobs layout: parallel lists, one entry per
/// token; `text_offset` is where each token's text starts in the choice's text.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
}

impl CompletionLogprobs {
    /// Logprobs of `lps`, whose text starts at byte `offset` of the choice.
    pub fn new(lps: &[TokenLogprob], mut offset: usize, token_text: &dyn Fn(u32) -> String) -> Self {
        let mut out = CompletionLogprobs::default();
        for t in lps {
            let token = token_text(t.token);
            out.text_offset.push(offset);
            offset += token.len();
            out.token_logprobs.push(Some(clamp_logprob(t.logprob)));
            let mut top = Map::new();
            for &(id, lp) in &t.top {
                top.insert(token_text(id), Value::from(clamp_logprob(lp)));
            }
            out.top_logprobs.push(Some(top));
            out.tokens.push(token);
        }
        out
    }
}

impl CompletionResponse {
    pub fn new(
        id: String,
        model: String,
        created: u64,
        out: &RequestOutput,
        token_text: &dyn Fn(u32) -> String,
    ) -> Self {
        let choices = out
            .choices
            .iter()
            .map(|c| CompletionChoice {
                index: c.index,
                text: c.text.clone(),
                logprobs: c.logprobs.as_deref().map(|l| CompletionLogprobs::new(l, 0, token_text)),
                finish_reason: c.finish_reason.as_str(),
                stop_reason: stop_reason_json(&c.stop_reason),
            })
            .collect();
        CompletionResponse { id, object: "text_completion", created, model, choices, usage: UsageInfo::new(out.usage) }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn input(body: Value) -> Result<CompletionInput> {
        CompletionRequest::from_json(&body.to_string())?.to_input()
    }

    #[test]
    fn prompts_are_text_or_token_ids() {
        assert_eq!(input(json!({"prompt": "hi"})).unwrap().prompt, Prompt::Text("hi".into()));
        assert_eq!(input(json!({"prompt": ["hi"]})).unwrap().prompt, Prompt::Text("hi".into()));
        assert_eq!(input(json!({"prompt": [1, 2, 3]})).unwrap().prompt, Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!(input(json!({"prompt": [[4, 5]]})).unwrap().prompt, Prompt::Tokens(vec![4, 5]));
        let e = |b: Value| input(b).unwrap_err().to_string();
        assert!(e(json!({"prompt": ["a", "b"]})).contains("one prompt per request"));
        assert!(e(json!({"prompt": []})).contains("must not be empty"));
        assert!(e(json!({"prompt": [1, -2]})).contains("non-negative"));
        assert!(e(json!({"max_tokens": 3})).contains("missing field `prompt`"));
        assert!(e(json!({"prompt": null})).contains("prompt is required"));
    }

    #[test]
    fn sampling_fields_are_validated_as_in_chat() {
        let i = input(json!({"prompt": "x", "logprobs": 2, "n": 2, "temperature": 0.5, "stop": "."})).unwrap();
        assert_eq!((i.max_tokens, i.params.n, i.params.sampling.logprobs), (DEFAULT_MAX_TOKENS, 2, Some(2)));
        assert_eq!(i.params.stop, vec![".".to_string()]);
        assert_eq!(input(json!({"prompt": "x"})).unwrap().params.sampling.logprobs, None);
        let e = |b: Value| input(b).unwrap_err().to_string();
        assert!(e(json!({"prompt": "x", "max_tokens": 0})).contains("max_tokens must be at least 1"));
        assert!(e(json!({"prompt": "x", "logprobs": 21})).contains("logprobs must be between 0 and 20"));
        assert!(e(json!({"prompt": "x", "echo": true})).contains("echo"));
        assert!(e(json!({"prompt": "x", "best_of": 3})).contains("best_of"));
        assert!(e(json!({"prompt": "x", "n": 100})).contains("n must be"));
    }

    #[test]
    fn logprob_offsets_follow_the_text() {
        let lps = vec![
            TokenLogprob { token: 1, logprob: -0.5, top: vec![(1, -0.5), (2, -1.0)] },
            TokenLogprob { token: 2, logprob: f32::NEG_INFINITY, top: vec![] },
        ];
        let text = |id: u32| if id == 1 { "ab".to_string() } else { "c".to_string() };
        let l = CompletionLogprobs::new(&lps, 3, &text);
        assert_eq!(l.text_offset, vec![3, 5]);
        assert_eq!(l.tokens, vec!["ab", "c"]);
        assert_eq!(l.token_logprobs, vec![Some(-0.5), Some(-9999.0)]);
        assert_eq!(serde_json::to_value(&l.top_logprobs[0]).unwrap(), json!({"ab": -0.5, "c": -1.0}));
    }
}

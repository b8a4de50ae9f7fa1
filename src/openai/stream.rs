//! Server-sent event chunks of streamed completions, as vLLM's server
//! writes them (vllm/entrypoints/openai/serving_chat.py and
//! serving_completion.py; protocol.py `ChatCompletionStreamResponse`,
//! `CompletionStreamResponse`): each is one `data: {json}` event, and the
//! stream ends with `data: [DONE]`.
//!
//! Chat: a first chunk per choice with `delta.role = "assistant"`, then text
//! deltas, then one chunk per choice with its `finish_reason` (and an empty
//! delta); with `stream_options.include_usage` every chunk has `"usage":
//! null` and a last chunk with `"choices": []` carries the usage.
//! Completions: the same without the role chunks, `text` in place of `delta`.

use serde_json::{json, Value};

use super::protocol::UsageInfo;
use crate::engine::request::Usage;

/// What every chunk of one response shares.
#[derive(Clone, Debug)]
pub struct ChunkHeader {
    pub id: String,
    /// "chat.completion.chunk" or "text_completion".
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Whether the request asked for a usage chunk (`"usage": null` elsewhere).
    pub include_usage: bool,
}

impl ChunkHeader {
    /// A chunk holding one choice.
    pub fn chunk(&self, choice: Value) -> Value {
        self.with_choices(vec![choice], None)
    }

    /// The last chunk: no choices, the request's usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.with_choices(vec![], Some(usage))
    }

    fn with_choices(&self, choices: Vec<Value>, usage: Option<Usage>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.map_or(Value::Null, |u| json!(UsageInfo::new(u)));
        }
        v
    }
}

/// `finish_reason` and `stop_reason` of a choice chunk (null while it goes on).
fn finish_fields(finish: Option<(&str, Option<Value>)>) -> (Value, Value) {
    match finish {
        Some((r, s)) => (json!(r), s.unwrap_or(Value::Null)),
        None => (Value::Null, Value::Null),
    }
}

/// A chat choice's delta: `delta` is `{"role": ...}`, `{"content": ...}` or `{}`.
pub fn chat_choice(
    index: usize,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<(&str, Option<Value>)>,
) -> Value {
    let (finish_reason, stop_reason) = finish_fields(finish);
    json!({
        "index": index,
        "delta": delta,
        "logprobs": logprobs.unwrap_or(Value::Null),
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    })
}

/// A completion choice's piece of text.
pub fn completion_choice(
    index: usize,
    text: &str,
    logprobs: Option<Value>,
    finish: Option<(&str, Option<Value>)>,
) -> Value {
    let (finish_reason, stop_reason) = finish_fields(finish);
    json!({
        "index": index,
        "text": text,
        "logprobs": logprobs.unwrap_or(Value::Null),
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_null_until_the_last_chunk_when_asked() {
        let h = ChunkHeader {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            include_usage: true,
        };
        let c = h.chunk(chat_choice(0, json!({"content": "hi"}), None, None));
        assert_eq!(c["usage"], Value::Null);
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        let u = h.usage_chunk(Usage { prompt_tokens: 2, completion_tokens: 3 });
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"], json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}));
        let h = ChunkHeader { include_usage: false, ..h };
        assert!(h.chunk(json!({})).get("usage").is_none());
        let f = completion_choice(1, "", None, Some(("stop", Some(json!(7)))));
        assert_eq!((f["finish_reason"].clone(), f["stop_reason"].clone()), (json!("stop"), json!(7)));
    }
}

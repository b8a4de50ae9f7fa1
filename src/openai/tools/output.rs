//! What a chat answer becomes when the request has tools, whole and
//! streamed, as vLLM's `OpenAIServingChat` makes it
//! (vllm/entrypoints/openai/serving_chat.py):
//!
//! - `tool_choice: "none"` (or no tools): the text is the content.
//! - `"auto"`: the text is read for calls in the parser's format (Hermes);
//!   with calls, `finish_reason` is `"tool_calls"` and the content is the
//!   text before them (null when there is none).
//! - a named function: the grammar held the text to the function's
//!   parameters, so the text is the call's arguments; content is null and
//!   `finish_reason` stays what it was (`"stop"`), as OpenAI answers a
//!   forced call.
//! - `"required"`: the grammar held the text to a JSON array of
//!   `{"name", "parameters"}`; each item is a call and `finish_reason` is
//!   `"tool_calls"`. Text that is no such array (cut short by max_tokens)
//!   is returned as content.
//!
//! `parallel_tool_calls: false` keeps the first call only.

use serde_json::{json, Value};

use super::{parse_hermes, parse_required_output, HermesStream, Tool, ToolCall, ToolChoice, ToolDelta};
use crate::error::{Error, Result};

/// How one request's answers are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolMode {
    /// The text is the content.
    Off,
    /// Calls are parsed from the text; `parser` is a `--tool-call-parser` name.
    Auto { parser: &'static str, parallel: bool },
    /// The text is this function's arguments.
    Named(String),
    /// The text is a JSON array of calls.
    Required { parallel: bool },
}

impl ToolMode {
    /// The mode for a request's tools and tool_choice. `"auto"` needs a
    /// tool-call parser (the server's `--tool-call-parser` or the model
    /// family's own); without one it is a 400 that says so, as vLLM
    /// refuses it.
    pub fn new(tools: &[Tool], choice: &ToolChoice, parser: Option<&'static str>, parallel: bool) -> Result<Self> {
        Ok(match choice {
            _ if tools.is_empty() => ToolMode::Off,
            ToolChoice::None => ToolMode::Off,
            ToolChoice::Auto => match parser {
                Some(parser) => ToolMode::Auto { parser, parallel },
                None => {
                    return Err(Error::InvalidInput(
                        "\"auto\" tool choice needs a tool-call parser: this model has no tool-call format of its \
                         own; start the server with --enable-auto-tool-choice --tool-call-parser hermes if it \
                         writes <tool_call> blocks, or use tool_choice \"required\" or a named function"
                            .into(),
                    ))
                }
            },
            ToolChoice::Named(name) => ToolMode::Named(name.clone()),
            ToolChoice::Required => ToolMode::Required { parallel },
        })
    }

    /// A finished choice's content, calls and finish reason.
    pub fn answer(&self, text: &str, finish_reason: &'static str) -> Answer {
        let plain = || Answer { content: Some(text.to_owned()), calls: Vec::new(), finish_reason };
        match self {
            ToolMode::Off => plain(),
            ToolMode::Auto { parallel, .. } => {
                let (content, mut calls) = parse_hermes(text);
                if calls.is_empty() {
                    return plain();
                }
                if !parallel {
                    calls.truncate(1);
                }
                Answer { content, calls, finish_reason: "tool_calls" }
            }
            ToolMode::Named(name) => {
                Answer { content: None, calls: vec![ToolCall::new(name.clone(), text)], finish_reason }
            }
            ToolMode::Required { parallel } => match parse_required_output(text) {
                Ok(mut calls) => {
                    if !parallel {
                        calls.truncate(1);
                    }
                    Answer { content: None, calls, finish_reason: "tool_calls" }
                }
                Err(_) => plain(),
            },
        }
    }
}

/// One finished choice's message parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
    pub finish_reason: &'static str,
}

/// A streamed choice: text deltas in, OpenAI `delta` objects out
/// (`{"content": ...}` or `{"tool_calls": [...]}`).
#[derive(Debug)]
pub struct ToolStream {
    mode: ToolMode,
    hermes: HermesStream,
    /// Named: the call's id once its first delta went out.
    named_id: Option<String>,
    /// Required: the whole text, read at the end.
    buffer: String,
}

/// A `tool_calls` delta entry with the whole call.
fn call_delta(index: usize, call: &ToolCall) -> Value {
    let mut v = call.to_json();
    v["index"] = json!(index);
    json!({"tool_calls": [v]})
}

impl ToolStream {
    pub fn new(mode: &ToolMode) -> Self {
        ToolStream { mode: mode.clone(), hermes: HermesStream::new(), named_id: None, buffer: String::new() }
    }

    /// The deltas for a piece of the choice's text (none while a call is
    /// still being written).
    pub fn push(&mut self, text: &str) -> Vec<Value> {
        match &self.mode {
            ToolMode::Off => content(text),
            ToolMode::Auto { parallel, .. } => {
                let parallel = *parallel;
                let deltas = self.hermes.push(text);
                deltas.into_iter().filter_map(|d| hermes_delta(d, parallel)).collect()
            }
            ToolMode::Named(name) => {
                if text.is_empty() {
                    return Vec::new();
                }
                match &self.named_id {
                    Some(_) => vec![json!({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})],
                    None => {
                        let call = ToolCall::new(name.clone(), text);
                        self.named_id = Some(call.id.clone());
                        vec![call_delta(0, &call)]
                    }
                }
            }
            ToolMode::Required { .. } => {
                self.buffer.push_str(text);
                Vec::new()
            }
        }
    }

    /// The last deltas of a choice that ended with `finish_reason`, and the
    /// finish reason to report.
    pub fn finish(&mut self, finish_reason: &'static str) -> (Vec<Value>, &'static str) {
        match &self.mode {
            ToolMode::Off => (Vec::new(), finish_reason),
            ToolMode::Auto { parallel, .. } => {
                let parallel = *parallel;
                let deltas = self.hermes.finish().into_iter().filter_map(|d| hermes_delta(d, parallel)).collect();
                (deltas, if self.hermes.saw_calls() { "tool_calls" } else { finish_reason })
            }
            ToolMode::Named(name) => match self.named_id {
                Some(_) => (Vec::new(), finish_reason),
                // Nothing was written: the call goes out with empty arguments.
                None => (vec![call_delta(0, &ToolCall::new(name.clone(), ""))], finish_reason),
            },
            ToolMode::Required { .. } => {
                let text = std::mem::take(&mut self.buffer);
                let a = self.mode.answer(&text, finish_reason);
                let mut deltas: Vec<Value> = a.calls.iter().enumerate().map(|(i, c)| call_delta(i, c)).collect();
                if let Some(c) = a.content {
                    deltas.extend(content(&c));
                }
                (deltas, a.finish_reason)
            }
        }
    }
}

fn content(text: &str) -> Vec<Value> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![json!({"content": text})]
    }
}

fn hermes_delta(d: ToolDelta, parallel: bool) -> Option<Value> {
    match d {
        ToolDelta::Content(c) => content(&c).pop(),
        ToolDelta::Call { index, call } => (parallel || index == 0).then(|| call_delta(index, &call)),
    }
}

#[cfg(test)]
#[path = "output_tests.rs"]
mod tests;

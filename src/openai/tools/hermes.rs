//! The Hermes tool-call format (vLLM `--tool-call-parser hermes`,
//! vllm/entrypoints/openai/tool_parsers/hermes_tool_parser.py), which
//! Qwen2/2.5 and Hermes models write and Qwen2.5's chat template teaches:
//!
//! ```text
//! Some text.
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! <tool_call>
//! ...
//! ```
//!
//! Both parsers read the same blocks as vLLM's regex
//! `<tool_call>(.*?)</tool_call>|<tool_call>(.*)` (the last block may be
//! left open at the end of the output) and agree on the text before the
//! first block. Where vLLM's streaming parser sends arguments piece by
//! piece from partial JSON, `HermesStream` sends each call whole once its
//! block closes: simpler, and a client that accumulates deltas sees the
//! same message.

use serde_json::Value;

use super::ToolCall;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A block's JSON as a call: an object with a string `name`. `arguments`
/// are re-serialized compactly (vLLM: `json.dumps`, with spaces); missing
/// or null arguments are `{}` (vLLM fails the block), and a string holding
/// a JSON object (arguments encoded twice) is that object.
fn parse_block(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body).ok()?;
    let name = v.get("name")?.as_str()?;
    let arguments = match v.get("arguments") {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(inner @ Value::Object(_)) => inner.to_string(),
            _ => Value::String(s.clone()).to_string(),
        },
        Some(a) => a.to_string(),
    };
    Some(ToolCall::new(name, arguments))
}

/// The content and calls of a whole output, as vLLM's
/// `Hermes2ProToolParser.extract_tool_calls`: with no `<tool_call>`, the
/// text is the content (None if empty). Otherwise every block is a call and
/// the content is the text before the first block with its trailing
/// whitespace cut (None if nothing is left; vLLM keeps the whitespace);
/// text between and after blocks is dropped, as in vLLM. If any block is
/// not a JSON object with a string `name`, there are no calls and the
/// whole text is the content.
pub fn parse_hermes(text: &str) -> (Option<String>, Vec<ToolCall>) {
    let Some(first) = text.find(OPEN) else {
        return ((!text.is_empty()).then(|| text.to_owned()), Vec::new());
    };
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        let (body, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        match parse_block(body) {
            Some(call) => calls.push(call),
            None => return (Some(text.to_owned()), Vec::new()),
        }
        rest = after;
    }
    let content = text[..first].trim_end();
    ((!content.is_empty()).then(|| content.to_owned()), calls)
}

/// What a stream of output text turns into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolDelta {
    /// Text for `delta.content`.
    Content(String),
    /// A whole call, the `index`-th of this output (0-based).
    Call { index: usize, call: ToolCall },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the first block: text is content.
    Text,
    /// Inside a block, waiting for `</tool_call>`.
    Block,
    /// After a block: whitespace (and any other text) is dropped until the
    /// next block.
    Between,
    /// A block failed to parse, or the stream finished: text is content.
    Plain,
}

/// `parse_hermes` over text that arrives in pieces (vLLM's
/// `extract_tool_calls_streaming`, with calls sent whole). Content before
/// the first `<tool_call>` streams as it arrives, except a trailing piece
/// that may yet become `<tool_call>` and the whitespace before it, held
/// until the next text settles it. A call is sent when its `</tool_call>`
/// arrives, or at `finish` if the open last block parses. A block that
/// does not parse is sent as content (with the text after it), at once
/// when it closes, at `finish` if it is the open last block; calls sent
/// before it stand, where `parse_hermes` would report none. Otherwise the
/// content and calls put together equal `parse_hermes`'s.
#[derive(Clone, Debug)]
pub struct HermesStream {
    state: State,
    /// Text not yet settled.
    buf: String,
    /// Bytes of `buf` (in `Block`) known to hold no `</tool_call>` start.
    scanned: usize,
    /// The whitespace between the content and the first block: content
    /// again if that block does not parse.
    gap: String,
    calls: usize,
}

impl Default for HermesStream {
    fn default() -> Self {
        HermesStream { state: State::Text, buf: String::new(), scanned: 0, gap: String::new(), calls: 0 }
    }
}

/// Appends `text` as content, joining it to a content delta just before.
fn emit(out: &mut Vec<ToolDelta>, text: &str) {
    if text.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(ToolDelta::Content(c)) => c.push_str(text),
        _ => out.push(ToolDelta::Content(text.to_owned())),
    }
}

/// Where a trailing proper prefix of `<tool_call>` starts in `text`
/// (`text.len()` if there is none).
fn partial_open(text: &str) -> usize {
    (1..OPEN.len()).rev().find(|&k| text.ends_with(&OPEN[..k])).map_or(text.len(), |k| text.len() - k)
}

impl HermesStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a call has been sent (the choice's finish_reason is then
    /// "tool_calls", as in vLLM).
    pub fn saw_calls(&self) -> bool {
        self.calls > 0
    }

    /// Takes the next piece of output text.
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Text => match self.buf.find(OPEN) {
                    Some(i) => {
                        let content_end = self.buf[..i].trim_end().len();
                        emit(&mut out, &self.buf[..content_end]);
                        self.gap = self.buf[content_end..i].to_owned();
                        self.open_block(i);
                    }
                    None => {
                        let held = self.buf[..partial_open(&self.buf)].trim_end().len();
                        emit(&mut out, &self.buf[..held]);
                        self.buf.drain(..held);
                        break;
                    }
                },
                State::Between => match self.buf.find(OPEN) {
                    Some(i) => {
                        self.gap.clear();
                        self.open_block(i);
                    }
                    None => {
                        self.buf.drain(..partial_open(&self.buf));
                        break;
                    }
                },
                State::Block => {
                    let mut from = self.scanned.saturating_sub(CLOSE.len() - 1);
                    while !self.buf.is_char_boundary(from) {
                        from -= 1;
                    }
                    let Some(j) = self.buf[from..].find(CLOSE) else {
                        self.scanned = self.buf.len();
                        break;
                    };
                    let end = from + j;
                    self.close_block(end, true, &mut out);
                    self.buf.drain(..end + CLOSE.len());
                }
                State::Plain => {
                    emit(&mut out, &self.buf);
                    self.buf.clear();
                    break;
                }
            }
        }
        out
    }

    /// The end of the output: settles what was held back. Text pushed
    /// after this is content.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        match self.state {
            State::Text | State::Plain => emit(&mut out, &self.buf),
            State::Between => {}
            State::Block => self.close_block(self.buf.len(), false, &mut out),
        }
        self.buf.clear();
        self.state = State::Plain;
        out
    }

    /// Drops `buf` up to the end of the `<tool_call>` at `i`.
    fn open_block(&mut self, i: usize) {
        self.buf.drain(..i + OPEN.len());
        self.state = State::Block;
        self.scanned = 0;
    }

    /// Ends the block whose body is `buf[..end]`: a call, or (if it does
    /// not parse) content from here on.
    fn close_block(&mut self, end: usize, closed: bool, out: &mut Vec<ToolDelta>) {
        let body = &self.buf[..end];
        match parse_block(body) {
            Some(call) => {
                out.push(ToolDelta::Call { index: self.calls, call });
                self.calls += 1;
                self.state = State::Between;
            }
            None => {
                let gap = std::mem::take(&mut self.gap);
                emit(out, &format!("{gap}{OPEN}{body}{}", if closed { CLOSE } else { "" }));
                self.state = State::Plain;
            }
        }
    }
}

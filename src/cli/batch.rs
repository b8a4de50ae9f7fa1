//! `kestrel generate --batch in.jsonl --output out.jsonl`: runs a file of
//! chat completion requests offline, as vLLM's `vllm run-batch`
//! (vllm/entrypoints/openai/run_batch.py) does, in OpenAI's Batch API file
//! formats.
//!
//! Each input line is an OpenAI batch line
//! `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`
//! or a bare chat completion body (its custom_id is then `line-<N>`, N
//! counting from 1). Blank lines are skipped. Each output line, in input
//! order, is `{"id", "custom_id", "response": {"status_code", "request_id",
//! "body"}, "error": null}` whose body is a `chat.completion` (200) or an
//! OpenAI error object (400 for a bad line, 500 for an engine failure); a
//! bad line never stops the others.
//!
//! Media of all lines is fetched and decoded in parallel (rayon) before the
//! requests go to the engine together. `stream` is ignored: results are
//! whole. The `model` field is not checked; responses name the loaded model.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::cli::engine_args::EngineArgs;
use crate::engine::{Engine, Request};
use crate::error::{Error, Result};
use crate::multimodal::fetch::MediaFetcher;
use crate::openai::protocol::ErrorResponse;
use crate::openai::protocol::{ChatCompletionRequest, ChatCompletionResponse, ChatInput};
use crate::openai::tools::ToolMode;

/// The one endpoint a batch line may name.
pub const CHAT_URL: &str = "/v1/chat/completions";

/// One output line (OpenAI `BatchRequestOutput`).
#[derive(Serialize)]
struct OutputLine {
    id: String,
    custom_id: String,
    response: ResponseData,
    /// Set only when a request could not be run at all; per-request failures
    /// are in `response` with their status code, as OpenAI reports them.
    error: Option<Value>,
}

#[derive(Serialize)]
struct ResponseData {
    status_code: u16,
    request_id: String,
    body: Value,
}

/// A parsed input line: who it is, and the request or why it is bad.
struct Line {
    /// 1-based line number in the input file.
    number: usize,
    custom_id: String,
    /// The request, or why the line is bad (the message of its 400).
    input: std::result::Result<ChatInput, String>,
}

/// Counts of a finished batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub succeeded: usize,
}

/// Runs every request of `input` on a new engine and writes the results to
/// `output`. Errors only for what stops the whole batch (unreadable input,
/// unwritable output, model that does not load).
pub fn run(args: &EngineArgs, dir: &Path, input: &Path, output: &Path) -> Result<Summary> {
    let text =
        std::fs::read_to_string(input).map_err(|e| Error::Io { path: input.display().to_string(), source: e })?;
    let lines = parse_lines(&text);
    let fetcher = MediaFetcher::new(args.fetch_settings()?)?;
    let engine = Engine::start(args.engine_config(dir.to_path_buf())?)?;
    let results = run_lines(&engine, &fetcher, &lines);

    let run_id = format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let frontend = engine.frontend();
    let token_text = |id: u32| frontend.token_text(id);
    let token_bytes = |id: u32| frontend.token_bytes(id);
    let mut out = String::new();
    let mut succeeded = 0;
    for (line, result) in lines.iter().zip(results) {
        let n = line.number;
        let (status_code, body) = match result {
            Ok(o) => {
                succeeded += 1;
                let id = format!("chatcmpl-{run_id}-{n}");
                let resp = ChatCompletionResponse::new(
                    id,
                    frontend.model_name.clone(),
                    created,
                    &o,
                    &line.input.as_ref().map_or(ToolMode::Off, |i| tool_mode(frontend, i).unwrap_or(ToolMode::Off)),
                    &token_text,
                    &token_bytes,
                );
                (200, to_json(&resp))
            }
            Err(e) => {
                let (status, body) = ErrorResponse::from_error(&e);
                (status, to_json(&body))
            }
        };
        let line = OutputLine {
            id: format!("batch_req_{n}"),
            custom_id: line.custom_id.clone(),
            response: ResponseData { status_code, request_id: format!("req-{run_id}-{n}"), body },
            error: None,
        };
        out.push_str(&to_json(&line).to_string());
        out.push('\n');
    }
    let io = |e| Error::Io { path: output.display().to_string(), source: e };
    std::fs::File::create(output).and_then(|mut f| f.write_all(out.as_bytes())).map_err(io)?;
    Ok(Summary { total: lines.len(), succeeded })
}

fn to_json<T: Serialize>(v: &T) -> Value {
    // Our response types hold only strings, numbers and lists: this cannot fail.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Every non-blank line, parsed and validated.
fn parse_lines(text: &str) -> Vec<Line> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let number = i + 1;
            let (custom_id, body) = split_line(l, number);
            let input =
                body.and_then(|b| ChatCompletionRequest::from_value(b)?.to_chat_input()).map_err(|e| e.to_string());
            Line { number, custom_id, input }
        })
        .collect()
}

/// A line's custom_id and its chat completion body.
fn split_line(line: &str, number: usize) -> (String, Result<Value>) {
    let default_id = format!("line-{number}");
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return (default_id, Err(Error::InvalidInput(format!("line {number} is not valid JSON: {e}")))),
    };
    let Some(obj) = v.as_object() else {
        return (default_id, Err(Error::InvalidInput(format!("line {number} must be a JSON object"))));
    };
    if !obj.contains_key("body") {
        return (default_id, Ok(v));
    }
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => default_id,
    };
    let bad = |msg: String| Err(Error::InvalidInput(msg));
    let check = match (obj.get("method"), obj.get("url")) {
        (Some(m), _) if m != "POST" => bad(format!("method {m} is not supported; batch lines are POST requests")),
        (_, Some(u)) if u != CHAT_URL => bad(format!("url {u} is not supported; this batch runner serves {CHAT_URL}")),
        _ => Ok(()),
    };
    (custom_id, check.map(|()| obj["body"].clone()))
}

/// Loads media for every good line in parallel, prepares the prompts, and
/// runs them on the engine together; one result per line, in order.
fn run_lines(
    engine: &Engine,
    fetcher: &MediaFetcher,
    lines: &[Line],
) -> Vec<Result<crate::engine::request::RequestOutput>> {
    let frontend = engine.frontend();
    let prepared: Vec<Result<Request>> = lines
        .par_iter()
        .map(|l| match &l.input {
            Ok(input) => tool_mode(frontend, input).and_then(|_| prepare(frontend, fetcher, input)),
            Err(msg) => Err(Error::InvalidInput(msg.clone())),
        })
        .collect();
    let mut results: Vec<Option<Result<_>>> = Vec::with_capacity(lines.len());
    let mut reqs = Vec::new();
    for p in prepared {
        match p {
            Ok(r) => {
                reqs.push(r);
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut outputs = engine.generate(reqs).into_iter();
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                outputs.next().unwrap_or_else(|| Err(Error::Engine("the engine returned too few results".into())))
            })
        })
        .collect()
}

/// How a line's answers are read for tool calls (the family's own format for "auto").
fn tool_mode(frontend: &crate::engine::Frontend, input: &ChatInput) -> Result<ToolMode> {
    ToolMode::new(&input.tools, &input.tool_choice, frontend.tool_parser, input.parallel_tool_calls)
}

pub use crate::openai::{prepare, prepare_timed};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_batch_lines_or_bare_bodies() {
        let text = [
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}"#,
            "",
            r#"{"messages": [{"role": "user", "content": "bare"}], "max_tokens": 3}"#,
            r#"{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}"#,
            r#"{"custom_id": 7, "method": "GET", "url": "/v1/chat/completions", "body": {}}"#,
            "{not json",
            "[1, 2]",
            r#"{"custom_id": "d", "body": {"messages": []}}"#,
        ]
        .join("\n");
        let lines = parse_lines(&text);
        let ids: Vec<_> = lines.iter().map(|l| (l.number, l.custom_id.as_str())).collect();
        assert_eq!(ids, [(1, "a"), (3, "line-3"), (4, "c"), (5, "7"), (6, "line-6"), (7, "line-7"), (8, "d")]);
        assert!(lines[0].input.is_ok());
        assert_eq!(lines[1].input.as_ref().unwrap().max_tokens, Some(3));
        let e = |i: usize| lines[i].input.as_ref().err().unwrap().clone();
        assert!(e(2).contains("url \"/v1/embeddings\" is not supported"), "{}", e(2));
        assert!(e(3).contains("method \"GET\" is not supported"), "{}", e(3));
        assert!(e(4).contains("line 6 is not valid JSON"), "{}", e(4));
        assert!(e(5).contains("line 7 must be a JSON object"), "{}", e(5));
        assert!(e(6).contains("messages must hold at least one message"), "{}", e(6));
    }
}

//! Function calling, as vLLM's OpenAI-compatible server does it: the
//! request's `tools` and `tool_choice` (vllm/entrypoints/openai/protocol.py
//! `ChatCompletionRequest.check_tool_usage`), the JSON schemas structured
//! output enforces for `tool_choice: "required"` or a named function
//! (`_get_guided_json_from_tool`), reading the model's output back into
//! calls (serving_chat.py; the Hermes parser, tool_parsers/
//! hermes_tool_parser.py, in `hermes`), and the clean-up of assistant
//! `tool_calls` before a chat template sees them (chat_utils.py
//! `_postprocess_messages`).
//!
//! What answers become (content, calls, finish reason; whole and
//! streamed) is in `output`. Everything here is pure: no engine, no template. Every problem with a
//! request is `Error::InvalidInput` (a 400) whose message starts with the
//! field's path (`tools[2].function.name ...`).

mod hermes;
mod output;

pub use hermes::{parse_hermes, HermesStream, ToolDelta};
pub use output::{Answer, ToolMode, ToolStream};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::sampling::Rng;

/// Longest function name OpenAI accepts.
pub const MAX_NAME_LEN: usize = 64;

/// One function the model may call (the request's
/// `{"type": "function", "function": {...}}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema object; `{"type": "object", "properties": {}}` when
    /// the request gave none.
    pub parameters: Value,
    /// OpenAI's strict mode. Kept for the template; the grammar enforces the
    /// schema whether or not it is set.
    pub strict: Option<bool>,
}

/// The parameters of a function that takes none. vLLM puts this in the
/// `required` schema when `parameters` is missing or `{}`.
fn empty_parameters() -> Value {
    json!({"type": "object", "properties": {}})
}

fn bad<T>(msg: String) -> Result<T> {
    Err(Error::InvalidInput(msg))
}

/// Whether `name` is a function name OpenAI accepts: 1 to 64 of a-z, A-Z,
/// 0-9, `_` and `-`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The request's `tools` (null: none). OpenAI's shape:
/// `[{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}]`. A missing `type` is "function", as in
/// vLLM's `ChatCompletionToolsParam`; other fields are ignored. Names are
/// checked as OpenAI checks them (vLLM does not) and must be unique.
/// Missing, null or `{}` parameters become an empty object schema.
pub fn parse_tools(v: &Value) -> Result<Vec<Tool>> {
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(list) => list,
        other => {
            return bad(format!(
                "tools must be an array of {{\"type\": \"function\", \"function\": {{...}}}} objects, got {other}"
            ))
        }
    };
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        let Value::Object(entry) = entry else {
            return bad(format!("{at} must be an object {{\"type\": \"function\", \"function\": {{...}}}}"));
        };
        match entry.get("type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "function" => {}
            Some(t) => return bad(format!("{at}.type must be \"function\" (the only kind of tool served), got {t}")),
        }
        let Some(Value::Object(f)) = entry.get("function") else {
            return bad(format!("{at}.function must be an object with a `name`"));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            Some(Value::String(n)) => {
                return bad(format!(
                    "{at}.function.name must be 1 to {MAX_NAME_LEN} characters of a-z, A-Z, 0-9, _ and -, got {n:?}"
                ))
            }
            None | Some(Value::Null) => return bad(format!("{at}.function.name is missing")),
            Some(other) => return bad(format!("{at}.function.name must be a string, got {other}")),
        };
        if let Some(j) = tools.iter().position(|t| t.name == name) {
            return bad(format!("{at}.function.name {name:?} is already the name of tools[{j}]; names must be unique"));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(other) => return bad(format!("{at}.function.description must be a string, got {other}")),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => empty_parameters(),
            Some(Value::Object(p)) if p.is_empty() => empty_parameters(),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(other) => {
                return bad(format!("{at}.function.parameters must be a JSON Schema object, got {other}"));
            }
        };
        let strict = match f.get("strict") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => return bad(format!("{at}.function.strict must be a boolean, got {other}")),
        };
        tools.push(Tool { name, description, parameters, strict });
    }
    Ok(tools)
}

/// The `tools` variable of a chat template: OpenAI's shape, which HF's
/// templates (Qwen2.5's `tool | tojson`) expect, keys in the order
/// `name`, `description`, `parameters`, `strict`. Fields the request left
/// out stay out (vLLM's `model_dump()` prints them as null).
pub fn tools_for_template(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), json!(t.name));
                if let Some(d) = &t.description {
                    f.insert("description".into(), json!(d));
                }
                f.insert("parameters".into(), t.parameters.clone());
                if let Some(s) = t.strict {
                    f.insert("strict".into(), json!(s));
                }
                json!({"type": "function", "function": f})
            })
            .collect(),
    )
}

/// What the request lets the model do with its tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer in text; no parsing of calls.
    None,
    /// The model decides; its output is parsed for calls (Hermes).
    Auto,
    /// At least one call: the output is held to `required_schema`.
    Required,
    /// Exactly this function: the output is held to its parameters
    /// (`named_schema`) and is the call's arguments.
    Named(String),
}

/// The request's `tool_choice` given its parsed `tools` (empty: none or
/// `[]`). Absent or null: `auto` with tools, `none` without, as vLLM's
/// `check_tool_usage`. Any choice but "none" without tools is a 400, as
/// OpenAI answers (vLLM lets `"auto"` and `"required"` through when
/// `tools` is `[]`); a named function must be one of the tools.
pub fn parse_tool_choice(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice> {
    const SHAPES: &str = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}";
    let parsed = match choice {
        None | Some(Value::Null) => {
            return Ok(if tools.is_empty() { ToolChoice::None } else { ToolChoice::Auto });
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(ToolChoice::None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return bad(format!("tool_choice must be {SHAPES}, got {other:?}")),
        },
        Some(Value::Object(o)) => {
            match o.get("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(t)) if t == "function" => {}
                Some(t) => return bad(format!("tool_choice.type must be \"function\", got {t}")),
            }
            let name = match o.get("function") {
                Some(Value::Object(f)) => match f.get("name") {
                    Some(Value::String(n)) if !n.is_empty() => n.clone(),
                    _ => return bad("tool_choice.function.name must be a non-empty string".into()),
                },
                _ => {
                    return bad(format!("tool_choice.function must be an object {{\"name\": ...}}; expected {SHAPES}"))
                }
            };
            ToolChoice::Named(name)
        }
        Some(other) => return bad(format!("tool_choice must be {SHAPES}, got {other}")),
    };
    if tools.is_empty() {
        let what = match &parsed {
            ToolChoice::Named(n) => format!("function {n:?}"),
            ToolChoice::Auto => "\"auto\"".into(),
            _ => "\"required\"".into(),
        };
        return bad(format!(
            "tool_choice {what} needs `tools`, and the request has none; give tools or leave tool_choice out"
        ));
    }
    if let ToolChoice::Named(n) = &parsed {
        if !tools.iter().any(|t| &t.name == n) {
            let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
            return bad(format!(
                "tool_choice names function {n:?}, which is not in tools (they are: {})",
                names.join(", ")
            ));
        }
    }
    Ok(parsed)
}

/// The schema structured output holds a named function's output to: its
/// parameters, so the whole output is the call's arguments (vLLM).
pub fn named_schema(tool: &Tool) -> Value {
    tool.parameters.clone()
}

/// The schema for `tool_choice: "required"`, as vLLM builds it: an array
/// of at least one `{"name", "parameters"}` object, each item any of the
/// tools (its name a constant, its parameters that tool's schema; vLLM
/// spells the constant as a one-element enum). With `parallel` false
/// (`parallel_tool_calls: false`) at most one item: OpenAI's meaning, which
/// vLLM ignores. `$defs` of the tools' parameters move to the root, where
/// their `#/$defs/...` references resolve; two tools defining one name
/// differently is a 400, as in vLLM.
pub fn required_schema(tools: &[Tool], parallel: bool) -> Result<Value> {
    let mut defs = Map::new();
    let mut any_of = Vec::with_capacity(tools.len());
    for t in tools {
        let mut params = t.parameters.clone();
        if let Some(Value::Object(own)) = params.as_object_mut().and_then(|p| p.remove("$defs")) {
            for (k, v) in own {
                match defs.get(&k) {
                    Some(prev) if *prev != v => {
                        return bad(format!(
                            "tools: the schema definition {k:?} ($defs) differs between tools, which \
                             tool_choice \"required\" cannot combine"
                        ))
                    }
                    _ => {
                        defs.insert(k, v);
                    }
                }
            }
        }
        any_of.push(json!({
            "properties": {
                "name": {"type": "string", "const": t.name},
                "parameters": params,
            },
            "required": ["name", "parameters"],
        }));
    }
    let mut schema = json!({
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": any_of},
    });
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    Ok(schema)
}

/// The calls in an output held to `required_schema`: a JSON array of
/// `{"name": string, "parameters": object}` (vLLM validates it as a list of
/// `FunctionDefinition`). Arguments are the parameters re-serialized
/// compactly; missing or null parameters are `{}` (vLLM writes `null`).
/// Output that does not fit (cut short by max_tokens, say) is an error
/// saying what was wrong.
pub fn parse_required_output(text: &str) -> Result<Vec<ToolCall>> {
    let what = "the output for tool_choice \"required\"";
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::InvalidInput(format!("{what} is not valid JSON ({e}): {text:?}")))?;
    let Value::Array(items) = v else {
        return bad(format!("{what} must be a JSON array of {{\"name\", \"parameters\"}} objects, got {text:?}"));
    };
    let mut calls = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let name = match item.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => return bad(format!("{what}: item {i} has no string `name`: {item}")),
        };
        let arguments = match item.get("parameters") {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(p @ Value::Object(_)) => p.to_string(),
            Some(p) => return bad(format!("{what}: item {i}'s `parameters` must be an object, got {p}")),
        };
        calls.push(ToolCall::new(name, arguments));
    }
    Ok(calls)
}

/// One call the model made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_` and 24 random alphanumerics (OpenAI's form).
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI sends a string).
    pub arguments: String,
}

impl ToolCall {
    /// A call with a fresh random id.
    pub fn new(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        let mut rng = Rng::from_entropy();
        ToolCall { id: call_id(&mut || rng.next_u64()), name: name.into(), arguments: arguments.into() }
    }

    /// OpenAI's `tool_calls` entry:
    /// `{"id", "type": "function", "function": {"name", "arguments"}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// A call id: `call_` and 24 alphanumerics drawn from `next_u64` (one draw
/// each; the modulo bias is 62/2^64).
pub fn call_id(next_u64: &mut dyn FnMut() -> u64) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(29);
    id.push_str("call_");
    for _ in 0..24 {
        id.push(ALPHABET[(next_u64() % 62) as usize] as char);
    }
    id
}

/// Readies assistant `tool_calls` for a chat template, as vLLM's
/// `_postprocess_messages` does: templates `tojson` the arguments, so each
/// `function.arguments` JSON string that holds an object becomes that
/// object; an empty or null one becomes `{}`; an empty `tool_calls` list is
/// dropped so the message renders as a plain answer. Arguments that are not
/// a JSON object stay the string they were (vLLM now replaces them with
/// `{}`; a template can print the string as the model wrote it). Entries of
/// the wrong shape are left alone for the template to judge.
pub fn postprocess_messages(messages: &mut Value) {
    let Value::Array(list) = messages else { return };
    for m in list.iter_mut().filter(|m| m["role"] == "assistant") {
        let Some(obj) = m.as_object_mut() else { continue };
        match obj.get_mut("tool_calls") {
            Some(Value::Array(calls)) if calls.is_empty() => {
                obj.remove("tool_calls");
            }
            Some(Value::Array(calls)) => {
                for f in calls.iter_mut().filter_map(|c| c.get_mut("function")).filter_map(Value::as_object_mut) {
                    let parsed = match f.get("arguments") {
                        None | Some(Value::Null) => json!({}),
                        Some(Value::String(s)) if s.trim().is_empty() => json!({}),
                        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                            Ok(v @ Value::Object(_)) => v,
                            _ => continue,
                        },
                        Some(_) => continue,
                    };
                    f.insert("arguments".into(), parsed);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;

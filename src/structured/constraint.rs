//! What a request constrains its output to, read from the fields vLLM's
//! OpenAI server takes for it (vllm/entrypoints/openai/protocol.py,
//! vllm/sampling_params.py `StructuredOutputsParams`):
//!
//! - OpenAI's `response_format`: `{"type": "text"}` (no constraint),
//!   `{"type": "json_object"}`, `{"type": "json_schema", "json_schema":
//!   {"name", "schema", "strict", "description"}}`;
//! - vLLM's `structured_outputs` object: one of `json`, `regex`, `choice`,
//!   `grammar`, `json_object`, with `disable_any_whitespace`,
//!   `disable_additional_properties`, `whitespace_pattern`,
//!   `disable_fallback`;
//! - vLLM's older `guided_json`, `guided_regex`, `guided_choice`,
//!   `guided_grammar`, `guided_whitespace_pattern` and
//!   `guided_decoding_backend`.
//!
//! At most one constraint per request; two are a 400 that names both, as
//! vLLM refuses them. `structural_tag` and backends other than llguidance
//! are refused with the reason.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One request's output constraint.
#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// Output is JSON valid against the schema (`{"type": "object"}` for
    /// `json_object`).
    Json { schema: Value, options: JsonOptions },
    /// Output matches the regular expression (Rust `regex` syntax) whole.
    Regex(String),
    /// Output is exactly one of the strings.
    Choice(Vec<String>),
    /// Output is a sentence of the grammar: llguidance's Lark syntax, or
    /// llama.cpp's GBNF (`root ::= ...`, vLLM's documented form).
    Grammar(String),
}

/// How JSON is written around the schema's values.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonOptions {
    /// Any whitespace between tokens (vLLM's default); false writes compact
    /// JSON (`disable_any_whitespace`).
    pub any_whitespace: bool,
    /// A regex for the whitespace allowed between tokens.
    pub whitespace_pattern: Option<String>,
    /// Objects that do not say otherwise take no properties beyond those
    /// listed (`disable_additional_properties`).
    pub no_additional_properties: bool,
    /// With `any_whitespace` false: write `, ` and `: ` between items and
    /// after keys (Python's `json.dumps` layout, the one models see in
    /// training) instead of `,` and `:`.
    pub spaced: bool,
}

impl Default for JsonOptions {
    fn default() -> Self {
        JsonOptions { any_whitespace: true, whitespace_pattern: None, no_additional_properties: false, spaced: false }
    }
}

impl JsonOptions {
    /// Tool calls' arguments: `json.dumps` layout, nothing else. Bounded
    /// (a model cannot wander in whitespace) and what the Hermes format's
    /// examples look like.
    pub fn tool_calls() -> Self {
        JsonOptions { any_whitespace: false, spaced: true, ..JsonOptions::default() }
    }
}

impl JsonOptions {
    /// Writes the options into the schema where llguidance reads them
    /// (its `x-guidance` key; what the schema already sets there wins).
    pub fn apply(&self, schema: &mut Value) {
        if self.no_additional_properties {
            close_objects(schema);
        }
        let Some(obj) = schema.as_object_mut() else { return };
        let x = obj.entry("x-guidance").or_insert_with(|| json!({}));
        if let Some(x) = x.as_object_mut() {
            x.entry("whitespace_flexible").or_insert(json!(self.any_whitespace));
            if self.spaced && !self.any_whitespace {
                x.entry("item_separator").or_insert(json!(", "));
                x.entry("key_separator").or_insert(json!(": "));
            }
            if let Some(p) = &self.whitespace_pattern {
                x.entry("whitespace_pattern").or_insert(json!(p));
            }
        }
    }
}

/// `additionalProperties: false` on every object schema that lists
/// properties and says nothing about others.
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            m.values_mut().for_each(close_objects);
        }
        Value::Array(a) => a.iter_mut().for_each(close_objects),
        _ => {}
    }
}

impl Constraint {
    /// What the constraint is, for messages ("JSON schema", ...).
    pub fn what(&self) -> &'static str {
        match self {
            Constraint::Json { .. } => "JSON schema",
            Constraint::Regex(_) => "regular expression",
            Constraint::Choice(_) => "choice list",
            Constraint::Grammar(_) => "grammar",
        }
    }

    /// Any JSON object.
    pub fn json_object(options: JsonOptions) -> Self {
        Constraint::Json { schema: json!({"type": "object"}), options }
    }
}

/// The request fields that ask for a constraint, as both the chat and the
/// completions bodies carry them.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConstraintFields {
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
    pub structural_tag: Option<Value>,
}

fn bad<T>(msg: String) -> Result<T> {
    Err(Error::InvalidInput(msg))
}

/// Backends a request may name: Kestrel's engine is llguidance, which vLLM
/// calls `guidance`; `auto` lets the server choose.
const BACKENDS: [&str; 3] = ["auto", "guidance", "llguidance"];

impl ConstraintFields {
    /// The request's constraint, if it asks for one.
    pub fn constraint(&self) -> Result<Option<Constraint>> {
        if let Some(b) = present(&self.guided_decoding_backend) {
            match b.as_str() {
                Some(name) if BACKENDS.contains(&name) => {}
                _ => {
                    return bad(format!(
                        "guided_decoding_backend {b} is not available: structured outputs run on llguidance \
                         (vLLM's \"guidance\" backend); leave it out or use \"guidance\""
                    ))
                }
            }
        }
        if present(&self.structural_tag).is_some() {
            return bad("structural_tag is not supported; use response_format json_schema or tools".into());
        }
        let mut found: Vec<(&'static str, Constraint)> = Vec::new();
        let ws = match present(&self.guided_whitespace_pattern) {
            None => None,
            Some(Value::String(p)) => Some(p.clone()),
            Some(other) => return bad(format!("guided_whitespace_pattern must be a string, got {other}")),
        };
        let mut options = JsonOptions { whitespace_pattern: ws, ..JsonOptions::default() };
        // structured_outputs' options (disable_any_whitespace, ...) hold for
        // whichever field gives the constraint, as vLLM merges them.
        let mut options_only = false;
        if let Some(so) = present(&self.structured_outputs) {
            let (opts, c) = structured_outputs(so, &options)?;
            options = opts;
            match c {
                Some(c) => found.push(("structured_outputs", c)),
                None => options_only = true,
            }
        }
        if let Some(rf) = present(&self.response_format) {
            if let Some(c) = response_format(rf, &options)? {
                found.push(("response_format", c));
            }
        }
        let guided = [
            ("guided_json", &self.guided_json),
            ("guided_regex", &self.guided_regex),
            ("guided_choice", &self.guided_choice),
            ("guided_grammar", &self.guided_grammar),
        ];
        for (name, v) in guided {
            if let Some(v) = present(v) {
                let kind = name.strip_prefix("guided_").unwrap_or(name);
                found.push((name, one(name, kind, v, &options)?));
            }
        }
        match found.len() {
            0 if options_only => bad("structured_outputs gives options but no constraint (json, regex, choice, \
                                      grammar or json_object), and no other field gives one"
                .into()),
            0 => Ok(None),
            1 => Ok(found.pop().map(|f| f.1)),
            _ => {
                let names: Vec<&str> = found.iter().map(|f| f.0).collect();
                bad(format!("only one output constraint may be given, but this request has {}", names.join(" and ")))
            }
        }
    }
}

/// A field that is there and not null.
fn present(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|v| !v.is_null())
}

/// One constraint of `kind` (json, regex, grammar, choice), given as the
/// field `key`.
fn one(key: &str, kind: &str, v: &Value, options: &JsonOptions) -> Result<Constraint> {
    let string = |what: &str| match v {
        Value::String(s) => Ok(s.clone()),
        other => bad(format!("{key} must be {what}, got {other}")),
    };
    match kind {
        "json" => Ok(Constraint::Json { schema: schema_value(key, v)?, options: options.clone() }),
        "regex" => Ok(Constraint::Regex(string("a regular expression (a string)")?)),
        "grammar" => {
            let g = string("a grammar (a string)")?;
            if g.trim().is_empty() {
                return bad(format!("{key} is empty"));
            }
            Ok(Constraint::Grammar(g))
        }
        "choice" => {
            let items = match v {
                Value::Array(items) if !items.is_empty() => items,
                other => return bad(format!("{key} must be a non-empty array of strings, got {other}")),
            };
            let choices = items
                .iter()
                .map(|c| c.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::InvalidInput(format!("{key} must be an array of strings")))?;
            Ok(Constraint::Choice(choices))
        }
        _ => bad(format!("{key}: {kind} is not a known constraint")),
    }
}

/// A schema given as an object or as its JSON text.
fn schema_value(key: &str, v: &Value) -> Result<Value> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| Error::InvalidInput(format!("{key} is a string but not JSON text: {e}")))?,
        other => other.clone(),
    };
    match schema {
        Value::Object(_) => Ok(schema),
        // `true` is JSON Schema's "anything": any JSON value.
        Value::Bool(true) => Ok(json!({})),
        other => bad(format!("{key} must be a JSON schema (an object), got {other}")),
    }
}

/// OpenAI's `response_format`.
fn response_format(rf: &Value, options: &JsonOptions) -> Result<Option<Constraint>> {
    let Some(obj) = rf.as_object() else {
        return bad(format!("response_format must be an object with a `type`, got {rf}"));
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::json_object(options.clone()))),
        Some("json_schema") => {
            let Some(js) = obj.get("json_schema").and_then(Value::as_object) else {
                return bad("response_format json_schema needs a `json_schema` object with a `schema`".into());
            };
            // vLLM also takes the schema under `json_schema` (its alias).
            let Some(schema) = js.get("schema").or_else(|| js.get("json_schema")).filter(|s| !s.is_null()) else {
                return bad("response_format.json_schema.schema is missing".into());
            };
            let schema = schema_value("response_format.json_schema.schema", schema)?;
            Ok(Some(Constraint::Json { schema, options: options.clone() }))
        }
        Some("structural_tag") => {
            bad("response_format structural_tag is not supported; use json_schema or tools".into())
        }
        Some(other) => {
            bad(format!("response_format type {other:?} is not supported; expected text, json_object or json_schema"))
        }
        None => bad("response_format needs a `type` (text, json_object or json_schema)".into()),
    }
}

/// vLLM's `structured_outputs` object: its options over `base`, and its
/// constraint if it gives one.
fn structured_outputs(so: &Value, base: &JsonOptions) -> Result<(JsonOptions, Option<Constraint>)> {
    let Some(obj) = so.as_object() else {
        return bad(format!("structured_outputs must be an object, got {so}"));
    };
    let flag = |k: &str| match obj.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bad(format!("structured_outputs.{k} must be true or false, got {other}")),
    };
    let mut options = base.clone();
    options.any_whitespace = !flag("disable_any_whitespace")?;
    options.no_additional_properties = flag("disable_additional_properties")?;
    // There is one engine and nothing to fall back to: the flag holds either way.
    flag("disable_fallback")?;
    match obj.get("whitespace_pattern") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) => options.whitespace_pattern = Some(p.clone()),
        Some(other) => return bad(format!("structured_outputs.whitespace_pattern must be a string, got {other}")),
    }
    let known = [
        "json",
        "regex",
        "choice",
        "grammar",
        "json_object",
        "structural_tag",
        "disable_any_whitespace",
        "disable_additional_properties",
        "disable_fallback",
        "whitespace_pattern",
    ];
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return bad(format!("structured_outputs.{k} is not a known field; expected one of {}", known.join(", ")));
    }
    if obj.get("structural_tag").is_some_and(|v| !v.is_null()) {
        return bad("structured_outputs.structural_tag is not supported; use json or tools".into());
    }
    let mut kinds: Vec<Constraint> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for k in ["json", "regex", "choice", "grammar"] {
        if let Some(v) = obj.get(k).filter(|v| !v.is_null()) {
            kinds.push(one(&format!("structured_outputs.{k}"), k, v, &options)?);
            names.push(k);
        }
    }
    if flag("json_object")? {
        kinds.push(Constraint::json_object(options.clone()));
        names.push("json_object");
    }
    match kinds.len() {
        0 | 1 => Ok((options, kinds.pop())),
        _ => bad(format!("structured_outputs may hold one constraint, but has {}", names.join(" and "))),
    }
}

#[cfg(test)]
#[path = "constraint_tests.rs"]
mod tests;

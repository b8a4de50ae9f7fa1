//! Chat templates: find a model's Jinja chat template the way transformers
//! does and render it with minijinja set up like transformers' Jinja
//! environment, so the prompt text is the one HF would build.
//!
//! Mirrors, in transformers 5.x:
//! - `ProcessorMixin.get_processor_dict` (processing_utils.py) and
//!   `PreTrainedTokenizerBase.from_pretrained` / `__init__`
//!   (tokenization_utils_base.py) for where the template comes from;
//! - `_cached_compile_jinja_template` (utils/chat_template_utils.py) for the
//!   environment: `trim_blocks`, `lstrip_blocks`, loop controls,
//!   `raise_exception`, `strftime_now`, and a `tojson` that is Python's
//!   `json.dumps` (no HTML escaping, `ensure_ascii`/`indent`/`separators`/
//!   `sort_keys`) (these two are in `text::pycompat`);
//! - `render_jinja_template` and `ProcessorMixin.apply_chat_template` for the
//!   variables: `messages`, `tools` (none), `documents` (none),
//!   `add_generation_prompt`, the named special tokens (`bos_token`,
//!   `eos_token`, ...), then caller kwargs (e.g. `add_vision_id`), and for
//!   the message clean-up: keys whose value is null are dropped, OpenAI
//!   `{"type": "image_url", "image_url": {"url": u}}` parts become
//!   `{"type": "image", "url": u}`, and `reasoning_content` / `thinking` /
//!   `reasoning` alias each other.
//!
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`,
//! ...) come from minijinja-contrib's pycompat. Maps keep the key order of
//! the JSON they came from (templates that iterate a dict or `tojson` it see
//! Python's order) provided serde_json keeps it (its `preserve_order`
//! feature). Known differences from Jinja2: `~` and `|string` print floats
//! like 1e20 as `100000000000000000000.0` where Python prints `1e+20`, and
//! `strftime_now` uses UTC, not the host's local time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, ErrorKind, Value};

use crate::error::{Error, Result};
use crate::text::pycompat;
use crate::text::tokenizer::SpecialTokens;

/// A family's text for its n-th image (1-based, counted across the
/// conversation) in a prompt: `<|image_n|>`, `<image>`, ….
pub type Placeholder = fn(usize) -> String;

/// A compiled chat template plus the special-token variables it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file, or `--chat-template`); also the
    /// template's name in error messages.
    origin: String,
    source: String,
    special: SpecialTokens,
    /// The family's placeholder (see [`Self::with_string_content`]).
    placeholder: Option<Placeholder>,
    /// Whether content lists are flattened with it before rendering.
    string_content: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("special", &self.special).finish()
    }
}

impl ChatTemplate {
    /// Compile `source`. `origin` names it in error messages. Syntax errors
    /// are `Error::Template` with minijinja's message and line.
    pub fn new(source: impl Into<String>, origin: impl Into<String>, special: SpecialTokens) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let mut env = hf_environment()?;
        env.add_template_owned(origin.clone(), source.clone()).map_err(template_error)?;
        Ok(ChatTemplate { env, origin, source, special, placeholder: None, string_content: false })
    }

    /// The model folder's own template (see [`find_in_dir`] for the order),
    /// with the special tokens from its tokenizer_config.json.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let Some((source, file)) = find_in_dir(dir)? else {
            return Err(Error::Template(format!(
                "{} has no chat template (looked in processor_config.json, chat_template.json, \
                 chat_template.jinja, additional_chat_templates/, tokenizer_config.json); pass --chat-template",
                dir.display()
            )));
        };
        Self::new(source, file.display().to_string(), SpecialTokens::from_dir(dir)?)
    }

    /// What the server uses: `--chat-template` if given (see
    /// [`read_override`]), else the folder's own template; special tokens
    /// come from the folder either way.
    pub fn load(dir: impl AsRef<Path>, chat_template: Option<&str>) -> Result<Self> {
        Self::load_or(dir, chat_template, None)
    }

    /// As [`ChatTemplate::load`], with a built-in template (the model
    /// family's, named by `builtin.0`) for a folder that has none; says so
    /// once on stderr when it is used.
    pub fn load_or(dir: impl AsRef<Path>, chat_template: Option<&str>, builtin: Option<(&str, &str)>) -> Result<Self> {
        let dir = dir.as_ref();
        match (chat_template, builtin) {
            (Some(arg), _) => {
                let (source, origin) = read_override(arg)?;
                Self::new(source, origin, SpecialTokens::from_dir(dir)?)
            }
            (None, Some((family, source))) if find_in_dir(dir)?.is_none() => {
                eprintln!(
                    "kestrel: {} has no chat template; using Kestrel's built-in {family} template \
                     (--chat-template overrides it)",
                    dir.display()
                );
                Self::new(source, format!("built-in {family} template"), SpecialTokens::from_dir(dir)?)
            }
            (None, _) => Self::from_dir(dir),
        }
    }

    /// Makes content lists render with a template written for string
    /// content, as vLLM's "string" content format does: when the template
    /// never loops over a message's content, each list becomes one string,
    /// the placeholders of its images (numbered across the conversation)
    /// that its text does not already hold, each on its own line, then its
    /// text parts joined by newlines. Templates that loop over content get
    /// the parts as they are.
    pub fn with_string_content(mut self, placeholder: Placeholder) -> Self {
        self.placeholder = Some(placeholder);
        self.string_content = !iterates_content(&self.source);
        self
    }

    /// Whether content lists are flattened (see [`Self::with_string_content`]).
    pub fn flattens_content(&self) -> bool {
        self.string_content
    }

    /// The family placeholder this template was given, if any.
    pub fn placeholder(&self) -> Option<Placeholder> {
        self.placeholder
    }

    /// Render a conversation: `messages` is the JSON array of messages
    /// (`{"role": ..., "content": string | [parts]}`), as in the OpenAI API.
    pub fn render(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Value::Null)
    }

    /// [`render`](Self::render) with extra template variables
    /// (`chat_template_kwargs`: a JSON object such as
    /// `{"add_vision_id": true}`, or null). They override the special-token
    /// variables, as in HF.
    pub fn render_with(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        kwargs: &serde_json::Value,
    ) -> Result<String> {
        self.render_tools(messages, add_generation_prompt, kwargs, &serde_json::Value::Null)
    }

    /// `render_with`, with the request's `tools` (OpenAI's list of
    /// `{"type": "function", "function": {...}}`, or null for none) as the
    /// template's `tools` variable, as transformers' `apply_chat_template`
    /// passes them.
    pub fn render_tools(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        kwargs: &serde_json::Value,
        tools: &serde_json::Value,
    ) -> Result<String> {
        let flat;
        let messages = match self.placeholder.filter(|_| self.string_content) {
            Some(ph) => {
                flat = flatten_content(messages, ph);
                normalize_messages(&flat)?
            }
            None => normalize_messages(messages)?,
        };
        let mut ctx: Vec<(String, Value)> = Vec::new();
        for (name, tok) in self.special.named() {
            ctx.push((name.to_owned(), Value::from(tok)));
        }
        match kwargs {
            serde_json::Value::Null => {}
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    ctx.retain(|(name, _)| name != k);
                    ctx.push((k.clone(), to_value(v)));
                }
            }
            other => {
                return Err(Error::InvalidInput(format!("chat template kwargs must be a JSON object, got {other}")))
            }
        }
        // These four are set last, as keyword arguments to `render` are in HF.
        for name in ["messages", "tools", "documents", "add_generation_prompt"] {
            ctx.retain(|(k, _)| k != name);
        }
        ctx.push(("messages".into(), messages));
        ctx.push(("tools".into(), if tools.is_null() { Value::from(()) } else { to_value(tools) }));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));

        let tmpl = self.env.get_template(&self.origin).map_err(template_error)?;
        tmpl.render(Value::from_object(OrderedMap(ctx.into_iter().map(|(k, v)| (Value::from(k), v)).collect())))
            .map_err(template_error)
    }

    /// Whether the template reads the `tools` variable (renders a
    /// request's tools for the model).
    pub fn renders_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }
}

/// Find a model folder's chat template the way transformers 5.x does for a
/// multimodal model (`AutoProcessor`, falling back to the tokenizer's own,
/// as vLLM does). First match wins:
/// 1. `processor_config.json` key `chat_template` (legacy; HF warns but uses it);
/// 2. `chat_template.json` (`{"chat_template": "..."}`; legacy processor file);
/// 3. `chat_template.jinja`;
/// 4. `additional_chat_templates/default.jinja`;
/// 5. `tokenizer_config.json` key `chat_template`: a string, or a list of
///    `{"name", "template"}` from which "default" is taken.
///
/// Returns the template and the file it came from, or `None` when the folder
/// has none. Malformed files are errors, never skipped.
pub fn find_in_dir(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    if let Some(cfg) = read_json_opt(&dir.join("processor_config.json"))? {
        match &cfg["chat_template"] {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => return Ok(Some((s.clone(), dir.join("processor_config.json")))),
            _ => return Err(Error::Template("processor_config.json: chat_template is not a string".into())),
        }
    }

    let additional = dir.join("additional_chat_templates");
    let has_additional = additional_templates(&additional)?;

    let legacy = dir.join("chat_template.json");
    if let Some(cfg) = read_json_opt(&legacy)? {
        if has_additional {
            // transformers refuses this combination too.
            return Err(Error::Template(format!(
                "{} and {} are both present; replace chat_template.json with chat_template.jinja",
                legacy.display(),
                additional.display()
            )));
        }
        return match &cfg["chat_template"] {
            serde_json::Value::String(s) => Ok(Some((s.clone(), legacy))),
            _ => Err(Error::Template(format!("{}: no string `chat_template` key", legacy.display()))),
        };
    }

    let jinja = dir.join("chat_template.jinja");
    if let Some(s) = read_text_opt(&jinja)? {
        return Ok(Some((s, jinja)));
    }
    if has_additional {
        let default = additional.join("default.jinja");
        return match read_text_opt(&default)? {
            Some(s) => Ok(Some((s, default))),
            None => Err(Error::Template(format!(
                "{} has templates but none named default.jinja and there is no chat_template.jinja",
                additional.display()
            ))),
        };
    }

    let tok_cfg = dir.join("tokenizer_config.json");
    if let Some(cfg) = read_json_opt(&tok_cfg)? {
        match &cfg["chat_template"] {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => return Ok(Some((s.clone(), tok_cfg))),
            serde_json::Value::Array(list) => {
                let mut names = Vec::new();
                for entry in list {
                    let (Some(name), Some(template)) = (entry["name"].as_str(), entry["template"].as_str()) else {
                        return Err(Error::Template(format!(
                            "{}: chat_template list entries need string `name` and `template`",
                            tok_cfg.display()
                        )));
                    };
                    if name == "default" {
                        return Ok(Some((template.to_owned(), tok_cfg)));
                    }
                    names.push(name.to_owned());
                }
                return Err(Error::Template(format!(
                    "{}: no chat template named \"default\" (have: {})",
                    tok_cfg.display(),
                    names.join(", ")
                )));
            }
            _ => return Err(Error::Template(format!("{}: chat_template is not a string or list", tok_cfg.display()))),
        }
    }
    Ok(None)
}

/// `--chat-template ARG`: the contents of the file `ARG`; if there is no
/// such file but `ARG` contains `{{` or `{%`, `ARG` is the template itself
/// (vLLM accepts both). Returns the template and its origin.
pub fn read_override(arg: &str) -> Result<(String, String)> {
    let path = Path::new(arg);
    match std::fs::metadata(path) {
        Ok(_) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: arg.to_owned(), source })?;
            Ok((text, arg.to_owned()))
        }
        Err(_) if arg.contains("{{") || arg.contains("{%") => Ok((arg.to_owned(), "--chat-template".to_owned())),
        Err(source) => Err(Error::Io { path: arg.to_owned(), source }),
    }
}

fn additional_templates(dir: &Path) -> Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(Error::Io { path: dir.display().to_string(), source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
        if entry.path().extension().is_some_and(|e| e == "jinja") {
            return Ok(true);
        }
    }
    Ok(false)
}

fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: path.display().to_string(), source }),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    match read_text_opt(path)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Template(format!("{}: invalid JSON: {e}", path.display()))),
    }
}

fn template_error(e: minijinja::Error) -> Error {
    use std::fmt::Write;
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    Error::Template(msg)
}

/// The Jinja environment of transformers' `_cached_compile_jinja_template`.
fn hf_environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false) // Jinja2's default
        .build()
        .map_err(template_error)?;
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", pycompat::tojson_filter);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| pycompat::strftime_now(&fmt));
    Ok(env)
}

// ---------------------------------------------------------------------------
// Messages: HF's clean-up, then JSON -> template values in the JSON's order.

/// Whether a template loops over message content (`{% for … in
/// message['content'] %}` or `….content`): vLLM's test for its "openai"
/// content format. Templates that do not see content only as a string.
pub fn iterates_content(source: &str) -> bool {
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        let block = &rest[i + 2..];
        let end = block.find("%}").unwrap_or(block.len());
        let stmt = block[..end].trim_start_matches(['-', '+']).trim();
        if let Some(body) = stmt.strip_prefix("for ") {
            if body.split(" in ").nth(1).is_some_and(|it| it.contains("content")) {
                return true;
            }
        }
        rest = &block[end..];
    }
    false
}

/// Content lists to strings (see [`ChatTemplate::with_string_content`]).
fn flatten_content(messages: &serde_json::Value, placeholder: Placeholder) -> serde_json::Value {
    use serde_json::Value as J;
    let J::Array(list) = messages else { return messages.clone() };
    let mut images = 0;
    let out = list.iter().map(|m| {
        let Some(J::Array(parts)) = m.get("content") else { return m.clone() };
        let mut texts = Vec::new();
        let mut tags = Vec::new();
        for p in parts {
            let kind = p.get("type").and_then(J::as_str).unwrap_or("");
            if kind == "text" {
                texts.push(p.get("text").and_then(J::as_str).unwrap_or("").to_owned());
            } else if kind.starts_with("image") {
                images += 1;
                tags.push(placeholder(images));
            }
        }
        let text = texts.join("\n");
        let mut lines: Vec<String> = tags.into_iter().filter(|t| !text.contains(t.as_str())).collect();
        lines.push(text);
        let mut m = m.clone();
        m["content"] = J::String(lines.join("\n"));
        m
    });
    J::Array(out.collect())
}

/// `_normalize_chat_messages` + the processor's `image_url` rewrite +
/// `_alias_reasoning_fields`.
fn normalize_messages(messages: &serde_json::Value) -> Result<Value> {
    use serde_json::Value as J;
    let J::Array(list) = messages else {
        return Err(Error::InvalidInput("messages must be a JSON array".into()));
    };
    if list.is_empty() {
        return Err(Error::InvalidInput("cannot apply the chat template to an empty conversation".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let J::Object(m) = m else {
            return Err(Error::InvalidInput(format!("messages[{i}] must be a JSON object, got {m}")));
        };
        let mut fields: Vec<(Value, Value)> = Vec::with_capacity(m.len() + 2);
        for (k, v) in m {
            if v.is_null() {
                continue;
            }
            let v = if k == "content" { normalize_content(v) } else { to_value(v) };
            fields.push((Value::from(k.as_str()), v));
        }
        // {"thinking": r, **message, "reasoning_content": r}
        let reasoning =
            ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| m.get(*k).filter(|v| !v.is_null()));
        if let Some(r) = reasoning {
            let r = to_value(r);
            if m.get("thinking").is_none_or(|v| v.is_null()) {
                fields.insert(0, (Value::from("thinking"), r.clone()));
            }
            match fields.iter_mut().find(|(k, _)| k.as_str() == Some("reasoning_content")) {
                Some(slot) => slot.1 = r,
                None => fields.push((Value::from("reasoning_content"), r)),
            }
        }
        out.push(Value::from_object(OrderedMap(fields)));
    }
    Ok(Value::from(out))
}

/// OpenAI image parts `{"type": "image_url", "image_url": {"url": u}}` (or a
/// bare string) become HF's `{"type": "image", "url": u}`.
fn normalize_content(content: &serde_json::Value) -> Value {
    let serde_json::Value::Array(parts) = content else {
        return to_value(content);
    };
    let parts = parts.iter().map(|p| match p.get("image_url") {
        Some(info) if p.get("type").and_then(|t| t.as_str()) == Some("image_url") => {
            let url = match info {
                serde_json::Value::Object(o) => o.get("url").map_or(Value::from(""), to_value),
                other => to_value(other),
            };
            Value::from_object(OrderedMap(vec![(Value::from("type"), Value::from("image")), (Value::from("url"), url)]))
        }
        _ => to_value(p),
    });
    Value::from(parts.collect::<Vec<_>>())
}

/// JSON to a template value, keeping object key order.
fn to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(to_value).collect::<Vec<_>>()),
        J::Object(o) => {
            Value::from_object(OrderedMap(o.iter().map(|(k, v)| (Value::from(k.as_str()), to_value(v))).collect()))
        }
    }
}

/// A map that iterates in insertion order, like a Python dict, whatever
/// minijinja's own map type does. Chat messages have a handful of keys, so
/// lookup is a scan.
#[derive(Debug)]
struct OrderedMap(Vec<(Value, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| k.clone()).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kestrel-tmpl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn found(dir: &Path) -> String {
        let (text, path) = find_in_dir(dir).unwrap().expect("a template");
        format!("{text} <- {}", path.strip_prefix(dir).unwrap().display())
    }

    #[test]
    fn discovery_order_follows_transformers() {
        let d = scratch("order");
        assert!(find_in_dir(&d).unwrap().is_none());
        std::fs::write(d.join("tokenizer_config.json"), r#"{"chat_template": "T"}"#).unwrap();
        assert_eq!(found(&d), "T <- tokenizer_config.json");
        std::fs::create_dir(d.join("additional_chat_templates")).unwrap();
        std::fs::write(d.join("additional_chat_templates/default.jinja"), "A").unwrap();
        assert_eq!(found(&d), "A <- additional_chat_templates/default.jinja");
        std::fs::write(d.join("chat_template.jinja"), "J").unwrap();
        assert_eq!(found(&d), "J <- chat_template.jinja");
        std::fs::remove_dir_all(d.join("additional_chat_templates")).unwrap();
        std::fs::write(d.join("chat_template.json"), r#"{"chat_template": "L"}"#).unwrap();
        assert_eq!(found(&d), "L <- chat_template.json");
        std::fs::write(d.join("processor_config.json"), r#"{"chat_template": null}"#).unwrap();
        assert_eq!(found(&d), "L <- chat_template.json");
        std::fs::write(d.join("processor_config.json"), r#"{"chat_template": "P"}"#).unwrap();
        assert_eq!(found(&d), "P <- processor_config.json");
    }

    #[test]
    fn tokenizer_config_template_list_picks_default() {
        let d = scratch("list");
        let cfg =
            json!({"chat_template": [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D"}]});
        std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        assert_eq!(found(&d), "D <- tokenizer_config.json");
        let cfg = json!({"chat_template": [{"name": "tool_use", "template": "X"}]});
        std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let err = find_in_dir(&d).unwrap_err().to_string();
        assert!(err.contains("tool_use"), "{err}");
    }

    #[test]
    fn legacy_json_with_additional_templates_is_refused() {
        let d = scratch("conflict");
        std::fs::write(d.join("chat_template.json"), r#"{"chat_template": "L"}"#).unwrap();
        std::fs::create_dir(d.join("additional_chat_templates")).unwrap();
        std::fs::write(d.join("additional_chat_templates/tool_use.jinja"), "X").unwrap();
        assert!(matches!(find_in_dir(&d), Err(Error::Template(_))));
    }

    #[test]
    fn malformed_files_are_errors() {
        let d = scratch("malformed");
        std::fs::write(d.join("chat_template.json"), "{").unwrap();
        assert!(matches!(find_in_dir(&d), Err(Error::Template(_))));
        std::fs::write(d.join("chat_template.json"), r#"{"template": "x"}"#).unwrap();
        assert!(matches!(find_in_dir(&d), Err(Error::Template(_))));
        assert!(matches!(ChatTemplate::from_dir(scratch("empty")), Err(Error::Template(_))));
    }

    #[test]
    fn override_is_a_path_or_the_template_itself() {
        let d = scratch("override");
        let file = d.join("custom.jinja");
        std::fs::write(&file, "F{{ messages|length }}").unwrap();
        let arg = file.to_str().unwrap();
        assert_eq!(read_override(arg).unwrap(), ("F{{ messages|length }}".to_owned(), arg.to_owned()));
        let (text, origin) = read_override("{% for m in messages %}{{ m.role }}{% endfor %}").unwrap();
        assert_eq!(text, "{% for m in messages %}{{ m.role }}{% endfor %}");
        assert_eq!(origin, "--chat-template");
        assert!(matches!(read_override("/no/such/template.jinja"), Err(Error::Io { .. })));
        // The override wins over the folder's own template.
        std::fs::write(d.join("chat_template.jinja"), "own").unwrap();
        let t = ChatTemplate::load(&d, Some(arg)).unwrap();
        assert_eq!(t.render(&json!([{"role": "user", "content": "hi"}]), false).unwrap(), "F1");
        let t = ChatTemplate::load(&d, None).unwrap();
        assert_eq!(t.render(&json!([{"role": "user", "content": "hi"}]), false).unwrap(), "own");
    }

    #[test]
    fn syntax_error_names_origin_and_line() {
        let err =
            ChatTemplate::new("line one\n{% for m in messages %}\n{{ m.role }", "bad.jinja", SpecialTokens::default())
                .unwrap_err();
        let Error::Template(msg) = err else { panic!("{err:?}") };
        assert!(msg.contains("bad.jinja:3"), "{msg}");
        assert!(msg.contains("syntax error"), "{msg}");
    }

    #[test]
    fn render_errors_are_template_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}{% endif %}ok",
            "t",
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(t.render(&json!([{"role": "user", "content": "x"}]), false).unwrap(), "ok");
        let err = t.render(&json!([{"role": "assistant", "content": "x"}]), false).unwrap_err();
        assert!(matches!(&err, Error::Template(m) if m.contains("must start with user") && m.contains("t:1")), "{err}");
        let t = ChatTemplate::new("{{ messages[0].content.nope() }}", "t", SpecialTokens::default()).unwrap();
        assert!(matches!(t.render(&json!([{"role": "user", "content": "x"}]), false), Err(Error::Template(_))));
        assert!(matches!(t.render(&json!([]), false), Err(Error::InvalidInput(_))));
        assert!(matches!(t.render(&json!({"role": "user"}), false), Err(Error::InvalidInput(_))));
        assert!(matches!(t.render(&json!(["hi"]), false), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn messages_are_cleaned_up_like_hf() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}|{% endfor %}",
            "t",
            SpecialTokens::default(),
        )
        .unwrap();
        let msgs = json!([
            {"role": "user", "name": null, "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
            {"role": "assistant", "content": "a", "reasoning": "r"},
        ]);
        let out = t.render(&msgs, false).unwrap();
        let want = if serde_json_keeps_order() {
            "role=user;content=[{'type': 'image', 'url': 'u'}];|thinking=r;role=assistant;content=a;reasoning=r;reasoning_content=r;|"
        } else {
            "content=[{'type': 'image', 'url': 'u'}];role=user;|thinking=r;content=a;reasoning=r;role=assistant;reasoning_content=r;|"
        };
        assert_eq!(out, want);
    }

    fn serde_json_keeps_order() -> bool {
        let v: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": 2}"#).unwrap();
        v.as_object().unwrap().keys().next().map(String::as_str) == Some("b")
    }

    #[test]
    fn special_tokens_and_kwargs_are_variables() {
        let special =
            SpecialTokens { bos_token: Some("<s>".into()), eos_token: Some("</s>".into()), ..Default::default() };
        let t =
            ChatTemplate::new("[{{ bos_token }}][{{ eos_token }}][{{ pad_token }}][{{ add_vision_id }}]", "t", special)
                .unwrap();
        let m = json!([{"role": "user", "content": ""}]);
        assert_eq!(t.render(&m, false).unwrap(), "[<s>][</s>][][]");
        assert_eq!(
            t.render_with(&m, false, &json!({"eos_token": "E", "add_vision_id": true})).unwrap(),
            "[<s>][E][][True]"
        );
        assert!(matches!(t.render_with(&m, false, &json!([1])), Err(Error::InvalidInput(_))));
    }

    /// A template that prints content as a string (Phi-3.5-vision's
    /// published one) gets content lists flattened with the family's
    /// placeholders, as vLLM does; the built-in list-aware template renders
    /// the same text; a template that loops over content is left alone.
    #[test]
    fn string_content_templates_get_placeholders() {
        let published = "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] \
                         + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != \
                         'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}";
        let ph: Placeholder = |n| format!("<|image_{n}|>");
        let t = ChatTemplate::new(published, "p", SpecialTokens::default()).unwrap().with_string_content(ph);
        assert!(t.flattens_content());
        let url = json!({"url": "http://x/a.png"});
        let m = json!([
            {"role": "user", "content": [
                {"type": "image_url", "image_url": url}, {"type": "image_url", "image_url": url},
                {"type": "text", "text": "Compare"}, {"type": "text", "text": "them."}]},
            {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": [{"type": "text", "text": "And <|image_3|>?"}, {"type": "image_url", "image_url": url}]}
        ]);
        let want = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare\nthem.<|end|>\n<|assistant|>\nTwo cats.<|end|>\n\
                    <|user|>\nAnd <|image_3|>?<|end|>\n<|assistant|>\n";
        assert_eq!(t.render(&m, true).unwrap(), want);
        let builtin =
            ChatTemplate::new(include_str!("../model/phi3v/chat_template.jinja"), "b", SpecialTokens::default())
                .unwrap()
                .with_string_content(ph);
        assert!(!builtin.flattens_content());
        let m2 = json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": url}, {"type": "text", "text": "Compare"}]}]);
        assert_eq!(builtin.render(&m2, true).unwrap(), t.render(&m2, true).unwrap());
        assert!(iterates_content("{%- for c in message.content -%}{{ c }}{% endfor %}"));
        assert!(iterates_content("{% for part in message['content'] %}{% endfor %}"));
        assert!(!iterates_content("{% for message in messages %}{{ message['content'] }}{% endfor %}"));
    }
}

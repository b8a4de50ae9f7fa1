//! Embeddings requests and responses, as vLLM's OpenAI-compatible server
//! takes them (vllm/entrypoints/openai/protocol.py:
//! `EmbeddingCompletionRequest`, `EmbeddingChatRequest`,
//! `EmbeddingResponse`): OpenAI's `input` (a string, a list of strings,
//! token ids, or a list of token id lists), or vLLM's chat form with
//! `messages` (content parts may carry images), rendered with the chat
//! template without a generation prompt unless asked.
//!
//! `encoding_format` is `float` (default) or `base64` (little-endian f32
//! bytes, as OpenAI's Python client decodes them). `dimensions` keeps the
//! first N values and scales them back to unit length (Matryoshka
//! truncation); vLLM refuses it for models not trained that way, we leave
//! that judgement to the caller.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::completions::token_ids;
use super::protocol::{ChatCompletionRequest, ChatInput, ChatMessage};
use crate::error::{Error, Result};

/// Most inputs one request may hold (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// POST /v1/embeddings body.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub messages: Option<Vec<ChatMessage>>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    /// Chat form only (vLLM's default: false).
    pub add_generation_prompt: Option<bool>,
    /// Whether the tokenizer adds its special tokens (vLLM's default: true
    /// for `input`, false for `messages`, whose template writes them).
    pub add_special_tokens: Option<bool>,
    /// A Jinja chat template for this request instead of the server's.
    pub chat_template: Option<String>,
    /// Extra chat template variables (a JSON object).
    pub chat_template_kwargs: Option<Value>,
    /// Only `false` is supported.
    pub continue_final_message: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

/// What to embed.
#[derive(Clone, Debug)]
pub enum EmbeddingInputs {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
    /// One conversation (its media still to fetch; it says whether a
    /// generation prompt is added, by default not).
    Chat(Box<ChatInput>),
}

/// A validated embeddings request.
#[derive(Clone, Debug)]
pub struct EmbeddingInput {
    pub inputs: EmbeddingInputs,
    pub encoding: Encoding,
    pub dimensions: Option<usize>,
    pub add_special_tokens: bool,
}

impl EmbeddingInputs {
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInputs::Texts(t) => t.len(),
            EmbeddingInputs::Tokens(t) => t.len(),
            EmbeddingInputs::Chat(_) => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EmbeddingRequest {
    /// Parses a body; errors carry serde's position (line and column).
    pub fn from_json(body: &str) -> Result<Self> {
        super::parse_body(body)
    }

    pub fn to_input(&self) -> Result<EmbeddingInput> {
        let bad = |msg: String| Err(Error::InvalidInput(msg));
        let encoding = match self.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => return bad(format!("encoding_format must be \"float\" or \"base64\", got {other:?}")),
        };
        let dimensions = match self.dimensions {
            None => None,
            Some(d) if d >= 1 => Some(d as usize),
            Some(d) => return bad(format!("dimensions must be at least 1, got {d}")),
        };
        let inputs = match (&self.input, &self.messages) {
            (Some(_), Some(_)) => return bad("give either input or messages, not both".into()),
            (None, None) => return bad("input is required (or messages, for the chat form)".into()),
            (Some(v), None) => parse_input(v)?,
            (None, Some(messages)) => {
                let chat = ChatCompletionRequest {
                    messages: messages.clone(),
                    chat_template: self.chat_template.clone(),
                    chat_template_kwargs: self.chat_template_kwargs.clone(),
                    add_generation_prompt: Some(self.add_generation_prompt.unwrap_or(false)),
                    continue_final_message: self.continue_final_message,
                    ..Default::default()
                };
                EmbeddingInputs::Chat(Box::new(chat.to_chat_input()?))
            }
        };
        let add_special_tokens = self.add_special_tokens.unwrap_or(!matches!(inputs, EmbeddingInputs::Chat(_)));
        Ok(EmbeddingInput { inputs, encoding, dimensions, add_special_tokens })
    }
}

/// `input`: a string, strings, token ids, or lists of token ids.
fn parse_input(v: &Value) -> Result<EmbeddingInputs> {
    let bad = |msg: &str| Err(Error::InvalidInput(msg.into()));
    let items = match v {
        Value::String(s) => return Ok(EmbeddingInputs::Texts(vec![s.clone()])),
        Value::Array(items) => items,
        _ => return bad("input must be a string, a list of strings, or token ids"),
    };
    if items.is_empty() {
        return bad("input must not be empty");
    }
    if items.len() > MAX_INPUTS {
        return Err(Error::InvalidInput(format!(
            "input holds {} items; at most {MAX_INPUTS} are allowed",
            items.len()
        )));
    }
    if items.iter().all(Value::is_number) {
        return Ok(EmbeddingInputs::Tokens(vec![token_ids(items)?]));
    }
    if let Some(texts) = items.iter().map(|i| i.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>() {
        return Ok(EmbeddingInputs::Texts(texts));
    }
    let lists = items
        .iter()
        .map(|i| match i {
            Value::Array(ids) if !ids.is_empty() => token_ids(ids),
            _ => Err(Error::InvalidInput(
                "input must be a string, a list of strings, token ids, or a list of token id lists".into(),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EmbeddingInputs::Tokens(lists))
}

/// The first `dims` values of `v`, scaled to unit L2 norm (left as they are
/// if all zero). Errors when `dims` exceeds the embedding's size.
pub fn truncate_normalize(mut v: Vec<f32>, dims: usize) -> Result<Vec<f32>> {
    if dims > v.len() {
        return Err(Error::InvalidInput(format!(
            "dimensions ({dims}) is larger than the model's embedding size ({})",
            v.len()
        )));
    }
    v.truncate(dims);
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
    Ok(v)
}

/// An embedding as the response carries it.
pub fn encode(v: &[f32], encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => Value::from(v.to_vec()),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

// ---- response ----

#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: EmbeddingUsage,
}

#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingData {
    pub index: usize,
    pub object: &'static str,
    /// A list of floats, or a base64 string.
    pub embedding: Value,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
}

impl EmbeddingResponse {
    pub fn new(id: String, model: String, created: u64, embeddings: Vec<Value>, prompt_tokens: usize) -> Self {
        let data = embeddings
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| EmbeddingData { index, object: "embedding", embedding })
            .collect();
        EmbeddingResponse {
            id,
            object: "list",
            created,
            model,
            data,
            usage: EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens, completion_tokens: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn input(body: Value) -> Result<EmbeddingInput> {
        EmbeddingRequest::from_json(&body.to_string())?.to_input()
    }

    #[test]
    fn inputs_take_every_openai_form() {
        let texts = |b: Value| match input(b).unwrap().inputs {
            EmbeddingInputs::Texts(t) => t,
            other => panic!("expected texts, got {other:?}"),
        };
        let tokens = |b: Value| match input(b).unwrap().inputs {
            EmbeddingInputs::Tokens(t) => t,
            other => panic!("expected tokens, got {other:?}"),
        };
        assert_eq!(texts(json!({"input": "a"})), vec!["a"]);
        assert_eq!(texts(json!({"input": ["a", "b"]})), vec!["a", "b"]);
        assert_eq!(tokens(json!({"input": [1, 2]})), vec![vec![1, 2]]);
        assert_eq!(tokens(json!({"input": [[1], [2, 3]]})), vec![vec![1], vec![2, 3]]);
        let chat = input(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": "hi"}]}]}))
        .unwrap();
        assert!(!chat.add_special_tokens);
        match chat.inputs {
            EmbeddingInputs::Chat(input) => {
                assert_eq!(input.media.len(), 1);
                assert!(!input.add_generation_prompt);
            }
            other => panic!("expected chat, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_say_why() {
        let e = |b: Value| input(b).unwrap_err().to_string();
        assert!(e(json!({})).contains("input is required"));
        assert!(e(json!({"input": "a", "messages": []})).contains("not both"));
        assert!(e(json!({"input": []})).contains("must not be empty"));
        assert!(e(json!({"input": ["a", 1]})).contains("list of token id lists"));
        assert!(e(json!({"input": "a", "encoding_format": "int8"})).contains("encoding_format"));
        assert!(e(json!({"input": "a", "dimensions": 0})).contains("dimensions must be at least 1"));
    }

    #[test]
    fn truncation_renormalizes_and_base64_is_little_endian_f32() {
        let v = truncate_normalize(vec![3.0, 4.0, 12.0], 2).unwrap();
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(truncate_normalize(vec![1.0], 2).unwrap_err().to_string().contains("larger than"));
        assert_eq!(truncate_normalize(vec![0.0, 0.0], 1).unwrap(), vec![0.0]);
        assert_eq!(encode(&[1.0], Encoding::Base64), json!("AACAPw=="));
        assert_eq!(encode(&[0.5, 2.0], Encoding::Float), json!([0.5, 2.0]));
    }
}

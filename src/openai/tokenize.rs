//! vLLM's tokenizer endpoints (vllm/entrypoints/openai/protocol.py:
//! `TokenizeCompletionRequest`, `TokenizeChatRequest`, `TokenizeResponse`,
//! `DetokenizeRequest`, `DetokenizeResponse`): POST /tokenize takes a
//! `prompt` or chat `messages`, POST /detokenize takes `tokens`.
//!
//! Media parts of `messages` count as their unexpanded placeholders
//! (`<|vision_start|><|image_pad|><|vision_end|>`): the media are not
//! fetched, so the count is the text's, without the image tokens a
//! generation request would add.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::completions::token_ids;
use super::protocol::{ChatCompletionRequest, ChatInput, ChatMessage};
use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// Default: true for `prompt`, false for `messages` (vLLM).
    pub add_special_tokens: Option<bool>,
    /// Chat form only; default true (vLLM).
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's vocabulary string.
    pub return_token_strs: Option<bool>,
    /// A Jinja chat template for this request instead of the server's.
    pub chat_template: Option<String>,
    /// Extra chat template variables (a JSON object).
    pub chat_template_kwargs: Option<Value>,
    /// Only `false` is supported.
    pub continue_final_message: Option<bool>,
    /// Functions for the chat template to render (chat form only), as in
    /// chat completions.
    pub tools: Option<Value>,
}

/// What to tokenize.
#[derive(Clone, Debug)]
pub enum TokenizeInput {
    Prompt(String),
    /// The conversation (media parts replaced by their placeholders), to
    /// render with `ChatInput::render`.
    Chat(Box<ChatInput>),
}

impl TokenizeRequest {
    pub fn from_json(body: &str) -> Result<Self> {
        super::parse_body(body)
    }

    /// The input and whether special tokens are added.
    pub fn to_input(&self) -> Result<(TokenizeInput, bool)> {
        match (&self.prompt, &self.messages) {
            (Some(_), None) if self.tools.as_ref().is_some_and(|t| !t.is_null()) => {
                Err(Error::InvalidInput("tools apply to messages, not to a prompt".into()))
            }
            (Some(p), None) => Ok((TokenizeInput::Prompt(p.clone()), self.add_special_tokens.unwrap_or(true))),
            (None, Some(messages)) => {
                let chat = ChatCompletionRequest {
                    messages: messages.clone(),
                    chat_template: self.chat_template.clone(),
                    chat_template_kwargs: self.chat_template_kwargs.clone(),
                    add_generation_prompt: self.add_generation_prompt,
                    continue_final_message: self.continue_final_message,
                    tools: self.tools.clone(),
                    ..Default::default()
                };
                let input = chat.to_chat_input()?;
                Ok((TokenizeInput::Chat(Box::new(input)), self.add_special_tokens.unwrap_or(false)))
            }
            (Some(_), Some(_)) => Err(Error::InvalidInput("give either prompt or messages, not both".into())),
            (None, None) => Err(Error::InvalidInput("prompt or messages is required".into())),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<Value>,
}

impl DetokenizeRequest {
    pub fn from_json(body: &str) -> Result<Self> {
        super::parse_body(body)
    }

    pub fn ids(&self) -> Result<Vec<u32>> {
        token_ids(&self.tokens)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

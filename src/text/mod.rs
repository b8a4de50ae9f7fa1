//! Text: tokenizer and chat templates.

pub mod chat_template;
pub(crate) mod pycompat;
pub mod tokenizer;

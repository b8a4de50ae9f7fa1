//! Text: tokenizer and chat templates.

pub mod chat_template;
pub mod detokenizer;
pub(crate) mod pycompat;
pub mod tokenizer;

//! Structured outputs: a request's output held to a JSON schema, a regular
//! expression, a list of choices or a grammar while it is sampled (vLLM's
//! `response_format`, `structured_outputs` and `guided_*`; tool_choice
//! `required` and named functions). `constraint` reads what a request asks
//! for, `gbnf` turns llama.cpp grammars into llguidance's Lark, `grammar`
//! compiles constraints and follows them token by token on llguidance.

mod constraint;
pub mod gbnf;
mod grammar;

pub use constraint::{Constraint, ConstraintFields, JsonOptions};
pub use grammar::{Grammar, Grammars};

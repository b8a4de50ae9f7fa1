//! Structured outputs: grammars that constrain decoding, and their conversions.
pub mod gbnf;

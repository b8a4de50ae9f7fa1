//! Compiling constraints and following them token by token, on llguidance
//! (the grammar engine of vLLM's and SGLang's `guidance` backend).
//!
//! `Grammars` is built once per model from the tokenizer: a trie over every
//! token's raw bytes (special tokens marked so grammar text never matches
//! them), padded to the model's logits width. Building it takes a fraction
//! of a second for a 150k vocabulary, so it happens on first use (or on a
//! background thread at server start, `warm`), never on the engine thread.
//!
//! `compile` turns a `Constraint` into a `Grammar` on the HTTP worker (an
//! invalid schema, regex or grammar is the request's 400 there); the engine
//! gives each sequence its own copy, asks it for the allowed tokens before
//! every sampled token (`allowed`: one bit per token, llguidance's
//! `SimpleVob` words) and tells it the token drawn (`accept`). When the
//! grammar can go no further the choice ends (`finished`).

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::gbnf;
use super::Constraint;
use crate::error::{Error, Result};
use crate::text::tokenizer::Tokenizer;

/// The marker llguidance puts before a special token's text so that no
/// grammar literal can produce it (toktrie's `SPECIAL_TOKEN_MARKER`).
const SPECIAL: u8 = TokTrie::SPECIAL_TOKEN_MARKER;

/// One model's grammar compiler, shared by all threads.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    /// Width of the model's logits: masks cover exactly this many tokens.
    vocab: usize,
    /// The ids that end generation; the first is llguidance's EOS.
    eos: Arc<[u32]>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab", &self.vocab).field("eos", &self.eos).finish()
    }
}

impl Grammars {
    /// `vocab` is the model's logits width (at least the tokenizer's
    /// length); `eos` the ids that end a choice (the engine's).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize, eos: &[u32]) -> Self {
        Grammars { tokenizer, vocab, eos: eos.into(), factory: OnceLock::new() }
    }

    /// Builds the token trie now, on a thread of its own, so the first
    /// constrained request does not wait for it.
    pub fn warm(self: &Arc<Self>) {
        let me = self.clone();
        let _ = std::thread::Builder::new().name("kestrel-grammar-init".into()).spawn(move || {
            let _ = me.factory();
        });
    }

    fn factory(&self) -> Result<&ParserFactory> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer, self.vocab, &self.eos))
            .as_ref()
            .map_err(|e| Error::InvalidInput(format!("structured outputs are not available for this model: {e}")))
    }

    /// Compiles a constraint; what cannot be compiled is the request's 400,
    /// with llguidance's reason.
    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar> {
        let factory = self.factory()?;
        let top = top_level(constraint)?;
        let parser = factory.create_parser(top).map_err(|e| {
            Error::InvalidInput(format!("the {} cannot be used to constrain the output: {e}", constraint.what()))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidInput(format!(
                "the {} cannot be used to constrain the output: {e}",
                constraint.what()
            )));
        }
        Ok(Grammar {
            constraint: Arc::new(constraint.clone()),
            matcher,
            eos: self.eos.clone(),
            words: self.vocab.div_ceil(32),
            ahead: None,
        })
    }
}

/// The token trie and parser factory: every token id below `vocab` as its
/// bytes (special tokens behind the marker, ids the tokenizer lacks empty,
/// so never allowed).
fn build_factory(tok: &Tokenizer, vocab: usize, eos: &[u32]) -> std::result::Result<ParserFactory, String> {
    let vocab = vocab.max(tok.vocab_size());
    if vocab > u32::MAX as usize {
        return Err(format!("a vocabulary of {vocab} tokens"));
    }
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            if tok.is_special(id) {
                let mut w = vec![SPECIAL];
                w.extend(tok.id_token(id).unwrap_or_default().into_bytes());
                w
            } else {
                tok.token_bytes(id)
            }
        })
        .collect();
    let Some(&first_eos) = eos.first() else {
        return Err("the model has no end-of-text token".into());
    };
    let info = TokRxInfo::new(vocab as u32, first_eos);
    let trie = TokTrie::from(&info, &words);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    // llguidance's own log lines would go to stderr; errors reach the request instead.
    factory.quiet();
    Ok(factory)
}

/// The llguidance grammar for a constraint.
fn top_level(c: &Constraint) -> Result<TopLevelGrammar> {
    Ok(match c {
        Constraint::Json { schema, options } => {
            let mut schema = schema.clone();
            if !schema.is_object() {
                return Err(Error::InvalidInput(format!("a JSON schema must be a JSON object, got {schema}")));
            }
            options.apply(&mut schema);
            TopLevelGrammar::from_json_schema(schema)
        }
        Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        Constraint::Choice(choices) => {
            let alts: Vec<String> = choices.iter().map(|c| Value::String(c.clone()).to_string()).collect();
            TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
        }
        Constraint::Grammar(src) => {
            if gbnf::is_gbnf(src) {
                let lark = gbnf::gbnf_to_lark(src)
                    .map_err(|e| Error::InvalidInput(format!("the grammar (GBNF) cannot be read: {e}")))?;
                TopLevelGrammar::from_lark(lark)
            } else {
                TopLevelGrammar::from_lark(src.clone())
            }
        }
    })
}

/// A compiled constraint and where one sequence stands in it.
pub struct Grammar {
    constraint: Arc<Constraint>,
    matcher: Matcher,
    eos: Arc<[u32]>,
    /// u32 words of a mask: the model's vocabulary, rounded up.
    words: usize,
    /// The mask of the current state, computed ahead (`precompute`); a
    /// token taken clears it.
    ahead: Option<Result<Vec<u32>>>,
}

impl Clone for Grammar {
    /// An independent copy (llguidance's deep clone: its own lexer caches,
    /// so copies run on different threads without sharing locks).
    fn clone(&self) -> Self {
        Grammar {
            constraint: self.constraint.clone(),
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
            words: self.words,
            ahead: None,
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("constraint", &self.constraint).finish()
    }
}

/// Two grammars are equal when they were compiled from the same constraint.
impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.constraint == other.constraint
    }
}

impl Grammar {
    pub fn constraint(&self) -> &Constraint {
        &self.constraint
    }

    /// u32 words per mask.
    pub fn words(&self) -> usize {
        self.words
    }

    /// The tokens allowed next, one bit each (bit t % 32 of word t / 32),
    /// exactly `words()` words. Where the grammar may end, every end-of-text
    /// id is allowed, not only the one llguidance knows.
    pub fn allowed(&mut self) -> Result<Vec<u32>> {
        match self.ahead.take() {
            Some(m) => m,
            None => self.compute(),
        }
    }

    /// Computes the next mask now, for `allowed` to return later (the
    /// engine does this on another thread while its own thread goes on).
    pub fn precompute(&mut self) {
        if self.ahead.is_none() && !self.finished() {
            self.ahead = Some(self.compute());
        }
    }

    /// Whether the next mask is ready.
    pub fn has_mask(&self) -> bool {
        self.ahead.is_some()
    }

    fn compute(&mut self) -> Result<Vec<u32>> {
        let vob = self.matcher.compute_mask_or_eos().map_err(|e| self.error(e))?;
        let mut words = vob.as_slice().to_vec();
        words.resize(self.words, 0);
        let first = self.eos[0] as usize;
        if words.get(first / 32).is_some_and(|w| w >> (first % 32) & 1 == 1) {
            for &e in self.eos.iter() {
                if let Some(w) = words.get_mut(e as usize / 32) {
                    *w |= 1 << (e % 32);
                }
            }
        }
        Ok(words)
    }

    /// Moves past a sampled token. An end-of-text id ends the grammar.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.ahead = None;
        let t = if self.eos.contains(&token) { self.eos[0] } else { token };
        self.matcher.consume_token(t).map_err(|e| self.error(e))
    }

    /// Whether the output is complete: the grammar allows nothing more.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped() && self.matcher.stop_reason().is_ok()
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::InvalidInput(format!("the output could not follow the {}: {e}", self.constraint.what()))
    }
}

#[cfg(test)]
#[path = "grammar_tests.rs"]
mod tests;

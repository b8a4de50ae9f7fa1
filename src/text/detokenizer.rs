//! Incremental detokenization and stop strings: the last stage of a request
//! on the engine thread (sampler → detokenizer → stop check → channel).
//!
//! `IncrementalDetokenizer` mirrors the prefix/read-offset scheme of
//! transformers' `TextStreamer` and vLLM's `detokenize_incrementally`
//! (`vllm/transformers_utils/detokenizer_utils.py`; vLLM v1
//! `vllm/v1/engine/detokenizer.py`, slow path): decode a short window of ids
//! twice, once without and once with the new ids, and emit the difference.
//! Decoding a window instead of single ids keeps decoders that look at their
//! neighbours (SentencePiece's leading space, byte fallback) right, and a
//! window that ends inside a UTF-8 character decodes to a trailing U+FFFD,
//! which we hold back until the character completes.
//!
//! `StopChecker` applies OpenAI `stop` semantics to the emitted text: output
//! ends just before the first stop string (not included, vLLM's default
//! `include_stop_str_in_output=False`), and text that might still turn out to
//! be the start of a stop string is held back, so a stop string never leaks
//! into a streamed chunk.

use crate::error::Result;
use crate::text::tokenizer::Tokenizer;

/// How many prompt ids `with_context` keeps in front of the generated ids
/// (vLLM's `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
const CONTEXT_IDS: usize = 5;

/// Turns generated token ids, one at a time, into text pieces that are always
/// whole characters.
///
/// Invariant: the pieces returned by `push`, followed by `finish`, concatenate
/// to `tokenizer.decode(all_ids, skip_special_tokens)` (for `with_context`:
/// the part of `decode(context ++ ids)` after `decode(context)`).
///
/// The tokenizer is passed to each call rather than held, so a request can
/// keep its detokenizer without borrowing the engine's tokenizer; pass the
/// same one every time.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// Context ids (at most `CONTEXT_IDS`) then every id pushed so far.
    /// Only `ids[prefix_offset..]` is ever decoded again.
    ids: Vec<u32>,
    /// Start of the decode window: the ids before it have been emitted and
    /// no longer influence how later ids decode.
    prefix_offset: usize,
    /// End of the text already emitted: `decode(ids[prefix_offset..read_offset])`
    /// has been emitted in full.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a fresh generation with no context.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens }
    }

    /// A detokenizer whose first generated ids decode in the context of the
    /// prompt's last few ids (as vLLM seeds its offsets from the prompt). The
    /// context's own text is never emitted.
    pub fn with_context(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &prompt_ids[prompt_ids.len().saturating_sub(CONTEXT_IDS)..];
        Self { ids: tail.to_vec(), prefix_offset: 0, read_offset: tail.len(), skip_special_tokens }
    }

    /// Feed one generated id; returns the text it completes (often empty:
    /// a skipped special token, or part of a multi-byte character).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        // A trailing U+FFFD is an incomplete character (or, rarely, one the
        // model will never complete; `finish` flushes that one).
        if new_text.len() <= prefix_text.len() || new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let piece = Self::suffix_after(&new_text, &prefix_text);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }

    /// End of generation: the text still held back (an incomplete character
    /// decodes to U+FFFD here, as in the full decode).
    pub fn finish(self, tok: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok(Self::suffix_after(&new_text, &prefix_text))
    }

    /// `new_text` minus its leading `prefix_text`. The prefix window ends
    /// where an earlier decode ended on a whole character, so `new_text`
    /// starts with it for byte-level and SentencePiece decoders alike; should
    /// a decoder ever rewrite the prefix, fall back to the longest common
    /// prefix (on a character boundary) rather than panic or drop text.
    fn suffix_after(new_text: &str, prefix_text: &str) -> String {
        if let Some(rest) = new_text.strip_prefix(prefix_text) {
            return rest.to_owned();
        }
        let common = new_text
            .char_indices()
            .zip(prefix_text.chars())
            .find(|((_, a), b)| a != b)
            .map(|((i, _), _)| i)
            .unwrap_or(prefix_text.len().min(new_text.len()));
        new_text.get(common..).unwrap_or_default().to_owned()
    }
}

/// OpenAI `stop` strings over streamed text.
///
/// `push` releases the text that can no longer be part of a stop string and
/// holds back the longest suffix that is a proper prefix of some stop string.
/// When a stop string is complete, everything before it is released, the
/// stop string and anything after it are dropped, and `stopped` is true; later
/// pushes release nothing. Among the stop strings completed by one push, the
/// one that starts earliest wins.
#[derive(Debug, Clone)]
pub struct StopChecker {
    /// Non-empty stop strings, in request order.
    stops: Vec<String>,
    /// Text received but not yet released: at most the longest stop string
    /// minus one byte between pushes.
    pending: String,
    /// Index into `stops` of the string that ended generation.
    matched: Option<usize>,
}

impl StopChecker {
    /// Empty strings are ignored (they would match everywhere; OpenAI rejects
    /// them, and the request validator should too).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        let stops = stops.iter().map(|s| s.as_ref().to_owned()).filter(|s| !s.is_empty()).collect();
        Self { stops, pending: String::new(), matched: None }
    }

    /// Feed newly decoded text; returns the text safe to send and whether a
    /// stop string has ended generation.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.matched.is_some() {
            return (String::new(), true);
        }
        self.pending.push_str(text);

        // Everything released earlier had no suffix that starts a stop
        // string, so any match starts inside `pending`.
        let first =
            self.stops.iter().enumerate().filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i))).min();
        if let Some((at, i)) = first {
            self.pending.truncate(at);
            self.matched = Some(i);
            return (std::mem::take(&mut self.pending), true);
        }

        let hold = self.stops.iter().map(|s| self.partial_match(s)).max().unwrap_or(0);
        let cut = self.pending.len() - hold;
        let rest = self.pending.split_off(cut);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// Generation ended for another reason (length, EOS): release what was
    /// held back. Empty after a stop.
    pub fn finish(self) -> String {
        if self.matched.is_some() {
            String::new()
        } else {
            self.pending
        }
    }

    /// The stop string that ended generation (OpenAI/vLLM `stop_reason`).
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper
    /// prefix of `stop`. Such a suffix starts on a character boundary of
    /// `pending`, since it starts where a character of `stop` starts.
    fn partial_match(&self, stop: &str) -> usize {
        let longest = (stop.len() - 1).min(self.pending.len());
        (1..=longest).rev().find(|&k| stop.is_char_boundary(k) && self.pending.ends_with(&stop[..k])).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push `chunks` in order; the released text and whether it stopped.
    fn run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut sc = StopChecker::new(stops);
        let mut out = String::new();
        for c in chunks {
            let (r, stopped) = sc.push(c);
            out.push_str(&r);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&sc.finish());
        (out, false)
    }

    #[test]
    fn partial_match_holds_only_possible_starts() {
        let mut sc = StopChecker::new(&["abc"]);
        assert_eq!(sc.push("xxab"), ("xx".to_owned(), false));
        assert_eq!(sc.push("x"), ("abx".to_owned(), false));
        assert_eq!(sc.finish(), "");
    }

    #[test]
    fn multibyte_prefix_is_held_on_char_boundary() {
        // "é" is 2 bytes; the held suffix must be the whole character.
        let mut sc = StopChecker::new(&["éa"]);
        assert_eq!(sc.push("café"), ("caf".to_owned(), false));
        assert_eq!(sc.finish(), "é");
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        assert_eq!(run(&["", "z"], &["ab", "c"]), ("abc".to_owned(), false));
    }

    #[test]
    fn after_stop_nothing_is_released() {
        let mut sc = StopChecker::new(&["b"]);
        assert_eq!(sc.push("abc"), ("a".to_owned(), true));
        assert_eq!(sc.push("xyz"), (String::new(), true));
        assert_eq!(sc.matched(), Some("b"));
        assert_eq!(sc.finish(), "");
    }

    #[test]
    fn suffix_after_falls_back_on_a_rewritten_prefix() {
        assert_eq!(IncrementalDetokenizer::suffix_after("abcd", "ab"), "cd");
        assert_eq!(IncrementalDetokenizer::suffix_after("a\u{e9}cd", "a\u{fffd}"), "\u{e9}cd");
    }
}

//! What goes into the engine and what comes out: per-request settings with
//! OpenAI/vLLM names and meanings, the event stream of a running request, and
//! the collected result the offline API returns.

use crate::engine::sampling::SamplingParams;
use crate::error::{Error, Result};
use crate::model::inputs::PreparedInput;
use crate::structured::Grammar;

/// Identifies a request inside one engine (the server maps its own ids to these).
pub type RequestId = u64;

/// Most choices one request may ask for (`n`).
pub const MAX_N: usize = 16;
/// Most stop strings, and their longest length in bytes (OpenAI allows 4 stop
/// strings; vLLM does not cap them; we keep a generous bound so a request
/// cannot make the per-token stop check expensive).
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;

/// Everything about a request except its prompt. Defaults are OpenAI's
/// (temperature 1, n 1) with vLLM's extensions off.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestParams {
    pub sampling: SamplingParams,
    /// Most tokens to generate per choice (>= 1).
    pub max_tokens: usize,
    /// EOS and stop token ids are ignored until this many tokens exist (vLLM).
    pub min_tokens: usize,
    /// Generation ends before the first of these strings; it is not returned.
    pub stop: Vec<String>,
    /// Generation ends after any of these ids (the id is kept in token_ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's EOS tokens (benchmarks).
    pub ignore_eos: bool,
    /// Drop special tokens from the returned text (vLLM default true).
    pub skip_special_tokens: bool,
    /// Independent choices to generate for the prompt.
    pub n: usize,
    /// The output's constraint, compiled (`structured::Grammars::compile`);
    /// each choice follows its own copy.
    pub grammar: Option<Grammar>,
}

impl Default for RequestParams {
    fn default() -> Self {
        RequestParams {
            sampling: SamplingParams::default(),
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            n: 1,
            grammar: None,
        }
    }
}

impl RequestParams {
    /// `Err(InvalidInput)` naming the first setting out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidInput(msg));
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return bad(format!("min_tokens ({}) must not exceed max_tokens ({})", self.min_tokens, self.max_tokens));
        }
        if self.n == 0 || self.n > MAX_N {
            return bad(format!("n must be between 1 and {MAX_N}, got {}", self.n));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(format!("at most {MAX_STOP_STRINGS} stop strings are allowed, got {}", self.stop.len()));
        }
        if let Some(s) = self.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return bad(format!("stop strings must be 1 to {MAX_STOP_LEN} bytes long, got one of {} bytes", s.len()));
        }
        Ok(())
    }
}

/// A prepared prompt and how to continue it.
pub struct Request {
    pub input: PreparedInput,
    pub params: RequestParams,
}

/// Why a choice ended (OpenAI `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// max_tokens, or the model's context length.
    Length,
    /// The caller aborted the request (or went away).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What ended a choice with `FinishReason::Stop` (vLLM's `stop_reason`):
/// None for EOS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    String(String),
}

/// One generated token's log-probability under the raw model distribution,
/// with the most likely alternatives when asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The stream of a request, in order: Deltas and one Finished per choice,
/// then Done; or Error, after which nothing follows.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New output of choice `index`. `text` is whole characters and never
    /// part of a stop string; it may be empty while `token_ids` is not.
    Delta {
        index: usize,
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
    },
    /// The pooled embedding of an embedding request (then Done).
    Embedding {
        values: Vec<f32>,
    },
    /// Every choice has finished.
    Done {
        usage: Usage,
    },
    /// The request failed (bad input found late, or a device error); the
    /// message is for the user.
    Error {
        message: String,
    },
}

/// One finished choice.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Present when the request asked for logprobs.
    pub logprobs: Option<Vec<TokenLogprob>>,
    pub finish_reason: FinishReason,
    pub stop_reason: Option<StopReason>,
}

/// A finished request, as the offline API returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// The embedding, for an embedding request (which has no choices).
    pub embedding: Option<Vec<f32>>,
}

/// Folds a request's events into its output.
#[derive(Debug)]
pub struct Collector {
    choices: Vec<Choice>,
    want_logprobs: bool,
    usage: Option<Usage>,
    error: Option<String>,
    embedding: Option<Vec<f32>>,
}

impl Collector {
    pub fn new(params: &RequestParams) -> Self {
        let choices = (0..params.n)
            .map(|index| Choice {
                index,
                text: String::new(),
                token_ids: Vec::new(),
                logprobs: params.sampling.logprobs.map(|_| Vec::new()),
                finish_reason: FinishReason::Abort,
                stop_reason: None,
            })
            .collect();
        Collector {
            choices,
            want_logprobs: params.sampling.logprobs.is_some(),
            usage: None,
            error: None,
            embedding: None,
        }
    }

    /// Takes one event; true once the stream has ended (Done or Error).
    pub fn push(&mut self, ev: Event) -> bool {
        match ev {
            Event::Delta { index, text, token_ids, logprobs } => {
                if let Some(c) = self.choices.get_mut(index) {
                    c.text.push_str(&text);
                    c.token_ids.extend(token_ids);
                    if self.want_logprobs {
                        c.logprobs.get_or_insert_with(Vec::new).extend(logprobs);
                    }
                }
                false
            }
            Event::Finished { index, reason, stop_reason } => {
                if let Some(c) = self.choices.get_mut(index) {
                    c.finish_reason = reason;
                    c.stop_reason = stop_reason;
                }
                false
            }
            Event::Embedding { values } => {
                self.embedding = Some(values);
                false
            }
            Event::Done { usage } => {
                self.usage = Some(usage);
                true
            }
            Event::Error { message } => {
                self.error = Some(message);
                true
            }
        }
    }

    /// The output, or the request's error (`InvalidInput` with its message),
    /// or an error saying the stream ended early.
    pub fn finish(self) -> Result<RequestOutput> {
        if let Some(m) = self.error {
            return Err(Error::InvalidInput(m));
        }
        let usage = self.usage.ok_or_else(|| Error::Engine("the engine stopped before the request finished".into()))?;
        Ok(RequestOutput { choices: self.choices, usage, embedding: self.embedding })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let ok = RequestParams::default();
        ok.validate().unwrap();
        let e = |p: RequestParams| p.validate().unwrap_err().to_string();
        assert!(e(RequestParams { max_tokens: 0, ..ok.clone() }).contains("max_tokens"));
        assert!(e(RequestParams { min_tokens: 17, ..ok.clone() }).contains("min_tokens (17)"));
        assert!(e(RequestParams { n: 0, ..ok.clone() }).contains("n must be"));
        assert!(e(RequestParams { n: MAX_N + 1, ..ok.clone() }).contains("n must be"));
        assert!(e(RequestParams { stop: vec![String::new()], ..ok.clone() }).contains("stop strings"));
        let mut s = ok.clone();
        s.sampling.top_p = 0.0;
        assert!(e(s).contains("top_p"));
    }

    #[test]
    fn collector_folds_events_per_choice() {
        let params = RequestParams { n: 2, ..Default::default() };
        let mut c = Collector::new(&params);
        let d = |index, text: &str, ids: &[u32]| Event::Delta {
            index,
            text: text.into(),
            token_ids: ids.to_vec(),
            logprobs: vec![],
        };
        assert!(!c.push(d(1, "b", &[7])));
        assert!(!c.push(d(0, "a", &[5])));
        assert!(!c.push(d(0, "c", &[6])));
        c.push(Event::Finished { index: 0, reason: FinishReason::Length, stop_reason: None });
        c.push(Event::Finished {
            index: 1,
            reason: FinishReason::Stop,
            stop_reason: Some(StopReason::String("x".into())),
        });
        assert!(c.push(Event::Done { usage: Usage { prompt_tokens: 3, completion_tokens: 3 } }));
        let out = c.finish().unwrap();
        assert_eq!(out.choices[0].text, "ac");
        assert_eq!(out.choices[0].token_ids, vec![5, 6]);
        assert_eq!(out.choices[1].stop_reason, Some(StopReason::String("x".into())));
        assert_eq!(out.choices[0].logprobs, None);
        assert_eq!(out.usage.completion_tokens, 3);
    }

    #[test]
    fn collector_reports_errors_and_early_ends() {
        let mut c = Collector::new(&RequestParams::default());
        assert!(c.push(Event::Error { message: "image too large".into() }));
        assert_eq!(c.finish().unwrap_err().to_string(), "image too large");
        let c = Collector::new(&RequestParams::default());
        assert!(c.finish().unwrap_err().to_string().contains("stopped before"));
    }
}

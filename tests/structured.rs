//! Structured outputs in the engine, on the CPU backend and the built-in
//! tiny Qwen2-VL (random weights: only the constraint makes its output
//! valid). Constrained requests sample at temperature 1 beside free ones in
//! the same steps; every constrained choice must satisfy its constraint and
//! end by it, and the free requests must get exactly what they get alone.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};

use kestrel::engine::core::EngineCore;
use kestrel::engine::engine::load;
use kestrel::engine::request::{Collector, FinishReason};
use kestrel::engine::sampling::SamplingParams;
use kestrel::engine::{EngineConfig, Event, Frontend, Request, RequestOutput, RequestParams};
use kestrel::structured::{Constraint, JsonOptions};
use serde_json::{json, Value};

fn config() -> EngineConfig {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/builtin/tiny-qwen2-vl");
    EngineConfig { model_dir: dir, device: "cpu".into(), ..Default::default() }
}

fn prompt(fe: &Frontend, text: &str) -> kestrel::model::inputs::PreparedInput {
    fe.prepare_chat(&json!([{"role": "user", "content": text}]), &[]).unwrap()
}

/// Steps the core until every stream has ended; the outputs, or the error
/// message a request failed with.
fn run_all(core: &mut EngineCore, reqs: Vec<Request>) -> Vec<Result<RequestOutput, String>> {
    let mut streams: Vec<(Collector, Receiver<Event>, Option<String>, bool)> = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let c = Collector::new(&r.params);
        core.add(i as u64, r, tx).unwrap();
        streams.push((c, rx, None, false));
    }
    let drain = |streams: &mut Vec<(Collector, Receiver<Event>, Option<String>, bool)>| {
        for (c, rx, err, done) in streams.iter_mut() {
            while let Ok(ev) = rx.try_recv() {
                if let Event::Error { message } = &ev {
                    *err = Some(message.clone());
                    *done = true;
                    continue;
                }
                *done |= c.push(ev);
            }
        }
    };
    while core.has_work() {
        core.step().unwrap();
        drain(&mut streams);
    }
    drain(&mut streams);
    assert!(streams.iter().all(|s| s.3), "every stream ended");
    assert_eq!(core.pool().num_free(), core.pool().num_blocks(), "every block came back");
    streams
        .into_iter()
        .map(|(c, _, err, _)| match err {
            Some(m) => Err(m),
            None => Ok(c.finish().unwrap()),
        })
        .collect()
}

fn free(max_tokens: usize) -> RequestParams {
    RequestParams { sampling: SamplingParams::greedy(), max_tokens, ignore_eos: true, ..Default::default() }
}

fn sampled(seed: u64, max_tokens: usize) -> RequestParams {
    RequestParams {
        sampling: SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() },
        max_tokens,
        ..Default::default()
    }
}

fn compact() -> JsonOptions {
    JsonOptions { any_whitespace: false, ..JsonOptions::default() }
}

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": false
    })
}

fn check_weather(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{text:?} is not an object"));
    assert_eq!(o.len(), 3, "{text}");
    assert!(o["city"].as_str().is_some_and(|c| c.chars().count() <= 8), "{text}");
    assert!(["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap_or("")), "{text}");
    assert!(o["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)), "{text}");
}

#[test]
fn constrained_choices_are_valid_and_free_ones_unchanged_beside_them() {
    let (fe, mut core) = load(&config()).unwrap();
    let free_reqs = |fe: &Frontend| -> Vec<Request> {
        (0..3).map(|i| Request { input: prompt(fe, &"tell me more ".repeat(i + 1)), params: free(12 + i) }).collect()
    };
    let alone: Vec<RequestOutput> =
        free_reqs(&fe).into_iter().map(|r| run_all(&mut core, vec![r]).remove(0).unwrap()).collect();

    let grammar = |c: Constraint| Some(fe.grammars.compile(&c).unwrap());
    let json_c = Constraint::Json { schema: weather_schema(), options: compact() };
    let regex_c = Constraint::Regex(r"[a-z]{3,6}@[a-z]{2,4}\.(com|org)".into());
    let choices = vec!["positive".to_string(), "negative".into(), "neutral".into()];
    let choice_c = Constraint::Choice(choices.clone());
    let lark_c = Constraint::Grammar("start: \"SELECT \" col \" FROM t\"\ncol: \"a\" | \"b\" | \"c\"".into());
    let mut constrained = vec![
        // n = 3 with a seed: three choices, each on its own copy of the grammar.
        RequestParams { n: 3, grammar: grammar(json_c), ..sampled(7, 120) },
        RequestParams { grammar: grammar(regex_c), ..sampled(8, 60) },
        // Logprobs take the host sampler: the mask applies there too.
        RequestParams {
            grammar: grammar(choice_c),
            sampling: SamplingParams { logprobs: Some(3), ..sampled(9, 20).sampling },
            ..sampled(9, 20)
        },
        RequestParams { grammar: grammar(lark_c), ..sampled(10, 30) },
    ];
    let mut reqs: Vec<Request> = Vec::new();
    let mut frees = free_reqs(&fe).into_iter();
    for (i, params) in constrained.drain(..).enumerate() {
        reqs.push(Request { input: prompt(&fe, &format!("answer number {i}")), params });
        if let Some(f) = frees.next() {
            reqs.push(f);
        }
    }
    let out = run_all(&mut core, reqs);
    let out: Vec<RequestOutput> = out.into_iter().map(|o| o.expect("no request fails")).collect();
    // Free requests: bit-identical to running alone.
    for (k, a) in alone.iter().enumerate() {
        let b = &out[2 * k + 1];
        assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids, "free request {k}");
    }
    let json_out = &out[0];
    assert_eq!(json_out.choices.len(), 3);
    for c in &json_out.choices {
        assert_eq!(c.finish_reason, FinishReason::Stop, "{:?}", c.text);
        check_weather(&c.text);
    }
    let texts: Vec<&str> = json_out.choices.iter().map(|c| c.text.as_str()).collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "three seeds, three identical answers: {texts:?}");
    let email = &out[2].choices[0].text;
    let (user, domain) = email.split_once('@').expect("an @");
    assert!((3..=6).contains(&user.len()) && user.chars().all(|c| c.is_ascii_lowercase()), "{email}");
    assert!(domain.ends_with(".com") || domain.ends_with(".org"), "{email}");
    let choice = &out[4].choices[0];
    assert!(choices.contains(&choice.text), "{:?}", choice.text);
    let lps = choice.logprobs.as_ref().expect("logprobs");
    assert_eq!(lps.len(), choice.token_ids.len());
    // Logprobs of the masked distribution (vLLM masks before its sampler
    // takes them): where fewer tokens are allowed than asked for, the rest
    // of the top list is -inf and the allowed ones hold all the mass.
    for t in lps {
        assert!(t.logprob.is_finite(), "{lps:?}");
        if t.top.iter().any(|&(_, lp)| lp == f32::NEG_INFINITY) {
            let mass: f64 = t.top.iter().map(|&(_, lp)| (lp as f64).exp()).sum();
            assert!((mass - 1.0).abs() < 1e-4, "{lps:?}");
        }
    }
    assert!(lps.iter().any(|t| t.top[2].1 == f32::NEG_INFINITY), "{lps:?}");
    let sql = &out[6].choices[0].text;
    assert!(["SELECT a FROM t", "SELECT b FROM t", "SELECT c FROM t"].contains(&sql.as_str()), "{sql}");
}

#[test]
fn the_grammar_ends_a_choice_and_a_dead_end_fails_only_its_request() {
    let (fe, mut core) = load(&config()).unwrap();
    let compile = |c: Constraint| Some(fe.grammars.compile(&c).unwrap());
    // "ok" and nothing after: the choice ends as soon as it is written,
    // even with ignore_eos and room for more.
    let done =
        RequestParams { grammar: compile(Constraint::Choice(vec!["ok".into()])), ignore_eos: true, ..sampled(1, 8) };
    // The empty regex allows only EOS, which min_tokens bans: no token is left.
    let stuck = RequestParams { grammar: compile(Constraint::Regex(String::new())), min_tokens: 1, ..sampled(2, 8) };
    let out = run_all(
        &mut core,
        vec![
            Request { input: prompt(&fe, "hi"), params: done },
            Request { input: prompt(&fe, "hi"), params: stuck },
            Request { input: prompt(&fe, "hi"), params: free(6) },
        ],
    );
    let first = out[0].as_ref().unwrap();
    assert_eq!(first.choices[0].text, "ok");
    assert_eq!(first.choices[0].finish_reason, FinishReason::Stop);
    let err = out[1].as_ref().expect_err("a dead end fails the request");
    assert!(err.contains("regular expression allows no token"), "{err}");
    assert_eq!(out[2].as_ref().unwrap().choices[0].token_ids.len(), 6);
}

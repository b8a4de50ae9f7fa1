//! Structured outputs over HTTP, on the built-in tiny model (random weights:
//! only the constraint makes an answer valid): every form a vLLM user sends
//! (`response_format`, `structured_outputs`, `guided_*`), in chat and text
//! completions, whole and streamed, n > 1, beside unconstrained requests;
//! and the 400s for constraints that cannot be used.

mod common;

use common::http::Server;
use serde_json::{json, Value};

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "kestrel-tiny-qwen2-vl",
        "messages": [{"role": "user", "content": "Give me the weather as JSON."}],
        "max_tokens": 150,
        "seed": 11,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "temperature": {"type": "integer", "minimum": -40, "maximum": 50},
            "sky": {"enum": ["clear", "cloudy", "rain"]}
        },
        "required": ["city", "temperature", "sky"],
        "additionalProperties": false
    })
}

fn check(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{text:?} is not an object"));
    assert_eq!(o.len(), 3, "{text}");
    assert!(o["city"].as_str().is_some_and(|c| c.chars().count() <= 10), "{text}");
    assert!(o["temperature"].as_i64().is_some_and(|t| (-40..=50).contains(&t)), "{text}");
    assert!(["clear", "cloudy", "rain"].contains(&o["sky"].as_str().unwrap_or("")), "{text}");
}

fn json_schema_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "weather", "schema": schema(), "strict": true}})
}

#[test]
fn json_schema_answers_validate_whole_and_streamed() {
    let s = Server::start(&[]);
    let body = chat(json!({"response_format": json_schema_format(), "n": 3}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for c in choices {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        check(c["message"]["content"].as_str().unwrap());
    }
    // The same request streamed: the deltas add up to the same answers.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let mut text = vec![String::new(); 3];
    for chunk in s.stream("/v1/chat/completions", &streamed) {
        for ch in chunk["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            text[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    for (i, t) in text.iter().enumerate() {
        assert_eq!(t, choices[i]["message"]["content"].as_str().unwrap(), "choice {i}");
    }
}

#[test]
fn every_vllm_form_of_every_constraint() {
    let s = Server::start(&[]);
    let compact = |c: Value| {
        let mut so = c;
        so["disable_any_whitespace"] = json!(true);
        so
    };
    let content = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    for extra in [
        json!({"guided_json": schema()}),
        json!({"guided_json": schema().to_string(), "guided_decoding_backend": "guidance"}),
        json!({"structured_outputs": {"json": schema()}}),
    ] {
        let (status, v) = s.post("/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 200, "{extra}: {v}");
        check(&content(&v));
    }
    let (status, v) =
        s.post("/v1/chat/completions", &chat(json!({"structured_outputs": compact(json!({"json_object": true}))})));
    assert_eq!(status, 200, "{v}");
    let text = content(&v);
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(&text).is_ok_and(|o| o.is_object()), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    for extra in
        [json!({"guided_choice": ["left", "right"]}), json!({"structured_outputs": {"choice": ["left", "right"]}})]
    {
        let (status, v) = s.post("/v1/chat/completions", &chat(extra));
        assert_eq!(status, 200, "{v}");
        assert!(["left", "right"].contains(&content(&v).as_str()), "{v}");
    }
    let (status, v) = s.post("/v1/chat/completions", &chat(json!({"guided_regex": "[0-9]{3}-[0-9]{4}"})));
    assert_eq!(status, 200, "{v}");
    let phone = content(&v);
    assert!(phone.len() == 8 && phone.as_bytes()[3] == b'-', "{phone}");
    assert!(phone.chars().filter(|c| c.is_ascii_digit()).count() == 7, "{phone}");
    // Text completions take the same fields.
    let body = json!({"prompt": "The answer is", "max_tokens": 20, "guided_choice": ["yes", "no"], "seed": 3});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert!(["yes", "no"].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");
    let body = json!({"prompt": "JSON:", "max_tokens": 150, "response_format": json_schema_format(), "seed": 4});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    check(v["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn grammars_in_lark_and_in_vllms_gbnf() {
    let s = Server::start(&[]);
    // vLLM's documented example, in GBNF.
    let gbnf = r#"
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"#;
    let lark = "start: \"SELECT \" col \" FROM \" tbl\ncol: \"a\" | \"b\"\ntbl: /t[0-9]/";
    for (grammar, check) in [
        (
            gbnf,
            &(|t: &str| t.starts_with("SELECT col_") && t.contains(" from table_") && t.ends_with(' '))
                as &dyn Fn(&str) -> bool,
        ),
        (lark, &|t: &str| t.starts_with("SELECT ") && t.contains(" FROM t") && t.len() == 16),
    ] {
        for extra in [json!({"guided_grammar": grammar}), json!({"structured_outputs": {"grammar": grammar}})] {
            let (status, v) = s.post("/v1/chat/completions", &chat(extra));
            assert_eq!(status, 200, "{v}");
            let text = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(check(text), "{text:?}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
    }
}

#[test]
fn constrained_and_free_requests_at_once() {
    let s = Server::start(&[]);
    let free = chat(json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true}));
    let (_, alone) = s.post("/v1/chat/completions", &free);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let s = &s;
                let free = free.clone();
                sc.spawn(move || {
                    if i % 2 == 0 {
                        let (st, v) = s.post(
                            "/v1/chat/completions",
                            &chat(json!({"response_format": json_schema_format(), "seed": i})),
                        );
                        assert_eq!(st, 200, "{v}");
                        check(v["choices"][0]["message"]["content"].as_str().unwrap());
                        None
                    } else {
                        Some(s.post("/v1/chat/completions", &free).1)
                    }
                })
            })
            .collect();
        for h in handles {
            if let Some(v) = h.join().unwrap() {
                assert_eq!(v["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"]);
            }
        }
    });
}

#[test]
fn unusable_constraints_are_400_with_the_reason() {
    let s = Server::start(&[]);
    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}),
            "JSON schema",
        ),
        (json!({"guided_regex": "([a-z]"}), "regular expression"),
        (json!({"guided_grammar": "start: missing_rule"}), "grammar"),
        (json!({"guided_grammar": "root ::= \"a\" undefined"}), "GBNF"),
        (json!({"guided_json": schema(), "guided_regex": "a"}), "only one output constraint"),
        (json!({"guided_choice": "yes"}), "guided_choice"),
        (json!({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}), "llguidance"),
        (json!({"response_format": {"type": "structural_tag"}}), "structural_tag"),
    ];
    for (extra, want) in cases {
        let (status, v) = s.post("/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 400, "{extra}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{extra}: {msg}");
    }
    // The server goes on serving.
    let (status, _) = s.post("/v1/chat/completions", &chat(json!({"guided_choice": ["a"]})));
    assert_eq!(status, 200);
}

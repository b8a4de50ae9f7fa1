//! Tool calling over HTTP on the built-in tiny Qwen2-VL (random weights):
//! a named function and `"required"` are held to their schemas by the
//! grammar engine, so the calls are valid whatever the model; `"auto"`
//! reads Hermes `<tool_call>` blocks, here forced by a regex so the parse
//! path runs end to end; answers whole and streamed agree; a second turn
//! with the call and its result goes through the template; bad requests
//! are 400s.

mod common;

use common::http::Server;
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "unit": {"enum": ["c", "f"]}
                },
                "required": ["city", "unit"],
                "additionalProperties": false
            }
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": false}
        }}
    ])
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "kestrel-tiny-qwen2-vl",
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": tools(),
        "max_tokens": 120,
        "seed": 5,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// A call's arguments, checked against its function's schema.
fn check_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_") && id.len() == 29), "{call}");
    let name = call["function"]["name"].as_str().unwrap().to_owned();
    let text = call["function"]["arguments"].as_str().expect("arguments are a JSON string");
    let args: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let o = args.as_object().unwrap();
    match name.as_str() {
        "get_weather" => {
            assert_eq!(o.len(), 2, "{args}");
            assert!(o["city"].as_str().is_some_and(|c| c.chars().count() <= 8), "{args}");
            assert!(["c", "f"].contains(&o["unit"].as_str().unwrap()), "{args}");
        }
        "get_time" => assert!(o.len() == 1 && ["utc", "cet"].contains(&o["zone"].as_str().unwrap()), "{args}"),
        other => panic!("unknown function {other}"),
    }
    (name, args)
}

/// A streamed chat's accumulated message per choice: (content, calls as
/// {id, type, function: {name, arguments}}, finish_reason).
fn accumulate(chunks: &[Value]) -> Vec<(String, Vec<Value>, String)> {
    let mut out: Vec<(String, Vec<Value>, String)> = Vec::new();
    for c in chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, (String::new(), Vec::new(), String::new()));
            }
            let d = &ch["delta"];
            out[i].0.push_str(d["content"].as_str().unwrap_or(""));
            for tc in d["tool_calls"].as_array().into_iter().flatten() {
                let k = tc["index"].as_u64().unwrap() as usize;
                if k == out[i].1.len() {
                    out[i].1.push(json!({"id": tc["id"], "type": tc["type"], "function": {"name": tc["function"]["name"], "arguments": ""}}));
                }
                let args = out[i].1[k]["function"]["arguments"].as_str().unwrap().to_owned()
                    + tc["function"]["arguments"].as_str().unwrap_or("");
                out[i].1[k]["function"]["arguments"] = json!(args);
            }
            if let Some(r) = ch["finish_reason"].as_str() {
                out[i].2 = r.to_owned();
            }
        }
    }
    out
}

#[test]
fn a_named_function_is_called_with_valid_arguments() {
    let s = Server::start(&[]);
    let body = chat(json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "n": 2}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let mut whole = Vec::new();
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        assert!(c["message"]["content"].is_null(), "{c}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        let (name, args) = check_call(&calls[0]);
        assert_eq!(name, "get_weather");
        whole.push(args);
    }
    // Streamed: the arguments arrive in pieces and add up to the same call.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let streamed = accumulate(&s.stream("/v1/chat/completions", &sb));
    assert_eq!(streamed.len(), 2);
    for (i, (content, calls, finish)) in streamed.iter().enumerate() {
        assert_eq!((content.as_str(), finish.as_str(), calls.len()), ("", "stop", 1));
        assert_eq!(check_call(&calls[0]).1, whole[i], "choice {i}");
    }
}

#[test]
fn required_calls_one_or_more_functions() {
    let s = Server::start(&[]);
    for parallel in [true, false] {
        let body = chat(json!({"tool_choice": "required", "parallel_tool_calls": parallel}));
        let (status, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{c}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        if !parallel {
            assert_eq!(calls.len(), 1, "{c}");
        }
        calls.iter().for_each(|call| {
            check_call(call);
        });
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let streamed = accumulate(&s.stream("/v1/chat/completions", &sb));
        assert_eq!(streamed[0].2, "tool_calls");
        let names = |cs: &[Value]| cs.iter().map(|c| c["function"].clone()).collect::<Vec<_>>();
        assert_eq!(names(&streamed[0].1), names(calls), "the same calls, streamed");
    }
}

#[test]
fn auto_reads_hermes_calls_and_a_second_turn_takes_the_result() {
    let s = Server::start(&[]);
    // The regex makes the random model write a Hermes block, so "auto" has
    // a call to find: the parse path as a real model would drive it.
    let hermes = r#"Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Oslo|Rome)", "unit": "(c|f)"\}\}\n</tool_call>"#;
    let body = chat(json!({"guided_regex": hermes}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{c}");
    assert_eq!(c["message"]["content"], "Checking.");
    let calls = c["message"]["tool_calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(check_call(&calls[0]).0, "get_weather");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let streamed = accumulate(&s.stream("/v1/chat/completions", &sb));
    assert_eq!((streamed[0].0.as_str(), streamed[0].2.as_str()), ("Checking.", "tool_calls"));
    assert_eq!(streamed[0].1[0]["function"], calls[0]["function"]);
    // tool_choice "none": the same text stays text.
    let (_, v) = s.post("/v1/chat/completions", &chat(json!({"guided_regex": hermes, "tool_choice": "none"})));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("<tool_call>"));
    assert_eq!(v["choices"][0]["message"]["tool_calls"], json!([]));

    // Turn two: the call and its result go back through the template.
    let first_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let messages = json!([
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"temperature\": 21}"}
    ]);
    let (status, v2) = s.post("/v1/chat/completions", &chat(json!({"messages": messages, "max_tokens": 4})));
    assert_eq!(status, 200, "{v2}");
    let second_prompt = v2["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        second_prompt > first_prompt + 20,
        "the call and result are in the prompt: {first_prompt} -> {second_prompt}"
    );
}

#[test]
fn bad_tool_requests_are_400_with_the_reason() {
    let s = Server::start(&[]);
    let cases = [
        (json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}), "not in tools"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0]"),
        (json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}), "name"),
        (json!({"tools": null, "tool_choice": "required"}), "needs `tools`"),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tool_choice": "required", "response_format": {"type": "json_object"}}), "already constrains"),
    ];
    for (extra, want) in cases {
        let (status, v) = s.post("/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 400, "{extra}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{extra}: {msg}");
    }
}

#[test]
fn tokenize_renders_the_tools_as_chat_does() {
    let s = Server::start(&[]);
    let messages = json!([{"role": "user", "content": "What is the weather in Oslo?"}]);
    let count = |extra: Value| {
        let mut body = json!({"messages": messages});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, v) = s.post("/tokenize", &body);
        assert_eq!(status, 200, "{v}");
        v["count"].as_u64().unwrap()
    };
    let (plain, with_tools) = (count(json!({})), count(json!({"tools": tools()})));
    assert!(with_tools > plain + 50, "{plain} -> {with_tools}");
    // The same prompt chat completions builds.
    let (_, v) = s.post("/v1/chat/completions", &chat(json!({"max_tokens": 1, "tool_choice": "none"})));
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), with_tools);
    let (status, _) = s.post("/tokenize", &json!({"prompt": "hi", "tools": tools()}));
    assert_eq!(status, 400);
}

#[test]
fn without_a_parser_auto_is_refused_but_forced_calls_work() {
    // A start that names no parser for a family without one fails; Qwen2-VL's
    // own (hermes) is the default, and a bad name is refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["serve", "--device", "cpu", "--port", "0", "--tool-call-parser", "mistral"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Kestrel reads: hermes"));
}

use serde_json::{json, Value};

use super::*;
use crate::openai::tools::parse_tools;

fn tools() -> Vec<Tool> {
    parse_tools(&json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time"}}
    ]))
    .unwrap()
}

/// What a client that accumulates the stream's deltas ends with: content,
/// (name, arguments) per call index, and the finish reason.
fn streamed(mode: &ToolMode, pieces: &[&str], finish: &'static str) -> (String, Vec<(String, String)>, &'static str) {
    let mut s = ToolStream::new(mode);
    let mut deltas: Vec<Value> = pieces.iter().flat_map(|p| s.push(p)).collect();
    let (last, reason) = s.finish(finish);
    deltas.extend(last);
    let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
    let mut ids: Vec<String> = Vec::new();
    for d in deltas {
        if let Some(c) = d.get("content") {
            content.push_str(c.as_str().unwrap());
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                // A call's first delta names it and has its id and type.
                assert_eq!(tc["type"], "function", "{tc}");
                let id = tc["id"].as_str().unwrap().to_owned();
                assert!(id.starts_with("call_") && !ids.contains(&id), "{tc}");
                ids.push(id);
                calls.push((tc["function"]["name"].as_str().unwrap().into(), String::new()));
            }
            calls[i].1.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    (content, calls, reason)
}

fn whole(mode: &ToolMode, text: &str, finish: &'static str) -> (String, Vec<(String, String)>, &'static str) {
    let a = mode.answer(text, finish);
    (a.content.unwrap_or_default(), a.calls.into_iter().map(|c| (c.name, c.arguments)).collect(), a.finish_reason)
}

#[test]
fn modes_from_tool_choice() {
    let t = tools();
    assert_eq!(ToolMode::new(&[], &ToolChoice::Auto, Some("hermes"), true).unwrap(), ToolMode::Off);
    assert_eq!(ToolMode::new(&t, &ToolChoice::None, Some("hermes"), true).unwrap(), ToolMode::Off);
    assert_eq!(
        ToolMode::new(&t, &ToolChoice::Auto, Some("hermes"), false).unwrap(),
        ToolMode::Auto { parser: "hermes", parallel: false }
    );
    let e = ToolMode::new(&t, &ToolChoice::Auto, None, true).unwrap_err().to_string();
    assert!(e.contains("--tool-call-parser hermes"), "{e}");
    assert_eq!(
        ToolMode::new(&t, &ToolChoice::Named("get_time".into()), None, true).unwrap(),
        ToolMode::Named("get_time".into())
    );
    assert_eq!(ToolMode::new(&t, &ToolChoice::Required, None, true).unwrap(), ToolMode::Required { parallel: true });
}

#[test]
fn streamed_answers_add_up_to_the_whole_ones() {
    let auto = ToolMode::Auto { parser: "hermes", parallel: true };
    let hermes = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let required =
        r#"[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]"#;
    let cases: Vec<(ToolMode, &str, &'static str)> = vec![
        (ToolMode::Off, "plain <tool_call> text", "stop"),
        (auto.clone(), "no calls here", "length"),
        (auto.clone(), hermes, "stop"),
        (ToolMode::Auto { parser: "hermes", parallel: false }, hermes, "stop"),
        (ToolMode::Named("get_weather".into()), "{\"city\": \"Lima\"}", "stop"),
        (ToolMode::Required { parallel: true }, required, "stop"),
        (ToolMode::Required { parallel: false }, required, "stop"),
        (ToolMode::Required { parallel: true }, "[{\"name\": \"get_ti", "length"),
    ];
    for (mode, text, finish) in cases {
        let want = whole(&mode, text, finish);
        // Every split into two pieces, and byte by byte (on char boundaries).
        for cut in (0..=text.len()).filter(|&c| text.is_char_boundary(c)) {
            assert_eq!(streamed(&mode, &[&text[..cut], &text[cut..]], finish), want, "{mode:?} cut at {cut}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(streamed(&mode, &pieces, finish), want, "{mode:?} char by char");
    }
}

#[test]
fn whole_answers() {
    let auto = ToolMode::Auto { parser: "hermes", parallel: true };
    let a = auto.answer("<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>", "stop");
    assert_eq!((a.content, a.finish_reason, a.calls.len()), (None, "tool_calls", 1));
    assert_eq!((a.calls[0].name.as_str(), a.calls[0].arguments.as_str()), ("get_time", "{}"));
    let a = ToolMode::Named("get_weather".into()).answer("{\"city\":\"Oslo\"}", "stop");
    assert_eq!((a.content, a.finish_reason), (None, "stop"));
    assert_eq!(a.calls[0].arguments, "{\"city\":\"Oslo\"}");
    let a = ToolMode::Required { parallel: false }
        .answer(r#"[{"name":"get_time","parameters":{}},{"name":"get_time","parameters":{}}]"#, "stop");
    assert_eq!((a.calls.len(), a.finish_reason), (1, "tool_calls"));
    let a = ToolMode::Required { parallel: true }.answer("[{\"na", "length");
    assert_eq!((a.content.as_deref(), a.calls.len(), a.finish_reason), (Some("[{\"na"), 0, "length"));
}

use serde_json::json;

use super::*;

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }})
}

fn tools(v: Value) -> Vec<Tool> {
    parse_tools(&v).unwrap()
}

/// The error message of `r`, which must be InvalidInput.
fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn tools_parse_with_defaults() {
    let t = tools(
        json!([weather(), {"function": {"name": "now", "strict": true}}, {"type": "function", "function": {"name": "n-2", "parameters": {}}}]),
    );
    assert_eq!(t.len(), 3);
    assert_eq!(t[0].name, "get_weather");
    assert_eq!(t[0].description.as_deref(), Some("Current weather in a city"));
    assert_eq!(t[0].parameters["required"], json!(["city"]));
    assert_eq!(
        t[1],
        Tool { name: "now".into(), description: None, parameters: empty_parameters(), strict: Some(true) }
    );
    assert_eq!(t[2].parameters, json!({"type": "object", "properties": {}}));
    assert!(parse_tools(&Value::Null).unwrap().is_empty());
    assert!(parse_tools(&json!([])).unwrap().is_empty());
}

#[test]
fn tool_errors_name_the_path() {
    let e = |v: Value| err(parse_tools(&v));
    assert!(e(json!({"a": 1})).starts_with("tools must be an array"));
    assert!(e(json!([weather(), 3])).starts_with("tools[1] must be an object"));
    let m = e(json!([{"type": "retrieval", "function": {"name": "x"}}]));
    assert!(m.starts_with("tools[0].type must be \"function\"") && m.contains("retrieval"), "{m}");
    assert!(e(json!([{"type": "function"}])).starts_with("tools[0].function must be an object"));
    assert!(e(json!([{"type": "function", "function": "f"}])).starts_with("tools[0].function must be an object"));
    assert_eq!(e(json!([weather(), {"function": {"description": "d"}}])), "tools[1].function.name is missing");
    assert!(e(json!([{"function": {"name": 7}}])).starts_with("tools[0].function.name must be a string"));
    let bad_names = ["", "has space", "dot.ted", "ünï", &"x".repeat(65)];
    for n in bad_names {
        let m = e(json!([{"function": {"name": n}}]));
        assert!(m.starts_with("tools[0].function.name must be 1 to 64 characters"), "{n:?}: {m}");
    }
    assert!(parse_tools(&json!([{"function": {"name": "x".repeat(64)}}])).is_ok());
    let m = e(json!([weather(), {"function": {"name": "b"}}, weather()]));
    assert_eq!(m, "tools[2].function.name \"get_weather\" is already the name of tools[0]; names must be unique");
    let m = e(json!([{"function": {"name": "a", "parameters": "string"}}]));
    assert!(m.starts_with("tools[0].function.parameters must be a JSON Schema object"), "{m}");
    assert!(e(json!([{"function": {"name": "a", "parameters": []}}])).starts_with("tools[0].function.parameters"));
    assert!(e(json!([{"function": {"name": "a", "description": 1}}])).starts_with("tools[0].function.description"));
    assert!(e(json!([{"function": {"name": "a", "strict": "yes"}}])).starts_with("tools[0].function.strict"));
}

#[test]
fn template_tools_have_the_openai_shape() {
    let t = tools(json!([weather(), {"function": {"name": "now", "strict": false}}]));
    let v = tools_for_template(&t);
    assert_eq!(v[0], weather());
    assert_eq!(
        v[1],
        json!({"type": "function", "function": {"name": "now", "parameters": empty_parameters(), "strict": false}})
    );
    let keys: Vec<&String> = v[0]["function"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["name", "description", "parameters"]);
}

#[test]
fn tool_choice_defaults_and_shapes() {
    let t = tools(json!([weather(), {"function": {"name": "now"}}]));
    assert_eq!(parse_tool_choice(None, &t).unwrap(), ToolChoice::Auto);
    assert_eq!(parse_tool_choice(Some(&Value::Null), &t).unwrap(), ToolChoice::Auto);
    assert_eq!(parse_tool_choice(None, &[]).unwrap(), ToolChoice::None);
    assert_eq!(parse_tool_choice(Some(&json!("none")), &[]).unwrap(), ToolChoice::None);
    assert_eq!(parse_tool_choice(Some(&json!("none")), &t).unwrap(), ToolChoice::None);
    assert_eq!(parse_tool_choice(Some(&json!("auto")), &t).unwrap(), ToolChoice::Auto);
    assert_eq!(parse_tool_choice(Some(&json!("required")), &t).unwrap(), ToolChoice::Required);
    let named = json!({"type": "function", "function": {"name": "now"}});
    assert_eq!(parse_tool_choice(Some(&named), &t).unwrap(), ToolChoice::Named("now".into()));
    let untyped = json!({"function": {"name": "get_weather"}});
    assert_eq!(parse_tool_choice(Some(&untyped), &t).unwrap(), ToolChoice::Named("get_weather".into()));
}

#[test]
fn tool_choice_errors() {
    let t = tools(json!([weather(), {"function": {"name": "now"}}]));
    let e = |c: Value, t: &[Tool]| err(parse_tool_choice(Some(&c), t));
    for c in [json!("auto"), json!("required"), json!({"type": "function", "function": {"name": "now"}})] {
        let m = e(c.clone(), &[]);
        assert!(m.starts_with("tool_choice ") && m.contains("needs `tools`, and the request has none"), "{c}: {m}");
    }
    let m = e(json!("any"), &t);
    assert!(
        m.starts_with("tool_choice must be \"none\", \"auto\", \"required\" or {") && m.ends_with("got \"any\""),
        "{m}"
    );
    assert!(e(json!(1), &t).starts_with("tool_choice must be"));
    assert!(e(json!(["auto"]), &t).starts_with("tool_choice must be"));
    assert!(
        e(json!({"type": "allowed_tools", "function": {"name": "now"}}), &t).starts_with("tool_choice.type must be")
    );
    assert!(e(json!({"type": "function"}), &t).starts_with("tool_choice.function must be an object"));
    assert!(e(json!({"type": "function", "name": "now"}), &t).starts_with("tool_choice.function must be an object"));
    assert!(
        e(json!({"function": {"name": ""}}), &t).starts_with("tool_choice.function.name must be a non-empty string")
    );
    assert!(e(json!({"function": {"name": 3}}), &t).starts_with("tool_choice.function.name must be a non-empty string"));
    let m = e(json!({"function": {"name": "later"}}), &t);
    assert_eq!(m, "tool_choice names function \"later\", which is not in tools (they are: get_weather, now)");
}

#[test]
fn named_and_required_schemas() {
    let t = tools(json!([weather(), {"function": {"name": "now"}}]));
    assert_eq!(named_schema(&t[0]), weather()["function"]["parameters"]);
    let item = |name: &str, params: Value| json!({"properties": {"name": {"type": "string", "const": name}, "parameters": params}, "required": ["name", "parameters"]});
    let want = json!({
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": [
            item("get_weather", weather()["function"]["parameters"].clone()),
            item("now", empty_parameters()),
        ]},
    });
    assert_eq!(required_schema(&t, true).unwrap(), want);
    let mut one = want.clone();
    one["maxItems"] = json!(1);
    assert_eq!(required_schema(&t, false).unwrap(), one);
}

#[test]
fn required_schema_hoists_defs() {
    let point = json!({"type": "object", "properties": {"x": {"type": "number"}}});
    let with_defs = |name: &str, def: &Value| {
        json!({"function": {"name": name, "parameters": {
            "type": "object", "properties": {"at": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": def}}}})
    };
    let t = tools(json!([with_defs("a", &point), with_defs("b", &point), {"function": {"name": "c"}}]));
    let s = required_schema(&t, true).unwrap();
    assert_eq!(s["$defs"], json!({"Point": point}));
    for i in 0..2 {
        let p = &s["items"]["anyOf"][i]["properties"]["parameters"];
        assert!(p.get("$defs").is_none() && p["properties"]["at"]["$ref"] == "#/$defs/Point", "{p}");
    }
    // The named schema is the tool's own root: its $defs stay.
    assert_eq!(named_schema(&t[0])["$defs"]["Point"], point);
    assert!(required_schema(&t[2..], true).unwrap().get("$defs").is_none());
    let other = json!({"type": "string"});
    let t = tools(json!([with_defs("a", &point), with_defs("b", &other)]));
    let m = err(required_schema(&t, true));
    assert!(m.contains("\"Point\"") && m.contains("differs between tools"), "{m}");
}

fn names_and_args(calls: &[ToolCall]) -> Vec<(String, String)> {
    calls.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect()
}

#[test]
fn required_output_parses() {
    let calls = parse_required_output(r#"[{"name": "get_weather", "parameters": {"city": "Paris"}}]"#).unwrap();
    assert_eq!(names_and_args(&calls), pairs(&[("get_weather", r#"{"city":"Paris"}"#)]));
    let text =
        r#" [ {"name": "a", "parameters": {"k": [1, 2], "s": "é"}}, {"name": "b", "parameters": {}}, {"name": "c"} ] "#;
    let calls = parse_required_output(text).unwrap();
    assert_eq!(names_and_args(&calls), pairs(&[("a", r#"{"k":[1,2],"s":"é"}"#), ("b", "{}"), ("c", "{}")]));
    assert_ne!(calls[0].id, calls[1].id);
}

#[test]
fn required_output_errors() {
    let e = |t: &str| err(parse_required_output(t));
    assert!(e(r#"{"name": "a", "parameters": {}}"#).contains("must be a JSON array"));
    assert!(e(r#"[{"name": "a", "parameters": {"#).contains("is not valid JSON"));
    assert!(e(r#"[{"function": "a", "parameters": {}}]"#).contains("item 0 has no string `name`"));
    assert!(e(r#"[{"name": "a"}, {"name": 5, "parameters": {}}]"#).contains("item 1 has no string `name`"));
    assert!(e(r#"[{"name": "a", "parameters": "{}"}]"#).contains("item 0's `parameters` must be an object"));
    assert!(e("[1]").contains("item 0 has no string `name`"));
}

#[test]
fn call_ids_and_json() {
    let mut n = 0u64;
    let id = call_id(&mut || {
        n += 1;
        n * 7
    });
    assert_eq!(id, "call_7ELSZgnu18FMTahov29GNUbi");
    let c = ToolCall::new("f", r#"{"a":1}"#);
    assert!(c.id.starts_with("call_") && c.id.len() == 29 && c.id[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_ne!(c.id, ToolCall::new("f", "{}").id);
    assert_eq!(
        c.to_json(),
        json!({"id": c.id, "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}})
    );
}

#[test]
fn postprocess_parses_arguments() {
    let mut m = json!([
        {"role": "user", "content": "hi", "tool_calls": [{"function": {"arguments": "{\"a\": 1}"}}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": [1, {\"b\": null}]}"}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": ""}},
            {"id": "3", "type": "function", "function": {"name": "h"}},
            {"id": "4", "type": "function", "function": {"name": "i", "arguments": "[1]"}},
            {"id": "5", "type": "function", "function": {"name": "j", "arguments": "{oops"}},
            {"id": "6", "type": "function", "function": {"name": "k", "arguments": {"already": true}}},
            "not an object",
        ]},
        {"role": "assistant", "content": "plain", "tool_calls": []},
        {"role": "tool", "content": "{\"t\": 1}", "tool_call_id": "1"},
    ]);
    postprocess_messages(&mut m);
    let args: Vec<Value> =
        m[1]["tool_calls"].as_array().unwrap()[..6].iter().map(|c| c["function"]["arguments"].clone()).collect();
    assert_eq!(
        args,
        [json!({"a": [1, {"b": null}]}), json!({}), json!({}), json!("[1]"), json!("{oops"), json!({"already": true})]
    );
    assert_eq!(m[1]["tool_calls"][6], "not an object");
    // Only assistant messages are touched; an empty list is dropped.
    assert_eq!(m[0]["tool_calls"][0]["function"]["arguments"], "{\"a\": 1}");
    assert_eq!(m[2], json!({"role": "assistant", "content": "plain"}));
    assert_eq!(m[3]["content"], "{\"t\": 1}");
    let mut not_a_list = json!({"role": "assistant"});
    postprocess_messages(&mut not_a_list);
    assert_eq!(not_a_list, json!({"role": "assistant"}));
}

// ---- Hermes ----

#[test]
fn hermes_without_calls_is_content() {
    assert_eq!(parse_hermes(""), (None, vec![]));
    let (content, calls) = parse_hermes("  It is sunny.\n");
    assert_eq!((content.as_deref(), calls.len()), (Some("  It is sunny.\n"), 0));
    let (content, calls) = parse_hermes("a <tool_ b </tool_call>");
    assert_eq!((content.as_deref(), calls.len()), (Some("a <tool_ b </tool_call>"), 0));
}

#[test]
fn hermes_reads_calls() {
    let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let (content, calls) = parse_hermes(one);
    assert_eq!(content, None);
    assert_eq!(names_and_args(&calls), pairs(&[("get_weather", r#"{"city":"Paris"}"#)]));

    let two = "Let me check both.\n\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n\
               <tool_call>\n{\"arguments\": {\"y\": \"ü\"}, \"name\": \"b\"}\n</tool_call>\n";
    let (content, calls) = parse_hermes(two);
    assert_eq!(content.as_deref(), Some("Let me check both."));
    assert_eq!(names_and_args(&calls), pairs(&[("a", r#"{"x":1}"#), ("b", r#"{"y":"ü"}"#)]));
    assert_ne!(calls[0].id, calls[1].id);

    // Only whitespace before the block: no content. No or null arguments
    // are {}; arguments given as a JSON string of an object are that object.
    let (content, calls) = parse_hermes(" \n<tool_call>{\"name\": \"now\"}</tool_call><tool_call>{\"name\": \"n\", \"arguments\": \"{\\\"k\\\": 2}\"}</tool_call>");
    assert_eq!(content, None);
    assert_eq!(names_and_args(&calls), pairs(&[("now", "{}"), ("n", r#"{"k":2}"#)]));
    // Text between and after blocks is dropped, as vLLM does.
    let (content, calls) =
        parse_hermes("<tool_call>{\"name\": \"a\"}</tool_call> and <tool_call>{\"name\": \"b\"}</tool_call> done");
    assert_eq!((content, calls.len()), (None, 2));
}

#[test]
fn hermes_unclosed_last_block_is_a_call() {
    let text = "Sure.<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"q\": 1}}\n";
    let (content, calls) = parse_hermes(text);
    assert_eq!(content.as_deref(), Some("Sure."));
    assert_eq!(names_and_args(&calls), pairs(&[("a", "{}"), ("b", r#"{"q":1}"#)]));
}

#[test]
fn hermes_bad_block_makes_everything_content() {
    let bad = [
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {}\n</tool_call>",
        "Hi <tool_call>{\"name\": \"a\"}</tool_call><tool_call>not json</tool_call>",
        "<tool_call>{\"name\": 3, \"arguments\": {}}</tool_call>",
        "<tool_call>[\"a\"]</tool_call>",
        "<tool_call>{\"name\": \"a\"}</tool_call><tool_call>{\"name\": \"b\", \"argu",
        "text <tool_call>",
    ];
    for text in bad {
        assert_eq!(parse_hermes(text), (Some(text.to_owned()), vec![]), "{text:?}");
    }
}

/// Content (None if empty) and (name, arguments) of a stream's deltas;
/// checks that call indices count up from 0.
fn collect(deltas: &[ToolDelta]) -> (Option<String>, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for d in deltas {
        match d {
            ToolDelta::Content(c) => {
                assert!(!c.is_empty(), "empty content delta");
                content.push_str(c);
            }
            ToolDelta::Call { index, call } => {
                assert_eq!(*index, calls.len());
                calls.push((call.name.clone(), call.arguments.clone()));
            }
        }
    }
    ((!content.is_empty()).then_some(content), calls)
}

/// The stream's deltas for `pieces`, then finish.
fn stream(pieces: &[&str]) -> (Vec<ToolDelta>, bool) {
    let mut s = HermesStream::new();
    let mut out: Vec<ToolDelta> = pieces.iter().flat_map(|p| s.push(p)).collect();
    out.extend(s.finish());
    (out, s.saw_calls())
}

const SAMPLES: [&str; 9] = [
    "Let me look that up. \n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"s\": \"</tool\"}}\n</tool_call>  \n <tool_call>{\"name\": \"b\"}",
    "No tools needed: 2 < 3 and <tool_ is not a tag. ",
    "Ends with a partial tag <tool_ca",
    "  leading space, then\t<tool_call>{\"name\": \"f\", \"arguments\": {\"emoji\": \"🌧\"}}</tool_call>\n",
    "Broken: <tool_call>{\"name\": \"a\", \"arguments\": {]}</tool_call> and after",
    "<tool_call>{\"name\": \"open\", \"argu",
    "",
    "   \n",
];

#[test]
fn hermes_stream_matches_whole_text_at_every_split() {
    for text in SAMPLES {
        let (want_content, want_calls) = parse_hermes(text);
        let want = (want_content, names_and_args(&want_calls));
        let (deltas, saw) = stream(&[text]);
        assert_eq!(collect(&deltas), want, "{text:?} in one piece");
        assert_eq!(saw, !want.1.is_empty());
        for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let (deltas, _) = stream(&[&text[..i], &text[i..]]);
            assert_eq!(collect(&deltas), want, "{text:?} split at {i}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        let (deltas, _) = stream(&pieces);
        assert_eq!(collect(&deltas), want, "{text:?} char by char");
    }
}

#[test]
fn hermes_stream_sends_content_early_and_holds_tag_prefixes() {
    let mut s = HermesStream::new();
    assert_eq!(s.push("Hello"), [ToolDelta::Content("Hello".into())]);
    // Trailing whitespace and a possible tag start wait for what follows.
    assert_eq!(s.push(" wor"), [ToolDelta::Content(" wor".into())]);
    assert_eq!(s.push("ld \n<tool"), [ToolDelta::Content("ld".into())]);
    assert_eq!(s.push("s>"), [ToolDelta::Content(" \n<tools>".into())]);
    assert_eq!(s.push("\n<tool_call>{\"name\": \"f\", "), []);
    assert!(!s.saw_calls());
    let d = s.push("\"arguments\": {}}</tool_call>\n");
    assert!(
        matches!(&d[..], [ToolDelta::Call { index: 0, call }] if call.name == "f" && call.arguments == "{}"),
        "{d:?}"
    );
    assert!(s.saw_calls());
    assert_eq!(s.push("\n<tool_c"), []);
    assert_eq!(s.finish(), []);
}

#[test]
fn hermes_stream_bad_block_after_a_call_is_content() {
    let text = "<tool_call>{\"name\": \"a\"}</tool_call>\n<tool_call>{nope}</tool_call> tail";
    let (deltas, saw) = stream(&[text]);
    // The call already sent stands; the bad block and what follows is content.
    assert_eq!(collect(&deltas), (Some("<tool_call>{nope}</tool_call> tail".into()), pairs(&[("a", "{}")])));
    assert!(saw);
    // The bad block is sent when it closes, not held to the end.
    let mut s = HermesStream::new();
    assert_eq!(s.push("Hi <tool_call>{x}"), [ToolDelta::Content("Hi".into())]);
    assert_eq!(s.push("</tool_call> more"), [ToolDelta::Content(" <tool_call>{x}</tool_call> more".into())]);
}

use serde_json::json;

use super::*;
use crate::engine::request::{Choice, FinishReason, Usage};

fn input(body: Value) -> Result<ChatInput> {
    ChatCompletionRequest::from_value(body)?.to_chat_input()
}

fn user(content: Value) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": content}]})
}

/// The request's error message; it must be InvalidInput.
fn err(body: Value) -> String {
    match input(body) {
        Err(e @ Error::InvalidInput(_)) => e.to_string(),
        Err(e) => panic!("expected InvalidInput, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn string_content_and_extra_fields_are_kept() {
    let body = json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "ann"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}
        ],
        "some_future_field": {"ignored": true}
    });
    let inp = input(body).unwrap();
    assert_eq!(
        inp.messages,
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "ann"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}
        ])
    );
    assert!(inp.media.is_empty());
}

#[test]
fn interleaved_parts_become_placeholders_in_order() {
    let inp = input(user(json!([
        {"type": "text", "text": "First"},
        {"type": "image_url", "image_url": {"url": "http://a/1.png", "detail": "high"}},
        {"type": "text", "text": "then"},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        {"type": "image_embeds", "image_embeds": "/data/e.safetensors"},
        {"type": "video", "video": ["f0.png", "f1.png"]},
        {"image_url": {"url": "http://a/untyped.png"}},
        {"type": "video_url", "video_url": {"url": "http://a/clip.mp4"}},
        {"video_url": "data:video/mp4;base64,AAAA"}
    ])))
    .unwrap();
    assert_eq!(
        inp.messages[0]["content"],
        json!([
            {"type": "text", "text": "First"},
            {"type": "image"},
            {"type": "text", "text": "then"},
            {"type": "image"},
            {"type": "image"},
            {"type": "video"},
            {"type": "image"},
            {"type": "video"},
            {"type": "video"}
        ])
    );
    assert_eq!(
        inp.media,
        vec![
            MediaRef::Image("http://a/1.png".into()),
            MediaRef::Image("data:image/png;base64,AAAA".into()),
            MediaRef::ImageEmbeds("/data/e.safetensors".into()),
            MediaRef::Video(vec!["f0.png".into(), "f1.png".into()]),
            MediaRef::Image("http://a/untyped.png".into()),
            MediaRef::VideoFile("http://a/clip.mp4".into()),
            MediaRef::VideoFile("data:video/mp4;base64,AAAA".into()),
        ]
    );
}

#[test]
fn media_in_several_messages_keeps_prompt_order() {
    let body = json!({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b"}}]}
    ]});
    let inp = input(body).unwrap();
    assert_eq!(inp.media, vec![MediaRef::Image("a".into()), MediaRef::Image("b".into())]);
    assert_eq!(inp.messages[1]["content"], "A cat.");
}

#[test]
fn defaults_follow_openai() {
    let inp = input(user(json!("hi"))).unwrap();
    let p = &inp.params;
    assert_eq!(inp.max_tokens, None);
    assert_eq!(p.sampling.temperature, 1.0);
    assert_eq!(p.sampling.top_p, 1.0);
    assert_eq!(p.sampling.logprobs, None);
    assert_eq!(p.sampling.seed, None);
    assert_eq!((p.n, p.min_tokens, p.ignore_eos, p.skip_special_tokens), (1, 0, false, true));
    assert!(p.stop.is_empty() && p.stop_token_ids.is_empty());
}

#[test]
fn sampling_fields_map_onto_params() {
    let mut body = user(json!("hi"));
    let fields = json!({
        "max_tokens": 7, "temperature": 0.0, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1, "seed": -1,
        "stop_token_ids": [5, 6], "ignore_eos": true, "min_tokens": 2, "n": 3,
        "skip_special_tokens": false, "stream": true, "stream_options": {"include_usage": true}
    });
    body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    let req = ChatCompletionRequest::from_value(body).unwrap();
    assert_eq!(req.stream_options.as_ref().and_then(|s| s.include_usage), Some(true));
    let inp = req.to_chat_input().unwrap();
    let p = &inp.params;
    assert_eq!(inp.max_tokens, Some(7));
    assert_eq!(p.max_tokens, 7);
    assert_eq!(p.sampling.temperature, 0.0);
    assert_eq!((p.sampling.top_p, p.sampling.top_k, p.sampling.min_p), (0.9, 20, 0.05));
    assert_eq!((p.sampling.presence_penalty, p.sampling.frequency_penalty), (0.5, -0.5));
    assert_eq!(p.sampling.repetition_penalty, 1.1);
    assert_eq!(p.sampling.seed, Some(u64::MAX));
    assert_eq!(p.stop_token_ids, vec![5, 6]);
    assert_eq!((p.ignore_eos, p.min_tokens, p.n, p.skip_special_tokens), (true, 2, 3, false));
}

#[test]
fn max_completion_tokens_wins() {
    let mut body = user(json!("hi"));
    body["max_tokens"] = json!(100);
    body["max_completion_tokens"] = json!(9);
    assert_eq!(input(body).unwrap().max_tokens, Some(9));
}

#[test]
fn stop_is_a_string_or_a_list() {
    let mut body = user(json!("hi"));
    body["stop"] = json!("\n\n");
    assert_eq!(input(body.clone()).unwrap().params.stop, vec!["\n\n".to_string()]);
    body["stop"] = json!(["a", "bc"]);
    assert_eq!(input(body.clone()).unwrap().params.stop, vec!["a".to_string(), "bc".to_string()]);
    body["stop"] = json!(null);
    assert!(input(body.clone()).unwrap().params.stop.is_empty());
    body["stop"] = json!(["a", 3]);
    assert!(err(body.clone()).contains("stop must be a string or an array of strings"));
    body["stop"] = json!(7);
    assert!(err(body).contains("stop must be a string or an array of strings"));
}

#[test]
fn logprobs_map_to_top_counts() {
    let with = |lp: Value, top: Value| {
        let mut body = user(json!("hi"));
        body["logprobs"] = lp;
        body["top_logprobs"] = top;
        input(body).map(|i| i.params.sampling.logprobs)
    };
    assert_eq!(with(json!(true), json!(null)).unwrap(), Some(0));
    assert_eq!(with(json!(true), json!(5)).unwrap(), Some(5));
    assert_eq!(with(json!(true), json!(20)).unwrap(), Some(20));
    assert_eq!(with(json!(false), json!(null)).unwrap(), None);
    assert_eq!(with(json!(null), json!(0)).unwrap(), None);
    let e = with(json!(false), json!(3)).unwrap_err().to_string();
    assert!(e.contains("top_logprobs needs logprobs set to true"), "{e}");
    let e = with(json!(null), json!(1)).unwrap_err().to_string();
    assert!(e.contains("top_logprobs needs logprobs"), "{e}");
    let e = with(json!(true), json!(21)).unwrap_err().to_string();
    assert!(e.contains("top_logprobs must be between 0 and 20, got 21"), "{e}");
    let e = with(json!(true), json!(-1)).unwrap_err().to_string();
    assert!(e.contains("got -1"), "{e}");
}

#[test]
fn bad_requests_are_named() {
    let with = |key: &str, v: Value| {
        let mut body = user(json!("hi"));
        body[key] = v;
        err(body)
    };
    assert!(with("max_tokens", json!(0)).contains("max_tokens must be at least 1"));
    assert!(with("max_completion_tokens", json!(0)).contains("max_tokens must be at least 1"));
    assert!(with("n", json!(0)).contains("n must be between 1 and 16"));
    assert!(with("n", json!(17)).contains("n must be between 1 and 16"));
    assert!(with("temperature", json!(-0.5)).contains("temperature"));
    assert!(with("top_p", json!(0)).contains("top_p"));
    let mut body = user(json!("hi"));
    body["min_tokens"] = json!(9);
    // Without max_tokens, min_tokens is checked once the prompt length is known.
    assert_eq!(input(body.clone()).unwrap().params.min_tokens, 9);
    body["max_tokens"] = json!(4);
    assert!(err(body).contains("min_tokens (9) must not exceed max_tokens (4)"));
    // Type errors come from serde with the field's position.
    let e = with("max_tokens", json!(-3));
    assert!(e.starts_with("invalid request body:") && e.contains("-3"), "{e}");
    let e = with("temperature", json!("hot"));
    assert!(e.contains("invalid type: string \"hot\""), "{e}");

    let e = err(json!({"model": "m", "messages": []}));
    assert!(e.contains("messages must hold at least one message"), "{e}");
    let e = err(json!({"model": "m"}));
    assert!(e.contains("missing field `messages`"), "{e}");
    let e = err(json!({"messages": [{"role": "critic", "content": "x"}]}));
    assert!(e.contains("messages[0].role \"critic\" is not supported"), "{e}");
    let e = err(user(json!(5)));
    assert!(e.contains("messages[0].content must be a string or an array"), "{e}");
}

#[test]
fn bad_content_parts_are_named() {
    let part = |p: Value| err(user(json!([{"type": "text", "text": "x"}, p])));
    let e = part(json!({"type": "input_audio", "input_audio": {}}));
    assert!(e.contains("messages[0].content[1]: unknown content part type \"input_audio\""), "{e}");
    assert!(
        part(json!({"type": "video_url", "video_url": {"uri": "v.mp4"}})).contains("`video_url.url` must be a string")
    );
    assert!(part(json!({"type": "video_url", "video_url": 3})).contains("`video_url` must be an object"));
    assert!(
        part(json!({"type": "image_url", "image_url": {"detail": "low"}})).contains("`image_url.url` must be a string")
    );
    assert!(part(json!({"type": "image_url"})).contains("`image_url` must be an object"));
    assert!(part(json!({"type": "text", "text": 3})).contains("`text` must be a string"));
    assert!(part(json!({"type": "video", "video": []})).contains("non-empty array"));
    assert!(part(json!({"type": "video", "video": ["a", 1]})).contains("array of frame URLs"));
    assert!(part(json!({"type": "image_embeds", "image_embeds": {"x": 1}})).contains("`image_embeds` must be a string"));
    assert!(part(json!({"foo": 1})).contains("needs a `type`"));
    assert!(part(json!("just text")).contains("must be an object"));
}

#[test]
fn max_tokens_resolve_against_the_context() {
    assert_eq!(resolve_max_tokens(None, 10, 32).unwrap(), 22);
    assert_eq!(resolve_max_tokens(Some(5), 10, 32).unwrap(), 5);
    assert_eq!(resolve_max_tokens(Some(22), 10, 32).unwrap(), 22);
    let e = resolve_max_tokens(Some(23), 10, 32).unwrap_err().to_string();
    assert!(e.contains("too large: 23") && e.contains("(23 > 32 - 10)"), "{e}");
    let e = resolve_max_tokens(None, 32, 32).unwrap_err().to_string();
    assert!(e.contains("maximum context length is 32 tokens") && e.contains("32 input tokens"), "{e}");
}

#[test]
fn response_json_has_openais_shape() {
    let out = RequestOutput {
        embedding: None,
        choices: vec![
            Choice {
                index: 0,
                text: "Hi é".into(),
                token_ids: vec![1, 2],
                logprobs: Some(vec![
                    TokenLogprob { token: 1, logprob: -0.5, top: vec![(1, -0.5), (3, -1.25)] },
                    TokenLogprob { token: 2, logprob: f32::NEG_INFINITY, top: vec![] },
                ]),
                finish_reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Token(7)),
            },
            Choice {
                index: 1,
                text: "Yo".into(),
                token_ids: vec![3],
                logprobs: Some(vec![]),
                finish_reason: FinishReason::Stop,
                stop_reason: Some(StopReason::String("\n".into())),
            },
            Choice {
                index: 2,
                text: String::new(),
                token_ids: vec![],
                logprobs: None,
                finish_reason: FinishReason::Length,
                stop_reason: None,
            },
        ],
        usage: Usage { prompt_tokens: 11, completion_tokens: 3 },
    };
    let text = |id: u32| match id {
        1 => "Hi".to_string(),
        2 => " é".to_string(),
        _ => format!("<{id}>"),
    };
    // Raw bytes come from the tokenizer, not the text: token 3 is a lone
    // byte of a multi-byte character here.
    let bytes = |id: u32| if id == 3 { vec![0x93] } else { text(id).into_bytes() };
    let resp = ChatCompletionResponse::new(
        "chatcmpl-1".into(),
        "tiny".into(),
        1700000000,
        &out,
        &crate::openai::tools::ToolMode::Off,
        &text,
        &bytes,
    );
    assert_eq!(
        serde_json::to_value(&resp).unwrap(),
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi é", "tool_calls": []},
                    "logprobs": {"content": [
                        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
                            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                            {"token": "<3>", "logprob": -1.25, "bytes": [147]}
                        ]},
                        {"token": " é", "logprob": -9999.0, "bytes": [32, 195, 169], "top_logprobs": []}
                    ]},
                    "finish_reason": "stop",
                    "stop_reason": 7
                },
                {
                    "index": 1,
                    "message": {"role": "assistant", "content": "Yo", "tool_calls": []},
                    "logprobs": {"content": []},
                    "finish_reason": "stop",
                    "stop_reason": "\n"
                },
                {
                    "index": 2,
                    "message": {"role": "assistant", "content": "", "tool_calls": []},
                    "logprobs": null,
                    "finish_reason": "length",
                    "stop_reason": null
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        })
    );
}

#[test]
fn error_bodies_have_openais_shape() {
    let (status, body) = ErrorResponse::from_error(&Error::InvalidInput("bad image".into()));
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::to_value(body).unwrap(),
        json!({"error": {"message": "bad image", "type": "invalid_request_error", "param": null, "code": null}})
    );
    let (status, body) = ErrorResponse::from_error(&Error::Config("no such model".into()));
    assert_eq!((status, body.error.kind), (500, "server_error"));
    let (status, body) = ErrorResponse::from_error(&Error::MediaFetch("media URL x: connection refused".into()));
    assert_eq!(
        (status, body.error.kind, body.error.code.as_deref()),
        (422, "invalid_request_error", Some("media_fetch_failed"))
    );
    assert_eq!(ErrorResponse::new(401, "no key", Some("invalid_api_key")).error.kind, "authentication_error");
    assert_eq!(ErrorResponse::new(429, "busy", None).error.kind, "rate_limit_error");
    assert_eq!(ErrorResponse::new(404, "gone", None).error.kind, "invalid_request_error");
}

fn roles_template(src: &str) -> ChatTemplate {
    ChatTemplate::new(src, "server", crate::text::tokenizer::SpecialTokens::default()).unwrap()
}

const ROLES_TMPL: &str =
    "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}{% if add_generation_prompt %}>{% endif %}";

#[test]
fn developer_is_system_unless_the_template_knows_it() {
    let body = json!({"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]});
    let inp = input(body).unwrap();
    assert_eq!(inp.render(&roles_template(ROLES_TMPL)).unwrap(), "system:d;user:u;>");
    // A template with its own rule for the role sees it as sent.
    let knows =
        "{% for m in messages %}{% if m.role == 'developer' %}DEV {% endif %}{{ m.role }}:{{ m.content }};{% endfor %}";
    assert_eq!(inp.render(&roles_template(knows)).unwrap(), "DEV developer:d;user:u;");
}

#[test]
fn request_chat_template_kwargs_and_generation_prompt() {
    let server = roles_template(ROLES_TMPL);
    let mut body = user(json!("hi"));
    assert_eq!(input(body.clone()).unwrap().render(&server).unwrap(), "user:hi;>");
    body["add_generation_prompt"] = json!(false);
    assert_eq!(input(body.clone()).unwrap().render(&server).unwrap(), "user:hi;");
    body["chat_template"] = json!("[{{ messages[0].content }}|{{ flag }}|{{ add_generation_prompt }}]");
    assert_eq!(input(body.clone()).unwrap().render(&server).unwrap(), "[hi||False]");
    body["chat_template_kwargs"] = json!({"flag": "on"});
    assert_eq!(input(body.clone()).unwrap().render(&server).unwrap(), "[hi|on|False]");
    // Kwargs reach the server's template too.
    let inp =
        input(json!({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"add_vision_id": true}}))
            .unwrap();
    assert_eq!(inp.render(&roles_template("{{ add_vision_id }}")).unwrap(), "True");
    // The request's template sees the developer rule too (no mention: system).
    body["messages"] = json!([{"role": "developer", "content": "d"}]);
    body["chat_template"] = json!("{{ messages[0].role }}");
    assert_eq!(input(body).unwrap().render(&server).unwrap(), "system");
}

#[test]
fn bad_request_templates_and_kwargs_are_400() {
    let server = roles_template(ROLES_TMPL);
    let mut body = user(json!("hi"));
    body["chat_template"] = json!("{% for m in messages %}{{ m.role }");
    let e = input(body.clone()).unwrap().render(&server).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m.starts_with("chat_template:") && m.contains("syntax error")),
        "{e}"
    );
    body["chat_template"] = json!("{{ raise_exception('no thanks') }}");
    let e = input(body.clone()).unwrap().render(&server).unwrap_err();
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("no thanks")), "{e}");
    body["chat_template"] = Value::Null;
    body["chat_template_kwargs"] = json!([1]);
    assert!(err(body.clone()).contains("chat_template_kwargs must be a JSON object"));
    body["chat_template_kwargs"] = Value::Null;
    body["continue_final_message"] = json!(true);
    assert!(err(body.clone()).contains("continue_final_message is not supported"));
    body["continue_final_message"] = json!(false);
    assert!(input(body).is_ok());
}

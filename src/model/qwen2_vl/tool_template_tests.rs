//! The tool-aware template against the built-in one and Qwen2.5's format.

use serde_json::{json, Value};

use super::TOOL_CHAT_TEMPLATE;
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::SpecialTokens;

const BUILTIN: &str = include_str!("chat_template.jinja");

fn template(source: &str) -> ChatTemplate {
    ChatTemplate::new(source, "t", SpecialTokens::default()).unwrap()
}

/// Conversations as the server passes them: media parts are
/// `{"type": "image"}` / `{"type": "video"}`.
fn conversations() -> Vec<Value> {
    let image = json!({"type": "image"});
    let video = json!({"type": "video"});
    let text = |t: &str| json!({"type": "text", "text": t});
    vec![
        json!([{"role": "user", "content": "Hi"}]),
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again"},
        ]),
        json!([
            {"role": "user", "content": [image, text("Compare these"), image]},
            {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": [video, text("And this?"), {"type": "image_url", "image_url": {"url": "u"}}]},
        ]),
        json!([
            {"role": "system", "content": [text("Look closely.")]},
            {"role": "user", "content": [text("What is "), image, text(" showing?")]},
            {"role": "system", "content": "A second system turn."},
            {"role": "user", "content": [video, video]},
        ]),
        json!([{"role": "user", "content": ""}, {"role": "assistant", "content": [text("Part "), text("two")]}]),
    ]
}

#[test]
fn same_as_builtin_without_tools() {
    let (builtin, tools) = (template(BUILTIN), template(TOOL_CHAT_TEMPLATE));
    for m in conversations() {
        for gen in [false, true] {
            for kwargs in [Value::Null, json!({"add_vision_id": true})] {
                let want = builtin.render_with(&m, gen, &kwargs).unwrap();
                assert_eq!(tools.render_with(&m, gen, &kwargs).unwrap(), want, "{m} gen={gen} {kwargs}");
                // An empty tools list is no tools.
                assert_eq!(tools.render_tools(&m, gen, &kwargs, &json!([])).unwrap(), want, "{m} tools=[]");
            }
        }
    }
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ])
}

const TOOLS_PROMPT: &str = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n\
{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Current weather\", \
\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n\
{\"type\": \"function\", \"function\": {\"name\": \"now\", \"parameters\": {\"type\": \"object\", \"properties\": {}}}}\n\
</tools>\n\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n\
</tool_call><|im_end|>\n";

#[test]
fn renders_tools_calls_and_responses() {
    let m = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather where this was taken?"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}},
        ]},
        {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call_1"},
        {"role": "tool", "content": [{"type": "text", "text": "12:00"}], "tool_call_id": "call_2"},
        {"role": "user", "content": "Thanks"},
    ]);
    let want = format!(
        "<|im_start|>system\nYou are terse.{TOOLS_PROMPT}\
         <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Weather where this was taken?<|im_end|>\n\
         <|im_start|>assistant\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Paris\"}}}}\n\
         </tool_call>\n<tool_call>\n{{\"name\": \"now\", \"arguments\": {{}}}}\n</tool_call><|im_end|>\n\
         <|im_start|>user\n<tool_response>\n{{\"temp\": 21}}\n</tool_response>\n<tool_response>\n12:00\n\
         </tool_response><|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(template(TOOL_CHAT_TEMPLATE).render_tools(&m, true, &Value::Null, &tools()).unwrap(), want);
}

#[test]
fn tools_without_system_message_and_calls_with_text() {
    let m = json!([
        {"role": "user", "content": [{"type": "text", "text": "Time?"}, {"type": "image"}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "now", "arguments": "{\"tz\": \"UTC\"}"}},
            {"function": {"name": "now"}},
        ]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "a clock"}]},
    ]);
    let want = format!(
        "<|im_start|>system\nYou are a helpful assistant.{TOOLS_PROMPT}\
         <|im_start|>user\nTime?Picture 1: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n\
         <|im_start|>assistant\nChecking.\n<tool_call>\n{{\"name\": \"now\", \"arguments\": {{\"tz\": \"UTC\"}}}}\n\
         </tool_call>\n<tool_call>\n{{\"name\": \"now\", \"arguments\": {{}}}}\n</tool_call><|im_end|>\n\
         <|im_start|>user\n<tool_response>\nPicture 2: <|vision_start|><|image_pad|><|vision_end|>a clock\n\
         </tool_response><|im_end|>\n"
    );
    let kw = json!({"add_vision_id": true});
    assert_eq!(template(TOOL_CHAT_TEMPLATE).render_tools(&m, false, &kw, &tools()).unwrap(), want);
}

/// A history with calls renders them as blocks even when the request
/// sends no tools (as Qwen2.5's template does).
#[test]
fn calls_in_history_without_tools() {
    let m = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "content": "noon"},
    ]);
    let want = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call><|im_end|>\n\
                <|im_start|>user\n<tool_response>\nnoon\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(template(TOOL_CHAT_TEMPLATE).render(&m, true).unwrap(), want);
}

/// A request's tools and assistant calls (arguments as the OpenAI client
/// sends them, JSON strings) through `postprocess_messages` and
/// `tools_for_template` into the tool template; the model's answer in that
/// format parses back.
#[test]
fn round_trip_through_the_tool_template() {
    use crate::openai::tools::{parse_hermes, parse_tools, postprocess_messages, tools_for_template};

    let t = parse_tools(&json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]))
    .unwrap();
    let mut m = json!([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here?"}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]);
    postprocess_messages(&mut m);
    let prompt = template(TOOL_CHAT_TEMPLATE).render_tools(&m, true, &Value::Null, &tools_for_template(&t)).unwrap();
    assert!(
        prompt.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\"")
    );
    assert!(prompt.contains(
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
    ));
    assert!(prompt
        .ends_with("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"));
    let answer = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}\n</tool_call>";
    let (content, calls) = parse_hermes(answer);
    let calls: Vec<(String, String)> = calls.into_iter().map(|c| (c.name, c.arguments)).collect();
    assert_eq!((content, calls), (None, vec![("get_weather".to_string(), r#"{"city":"Lyon"}"#.to_string())]));
}

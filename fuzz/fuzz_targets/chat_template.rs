//! The Qwen2-VL chat template (minijinja set up as transformers' Jinja)
//! rendered from fuzzed JSON: any JSON value as `messages` must render or
//! fail with an error, never panic; and messages that passed the server's
//! validation must render, with one vision placeholder per media part.
#![no_main]

use kestrel::openai::protocol::{ChatCompletionRequest, ChatMessage, MediaRef};
use kestrel_fuzz::frontend;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let f = frontend();
    // Whatever the JSON, as messages: an error is fine, a panic is not.
    let _ = f.template.render(&value, true);
    let _ = f.template.render_with(&value, false, &serde_json::json!({"add_vision_id": true}));

    // As the messages of a request: validated ones must render.
    let Ok(messages) = serde_json::from_value::<Vec<ChatMessage>>(value) else { return };
    let req = ChatCompletionRequest { messages, ..Default::default() };
    let Ok(input) = req.to_chat_input() else { return };
    let text = match f.template.render(&input.messages, true) {
        Ok(t) => t,
        Err(e) => panic!("validated messages failed to render: {e}\n{}", input.messages),
    };
    let images = input.media.iter().filter(|m| !matches!(m, MediaRef::Video(_))).count();
    let videos = input.media.len() - images;
    // Text can hold the placeholder strings too, so the rendered count is a floor.
    assert!(text.matches("<|image_pad|>").count() >= images, "{text}");
    assert!(text.matches("<|video_pad|>").count() >= videos, "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
});

//! A request body through what the server does with it before the engine:
//! parse and validate it as every JSON route would (chat, completions,
//! embeddings, tokenize, detokenize), then for chat render the template,
//! expand media placeholders (with tiny stand-in images for the URLs, which
//! are not fetched), tokenize, and fit max_tokens to the context. Every
//! error must be the client's (4xx).
#![no_main]

use kestrel::model::qwen2_vl::inputs::{prepare_chat, Media};
use kestrel::multimodal::image::RgbImage;
use kestrel::openai::completions::{CompletionRequest, Prompt};
use kestrel::openai::embeddings::EmbeddingRequest;
use kestrel::openai::protocol::{resolve_max_tokens, ChatCompletionRequest, MediaRef};
use kestrel::openai::tokenize::{DetokenizeRequest, TokenizeInput, TokenizeRequest};
use kestrel_fuzz::{frontend, user_ok};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server answers a body that is not UTF-8 with a 400 before parsing.
    let Ok(body) = std::str::from_utf8(data) else { return };
    chat(body);
    completions(body);
    embeddings(body);
    tokenize(body);
    detokenize(body);
});

/// A decoded image the size of one merged patch (28x28).
fn stand_in() -> RgbImage {
    RgbImage::new(28, 28)
}

fn chat(body: &str) {
    let f = frontend();
    let Some(req) = user_ok(ChatCompletionRequest::from_json(body), "chat parse") else { return };
    let Some(input) = user_ok(req.to_chat_input(), "chat validate") else { return };
    let hidden = f.config.text_config.hidden_size;
    let merge = f.config.vision_config.spatial_merge_size;
    let media: Vec<Media> = input
        .media
        .iter()
        .map(|m| match m {
            MediaRef::Image(_) => Media::Image(stand_in()),
            MediaRef::Video(frames) => Media::Video(frames.iter().map(|_| stand_in()).collect()),
            // A decoded file stands in as two frames (decoding is the video target's business).
            MediaRef::VideoFile(_) => Media::Video(vec![stand_in(), stand_in()]),
            // One merged token's worth of features for a 1x2x2 patch grid.
            MediaRef::ImageEmbeds(_) => {
                Media::ImageEmbeds { values: vec![0.5; 4 / (merge * merge) * hidden], grid: [1, 2, 2] }
            }
        })
        .collect();
    let prepared = prepare_chat(&f.config, &f.tokenizer, &f.template, &f.processors, &input.messages, &media);
    let Some(prepared) = user_ok(prepared, "chat prepare") else { return };
    assert!(!prepared.input_ids.is_empty(), "a rendered chat has tokens");
    assert_eq!(prepared.positions.len(), 3 * prepared.input_ids.len(), "M-RoPE positions are (3, n)");
    let max_len = f.config.text_config.max_position_embeddings;
    let Some(max_tokens) =
        user_ok(resolve_max_tokens(input.max_tokens, prepared.input_ids.len(), max_len), "chat max_tokens")
    else {
        return;
    };
    assert!(max_tokens >= 1 && prepared.input_ids.len() + max_tokens <= max_len);
    let mut params = input.params;
    params.max_tokens = max_tokens;
    user_ok(params.validate(), "chat params");
}

fn completions(body: &str) {
    let f = frontend();
    let Some(req) = user_ok(CompletionRequest::from_json(body), "completions parse") else { return };
    let Some(input) = user_ok(req.to_input(), "completions validate") else { return };
    let prompt_tokens = match input.prompt {
        Prompt::Text(text) => match user_ok(f.tokenizer.encode_with(&text, true), "completions tokenize") {
            Some(ids) => ids.len(),
            None => return,
        },
        Prompt::Tokens(ids) => ids.len(),
    };
    let max_len = f.config.text_config.max_position_embeddings;
    let Some(max_tokens) =
        user_ok(resolve_max_tokens(Some(input.max_tokens), prompt_tokens, max_len), "completions max_tokens")
    else {
        return;
    };
    let mut params = input.params;
    params.max_tokens = max_tokens;
    user_ok(params.validate(), "completions params");
}

fn embeddings(body: &str) {
    let Some(req) = user_ok(EmbeddingRequest::from_json(body), "embeddings parse") else { return };
    if let Some(input) = user_ok(req.to_input(), "embeddings validate") {
        assert!(input.dimensions.is_none_or(|d| d >= 1));
    }
}

fn tokenize(body: &str) {
    let f = frontend();
    let Some(req) = user_ok(TokenizeRequest::from_json(body), "tokenize parse") else { return };
    let Some((input, add_special)) = user_ok(req.to_input(), "tokenize validate") else { return };
    let text = match input {
        TokenizeInput::Prompt(p) => p,
        TokenizeInput::Chat(chat)
            if chat.chat_template.is_some() || chat.chat_template_kwargs.as_object().is_some_and(|m| !m.is_empty()) =>
        {
            // The request's own template or variables may fail: the user's 400.
            let Some(t) = user_ok(chat.render(&f.template), "tokenize request template") else { return };
            t
        }
        TokenizeInput::Chat(chat) => {
            // Messages that passed validation must render with the model's
            // template: a failure here is a 500.
            match chat.render(&f.template) {
                Ok(t) => t,
                Err(e) => panic!("validated messages failed to render: {e}\n{}", chat.messages),
            }
        }
    };
    user_ok(f.tokenizer.encode_with(&text, add_special), "tokenize encode");
}

fn detokenize(body: &str) {
    let f = frontend();
    let Some(req) = user_ok(DetokenizeRequest::from_json(body), "detokenize parse") else { return };
    let Some(ids) = user_ok(req.ids(), "detokenize ids") else { return };
    // The server refuses ids outside the vocabulary before decoding.
    if ids.iter().all(|&id| (id as usize) < f.config.text_config.vocab_size) {
        user_ok(f.tokenizer.decode(&ids, false), "detokenize decode");
    }
}

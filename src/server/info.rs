//! The small routes: GET /v1/models, /health, /version, /metrics and POST
//! /tokenize, /detokenize, with the bodies vLLM's server returns
//! (vllm/entrypoints/openai/api_server.py, serving_models.py,
//! serving_tokenization.py).

use serde_json::json;

use super::http::{ApiError, Reply};
use super::State;
use crate::openai::tokenize::{
    DetokenizeRequest, DetokenizeResponse, TokenizeInput, TokenizeRequest, TokenizeResponse,
};

/// GET /v1/models: the one served model.
pub(crate) fn models<'a>(state: &State) -> Reply<'a> {
    let f = state.frontend();
    Reply::json(
        200,
        &json!({
            "object": "list",
            "data": [{
                "id": f.model_name,
                "object": "model",
                "created": state.started,
                "owned_by": "kestrel",
                "root": state.cfg.model_root,
                "parent": null,
                "max_model_len": f.max_model_len,
                "permission": [],
            }],
        }),
    )
}

/// GET /health: 200 with an empty body while the engine thread answers;
/// 503 once it has stopped, or has spent longer than
/// --engine-iteration-timeout in one iteration (hung: a long legitimate step
/// stays under it).
pub(crate) fn health<'a>(state: &State) -> Reply<'a> {
    let limit = state.cfg.engine_iteration_timeout;
    let stalled = state.engine.stalled_for();
    if !state.engine.is_alive() {
        Reply::error(ApiError::new(503, "the engine thread has stopped", Some("engine_dead")))
    } else if stalled > limit {
        Reply::error(ApiError::new(
            503,
            format!(
                "the engine has not finished an iteration for {:.1} s (--engine-iteration-timeout {} s)",
                stalled.as_secs_f64(),
                limit.as_secs_f64()
            ),
            Some("engine_unresponsive"),
        ))
    } else {
        Reply::empty(200)
    }
}

/// GET /version.
pub(crate) fn version<'a>() -> Reply<'a> {
    Reply::json(200, &json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// GET /metrics.
pub(crate) fn metrics<'a>(state: &State) -> Reply<'a> {
    let in_flight = state.in_flight.load(std::sync::atomic::Ordering::SeqCst);
    let text = state.metrics.render(&state.engine.stats(), state.frontend().num_blocks, in_flight);
    Reply::text("text/plain; version=0.0.4; charset=utf-8", text)
}

/// POST /tokenize: a prompt, or chat messages rendered by the chat template.
pub(crate) fn tokenize<'a>(state: &State, body: &str) -> Result<Reply<'a>, ApiError> {
    let req = TokenizeRequest::from_json(body)?;
    state.check_model(req.model.as_deref())?;
    let (input, add_special_tokens) = req.to_input()?;
    let f = state.frontend();
    let text = match input {
        TokenizeInput::Prompt(p) => p,
        TokenizeInput::Chat(chat) => chat.render_for(&f.template, f.tools_template())?,
    };
    let tokens = f.tokenizer.encode_with(&text, add_special_tokens)?;
    let token_strs = req
        .return_token_strs
        .unwrap_or(false)
        .then(|| tokens.iter().map(|&t| f.tokenizer.id_token(t).unwrap_or_default()).collect());
    Ok(Reply::json(200, &TokenizeResponse { count: tokens.len(), max_model_len: f.max_model_len, tokens, token_strs }))
}

/// POST /detokenize: token ids back to text (special tokens kept, as vLLM).
pub(crate) fn detokenize<'a>(state: &State, body: &str) -> Result<Reply<'a>, ApiError> {
    let req = DetokenizeRequest::from_json(body)?;
    state.check_model(req.model.as_deref())?;
    let ids = req.ids()?;
    let f = state.frontend();
    let vocab = f.spec().vocab_size();
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::bad_request(format!("token id {bad} is out of vocabulary (size {vocab})")));
    }
    let prompt = f.tokenizer.decode(&ids, false)?;
    Ok(Reply::json(200, &DetokenizeResponse { prompt }))
}

//! POST /v1/embeddings, as vLLM's `OpenAIServingEmbedding`
//! (vllm/entrypoints/openai/serving_embedding.py): each input becomes one
//! engine request (`Engine::submit_embed`), all submitted before any is
//! awaited so the engine batches them; results come back in input order.

use crate::engine::request::Event;
use crate::engine::{RequestId, Task};
use crate::model::inputs::PreparedInput;
use crate::multimodal::image::DEFAULT_MAX_PIXELS;
use crate::openai::embeddings::{encode, truncate_normalize, EmbeddingInputs, EmbeddingRequest, EmbeddingResponse};
use crate::openai::{load_media_timed, MediaTimings};

use super::http::{ApiError, Reply};
use super::{unix_now, State};

pub(crate) fn embeddings<'a>(state: &'a State, body: &str) -> Result<Reply<'a>, ApiError> {
    let req = EmbeddingRequest::from_json(body)?;
    state.check_model(req.model.as_deref())?;
    state.check_task(Task::Embed, "Embeddings API")?;
    let input = req.to_input()?;
    let f = state.frontend();
    let hidden = f.spec().hidden_size();
    if let Some(d) = input.dimensions.filter(|&d| d > hidden) {
        return Err(ApiError::bad_request(format!(
            "dimensions ({d}) is larger than the model's embedding size ({hidden})"
        )));
    }
    let prepared: Vec<PreparedInput> = match input.inputs {
        EmbeddingInputs::Texts(texts) => {
            texts.iter().map(|t| state.text_input(t, input.add_special_tokens)).collect::<Result<_, _>>()?
        }
        EmbeddingInputs::Tokens(lists) => {
            lists.into_iter().map(|ids| state.token_input(ids)).collect::<Result<_, _>>()?
        }
        EmbeddingInputs::Chat(chat) => {
            state.check_media_limits(&chat.media)?;
            let timings = MediaTimings::default();
            let embeds = |b: &[u8]| f.processor.parse_image_embeds(b);
            let media = load_media_timed(&chat.media, &state.fetcher, DEFAULT_MAX_PIXELS as usize, &embeds, &timings);
            let prepared = media.and_then(|media| {
                timings.preprocess(|| {
                    let prompt = chat.render(&f.template)?;
                    f.prepare_prompt(prompt, &media)
                })
            });
            if !chat.media.is_empty() {
                let (fe, de, pr) = timings.totals();
                state.metrics.media(fe, de, pr);
            }
            vec![prepared?]
        }
    };
    for p in &prepared {
        if p.input_ids.is_empty() {
            return Err(ApiError::bad_request("an input is empty (no tokens)".into()));
        }
        if p.input_ids.len() > f.max_model_len {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {} tokens. However, an input has {} tokens.",
                f.max_model_len,
                p.input_ids.len()
            )));
        }
    }

    // Submit all, then wait for each; whatever is still pending when this
    // returns early is aborted.
    let mut pending = Pending { state, ids: Vec::new() };
    let mut streams = Vec::with_capacity(prepared.len());
    for p in prepared {
        let (id, rx) = state.engine.submit_embed(p)?;
        pending.ids.push(id);
        streams.push(rx);
    }
    let mut values = Vec::with_capacity(streams.len());
    let mut prompt_tokens = 0;
    for rx in &streams {
        let mut embedding = None;
        loop {
            match rx.recv() {
                Ok(Event::Embedding { values }) => embedding = Some(values),
                Ok(Event::Done { usage }) => {
                    prompt_tokens += usage.prompt_tokens;
                    break;
                }
                Ok(Event::Error { message }) => return Err(ApiError::bad_request(message)),
                Ok(Event::Delta { .. } | Event::Finished { .. }) => {}
                Err(_) => return Err(ApiError::new(500, "the engine stopped before the request finished", None)),
            }
        }
        let v = embedding.ok_or_else(|| ApiError::new(500, "the engine returned no embedding", None))?;
        let v = match input.dimensions {
            Some(d) => truncate_normalize(v, d)?,
            None => v,
        };
        values.push(encode(&v, input.encoding));
    }
    pending.ids.clear();
    state.metrics.prompt_tokens(prompt_tokens);
    super::note(|n| n.prompt_tokens = Some(prompt_tokens));
    let resp = EmbeddingResponse::new(state.new_id("embd"), f.model_name.clone(), unix_now(), values, prompt_tokens);
    Ok(Reply::json(200, &resp))
}

/// Aborts, on drop, the requests still listed.
struct Pending<'a> {
    state: &'a State,
    ids: Vec<RequestId>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.state.engine.abort(id);
        }
    }
}

//! One sequence through any model, outside the engine: prefill, decode and
//! greedy generation over a private KV cache. Used by the HF comparisons
//! (tests, `kestrel compare`); the engine batches and manages blocks itself.

use super::contract::Model;
use super::decoder::{AttnBatch, PagedKv, SeqChunk};
use super::inputs::{decode_position, PreparedInput};
use crate::error::{Error, Result};
use crate::ops::argmax;
use crate::tensor::{DType, Tensor};

/// A single sequence's KV cache (blocks 0, 1, ...).
pub struct SeqCache {
    kv: PagedKv,
    blocks: Vec<u32>,
    pub len: usize,
}

/// A one-sequence KV cache of up to `capacity` tokens.
pub fn new_cache(m: &dyn Model, capacity: usize) -> Result<SeqCache> {
    const BLOCK: usize = 16;
    let blocks = capacity.div_ceil(BLOCK).max(1);
    let kv = PagedKv::new(m.device(), &m.decoder().dims, blocks, BLOCK)?;
    Ok(SeqCache { kv, blocks: (0..blocks as u32).collect(), len: 0 })
}

/// Embeddings of the prompt with media features in place of their
/// placeholder tokens (in order, as HF's masked_scatter).
pub fn embed_prompt(m: &dyn Model, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
    let dev = m.device();
    let ids: Vec<i32> = input.input_ids.iter().map(|&i| i as i32).collect();
    let ids_t = Tensor::from_i32(dev, &[ids.len()], &ids)?;
    let mut x = m.decoder().embed(&ids_t)?;
    let feats = m.encode_media(input, observe)?;
    let s = m.spec();
    for (f, token) in [(&feats.image, Some(s.image_token_id)), (&feats.video, s.video_token_id)] {
        let placeholders = token.map_or(0, |t| input.input_ids.iter().filter(|&&id| id == t).count());
        let rows = f.as_ref().map_or(0, |f| f.shape()[0]);
        if placeholders != rows {
            return Err(Error::InvalidInput(format!(
                "{rows} media features but {placeholders} placeholder tokens in the prompt"
            )));
        }
    }
    m.place_features(&mut x, 0, &input.input_ids, (0, ids.len()), &feats)?;
    observe("decoder.embeds", &x);
    Ok(x)
}

/// The longrope table of a sequence that may grow to `max_len` tokens: the
/// one the input fixed, else the decoder's choice for that length (None
/// without longrope).
pub fn rope_table(m: &dyn Model, input: &PreparedInput, max_len: usize) -> Option<i32> {
    let table = m.decoder().dims.rope_table_for(max_len)?;
    Some(input.rope_table.unwrap_or(table))
}

/// Runs the prompt into `cache`; returns the final-normed hidden states of
/// every prompt token (n, hidden). A longrope decoder uses the input's
/// table, or the one for the prompt's own length (what HF's single forward
/// over the prompt uses).
pub fn prefill(
    m: &dyn Model,
    input: &PreparedInput,
    cache: &mut SeqCache,
    observe: &mut dyn FnMut(&str, &Tensor),
) -> Result<Tensor> {
    prefill_with(m, input, rope_table(m, input, input.input_ids.len()), cache, observe)
}

fn prefill_with(
    m: &dyn Model,
    input: &PreparedInput,
    table: Option<i32>,
    cache: &mut SeqCache,
    observe: &mut dyn FnMut(&str, &Tensor),
) -> Result<Tensor> {
    let x = embed_prompt(m, input, observe)?;
    let n = input.input_ids.len();
    let mut positions = input.positions.clone();
    if let Some(t) = table {
        positions[n..2 * n].fill(t);
    }
    let pos = Tensor::from_i32(m.device(), &[3, n], &positions)?;
    forward_seq(m, x, &pos, cache, observe)
}

/// One decode step: `token` at sequence index `cache.len`, with the
/// sequence's longrope table if any; returns its final-normed hidden state
/// (1, hidden).
pub fn decode(m: &dyn Model, token: u32, rope_delta: i64, table: Option<i32>, cache: &mut SeqCache) -> Result<Tensor> {
    let ids = Tensor::from_i32(m.device(), &[1], &[token as i32])?;
    let x = m.decoder().embed(&ids)?;
    let p = decode_position(cache.len, rope_delta) as i32;
    let pos = Tensor::from_i32(m.device(), &[3, 1], &[p, table.unwrap_or(p), p])?;
    forward_seq(m, x, &pos, cache, &mut |_, _| {})
}

fn forward_seq(
    m: &dyn Model,
    x: Tensor,
    pos: &Tensor,
    cache: &mut SeqCache,
    observe: &mut dyn FnMut(&str, &Tensor),
) -> Result<Tensor> {
    let n = x.shape()[0];
    let chunk = SeqChunk { blocks: &cache.blocks, past: cache.len, new: n };
    let batch = AttnBatch::new(m.device(), &[chunk], cache.kv.block_size)?;
    let h = m.decoder().forward(x, pos, &mut cache.kv, &batch, observe)?;
    cache.len += n;
    Ok(h)
}

/// Greedy decoding of up to `max_new` tokens, stopping after any of `stop`.
/// A longrope decoder keeps one table for the whole sequence, chosen for
/// n + max_new tokens (as the engine does).
pub fn generate_greedy(m: &dyn Model, input: &PreparedInput, max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
    let n = input.input_ids.len();
    let mut cache = new_cache(m, n + max_new)?;
    let table = rope_table(m, input, n + max_new);
    let h = prefill_with(m, input, table, &mut cache, &mut |_, _| {})?;
    let mut last = Tensor::empty(m.device(), &[1, m.decoder().dims.hidden], h.dtype())?;
    last.copy_rows_from(0, &h, n - 1, 1)?;
    let mut out = Vec::new();
    let mut best = Tensor::empty(m.device(), &[1], DType::I32)?;
    for _ in 0..max_new {
        let logits = m.decoder().logits(&last)?;
        argmax::argmax(&mut best, &logits)?;
        let tok = best.to_i32_vec()?[0] as u32;
        out.push(tok);
        if stop.contains(&tok) || out.len() == max_new {
            break;
        }
        last = decode(m, tok, input.rope_delta, table, &mut cache)?;
    }
    Ok(out)
}

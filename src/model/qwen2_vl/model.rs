//! Qwen2-VL as a whole: the vision tower's features scattered into the token
//! embeddings, the decoder over them, greedy generation.
//! Mirrors transformers `Qwen2VLModel.forward` / `Qwen2VLForConditionalGeneration`.

use std::path::Path;

use super::inputs::{Pixels, PreparedInput};
use super::mrope;
use super::processor;
use super::text::{AttnBatch, PagedKv, SeqChunk, TextDims, TextModel};
use super::vision::{VisionAct, VisionDims, VisionTower};
use crate::error::{Error, Result};
use crate::model::config::{Activation, Qwen2VlConfig};
use crate::model::weights::Weights;
use crate::ops::argmax;
use crate::tensor::{Device, Tensor};

/// A single sequence's KV cache, for one-off generation and comparisons
/// (the engine manages blocks itself).
pub struct SeqCache {
    kv: PagedKv,
    blocks: Vec<u32>,
    pub len: usize,
}

/// A prompt's media features, rows in placeholder order per kind.
pub struct MediaFeatures {
    pub image: Option<Tensor>,
    pub video: Option<Tensor>,
}

pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    pub device: Device,
    pub vision: VisionTower,
    pub text: TextModel,
}

impl Qwen2Vl {
    /// Loads a model folder (config.json + safetensors) onto `dev`.
    pub fn load(dir: impl AsRef<Path>, dev: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Qwen2VlConfig::from_dir(dir)?;
        let w = Weights::open(dir)?;
        let (t, v) = (&config.text_config, &config.vision_config);
        let act = match v.hidden_act {
            Activation::QuickGelu => VisionAct::QuickGelu,
            Activation::Gelu => VisionAct::Gelu,
            Activation::GeluTanh => VisionAct::GeluTanh,
            other => return Err(Error::Config(format!("vision_config.hidden_act {other:?} is not supported"))),
        };
        let vision = VisionTower::load(
            &w,
            dev,
            VisionDims {
                depth: v.depth,
                embed_dim: v.embed_dim,
                num_heads: v.num_heads,
                mlp_hidden: v.mlp_hidden_dim,
                out_hidden: v.hidden_size,
                in_channels: v.in_channels,
                temporal_patch: v.temporal_patch_size,
                patch: v.patch_size,
                merge: v.spatial_merge_size,
                act,
            },
        )?;
        let text = TextModel::load(
            &w,
            dev,
            TextDims {
                hidden: t.hidden_size,
                layers: t.num_hidden_layers,
                heads: t.num_attention_heads,
                kv_heads: t.num_key_value_heads,
                head_dim: t.head_dim,
                intermediate: t.intermediate_size,
                vocab: t.vocab_size,
                eps: t.rms_norm_eps as f32,
                rope_theta: t.rope_theta as f32,
                mrope_section: t.mrope_section,
            },
            t.tie_word_embeddings,
        )?;
        if let Device::Cuda(gpu) = dev {
            gpu.end_staging()?;
        }
        Ok(Self { config, device: dev.clone(), vision, text })
    }

    /// A one-sequence KV cache of up to `capacity` tokens (blocks 0, 1, ...).
    pub fn new_cache(&self, capacity: usize) -> Result<SeqCache> {
        const BLOCK: usize = 16;
        let blocks = capacity.div_ceil(BLOCK).max(1);
        let kv = PagedKv::new(&self.device, &self.text.dims, blocks, BLOCK)?;
        Ok(SeqCache { kv, blocks: (0..blocks as u32).collect(), len: 0 })
    }

    /// Vision features (Σ merged patches, hidden) of the items in `px`.
    pub fn encode_pixels(&self, px: &Pixels, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let d = &self.vision.dims;
        let n = px.values.len() / d.patch_dim();
        let pv = Tensor::from_f32(&self.device, &[n, d.patch_dim()], &px.values, self.device.activation_dtype())?;
        let pos: Vec<i32> = px.grids.iter().flat_map(|&g| mrope::vision_position_ids(g, d.merge)).collect();
        let pos = Tensor::from_i32(&self.device, &[n, 2], &pos)?;
        self.vision.forward(&pv, &px.grids, &pos, observe)
    }

    /// Features of every image and video of a prompt, rows in placeholder
    /// order: pixel images through the vision tower, precomputed ones as given.
    pub fn encode_media(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<MediaFeatures> {
        let hidden = self.text.dims.hidden;
        let merge = self.config.vision_config.spatial_merge_size;
        let image = if input.images.grids.is_empty() && input.image_embeds.is_empty() {
            None
        } else if input.image_embeds.is_empty() {
            Some(self.encode_pixels(&input.images, observe)?)
        } else {
            let grids = input.image_grids();
            let rows: usize = grids.iter().map(|&g| processor::num_placeholder_tokens(g, merge)).sum();
            let mut all = Tensor::empty(&self.device, &[rows, hidden], self.device.activation_dtype())?;
            let pixels =
                if input.images.grids.is_empty() { None } else { Some(self.encode_pixels(&input.images, observe)?) };
            let (mut at, mut px_row, mut px_item) = (0, 0, 0);
            for (i, &g) in grids.iter().enumerate() {
                let n = processor::num_placeholder_tokens(g, merge);
                if let Some(e) = input.image_embeds.iter().find(|e| e.order == i) {
                    let t = Tensor::from_f32(&self.device, &[n, hidden], &e.values, self.device.activation_dtype())?;
                    all.copy_rows_from(at, &t, 0, n)?;
                } else if let Some(px) = &pixels {
                    all.copy_rows_from(at, px, px_row, n)?;
                    px_row += n;
                    px_item += 1;
                }
                at += n;
            }
            debug_assert_eq!(px_item, input.images.grids.len());
            Some(all)
        };
        let video =
            if input.videos.grids.is_empty() { None } else { Some(self.encode_pixels(&input.videos, observe)?) };
        Ok(MediaFeatures { image, video })
    }

    /// Writes media features into the rows of `x` whose tokens are
    /// placeholders, for prompt tokens start..end: row `row0 + i` of `x`
    /// holds prompt token `start + i`. The k-th image placeholder of the
    /// prompt takes image feature row k (HF's masked_scatter), likewise for videos.
    pub fn place_features(
        &self,
        x: &mut Tensor,
        row0: usize,
        ids: &[u32],
        (start, end): (usize, usize),
        feats: &MediaFeatures,
    ) -> Result<()> {
        let end = end.min(ids.len());
        for (f, token) in [(&feats.image, self.config.image_token_id), (&feats.video, self.config.video_token_id)] {
            let Some(f) = f else { continue };
            let mut next = ids[..start.min(ids.len())].iter().filter(|&&t| t == token).count();
            let mut i = start;
            while i < end {
                if ids[i] != token {
                    i += 1;
                    continue;
                }
                let run_start = i;
                while i < end && ids[i] == token {
                    i += 1;
                }
                let run = i - run_start;
                if next + run > f.shape()[0] {
                    return Err(Error::InvalidInput(format!(
                        "the prompt has more placeholder tokens than the {} features its media give",
                        f.shape()[0]
                    )));
                }
                x.copy_rows_from(row0 + run_start - start, f, next, run)?;
                next += run;
            }
        }
        Ok(())
    }

    /// Embeddings of the prompt with image and video features in place of
    /// their placeholder tokens (in order, as HF's masked_scatter).
    pub fn embed_prompt(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let ids: Vec<i32> = input.input_ids.iter().map(|&i| i as i32).collect();
        let ids_t = Tensor::from_i32(&self.device, &[ids.len()], &ids)?;
        let mut x = self.text.embed(&ids_t)?;
        let feats = self.encode_media(input, observe)?;
        for (f, token) in [(&feats.image, self.config.image_token_id), (&feats.video, self.config.video_token_id)] {
            let placeholders = input.input_ids.iter().filter(|&&t| t == token).count();
            let rows = f.as_ref().map_or(0, |f| f.shape()[0]);
            if placeholders != rows {
                return Err(Error::InvalidInput(format!(
                    "{rows} media features but {placeholders} placeholder tokens in the prompt"
                )));
            }
        }
        self.place_features(&mut x, 0, &input.input_ids, (0, ids.len()), &feats)?;
        observe("decoder.embeds", &x);
        Ok(x)
    }

    /// Runs the prompt through the model into `cache`; returns the
    /// final-normed hidden states of every prompt token (n, hidden).
    pub fn prefill(
        &self,
        input: &PreparedInput,
        cache: &mut SeqCache,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let x = self.embed_prompt(input, observe)?;
        let n = input.input_ids.len();
        let pos = Tensor::from_i32(&self.device, &[3, n], &input.positions)?;
        self.forward_seq(x, &pos, cache, observe)
    }

    /// One decode step: `token` at sequence index `cache.len`; returns its
    /// final-normed hidden state (1, hidden).
    pub fn decode(&self, token: u32, rope_delta: i64, cache: &mut SeqCache) -> Result<Tensor> {
        let ids = Tensor::from_i32(&self.device, &[1], &[token as i32])?;
        let x = self.text.embed(&ids)?;
        let p = mrope::decode_position(cache.len, rope_delta) as i32;
        let pos = Tensor::from_i32(&self.device, &[3, 1], &[p, p, p])?;
        self.forward_seq(x, &pos, cache, &mut |_, _| {})
    }

    fn forward_seq(
        &self,
        x: Tensor,
        pos: &Tensor,
        cache: &mut SeqCache,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let n = x.shape()[0];
        let chunk = SeqChunk { blocks: &cache.blocks, past: cache.len, new: n };
        let batch = AttnBatch::new(&self.device, &[chunk], cache.kv.block_size)?;
        let h = self.text.forward(x, pos, &mut cache.kv, &batch, observe)?;
        cache.len += n;
        Ok(h)
    }
    /// Greedy decoding of up to `max_new` tokens, stopping after any of `stop`.
    pub fn generate_greedy(&self, input: &PreparedInput, max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        let n = input.input_ids.len();
        let mut cache = self.new_cache(n + max_new)?;
        let h = self.prefill(input, &mut cache, &mut |_, _| {})?;
        let mut last = Tensor::empty(&self.device, &[1, self.text.dims.hidden], h.dtype())?;
        last.copy_rows_from(0, &h, n - 1, 1)?;
        let mut out = Vec::new();
        let mut best = Tensor::empty(&self.device, &[1], crate::tensor::DType::I32)?;
        for _ in 0..max_new {
            let logits = self.text.logits(&last)?;
            argmax::argmax(&mut best, &logits)?;
            let tok = best.to_i32_vec()?[0] as u32;
            out.push(tok);
            if stop.contains(&tok) || out.len() == max_new {
                break;
            }
            last = self.decode(tok, input.rope_delta, &mut cache)?;
        }
        Ok(out)
    }
}

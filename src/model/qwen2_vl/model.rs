//! Qwen2-VL as a whole: the vision tower's features scattered into the token
//! embeddings, the decoder over them, greedy generation.
//! Mirrors transformers `Qwen2VLModel.forward` / `Qwen2VLForConditionalGeneration`.

use std::path::Path;

use super::inputs::{Pixels, PreparedInput};
use super::mrope;
use super::text::{KvCache, TextDims, TextModel};
use super::vision::{VisionAct, VisionDims, VisionTower};
use crate::error::{Error, Result};
use crate::model::config::{Activation, Qwen2VlConfig};
use crate::model::weights::Weights;
use crate::ops::argmax;
use crate::tensor::{Device, Tensor};

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
        Ok(Self { config, device: dev.clone(), vision, text })
    }

    /// A KV cache for one sequence of up to `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.device, &self.text.dims, capacity)
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

    /// Embeddings of the prompt with image and video features in place of
    /// their placeholder tokens (in order, as HF's masked_scatter).
    pub fn embed_prompt(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let ids: Vec<i32> = input.input_ids.iter().map(|&i| i as i32).collect();
        let ids_t = Tensor::from_i32(&self.device, &[ids.len()], &ids)?;
        let mut x = self.text.embed(&ids_t)?;
        for (px, token) in [(&input.images, self.config.image_token_id), (&input.videos, self.config.video_token_id)] {
            if px.grids.is_empty() {
                continue;
            }
            let feats = self.encode_pixels(px, observe)?;
            let mut next = 0; // next feature row
            let mut i = 0;
            while i < ids.len() {
                if input.input_ids[i] != token {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < ids.len() && input.input_ids[i] == token {
                    i += 1;
                }
                let run = i - start;
                if next + run > feats.shape()[0] {
                    return Err(Error::InvalidInput(format!(
                        "the prompt has more placeholder tokens than the {} features its media give",
                        feats.shape()[0]
                    )));
                }
                x.copy_rows_from(start, &feats, next, run)?;
                next += run;
            }
            if next != feats.shape()[0] {
                return Err(Error::InvalidInput(format!(
                    "{} media features but {next} placeholder tokens in the prompt",
                    feats.shape()[0]
                )));
            }
        }
        observe("decoder.embeds", &x);
        Ok(x)
    }

    /// Runs the prompt through the model into `cache`; returns the
    /// final-normed hidden states of every prompt token (n, hidden).
    pub fn prefill(
        &self,
        input: &PreparedInput,
        cache: &mut KvCache,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let x = self.embed_prompt(input, observe)?;
        let n = input.input_ids.len();
        let pos = Tensor::from_i32(&self.device, &[3, n], &input.positions)?;
        self.text.forward(x, &pos, cache, observe)
    }

    /// One decode step: `token` at sequence index `cache.len`; returns its
    /// final-normed hidden state (1, hidden).
    pub fn decode(&self, token: u32, rope_delta: i64, cache: &mut KvCache) -> Result<Tensor> {
        let ids = Tensor::from_i32(&self.device, &[1], &[token as i32])?;
        let x = self.text.embed(&ids)?;
        let p = mrope::decode_position(cache.len, rope_delta) as i32;
        let pos = Tensor::from_i32(&self.device, &[3, 1], &[p, p, p])?;
        self.text.forward(x, &pos, cache, &mut |_, _| {})
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

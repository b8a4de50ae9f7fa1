//! Qwen2-VL as a whole: the vision tower's features scattered into the token
//! embeddings, the decoder over them, greedy generation.
//! Mirrors transformers `Qwen2VLModel.forward` / `Qwen2VLForConditionalGeneration`.

use std::path::Path;

use super::inputs::Pixels;
use super::mrope;
use super::processor;
use crate::error::Result;
use crate::model::config::{Architecture, Qwen2VlConfig};
use crate::model::contract::{Model, ModelSpec};
use crate::model::decoder::{Decoder, DecoderDims, Head};
use crate::model::inputs::{image_features_in_order, MediaFeatures, PreparedInput};
use crate::model::seq;
use crate::model::vision::qwen::{VisionDims, VisionTower};
use crate::model::vision::VisionAct;
use crate::model::weights::Weights;
use crate::tensor::{Device, Tensor};

pub use crate::model::seq::SeqCache;

pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    pub spec: ModelSpec,
    pub device: Device,
    pub vision: VisionTower,
    pub text: Decoder,
}

/// The decoder's shape from the config (M-RoPE, q/k/v biases). A
/// `Qwen2VLModel` checkpoint without `lm_head` and untied is headless (it
/// serves embeddings); a `…ForConditionalGeneration` one must have its head.
pub fn decoder_dims(config: &Qwen2VlConfig, has_lm_head: bool) -> DecoderDims {
    let t = &config.text_config;
    let head = if has_lm_head {
        Head::Own
    } else if t.tie_word_embeddings {
        Head::Tied
    } else if config.architecture == Architecture::Model {
        Head::None
    } else {
        Head::Own
    };
    DecoderDims {
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
        qkv_bias: true,
        longrope: None,
        head,
    }
}

/// The family-neutral facts of a Qwen2-VL config.
pub fn spec(config: &Qwen2VlConfig, has_lm_head: bool) -> ModelSpec {
    ModelSpec {
        family: "qwen2_vl",
        decoder: decoder_dims(config, has_lm_head),
        max_position_embeddings: config.text_config.max_position_embeddings,
        eos_token_id: config.eos_token_id.clone(),
        image_token_id: config.image_token_id,
        video_token_id: Some(config.video_token_id),
        media_token_ids: vec![
            config.image_token_id,
            config.video_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
        ],
    }
}

impl Qwen2Vl {
    /// Loads a model folder (config.json + safetensors) onto `dev`.
    pub fn load(dir: impl AsRef<Path>, dev: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Qwen2VlConfig::from_dir(dir)?;
        let w = Weights::open(dir)?;
        let v = &config.vision_config;
        let act = VisionAct::from_config(v.hidden_act, "vision_config.hidden_act")?;
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
                rope_theta: v.rope_theta as f32,
            },
        )?;
        let spec = spec(&config, w.contains(crate::model::weights::LM_HEAD));
        let text = Decoder::load(&w, dev, spec.decoder.clone())?;
        if let Device::Cuda(gpu) = dev {
            gpu.end_staging()?;
        }
        Ok(Self { config, spec, device: dev.clone(), vision, text })
    }

    /// A one-sequence KV cache of up to `capacity` tokens (blocks 0, 1, ...).
    pub fn new_cache(&self, capacity: usize) -> Result<SeqCache> {
        seq::new_cache(self, capacity)
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

    /// Features of every image and video of a prompt (see [`Model::encode_media`]).
    pub fn encode_media(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<MediaFeatures> {
        Model::encode_media(self, input, observe)
    }

    /// Runs the prompt into `cache` (see [`seq::prefill`]).
    pub fn prefill(
        &self,
        input: &PreparedInput,
        cache: &mut SeqCache,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        seq::prefill(self, input, cache, observe)
    }

    /// One decode step (see [`seq::decode`]).
    pub fn decode(&self, token: u32, rope_delta: i64, cache: &mut SeqCache) -> Result<Tensor> {
        seq::decode(self, token, rope_delta, None, cache)
    }

    /// Greedy decoding of up to `max_new` tokens, stopping after any of `stop`.
    pub fn generate_greedy(&self, input: &PreparedInput, max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        seq::generate_greedy(self, input, max_new, stop)
    }
}

impl Model for Qwen2Vl {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn decoder(&self) -> &Decoder {
        &self.text
    }

    fn encode_media(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<MediaFeatures> {
        let hidden = self.text.dims.hidden;
        let merge = self.config.vision_config.spatial_merge_size;
        let image = if input.images.grids.is_empty() && input.image_embeds.is_empty() {
            None
        } else if input.image_embeds.is_empty() {
            Some(self.encode_pixels(&input.images, observe)?)
        } else {
            let pixels =
                if input.images.grids.is_empty() { None } else { Some(self.encode_pixels(&input.images, observe)?) };
            let rows = |g| processor::num_placeholder_tokens(g, merge);
            Some(image_features_in_order(&self.device, hidden, input, pixels.as_ref(), rows)?)
        };
        let video =
            if input.videos.grids.is_empty() { None } else { Some(self.encode_pixels(&input.videos, observe)?) };
        Ok(MediaFeatures { image, video })
    }

    /// Live tensors of one vision block at the largest image, bf16: the
    /// residual stream, norm, qkv (3x), attention out, projection (5 x embed
    /// wide) and the MLP's hidden and activation (2 x mlp wide), plus the
    /// f32 pixel upload.
    fn vision_peak_bytes(&self, pixels: usize) -> usize {
        let v = &self.vision.dims;
        let patches = pixels / (v.patch * v.patch);
        let elt = self.device.activation_dtype().size();
        patches * ((8 * v.embed_dim + 2 * v.mlp_hidden) * elt + v.patch_dim() * 4)
    }
}

//! The model contract: what the engine, the server, `openai/`, the CLI and
//! the benchmarks know of a model. Two halves, because two kinds of thread
//! use them:
//!
//! - [`Processor`] (worker threads, CPU only): from a rendered prompt and
//!   its decoded media to a [`PreparedInput`] (placeholder expansion,
//!   preprocessing, positions), precomputed-embedding files, and the image
//!   figures the benchmarks need.
//! - [`Model`] (the engine thread, owns the device): the shared
//!   [`Decoder`] over the paged KV cache, encoding a prompt's media into
//!   features, and the memory its vision tower may take.
//!
//! A [`Family`] ties them to `config.json` (`architectures`, `model_type`)
//! and brings a built-in chat template; `registry` lists the families.
//! Everything family-specific stays in the family's folder.

use std::path::Path;
use std::sync::Arc;

use super::decoder::{Decoder, DecoderDims};
use super::inputs::{MediaFeatures, PreparedInput};
use super::weights::Weights;
use crate::error::Result;
use crate::multimodal::image::ResizeFilter;
use crate::multimodal::Media;
use crate::tensor::{Device, Tensor};
use crate::text::tokenizer::Tokenizer;

/// Family-neutral facts of a checkpoint, read from its config.json.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// The family's name (`qwen2_vl`, `llava`).
    pub family: &'static str,
    /// The decoder's shape (also the roofline's and the KV cache's input).
    pub decoder: DecoderDims,
    pub max_position_embeddings: usize,
    /// config.json's `eos_token_id` (one or several; may be empty).
    pub eos_token_id: Vec<u32>,
    /// The token an image's features replace, and a video's (if any).
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
    /// Tokens only the server places (placeholders, start/end markers): a
    /// prompt's text may not hold them.
    pub media_token_ids: Vec<u32>,
}

impl ModelSpec {
    pub fn hidden_size(&self) -> usize {
        self.decoder.hidden
    }
    pub fn vocab_size(&self) -> usize {
        self.decoder.vocab
    }
    pub fn supports_video(&self) -> bool {
        self.video_token_id.is_some()
    }
}

/// The prompt side of a family (worker threads; no device).
pub trait Processor: Send + Sync {
    fn spec(&self) -> &ModelSpec;

    /// Prepares a rendered prompt whose placeholders (one per item, the
    /// family's own spelling) match `media` in order: expands them,
    /// preprocesses the media, tokenizes, computes positions.
    fn prepare_prompt(&self, tok: &Tokenizer, prompt: String, media: &[Media]) -> Result<PreparedInput>;

    /// A prompt given as token ids, with no media.
    fn text_input(&self, prompt: String, ids: Vec<u32>) -> PreparedInput {
        PreparedInput::text(prompt, ids)
    }

    /// The items of a precomputed image-embeddings file (safetensors), in
    /// the family's layout; errors say what was expected.
    fn parse_image_embeds(&self, bytes: &[u8]) -> Result<Vec<Media>>;

    /// Pixels of the largest image after preprocessing (memory sizing).
    fn max_image_pixels(&self) -> usize;

    /// The preprocessing of one image: pixel rows and the item's grid, as
    /// `prepare_prompt` would put them in `PreparedInput::images`.
    fn preprocess_image(&self, img: &image::RgbImage) -> Result<(Vec<f32>, [usize; 3])>;

    /// The size `preprocess_image` resizes a `width`×`height` image to, and
    /// with which filter (None: it takes the image as it is). For the
    /// benchmarks' stage timings.
    fn resize_target(&self, width: usize, height: usize) -> Result<Option<(usize, usize, ResizeFilter)>>;

    /// The grid an image of `width`×`height` gets, without its pixels.
    fn image_grid(&self, width: usize, height: usize) -> Result<[usize; 3]>;

    /// Placeholder tokens of an item with `grid`.
    fn image_tokens(&self, grid: [usize; 3]) -> usize;

    /// Flops of the vision tower and connector on one item of `grid`.
    fn vision_flops(&self, grid: [usize; 3]) -> f64;
}

/// The device side of a family (the engine thread).
pub trait Model: Send {
    fn spec(&self) -> &ModelSpec;
    fn device(&self) -> &Device;
    fn decoder(&self) -> &Decoder;

    /// Features of every image and video of a prompt, rows in placeholder
    /// order: pixels through the vision tower, precomputed ones as given.
    /// `observe` sees each stage (tests compare them with HF).
    fn encode_media(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<MediaFeatures>;

    /// Activation bytes the vision tower may need at once for an image of
    /// `pixels` pixels after preprocessing (an estimate; the KV cache is
    /// sized after it).
    fn vision_peak_bytes(&self, pixels: usize) -> usize;

    /// Writes `feats` into the placeholder rows of `x`: see
    /// [`super::inputs::place_features`].
    fn place_features(
        &self,
        x: &mut Tensor,
        row0: usize,
        ids: &[u32],
        range: (usize, usize),
        feats: &MediaFeatures,
    ) -> Result<()> {
        let s = self.spec();
        super::inputs::place_features(x, row0, ids, range, feats, (s.image_token_id, s.video_token_id))
    }
}

/// vLLM's `--mm-processor-kwargs`: settings over the folder's processor
/// config (e.g. Qwen2-VL's `min_pixels`/`max_pixels`, Phi-3.5-vision's
/// `num_crops`). Each family refuses keys it does not know.
pub type ProcessorKwargs = serde_json::Map<String, serde_json::Value>;

/// A model family: how to recognise its checkpoints and load them.
pub struct Family {
    /// Short name (`qwen2_vl`), as `kestrel info` lists it.
    pub name: &'static str,
    /// config.json `architectures` values it serves.
    pub architectures: &'static [&'static str],
    /// config.json `model_type` values it serves (used when `architectures`
    /// names none of ours).
    pub model_types: &'static [&'static str],
    /// Example checkpoints, for `kestrel info` and errors.
    pub examples: &'static [&'static str],
    /// What can be served: "generate", "embedding", with "image", "video".
    pub tasks: &'static str,
    /// Chat template used when the folder has none (said once at start).
    pub chat_template: Option<&'static str>,
    /// Template for `--task embedding` when the folder has none (the
    /// family's embedding model's prompt format), and its name for the log.
    pub embedding_template: Option<&'static str>,
    pub embedding_template_name: &'static str,
    /// The prompt text of the n-th image (1-based), which a template
    /// written for string content gets in place of an image part.
    pub placeholder: crate::text::chat_template::Placeholder,
    /// How the family's models write tool calls (a `--tool-call-parser`
    /// name), if they were trained to.
    pub tool_parser: Option<&'static str>,
    /// A chat template that renders `tools`, tool calls and tool results in
    /// that format, for requests with tools when the model's own template
    /// does not render them.
    pub tool_template: Option<&'static str>,
    /// The prompt side from a model folder, with `--mm-processor-kwargs`.
    pub processor: fn(&Path, &ProcessorKwargs) -> Result<Arc<dyn Processor>>,
    /// The device side from a model folder.
    pub load: fn(&Path, &Device) -> Result<Box<dyn Model>>,
    /// The checkpoint with this family's name map (canonical names:
    /// `model.language_model.*`, `lm_head.weight`, the family's vision names).
    pub weights: fn(&Path) -> Result<Weights>,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Family({})", self.name)
    }
}

//! From a conversation with images and videos to what the model consumes:
//! rendered prompt, placeholder expansion, token ids, pixel values, M-RoPE
//! positions. Mirrors transformers `Qwen2VLProcessor.__call__`
//! (processing_qwen2_vl.py): each `<|image_pad|>` / `<|video_pad|>` in the
//! rendered text becomes as many copies as the item has merged patches,
//! then the text is tokenized.

use std::sync::Arc;

use super::mrope;
use super::processor::{self, ImageProcessorConfig};
use crate::error::{Error, Result};
use crate::model::config::Qwen2VlConfig;
use crate::model::contract::{ModelSpec, Processor};
use crate::text::{chat_template::ChatTemplate, tokenizer::Tokenizer};

pub use crate::model::inputs::{ImageEmbeds, Pixels, PreparedInput};
pub use crate::multimodal::Media;

/// Processors for the two media kinds (preprocessor_config.json, and the
/// video processor's defaults).
pub struct Processors {
    pub image: ImageProcessorConfig,
    pub video: ImageProcessorConfig,
}

impl Processors {
    /// `--mm-processor-kwargs` over the files: `min_pixels`, `max_pixels`.
    pub fn apply_kwargs(&mut self, kwargs: &crate::model::ProcessorKwargs) -> Result<()> {
        for (key, v) in kwargs {
            let n = v.as_u64().filter(|&n| n > 0).map(|n| n as usize);
            let n = match key.as_str() {
                "min_pixels" | "max_pixels" => n.ok_or_else(|| {
                    Error::InvalidInput(format!("--mm-processor-kwargs: `{key}` must be a positive integer, got {v}"))
                })?,
                other => {
                    return Err(Error::InvalidInput(format!(
                        "--mm-processor-kwargs: `{other}` is not a setting of Qwen2-VL's processor \
                         (it takes `min_pixels` and `max_pixels`)"
                    )))
                }
            };
            for p in [&mut self.image, &mut self.video] {
                if key == "min_pixels" {
                    p.min_pixels = n;
                } else {
                    p.max_pixels = n;
                }
            }
        }
        for p in [&self.image, &self.video] {
            if p.min_pixels > p.max_pixels {
                return Err(Error::InvalidInput(format!(
                    "--mm-processor-kwargs: min_pixels {} exceeds max_pixels {}",
                    p.min_pixels, p.max_pixels
                )));
            }
        }
        Ok(())
    }

    /// From a model folder, as transformers' AutoProcessor finds them: images
    /// from preprocessor_config.json; videos from video_preprocessor_config.json,
    /// else from preprocessor_config.json over the video class defaults.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<String>> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::Io { path: p.display().to_string(), source: e }),
            }
        };
        let image_json = read("preprocessor_config.json")?;
        let image = match &image_json {
            Some(s) => ImageProcessorConfig::from_json(s)?,
            None => ImageProcessorConfig::default(),
        };
        let video = match (read("video_preprocessor_config.json")?, &image_json) {
            (Some(s), _) => ImageProcessorConfig::from_json_with_defaults(&s, ImageProcessorConfig::video_default())?,
            (None, Some(s)) => ImageProcessorConfig::from_json_with_defaults(s, ImageProcessorConfig::video_default())?,
            (None, None) => ImageProcessorConfig::video_default(),
        };
        Ok(Self { image, video })
    }
}

/// Renders `messages` (OpenAI/HF chat JSON) and prepares it with `media`,
/// which must hold one entry per image or video part, in order.
pub fn prepare_chat(
    cfg: &Qwen2VlConfig,
    tok: &Tokenizer,
    template: &ChatTemplate,
    procs: &Processors,
    messages: &serde_json::Value,
    media: &[Media],
) -> Result<PreparedInput> {
    let prompt = template.render(messages, true)?;
    prepare_prompt(cfg, tok, procs, prompt, media)
}

/// Prepares an already rendered prompt holding one placeholder per item.
pub fn prepare_prompt(
    cfg: &Qwen2VlConfig,
    tok: &Tokenizer,
    procs: &Processors,
    prompt: String,
    media: &[Media],
) -> Result<PreparedInput> {
    let name =
        |id: u32| tok.id_token(id).ok_or_else(|| Error::Config(format!("token id {id} is not in the tokenizer")));
    let image_pad = name(cfg.image_token_id)?;
    let video_pad = name(cfg.video_token_id)?;
    let merge = cfg.vision_config.spatial_merge_size;

    let mut images = Pixels::default();
    let mut image_embeds = Vec::new();
    let mut videos = Pixels::default();
    // Expand placeholders in order of appearance; each consumes the next item of its kind.
    let (mut img_items, mut vid_items) = (Vec::new(), Vec::new());
    for m in media {
        match m {
            Media::Image(img) => {
                let (v, g) = processor::preprocess_image(img, &procs.image)?;
                images.values.extend(v);
                images.grids.push(g);
                img_items.push(g);
            }
            Media::ImageEmbeds { values, grid } => {
                let tokens = processor::num_placeholder_tokens(*grid, merge);
                if grid.contains(&0) || grid[1] % merge != 0 || grid[2] % merge != 0 {
                    return Err(Error::InvalidInput(format!(
                        "image_grid_thw {grid:?}: t, h and w must be positive, h and w multiples of {merge}"
                    )));
                }
                let hidden = cfg.text_config.hidden_size;
                if values.len() != tokens * hidden {
                    return Err(Error::InvalidInput(format!(
                        "image_embeds for grid {grid:?} must be ({tokens}, {hidden}), got {} values",
                        values.len()
                    )));
                }
                image_embeds.push(ImageEmbeds { order: img_items.len(), grid: *grid, values: values.clone() });
                img_items.push(*grid);
            }
            Media::Video(frames) => {
                let (v, g) = processor::preprocess_video(frames, &procs.video)?;
                videos.values.extend(v);
                videos.grids.push(g);
                vid_items.push(g);
            }
        }
    }
    let mut expanded = String::with_capacity(prompt.len());
    let (mut ni, mut nv) = (0, 0);
    let mut rest = prompt.as_str();
    loop {
        let next_img = rest.find(&image_pad);
        let next_vid = rest.find(&video_pad);
        let (at, is_img) = match (next_img, next_vid) {
            (Some(a), Some(b)) => (a.min(b), a < b),
            (Some(a), None) => (a, true),
            (None, Some(b)) => (b, false),
            (None, None) => break,
        };
        expanded.push_str(&rest[..at]);
        let (pad, grid) = if is_img {
            ni += 1;
            (&image_pad, img_items.get(ni - 1))
        } else {
            nv += 1;
            (&video_pad, vid_items.get(nv - 1))
        };
        let Some(&grid) = grid else {
            return Err(Error::InvalidInput(format!(
                "the prompt has more {} placeholders than {} given",
                if is_img { "image" } else { "video" },
                if is_img { "images" } else { "videos" }
            )));
        };
        for _ in 0..processor::num_placeholder_tokens(grid, merge) {
            expanded.push_str(pad);
        }
        rest = &rest[at + pad.len()..];
    }
    expanded.push_str(rest);
    if ni != img_items.len() || nv != vid_items.len() {
        return Err(Error::InvalidInput(format!(
            "{} images and {} videos were given but the prompt has places for {ni} and {nv}",
            img_items.len(),
            vid_items.len()
        )));
    }

    let input_ids = tok.encode_prompt(&expanded)?;
    let (positions, rope_delta) = mrope::rope_index(
        &input_ids,
        &img_items,
        &videos.grids,
        merge,
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
    )?;
    Ok(PreparedInput {
        prompt: expanded,
        input_ids,
        positions,
        rope_delta,
        rope_table: None,
        images,
        image_embeds,
        videos,
    })
}

/// The prompt side of Qwen2-VL: its config, processors and spec.
pub struct Qwen2VlProcessor {
    pub config: Qwen2VlConfig,
    pub processors: Processors,
    pub spec: ModelSpec,
}

impl Qwen2VlProcessor {
    /// `kwargs` (`--mm-processor-kwargs`) may set `min_pixels` and
    /// `max_pixels` of the image and video processors, as vLLM passes them.
    pub fn from_dir(dir: &std::path::Path, kwargs: &crate::model::ProcessorKwargs) -> Result<Arc<dyn Processor>> {
        let config = Qwen2VlConfig::from_dir(dir)?;
        let spec = super::model::spec(&config, has_lm_head(dir)?);
        let mut processors = Processors::from_dir(dir)?;
        processors.apply_kwargs(kwargs)?;
        Ok(Arc::new(Self { processors, config, spec }))
    }
}

/// Whether the checkpoint in `dir` stores `lm_head.weight` (headers only).
/// A folder without weights (processor files only) counts as having one:
/// only the decoder's head figures depend on it.
pub fn has_lm_head(dir: &std::path::Path) -> Result<bool> {
    let has_weights = ["model.safetensors", "model.safetensors.index.json"].iter().any(|f| dir.join(f).is_file());
    if !has_weights {
        return Ok(true);
    }
    Ok(crate::model::weights::Weights::open(dir)?.contains(crate::model::weights::LM_HEAD))
}

impl Processor for Qwen2VlProcessor {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn prepare_prompt(&self, tok: &Tokenizer, prompt: String, media: &[Media]) -> Result<PreparedInput> {
        prepare_prompt(&self.config, tok, &self.processors, prompt, media)
    }

    fn parse_image_embeds(&self, bytes: &[u8]) -> Result<Vec<Media>> {
        let (merge, hidden) = (self.config.vision_config.spatial_merge_size, self.config.text_config.hidden_size);
        crate::multimodal::embeds::parse_image_embeds(bytes, merge, hidden)
    }

    fn max_image_pixels(&self) -> usize {
        self.processors.image.max_pixels
    }

    fn preprocess_image(&self, img: &image::RgbImage) -> Result<(Vec<f32>, [usize; 3])> {
        processor::preprocess_image(img, &self.processors.image)
    }

    fn resize_target(
        &self,
        width: usize,
        height: usize,
    ) -> Result<Option<(usize, usize, crate::multimodal::image::ResizeFilter)>> {
        let (h, w) = self.processors.image.resized_size(height, width)?;
        Ok(((w, h) != (width, height)).then_some((w, h, self.processors.image.resample)))
    }

    fn image_grid(&self, width: usize, height: usize) -> Result<[usize; 3]> {
        self.processors.image.grid_thw(1, height, width)
    }

    fn image_tokens(&self, grid: [usize; 3]) -> usize {
        processor::num_placeholder_tokens(grid, self.config.vision_config.spatial_merge_size)
    }

    fn vision_flops(&self, grid: [usize; 3]) -> f64 {
        super::vision_flops(&self.config.vision_config, grid)
    }
}

//! LLaVA-1.5's prompt side: `CLIPImageProcessor` and `LlavaProcessor`.
//!
//! Images mirror transformers 5.x `models/clip/image_processing_clip*.py` in
//! its default (torchvision) backend, the one `AutoProcessor` returns when
//! torchvision is installed, as for Qwen2-VL:
//!
//! 1. resize so the shortest side is `size.shortest_edge` (336) and the
//!    other `int(336 · long / short)` (`get_resize_output_image_size` with
//!    `default_to_square=False`), torch's antialiased bicubic on uint8
//!    (`multimodal::image::resize_rgb8`);
//! 2. centre crop to `crop_size` (336²) at offset `int((h − 336) / 2)`,
//!    truncated (the torchvision backend's own `center_crop`, not
//!    torchvision's, which rounds: a 1075-row image starts at row 369);
//! 3. rescale and normalize fused in f32 (`multimodal::image::level_table`),
//!    CLIP mean/std; pixel_values (3, 336, 336) per image.
//!
//! Prompts mirror `LlavaProcessor.__call__`: each `<image>` in the rendered
//! text becomes `image_tokens` copies (576: the 24×24 patches, plus one for
//! the "full" strategy), then the text is tokenized (with BOS).

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::model::config::OneOrThree;

use super::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::model::contract::{ModelSpec, Processor};
use crate::model::inputs::{ImageEmbeds, Pixels, PreparedInput};
use crate::model::qwen2_vl::processor::{CLIP_MEAN, CLIP_STD};
use crate::multimodal::image::{level_table, resize_rgb8, ResizeFilter, RgbImage};
use crate::multimodal::Media;
use crate::text::tokenizer::Tokenizer;

/// preprocessor_config.json of a LLaVA checkpoint (`CLIPImageProcessor`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipProcessorConfig {
    pub do_resize: bool,
    pub shortest_edge: usize,
    pub resample: ResizeFilter,
    pub do_center_crop: bool,
    pub crop: (usize, usize), // (height, width)
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Side {
    One(usize),
    Hw { height: usize, width: usize },
    Shortest { shortest_edge: usize },
}

#[derive(Deserialize)]
struct Raw {
    do_resize: Option<bool>,
    size: Option<Side>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<Side>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<OneOrThree>,
    image_std: Option<OneOrThree>,
}

impl ClipProcessorConfig {
    /// `CLIPImageProcessor`'s defaults at the tower's `image_size`.
    pub fn default_for(image_size: usize) -> Self {
        Self {
            do_resize: true,
            shortest_edge: image_size,
            resample: ResizeFilter::Bicubic,
            do_center_crop: true,
            crop: (image_size, image_size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    pub fn from_json(json: &str, image_size: usize) -> Result<Self> {
        let bad = |m: String| Error::Config(format!("preprocessor_config.json: {m}"));
        let raw: Raw = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let d = Self::default_for(image_size);
        let shortest_edge = match raw.size {
            None => d.shortest_edge,
            Some(Side::Shortest { shortest_edge }) | Some(Side::One(shortest_edge)) => shortest_edge,
            Some(Side::Hw { .. }) => {
                return Err(bad("size {height, width} (a square resize) is not supported; LLaVA-1.5 resizes by \
                                size.shortest_edge"
                    .into()))
            }
        };
        let crop = match raw.crop_size {
            None => d.crop,
            Some(Side::One(s)) | Some(Side::Shortest { shortest_edge: s }) => (s, s),
            Some(Side::Hw { height, width }) => (height, width),
        };
        let resample = match raw.resample {
            None => d.resample,
            Some(r) => ResizeFilter::from_pil(r)
                .ok_or_else(|| bad(format!("resample {r} is not supported (3 = bicubic, 2 = bilinear)")))?,
        };
        let cfg = Self {
            do_resize: raw.do_resize.unwrap_or(true),
            shortest_edge,
            resample,
            do_center_crop: raw.do_center_crop.unwrap_or(true),
            crop,
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean: raw.image_mean.map_or(d.image_mean, |m| m.get()),
            image_std: raw.image_std.map_or(d.image_std, |s| s.get()),
        };
        if cfg.shortest_edge == 0 || cfg.crop.0 == 0 || cfg.crop.1 == 0 {
            return Err(bad("size and crop_size must be positive".into()));
        }
        if !cfg.do_center_crop || cfg.crop != (image_size, image_size) {
            return Err(bad(format!(
                "the tower takes {image_size}x{image_size} images: do_center_crop must be true and crop_size \
                 {image_size} (found {:?}, crop {})",
                cfg.crop, cfg.do_center_crop
            )));
        }
        if cfg.do_normalize && cfg.image_std.contains(&0.0) {
            return Err(bad("image_std has a zero".into()));
        }
        Ok(cfg)
    }

    /// (height, width) after the shortest-edge resize of an h×w image.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.do_resize {
            return (height, width);
        }
        let (short, long) = (height.min(width), height.max(width));
        let new_long = (self.shortest_edge as f64 * long as f64 / short.max(1) as f64) as usize;
        if height <= width {
            (self.shortest_edge, new_long)
        } else {
            (new_long, self.shortest_edge)
        }
    }
}

/// One image → pixel_values (3, crop_h, crop_w) row-major.
pub fn preprocess(img: &RgbImage, cfg: &ClipProcessorConfig) -> Result<Vec<f32>> {
    let (h, w) = cfg.resized_size(img.height() as usize, img.width() as usize);
    let resized;
    let img = if (h, w) == (img.height() as usize, img.width() as usize) {
        img
    } else {
        resized = resize_rgb8(img, w as u32, h as u32, cfg.resample)?;
        &resized
    };
    let (ch, cw) = cfg.crop;
    if h < ch || w < cw {
        return Err(Error::InvalidInput(format!(
            "the image is {w}x{h} after resizing, smaller than the {cw}x{ch} crop"
        )));
    }
    // transformers' `TorchvisionBackend.center_crop`: int((h - crop) / 2.0).
    let (top, left) = ((h - ch) / 2, (w - cw) / 2);
    let table = level_table(
        cfg.do_rescale.then_some(cfg.rescale_factor),
        cfg.do_normalize.then_some((cfg.image_mean, cfg.image_std)),
    );
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * ch * cw];
    for y in 0..ch {
        let src = &raw[((top + y) * w + left) * 3..][..cw * 3];
        for (x, px) in src.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * ch * cw + y * cw + x] = table[c][usize::from(px[c])];
            }
        }
    }
    Ok(out)
}

/// The prompt side of LLaVA-1.5.
pub struct LlavaProcessor {
    pub config: LlavaConfig,
    pub image: ClipProcessorConfig,
    pub spec: ModelSpec,
}

impl LlavaProcessor {
    pub fn new(config: LlavaConfig, dir: &Path) -> Result<Self> {
        let size = config.vision_config.image_size;
        let path = dir.join("preprocessor_config.json");
        let image = match std::fs::read_to_string(&path) {
            Ok(s) => ClipProcessorConfig::from_json(&s, size)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClipProcessorConfig::default_for(size),
            Err(e) => return Err(Error::Io { path: path.display().to_string(), source: e }),
        };
        Ok(Self { spec: super::spec(&config), config, image })
    }

    /// LLaVA's processor has no setting vLLM passes through
    /// `--mm-processor-kwargs`; any key is refused.
    pub fn from_dir(dir: &Path, kwargs: &crate::model::ProcessorKwargs) -> Result<Arc<dyn Processor>> {
        if let Some(k) = kwargs.keys().next() {
            return Err(Error::InvalidInput(format!(
                "--mm-processor-kwargs: `{k}` is not a setting of LLaVA-1.5's processor (it takes none)"
            )));
        }
        Ok(Arc::new(Self::new(LlavaConfig::from_dir(dir)?, dir)?))
    }

    /// The grid of every image: [1, side, side] in feature rows.
    fn grid(&self) -> [usize; 3] {
        let side = self.config.vision_config.image_size / self.config.vision_config.patch_size;
        [1, side, side]
    }
}

impl Processor for LlavaProcessor {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn prepare_prompt(&self, tok: &Tokenizer, prompt: String, media: &[Media]) -> Result<PreparedInput> {
        let name = tok.id_token(self.config.image_token_id).ok_or_else(|| {
            Error::Config(format!("image token id {} is not in the tokenizer", self.config.image_token_id))
        })?;
        let tokens = self.config.image_tokens();
        let (mut images, mut image_embeds) = (Pixels::default(), Vec::new());
        for (order, m) in media.iter().enumerate() {
            match m {
                Media::Image(img) => {
                    images.values.extend(preprocess(img, &self.image)?);
                    images.grids.push(self.grid());
                }
                Media::ImageEmbeds { values, grid } => {
                    let hidden = self.spec.hidden_size();
                    if values.len() != tokens * hidden {
                        return Err(Error::InvalidInput(format!(
                            "image_embeds must be ({tokens}, {hidden}) per image for this model, got {} values",
                            values.len()
                        )));
                    }
                    image_embeds.push(ImageEmbeds { order, grid: *grid, values: values.clone() });
                }
                Media::Video(_) => {
                    return Err(Error::InvalidInput(
                        "this model (LLaVA-1.5) takes images only; video input is not supported".into(),
                    ))
                }
            }
        }
        let places = prompt.matches(name.as_str()).count();
        if places != media.len() {
            return Err(Error::InvalidInput(format!(
                "{} images were given but the prompt has places for {places}",
                media.len()
            )));
        }
        let expanded = prompt.replace(name.as_str(), &name.repeat(tokens));
        let input_ids = tok.encode_prompt(&expanded)?;
        let mut input = PreparedInput::text(expanded, input_ids);
        input.images = images;
        input.image_embeds = image_embeds;
        Ok(input)
    }

    fn parse_image_embeds(&self, bytes: &[u8]) -> Result<Vec<Media>> {
        let grid = self.grid();
        let rows = self.config.image_tokens();
        let items = crate::multimodal::embeds::parse_fixed_image_embeds(bytes, rows, self.spec.hidden_size())?;
        Ok(items.into_iter().map(|values| Media::ImageEmbeds { values, grid }).collect())
    }

    fn max_image_pixels(&self) -> usize {
        self.image.crop.0 * self.image.crop.1
    }

    fn preprocess_image(&self, img: &RgbImage) -> Result<(Vec<f32>, [usize; 3])> {
        Ok((preprocess(img, &self.image)?, self.grid()))
    }

    fn resize_target(&self, width: usize, height: usize) -> Result<Option<(usize, usize, ResizeFilter)>> {
        let (h, w) = self.image.resized_size(height, width);
        Ok(((w, h) != (width, height)).then_some((w, h, self.image.resample)))
    }

    fn image_grid(&self, _width: usize, _height: usize) -> Result<[usize; 3]> {
        Ok(self.grid())
    }

    fn image_tokens(&self, _grid: [usize; 3]) -> usize {
        self.config.image_tokens()
    }

    fn vision_flops(&self, _grid: [usize; 3]) -> f64 {
        super::vision_flops(&self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_the_aspect() {
        let c = ClipProcessorConfig::default_for(336);
        assert_eq!(c.resized_size(375, 500), (336, 448));
        assert_eq!(c.resized_size(640, 200), (1075, 336));
        assert_eq!(c.resized_size(336, 336), (336, 336));
    }

    #[test]
    fn a_square_resize_config_is_refused() {
        let e = ClipProcessorConfig::from_json(r#"{"size": {"height": 336, "width": 336}}"#, 336).unwrap_err();
        assert!(e.to_string().contains("shortest_edge"), "{e}");
        let c = ClipProcessorConfig::from_json(
            r#"{"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, "resample": 3}"#,
            336,
        )
        .unwrap();
        assert_eq!(c, ClipProcessorConfig::default_for(336));
    }
}

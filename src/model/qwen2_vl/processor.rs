//! Qwen2-VL image and video preprocessing.
//!
//! Mirrors transformers 5.x `models/qwen2_vl/image_processing_qwen2_vl.py`
//! (`Qwen2VLImageProcessor`, the torchvision backend: what `AutoProcessor` /
//! `AutoImageProcessor` return by default when torchvision is installed; the
//! PIL/numpy backend is `Qwen2VLImageProcessorPil`) and
//! `video_processing_qwen2_vl.py` (`Qwen2VLVideoProcessor`):
//!
//! 1. `smart_resize` picks a size whose sides are multiples of
//!    patch_size · merge_size (28) with min_pixels ≤ h·w ≤ max_pixels;
//! 2. resize with torch's antialiased bicubic on uint8
//!    (`multimodal::image::resize_rgb8`);
//! 3. rescale and normalize, fused as torchvision does it in f32:
//!    (x - mean/rescale) / (std/rescale);
//! 4. patchify: an image is repeated to fill the temporal patch (2), a video
//!    with an odd frame count repeats its last frame; rows come out in
//!    merge-window order (t, h/2, w/2, 2, 2) and each row is (C, T, 14, 14).
//!    Steps 3 and 4 are one pass from the uint8 pixels to the final rows.
//!
//! Measured against transformers 5.17 / torch 2.11 / torchvision 0.26 on
//! CPU: bit-identical pixel_values (tests/preprocess.rs). The PIL backend
//! differs from the default in the resize (see `multimodal::image`: one level,
//! 0.015 in pixel_values, on under 1% of values, but up to 0.33 when the
//! height shrinks while the width grows) and in float rounding of the
//! normalisation (≤ 2.4e-7).

use std::borrow::Cow;
use std::path::Path;

use rayon::prelude::*;
use serde::Deserialize;

use crate::model::config::OneOrThree;

use crate::error::{Error, Result};
use crate::multimodal::image::{resize_rgb8, ResizeFilter, RgbImage};

/// OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (transformers `image_utils.py`), with
/// HF's digits, rounded to f32 as `torch.tensor(image_mean)` rounds them.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// preprocessor_config.json of a Qwen2-VL checkpoint. Field names are HF's;
/// unset fields take the defaults of the HF class (`Default` for images,
/// [`ImageProcessorConfig::video_default`] for videos).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    /// PIL resampling filter (`resample`: 3 = BICUBIC, 2 = BILINEAR).
    pub resample: ResizeFilter,
    /// Lower bound on resized h·w: `min_pixels`, or 5.x `size.shortest_edge`.
    pub min_pixels: usize,
    /// Upper bound on resized h·w: `max_pixels`, or 5.x `size.longest_edge`.
    pub max_pixels: usize,
    /// Side of a ViT patch in pixels (14).
    pub patch_size: usize,
    /// Frames per ViT patch (2).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one LM token (2).
    pub merge_size: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    /// `Qwen2VLImageProcessor` class defaults (note: max_pixels here is
    /// 28·28·1280; the published Qwen2-VL configs raise it to 28·28·16384).
    fn default() -> Self {
        Self {
            do_resize: true,
            resample: ResizeFilter::Bicubic,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

#[derive(Deserialize, Default)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
    // transformers 4.x saved `size` as {min_pixels, max_pixels}.
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
}

#[derive(Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    resample: Option<u32>,
    size: Option<RawSize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<OneOrThree>,
    image_std: Option<OneOrThree>,
}

impl ImageProcessorConfig {
    /// `Qwen2VLVideoProcessor` class defaults: pixel bounds of
    /// 128·28·28 ..= 768·28·28 per frame, the rest as for images.
    pub fn video_default() -> Self {
        Self { min_pixels: 128 * 28 * 28, max_pixels: 28 * 28 * 768, ..Self::default() }
    }

    /// Parse preprocessor_config.json (or video_preprocessor_config.json)
    /// over `defaults`. As in HF's `__init__`, top-level `min_pixels` /
    /// `max_pixels` override `size`.
    pub fn from_json_with_defaults(json: &str, defaults: Self) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("preprocessor_config.json: {e}")))?;
        let size = raw.size.unwrap_or_default();
        let d = defaults;
        let resample = match raw.resample {
            None => d.resample,
            Some(r) => ResizeFilter::from_pil(r).ok_or_else(|| {
                Error::Config(format!(
                    "preprocessor_config.json: resample {r} is not supported (3 = bicubic, 2 = bilinear)"
                ))
            })?,
        };
        let cfg = Self {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            resample,
            min_pixels: raw.min_pixels.or(size.shortest_edge).or(size.min_pixels).unwrap_or(d.min_pixels),
            max_pixels: raw.max_pixels.or(size.longest_edge).or(size.max_pixels).unwrap_or(d.max_pixels),
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean: raw.image_mean.map_or(d.image_mean, |m| m.get()),
            image_std: raw.image_std.map_or(d.image_std, |s| s.get()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse preprocessor_config.json over the image class defaults.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_with_defaults(json, Self::default())
    }

    /// Read and parse a preprocessor_config.json file (image defaults).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_json(&text)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("preprocessor_config.json: {msg}")));
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return bad(format!(
                "patch_size {}, merge_size {} and temporal_patch_size {} must be positive",
                self.patch_size, self.merge_size, self.temporal_patch_size
            ));
        }
        if self.min_pixels > self.max_pixels {
            return bad(format!("min_pixels {} exceeds max_pixels {}", self.min_pixels, self.max_pixels));
        }
        if self.do_normalize && self.image_std.contains(&0.0) {
            return bad("image_std has a zero".into());
        }
        if self.do_rescale && (self.rescale_factor.is_nan() || self.rescale_factor <= 0.0) {
            return bad(format!("rescale_factor {} must be positive", self.rescale_factor));
        }
        Ok(())
    }

    /// Resized sides are multiples of this: patch_size · merge_size (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Size after `smart_resize` (or the input size when do_resize is off,
    /// which must then already be a multiple of `factor`).
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if height == 0 || width == 0 {
            return Err(Error::InvalidInput(format!("the image has no pixels ({width}x{height})")));
        }
        if self.do_resize {
            return smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels);
        }
        let f = self.factor();
        if !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            return Err(Error::InvalidInput(format!(
                "the image is {width}x{height}; with resizing off both sides must be multiples of {f}"
            )));
        }
        Ok((height, width))
    }

    /// grid_thw of an image (`frames` = 1) or a video of `frames` frames of
    /// height x width, without touching pixels (HF
    /// `get_number_of_image_patches` / `get_num_of_video_patches`).
    pub fn grid_thw(&self, frames: usize, height: usize, width: usize) -> Result<[usize; 3]> {
        if frames == 0 {
            return Err(Error::InvalidInput("the video has no frames".into()));
        }
        let (h, w) = self.resized_size(height, width)?;
        let t = if frames == 1 { 1 } else { frames.div_ceil(self.temporal_patch_size) };
        Ok([t, h / self.patch_size, w / self.patch_size])
    }
}

/// HF `smart_resize`: the size closest to (height, width) whose sides are
/// multiples of `factor`, scaled to keep min_pixels ≤ h·w ≤ max_pixels.
/// Python's `round` is round-half-to-even, so this uses `round_ties_even`.
/// Errors (as HF raises) when the aspect ratio exceeds 200.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(Error::InvalidInput(format!("cannot resize a {width}x{height} image to multiples of {factor}")));
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > 200.0 {
        return Err(Error::InvalidInput(format!(
            "the image is {width}x{height}, an aspect ratio of {ratio:.1}; Qwen2-VL accepts at most 200, \
             so crop or pad it"
        )));
    }
    let mut h_bar = (hf / ff).round_ties_even() as usize * factor;
    let mut w_bar = (wf / ff).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((height * width) as f64 / max_pixels as f64).sqrt();
        h_bar = factor.max((hf / beta / ff).floor() as usize * factor);
        w_bar = factor.max((wf / beta / ff).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (height * width) as f64).sqrt();
        h_bar = (hf * beta / ff).ceil() as usize * factor;
        w_bar = (wf * beta / ff).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        // Only reachable with min_pixels = 0 and a side under factor / 2.
        return Err(Error::InvalidInput(format!(
            "the image is {width}x{height}, too small to make one {factor}x{factor} patch"
        )));
    }
    Ok((h_bar, w_bar))
}

/// LM placeholder tokens for one image or video: t·h·w / merge².
pub fn num_placeholder_tokens(grid_thw: [usize; 3], merge_size: usize) -> usize {
    grid_thw.iter().product::<usize>() / (merge_size * merge_size)
}

/// One frame at the processor's size (h, w): resized unless it already is.
fn at_size<'a>(img: &'a RgbImage, h: usize, w: usize, cfg: &ImageProcessorConfig) -> Result<Cow<'a, RgbImage>> {
    if (img.height() as usize, img.width() as usize) == (h, w) {
        return Ok(Cow::Borrowed(img));
    }
    Ok(Cow::Owned(resize_rgb8(img, w as u32, h as u32, cfg.resample)?))
}

/// The pixel_values value of every uint8 level in each channel
/// (`multimodal::image::level_table`, torchvision's fused rescale+normalize).
fn level_table(cfg: &ImageProcessorConfig) -> [[f32; 256]; 3] {
    crate::multimodal::image::level_table(
        cfg.do_rescale.then_some(cfg.rescale_factor),
        cfg.do_normalize.then_some((cfg.image_mean, cfg.image_std)),
    )
}

/// Rescale, normalize and flatten `frames` (each h x w, at the processor's
/// size; `frames.len()` is grid_t · T) into rows (grid_t·gh·gw, 3·T·P·P) in
/// HF's order: rows (t, gh/m, gw/m, m, m), row content (C, T, P, P).
///
/// One pass reads the uint8 pixels and writes the final layout, with no f32
/// planes in between; rows are independent and spread over rayon's pool. A
/// frame that repeats the one before it in its temporal patch (an image
/// fills the patch with itself; a video pads with its last frame) is copied
/// within the row instead of looked up again.
fn patchify(frames: &[&RgbImage], h: usize, w: usize, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let table = level_table(cfg);
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let grid_t = frames.len() / tp;
    let plane = tp * p * p; // one channel of a row: (T, P, P)
    let mut out = vec![0f32; grid_t * gh * gw * 3 * plane];
    out.par_chunks_mut(3 * plane).enumerate().for_each(|(r, row)| {
        let (mw, r) = (r % m, r / m);
        let (mh, r) = (r % m, r / m);
        let (bw, r) = (r % (gw / m), r / (gw / m));
        let (bh, t) = (r % (gh / m), r / (gh / m));
        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
        let group = &frames[t * tp..(t + 1) * tp];
        let (red, rest) = row.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        for (ti, frame) in group.iter().enumerate() {
            let at = ti * p * p..(ti + 1) * p * p;
            if ti > 0 && std::ptr::eq(*frame, group[ti - 1]) {
                for channel in [&mut *red, &mut *green, &mut *blue] {
                    channel.copy_within(at.start - p * p..at.start, at.start);
                }
                continue;
            }
            let raw = frame.as_raw();
            let rows = red[at.clone()]
                .chunks_exact_mut(p)
                .zip(green[at.clone()].chunks_exact_mut(p))
                .zip(blue[at].chunks_exact_mut(p));
            for (y, ((r, g), b)) in rows.enumerate() {
                let src = &raw[((y0 + y) * w + x0) * 3..][..p * 3];
                for (((px, r), g), b) in src.chunks_exact(3).zip(r).zip(g).zip(b) {
                    *r = table[0][usize::from(px[0])];
                    *g = table[1][usize::from(px[1])];
                    *b = table[2][usize::from(px[2])];
                }
            }
        }
    });
    out
}

/// One image → (pixel_values (gh·gw, 3·T·P·P) row-major, grid_thw [1, gh, gw]).
/// `Qwen2VLImageProcessor._preprocess` for a single image.
pub fn preprocess_image(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<(Vec<f32>, [usize; 3])> {
    let (h, w) = cfg.resized_size(img.height() as usize, img.width() as usize)?;
    let img = at_size(img, h, w, cfg)?;
    let frames = vec![&*img; cfg.temporal_patch_size];
    let pixel_values = patchify(&frames, h, w, cfg);
    Ok((pixel_values, [1, h / cfg.patch_size, w / cfg.patch_size]))
}

/// Frames of one video → (pixel_values (t·gh·gw, 3·T·P·P), grid_thw [t, gh, gw]).
/// `Qwen2VLVideoProcessor._preprocess`: every frame gets the size
/// smart_resize picks for the first (all must be equal), and an incomplete
/// last temporal patch is filled by repeating the last frame. Frame sampling
/// is the caller's (HF's default is `do_sample_frames=False` too).
pub fn preprocess_video(frames: &[RgbImage], cfg: &ImageProcessorConfig) -> Result<(Vec<f32>, [usize; 3])> {
    let Some(first) = frames.first() else {
        return Err(Error::InvalidInput("the video has no frames".into()));
    };
    let dims = first.dimensions();
    if let Some((i, f)) = frames.iter().enumerate().find(|(_, f)| f.dimensions() != dims) {
        return Err(Error::InvalidInput(format!(
            "video frame {i} is {}x{} but frame 0 is {}x{}; all frames must have one size",
            f.width(),
            f.height(),
            dims.0,
            dims.1
        )));
    }
    let (h, w) = cfg.resized_size(dims.1 as usize, dims.0 as usize)?;
    let sized = frames.iter().map(|f| at_size(f, h, w, cfg)).collect::<Result<Vec<_>>>()?;
    let mut refs: Vec<&RgbImage> = sized.iter().map(|f| &**f).collect();
    let last = *refs.last().expect("at least one frame");
    while !refs.len().is_multiple_of(cfg.temporal_patch_size) {
        refs.push(last);
    }
    let grid_t = refs.len() / cfg.temporal_patch_size;
    let pixel_values = patchify(&refs, h, w, cfg);
    Ok((pixel_values, [grid_t, h / cfg.patch_size, w / cfg.patch_size]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    /// The straightforward pipeline the fused pass replaced: f32 planes
    /// (3, h, w) per frame, normalized sample by sample with torchvision's
    /// formula, then gathered into rows. Shares only `resize_rgb8` (which
    /// has its own reference test).
    fn reference(frames: &[RgbImage], cfg: &ImageProcessorConfig) -> Vec<f32> {
        let (h, w) = cfg.resized_size(frames[0].height() as usize, frames[0].width() as usize).unwrap();
        let inv = (1.0 / cfg.rescale_factor) as f32;
        let (mean, std, scale) = match (cfg.do_rescale, cfg.do_normalize) {
            (true, true) => (cfg.image_mean.map(|m| m * inv), cfg.image_std.map(|s| s * inv), 1.0),
            (false, true) => (cfg.image_mean, cfg.image_std, 1.0),
            (true, false) => ([0.0; 3], [1.0; 3], cfg.rescale_factor as f32),
            (false, false) => ([0.0; 3], [1.0; 3], 1.0),
        };
        let mut planes: Vec<Vec<f32>> = frames
            .iter()
            .map(|f| {
                let img = resize_rgb8(f, w as u32, h as u32, cfg.resample).unwrap();
                let mut out = vec![0f32; 3 * h * w];
                for c in 0..3 {
                    for y in 0..h {
                        for x in 0..w {
                            let v = f32::from(img.get_pixel(x as u32, y as u32).0[c]);
                            out[(c * h + y) * w + x] =
                                if cfg.do_normalize { (v - mean[c]) / std[c] } else { v * scale };
                        }
                    }
                }
                out
            })
            .collect();
        let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
        while !planes.len().is_multiple_of(tp) {
            planes.push(planes.last().unwrap().clone());
        }
        let (gh, gw) = (h / p, w / p);
        let mut out = Vec::new();
        for t in 0..planes.len() / tp {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            for c in 0..3 {
                                for frame in &planes[t * tp..(t + 1) * tp] {
                                    for y in 0..p {
                                        for x in 0..p {
                                            let (py, px) = ((bh * m + mh) * p + y, (bw * m + mw) * p + x);
                                            out.push(frame[(c * h + py) * w + px]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn noise(w: u32, h: u32, rng: &mut Rng) -> RgbImage {
        RgbImage::from_fn(w, h, |_, _| {
            let v = rng.next_u64();
            image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        })
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn fused_pass_matches_the_reference_bit_for_bit() {
        let mut rng = Rng::from_seed(5);
        let published = ImageProcessorConfig { min_pixels: 3136, max_pixels: 12_845_056, ..Default::default() };
        // Odd patch geometry catches index arithmetic that only works for 14/2/2.
        let odd = ImageProcessorConfig { patch_size: 5, merge_size: 3, temporal_patch_size: 3, ..published.clone() };
        let configs = [
            published.clone(),
            ImageProcessorConfig { do_normalize: false, ..published.clone() },
            ImageProcessorConfig { do_rescale: false, ..published.clone() },
            ImageProcessorConfig { do_rescale: false, do_normalize: false, image_mean: [0.3, 0.6, 0.1], ..odd.clone() },
            ImageProcessorConfig { rescale_factor: 0.7, image_std: [0.2, 1.5, 0.9], ..odd },
            ImageProcessorConfig { max_pixels: 28 * 28 * 9, ..published },
        ];
        for cfg in &configs {
            for (w, h) in [(97, 61), (13, 200), (301, 29), (56, 84)] {
                let img = noise(w, h, &mut rng);
                let (pv, grid) = preprocess_image(&img, cfg).unwrap();
                assert_eq!(grid, cfg.grid_thw(1, h as usize, w as usize).unwrap());
                assert_eq!(bits(&pv), bits(&reference(std::slice::from_ref(&img), cfg)), "{w}x{h} {cfg:?}");
            }
            // Videos: an odd frame count (padded with the last frame) and one
            // that fills its temporal patches.
            for n in [1, 4, 5] {
                let frames: Vec<RgbImage> = (0..n).map(|_| noise(45, 71, &mut rng)).collect();
                let (pv, _) = preprocess_video(&frames, cfg).unwrap();
                assert_eq!(bits(&pv), bits(&reference(&frames, cfg)), "{n} frames {cfg:?}");
            }
        }
    }

    #[test]
    fn smart_resize_matches_hf_cases() {
        let f = 28;
        let (lo, hi) = (56 * 56, 28 * 28 * 1280);
        // Plain rounding, with Python's ties to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
        assert_eq!(smart_resize(480, 640, f, lo, hi).unwrap(), (476, 644));
        assert_eq!(smart_resize(42, 70, f, lo, hi).unwrap(), (56, 56));
        // Upscale to min_pixels.
        assert_eq!(smart_resize(20, 20, f, lo, hi).unwrap(), (56, 56));
        // Downscale to max_pixels.
        let (h, w) = smart_resize(4000, 3000, f, lo, hi).unwrap();
        assert!(h * w <= hi && h % f == 0 && w % f == 0, "{h}x{w}");
        assert_eq!((h, w), (1148, 840));
        // Aspect ratio 200 passes, 201 fails.
        assert!(smart_resize(10, 2000, f, lo, hi).is_ok());
        let err = smart_resize(10, 2010, f, lo, hi).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)) && err.to_string().contains("201"), "{err}");
        assert!(smart_resize(0, 10, f, lo, hi).is_err());
    }

    #[test]
    fn config_reads_hf_files() {
        // The published Qwen2-VL-2B-Instruct preprocessor_config.json.
        let json = r#"{
          "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
          "temporal_patch_size": 2, "merge_size": 2,
          "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_std": [0.26862954, 0.26130258, 0.27577711],
          "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"
        }"#;
        let cfg = ImageProcessorConfig::from_json(json).unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (3136, 12845056));
        assert_eq!(cfg.image_mean, CLIP_MEAN);
        assert_eq!(cfg.resample, ResizeFilter::Bicubic);
        // 5.x save format.
        let json = r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}, "resample": 2, "image_mean": 0.5}"#;
        let cfg = ImageProcessorConfig::from_json(json).unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (100, 5000));
        assert_eq!(cfg.resample, ResizeFilter::Bilinear);
        assert_eq!(cfg.image_mean, [0.5; 3]);
        // Top-level min_pixels overrides size, as in HF __init__.
        let json = r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}, "min_pixels": 200}"#;
        assert_eq!(ImageProcessorConfig::from_json(json).unwrap().min_pixels, 200);
        let err = ImageProcessorConfig::from_json(r#"{"resample": 1}"#).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }

    #[test]
    fn patch_order_is_merge_window_then_c_t_p_p() {
        // No resize; put each pixel's coordinates in its channels so every
        // output value says where it came from.
        let cfg =
            ImageProcessorConfig { do_resize: false, do_rescale: false, do_normalize: false, ..Default::default() };
        let img = RgbImage::from_fn(28, 56, |x, y| image::Rgb([y as u8, x as u8, 0]));
        let (pv, grid) = preprocess_image(&img, &cfg).unwrap();
        assert_eq!(grid, [1, 4, 2]);
        let row_len = 3 * 2 * 14 * 14;
        assert_eq!(pv.len(), 8 * row_len);
        // Row r = (bh, bw, mh, mw) with gw/m = 1: r = bh*4 + mh*2 + mw.
        for r in 0..8 {
            let (bh, mh, mw) = (r / 4, (r / 2) % 2, r % 2);
            let (py, px) = (bh * 2 + mh, mw);
            let row = &pv[r * row_len..(r + 1) * row_len];
            for t in 0..2 {
                for y in 0..14 {
                    for x in 0..14 {
                        let at = |c: usize| row[((c * 2 + t) * 14 + y) * 14 + x];
                        assert_eq!(at(0), (py * 14 + y) as f32, "row {r} t {t} y {y} x {x}");
                        assert_eq!(at(1), (px * 14 + x) as f32);
                        assert_eq!(at(2), 0.0);
                    }
                }
            }
        }
        assert_eq!(num_placeholder_tokens(grid, 2), 2);
    }

    #[test]
    fn video_pads_odd_frame_count_with_last_frame() {
        let cfg = ImageProcessorConfig { do_rescale: false, do_normalize: false, ..Default::default() };
        let frames: Vec<RgbImage> = (0..3).map(|i| RgbImage::from_pixel(56, 56, image::Rgb([i, 0, 0]))).collect();
        let (pv, grid) = preprocess_video(&frames, &cfg).unwrap();
        assert_eq!(grid, [2, 4, 4]);
        assert_eq!(cfg.grid_thw(3, 56, 56).unwrap(), grid);
        let row_len = 3 * 2 * 14 * 14;
        // Temporal patch 1 (rows 16..32) holds frames 2 and 2 (the repeat).
        let row = &pv[16 * row_len..17 * row_len];
        assert_eq!(row[0], 2.0);
        assert_eq!(row[14 * 14], 2.0);
        let row0 = &pv[..row_len];
        assert_eq!((row0[0], row0[14 * 14]), (0.0, 1.0));
        let mixed = vec![frames[0].clone(), RgbImage::new(28, 56)];
        assert!(matches!(preprocess_video(&mixed, &cfg), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn normalisation_is_torchvision_fused() {
        let cfg = ImageProcessorConfig::default();
        let img = RgbImage::from_pixel(56, 56, image::Rgb([0, 128, 255]));
        let (pv, _) = preprocess_image(&img, &cfg).unwrap();
        let want = |v: f32, c: usize| (v - CLIP_MEAN[c] * 255.0) / (CLIP_STD[c] * 255.0);
        assert_eq!(pv[0], want(0.0, 0));
        assert_eq!(pv[2 * 14 * 14], want(128.0, 1));
        assert_eq!(pv[4 * 14 * 14], want(255.0, 2));
    }
}

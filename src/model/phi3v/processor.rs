//! The prompt side of Phi-3.5-vision: `Phi3VProcessor` of the remote
//! processing_phi3_v.py and `Phi3VImageProcessor` (the HD transform, in
//! [`super::hd`]).
//!
//! A prompt names its images with `<|image_1|>`, `<|image_2|>`, … The
//! remote processor splits the text at those tags and tokenizes every
//! chunk on its own, each with the tokenizer's BOS, then puts image k's
//! run of placeholder tokens where its tag was. It requires the numbers to
//! run 1..n; its feature placement then fills the runs in prompt order, so
//! a tag out of order or repeated would take another image's features:
//! both are refused here with a 400, as are missing numbers and a count of
//! tags that differs from the images sent. The remote code marks image
//! runs with −k; here they are `<|image|>` (the published tokenizer's
//! 32044, as vLLM uses), which the prompt's own text may not contain.
//!
//! Tokens per image with an h×w crop grid and s = 12 merged tokens per
//! crop side: (h·w + 1)·s² + 1 + (h + 1)·s — the crops' and the global
//! view's tokens, a separator after every row of each, and one between
//! them (672² at num_crops 4: 757).

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::config::Phi3VConfig;
use super::hd;
use crate::error::{Error, Result};
use crate::model::contract::{ModelSpec, Processor};
use crate::model::inputs::{ImageEmbeds, Pixels, PreparedInput};
use crate::multimodal::image::{ResizeFilter, RgbImage};
use crate::multimodal::Media;
use crate::text::tokenizer::Tokenizer;

/// The published tokenizer's `<|image|>` id.
pub const PUBLISHED_IMAGE_TOKEN_ID: u32 = 32044;

/// Placeholder tokens of an image with `crops` = [h, w] crops, `side`
/// merged tokens per crop side.
pub fn tokens_for(side: usize, crops: [usize; 2]) -> usize {
    let [h, w] = crops;
    (h * w + 1) * side * side + 1 + (h + 1) * side
}

/// The added tokens (content, id) of the folder's tokenizer.json; none when
/// it is absent or unreadable (the tokenizer's own loading reports that).
fn added_tokens(dir: &Path) -> Vec<(String, u32)> {
    let Some(v) =
        std::fs::read_to_string(dir.join("tokenizer.json")).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok())
    else {
        return Vec::new();
    };
    let list = v.get("added_tokens").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    list.iter().filter_map(|t| Some((t.get("content")?.as_str()?.to_owned(), t.get("id")?.as_u64()? as u32))).collect()
}

/// `<|image|>`'s id among the tokenizer's added tokens, or the published id
/// when the tokenizer does not name it.
fn image_token_id(added: &[(String, u32)], c: &Phi3VConfig) -> Result<u32> {
    let id = added.iter().find(|(t, _)| t == "<|image|>").map_or(PUBLISHED_IMAGE_TOKEN_ID, |&(_, i)| i);
    if id as usize >= c.text_config.vocab_size {
        return Err(Error::Config(format!(
            "the image placeholder `<|image|>` (id {id}) is outside the vocabulary ({}); the tokenizer \
             should list `<|image|>` among its added tokens",
            c.text_config.vocab_size
        )));
    }
    Ok(id)
}

/// The model's facts with the folder's tokenizer: `<|image|>`'s id, and
/// `<|end|>` among the stop tokens. The published generation_config.json
/// stops on `</s>` (2) only, but the model ends its turns with `<|end|>`, as
/// its template writes them.
pub fn spec_in(dir: &Path, c: &Phi3VConfig) -> Result<ModelSpec> {
    let added = added_tokens(dir);
    let mut spec = super::spec(c, image_token_id(&added, c)?);
    if let Some(&(_, end)) = added.iter().find(|(t, _)| t == "<|end|>") {
        if !spec.eos_token_id.contains(&end) {
            spec.eos_token_id.push(end);
        }
    }
    Ok(spec)
}

/// preprocessor_config.json of `Phi3VImageProcessor`, with
/// `--mm-processor-kwargs` applied.
#[derive(Clone, Debug, PartialEq)]
pub struct HdConfig {
    /// Most crops per image (`num_crops`; 4 for several images, 16 for one).
    pub num_crops: usize,
}

impl HdConfig {
    /// The processor's defaults are the class's (`num_crops` 1); the
    /// published file sets 4. Mean and std must be CLIP's, which the HD
    /// transform uses; `num_crops` in `kwargs` wins over the file.
    pub fn read(dir: &Path, kwargs: &serde_json::Map<String, Value>) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let file: Value = match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s)
                .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Object(Default::default()),
            Err(e) => return Err(Error::Io { path: path.display().to_string(), source: e }),
        };
        use crate::model::qwen2_vl::processor::{CLIP_MEAN, CLIP_STD};
        for (key, want) in [("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)] {
            if let Some(v) = file.get(key) {
                let got: Vec<f64> =
                    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
                let same = got.len() == 3 && got.iter().zip(want).all(|(g, w)| (g - w as f64).abs() < 1e-6);
                if !same {
                    return Err(Error::Config(format!(
                        "{}: `{key}` is {v}; the HD transform here normalizes with CLIP's {want:?}",
                        path.display()
                    )));
                }
            }
        }
        let mut num_crops = file.get("num_crops").and_then(Value::as_u64).unwrap_or(1) as usize;
        for (key, v) in kwargs {
            match key.as_str() {
                "num_crops" => {
                    let max = hd::MAX_NUM_CROPS as u64;
                    num_crops = v.as_u64().filter(|&n| (1..=max).contains(&n)).ok_or_else(|| {
                        Error::InvalidInput(format!("--mm-processor-kwargs: `num_crops` must be 1..={max}, got {v}"))
                    })? as usize
                }
                other => {
                    return Err(Error::InvalidInput(format!(
                        "--mm-processor-kwargs: `{other}` is not a setting of Phi-3.5-vision's processor \
                         (it takes `num_crops`)"
                    )))
                }
            }
        }
        if num_crops == 0 {
            return Err(Error::Config(format!("{}: `num_crops` is 0", path.display())));
        }
        Ok(Self { num_crops })
    }
}

pub struct Phi3VProcessor {
    pub config: Phi3VConfig,
    pub hd: HdConfig,
    pub spec: ModelSpec,
}

impl Phi3VProcessor {
    pub fn new(dir: &Path, kwargs: &serde_json::Map<String, Value>) -> Result<Self> {
        let config = Phi3VConfig::from_dir(dir)?;
        let hd = HdConfig::read(dir, kwargs)?;
        let spec = spec_in(dir, &config)?;
        Ok(Self { config, hd, spec })
    }

    pub fn from_dir(dir: &Path, kwargs: &serde_json::Map<String, Value>) -> Result<Arc<dyn Processor>> {
        Ok(Arc::new(Self::new(dir, kwargs)?))
    }

    fn tokens(&self, grid: [usize; 3]) -> usize {
        tokens_for(self.config.merged_side(), [grid[1], grid[2]])
    }
}

/// The `<|image_N|>` tags of `prompt`: (byte start, byte end, N) in order.
pub fn image_tags(prompt: &str) -> Vec<(usize, usize, usize)> {
    const OPEN: &str = "<|image_";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = prompt[from..].find(OPEN).map(|i| from + i) {
        let digits_start = at + OPEN.len();
        let digits = prompt[digits_start..].bytes().take_while(u8::is_ascii_digit).count();
        let end = digits_start + digits;
        if digits > 0 && prompt[end..].starts_with("|>") {
            // A number too large for usize is simply out of range below.
            let n = prompt[digits_start..end].parse().unwrap_or(usize::MAX);
            out.push((at, end + 2, n));
            from = end + 2;
        } else {
            from = digits_start;
        }
    }
    out
}

impl Processor for Phi3VProcessor {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn prepare_prompt(&self, tok: &Tokenizer, prompt: String, media: &[Media]) -> Result<PreparedInput> {
        let tags = image_tags(&prompt);
        for (k, &(_, _, n)) in tags.iter().enumerate() {
            if n != k + 1 {
                let seen: Vec<String> = tags.iter().map(|t| format!("<|image_{}|>", t.2)).collect();
                return Err(Error::InvalidInput(format!(
                    "image tags must be <|image_1|>, <|image_2|>, … in order, each once; the prompt has {}",
                    seen.join(", ")
                )));
            }
        }
        if tags.len() != media.len() {
            return Err(Error::InvalidInput(format!(
                "{} images were given but the prompt has {} image tags (<|image_1|> … <|image_N|>)",
                media.len(),
                tags.len()
            )));
        }
        let (mut images, mut image_embeds) = (Pixels::default(), Vec::new());
        let mut runs = Vec::with_capacity(media.len());
        for (order, m) in media.iter().enumerate() {
            match m {
                Media::Image(img) => {
                    let (values, grid) = self.preprocess_image(img)?;
                    images.values.extend(values);
                    images.grids.push(grid);
                    runs.push(self.tokens(grid));
                }
                Media::ImageEmbeds { values, grid } => {
                    let (tokens, hidden) = (self.tokens(*grid), self.spec.hidden_size());
                    if values.len() != tokens * hidden {
                        return Err(Error::InvalidInput(format!(
                            "image_embeds for a {}×{} crop grid must be ({tokens}, {hidden}), got {} values",
                            grid[1],
                            grid[2],
                            values.len()
                        )));
                    }
                    image_embeds.push(ImageEmbeds { order, grid: *grid, values: values.clone() });
                    runs.push(tokens);
                }
                Media::Video(_) => {
                    return Err(Error::InvalidInput(
                        "this model (Phi-3.5-vision) takes images only; send video as several images".into(),
                    ))
                }
            }
        }
        // Chunks between the tags, each tokenized with its BOS.
        let image = self.spec.image_token_id;
        let mut input_ids = Vec::new();
        let mut expanded = String::with_capacity(prompt.len());
        let mut from = 0;
        for (&(start, end, _), &run) in tags.iter().zip(&runs) {
            input_ids.extend(tok.encode(&prompt[from..start])?);
            input_ids.extend(std::iter::repeat_n(image, run));
            expanded.push_str(&prompt[from..end]);
            from = end;
        }
        input_ids.extend(tok.encode(&prompt[from..])?);
        expanded.push_str(&prompt[from..]);
        let mut input = PreparedInput::text(expanded, input_ids);
        input.images = images;
        input.image_embeds = image_embeds;
        Ok(input)
    }

    /// vLLM's form for Phi-3-vision: `image_embeds` (Σ tokens, hidden) or
    /// (images, tokens, hidden) with `image_sizes` (images, 2), each the
    /// [height, width] of the HD image (multiples of 336) as the processor
    /// returns it; the sizes fix each image's token count.
    fn parse_image_embeds(&self, bytes: &[u8]) -> Result<Vec<Media>> {
        let side = self.config.merged_side();
        let crop = hd::CROP;
        crate::multimodal::embeds::parse_sized_image_embeds(bytes, self.spec.hidden_size(), |[h, w]| {
            if h == 0 || w == 0 || h % crop != 0 || w % crop != 0 {
                return Err(format!("image size [{h}, {w}] must be positive multiples of {crop} (the HD image's)"));
            }
            let crops = [h / crop, w / crop];
            if crops[0].saturating_mul(crops[1]) > self.hd.num_crops.max(1) * 64 {
                return Err(format!("image size [{h}, {w}] is too large"));
            }
            Ok(([1, crops[0], crops[1]], tokens_for(side, crops)))
        })
    }

    fn max_image_pixels(&self) -> usize {
        (self.hd.num_crops + 1) * hd::CROP * hd::CROP
    }

    fn preprocess_image(&self, img: &RgbImage) -> Result<(Vec<f32>, [usize; 3])> {
        let out = hd::hd_transform(img, self.hd.num_crops)?;
        let [h, w] = out.size;
        Ok((out.pixels, [1, h / hd::CROP, w / hd::CROP]))
    }

    fn resize_target(&self, width: usize, height: usize) -> Result<Option<(usize, usize, ResizeFilter)>> {
        let (w, h) = hd::resized_size(width, height, self.hd.num_crops)?;
        Ok(((w, h) != (width, height)).then_some((w, h, ResizeFilter::Bilinear)))
    }

    fn image_grid(&self, width: usize, height: usize) -> Result<[usize; 3]> {
        let [h, w] = hd::hd_size(width, height, self.hd.num_crops)?;
        Ok([1, h / hd::CROP, w / hd::CROP])
    }

    fn image_tokens(&self, grid: [usize; 3]) -> usize {
        self.tokens(grid)
    }

    fn vision_flops(&self, grid: [usize; 3]) -> f64 {
        super::vision_flops(&self.config, [grid[1], grid[2]], self.tokens(grid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_found_with_their_numbers() {
        let p = "<|user|>\n<|image_1|>\nA <|image_2|>B<|image_|> <|image_x|> <|image_12|><|end|>";
        let tags = image_tags(p);
        assert_eq!(tags.iter().map(|t| t.2).collect::<Vec<_>>(), vec![1, 2, 12]);
        for (s, e, n) in tags {
            assert_eq!(&p[s..e], format!("<|image_{n}|>"));
        }
        assert!(image_tags("<|image_99999999999999999999999|>")[0].2 == usize::MAX);
    }

    #[test]
    fn token_counts_follow_the_remote_formula() {
        // calc_num_image_tokens: ((h//336)·(w//336) + 1)·144 + 1 + (h//336 + 1)·12.
        assert_eq!(tokens_for(12, [2, 2]), 757);
        assert_eq!(tokens_for(12, [1, 1]), 313);
        assert_eq!(tokens_for(12, [1, 4]), 5 * 144 + 1 + 24);
        assert_eq!(tokens_for(12, [4, 1]), 5 * 144 + 1 + 60);
    }
}

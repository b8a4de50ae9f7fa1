//! What a prepared prompt carries to the engine, for every family: token
//! ids, positions, and the media as the family's processor prepared it.
//! Built on worker threads by a [`Processor`](super::Processor); consumed
//! on the engine thread by a [`Model`](super::Model).

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// An image whose features were given, not computed.
#[derive(Clone)]
pub struct ImageEmbeds {
    /// Its place among all the prompt's images (0-based).
    pub order: usize,
    /// As in `Media::ImageEmbeds`.
    pub grid: [usize; 3],
    pub values: Vec<f32>, // (tokens, hidden)
}

/// Pixel values of several items, concatenated, with each item's grid. The
/// row layout is the family's (Qwen2-VL: merge-ordered patches of
/// (C, T, P, P); CLIP: one (C, S, S) image per item).
#[derive(Default, Clone)]
pub struct Pixels {
    pub values: Vec<f32>,
    pub grids: Vec<[usize; 3]>, // [t, h, w] in patches, per item
}

/// A prompt ready for the engine.
pub struct PreparedInput {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    /// (3, n) i32 rows: temporal, height, width. Families with 1-D RoPE
    /// keep three equal rows (M-RoPE with equal rows is 1-D RoPE), so one
    /// kernel path and the decode graphs serve every family.
    pub positions: Vec<i32>,
    /// Position of decode token t is t + rope_delta (0 for 1-D RoPE).
    pub rope_delta: i64,
    /// Longrope's table for this sequence (see [`Self::set_rope_table`]).
    pub rope_table: Option<i32>,
    /// The images given as pixels; `image_embeds` the ones given as features.
    pub images: Pixels,
    pub image_embeds: Vec<ImageEmbeds>,
    pub videos: Pixels,
}

impl PreparedInput {
    /// A prompt without media at 1-D positions 0..n.
    pub fn text(prompt: String, input_ids: Vec<u32>) -> Self {
        let n = input_ids.len() as i32;
        PreparedInput {
            prompt,
            positions: (0..3).flat_map(|_| 0..n).collect(),
            input_ids,
            rope_delta: 0,
            rope_table: None,
            images: Pixels::default(),
            image_embeds: Vec::new(),
            videos: Pixels::default(),
        }
    }

    /// Grids of every image, pixel or precomputed, in prompt order.
    pub fn image_grids(&self) -> Vec<[usize; 3]> {
        let mut grids = self.images.grids.clone();
        for e in &self.image_embeds {
            grids.insert(e.order.min(grids.len()), e.grid);
        }
        grids
    }

    /// Whether the prompt carries any media.
    pub fn has_media(&self) -> bool {
        !self.images.grids.is_empty() || !self.image_embeds.is_empty() || !self.videos.grids.is_empty()
    }

    /// Position of token t on `axis` (0 temporal, 1 height, 2 width): the
    /// prompt's own, then t + rope_delta for generated tokens. With a
    /// longrope table set, row 1 holds the table for every token.
    pub fn position(&self, axis: usize, t: usize) -> i32 {
        let n = self.input_ids.len();
        match self.rope_table {
            Some(table) if axis == 1 => table,
            _ if t < n => self.positions[axis * n + t],
            _ => decode_position(t, self.rope_delta) as i32,
        }
    }

    /// Fixes the longrope table of this sequence (0 short, 1 long;
    /// [`crate::model::decoder::LongRope::table_for`]): it goes in position
    /// row 1 of every token, prompt and generated, which the 1-D RoPE of a
    /// longrope decoder reads as its table (row 0 gives the angle).
    pub fn set_rope_table(&mut self, table: i32) {
        let n = self.input_ids.len();
        self.positions[n..2 * n].fill(table);
        self.rope_table = Some(table);
    }
}

/// Position of the token at sequence index `t` (≥ the prompt length) on all
/// three axes: t + rope_delta (transformers' `cache_position + rope_deltas`).
pub fn decode_position(t: usize, rope_delta: i64) -> i64 {
    t as i64 + rope_delta
}

/// Every image's features in prompt order, (Σ rows, hidden): the rows of
/// the images given as pixels come from `pixels` (their features, in
/// order), those given as features from `input.image_embeds`; `rows_of`
/// says how many rows an image of a grid has.
pub fn image_features_in_order(
    dev: &Device,
    hidden: usize,
    input: &PreparedInput,
    pixels: Option<&Tensor>,
    rows_of: impl Fn([usize; 3]) -> usize,
) -> Result<Tensor> {
    let grids = input.image_grids();
    let total: usize = grids.iter().map(|&g| rows_of(g)).sum();
    let mut all = Tensor::empty(dev, &[total, hidden], dev.activation_dtype())?;
    let (mut at, mut px_row) = (0, 0);
    for (i, &g) in grids.iter().enumerate() {
        let n = rows_of(g);
        if let Some(e) = input.image_embeds.iter().find(|e| e.order == i) {
            all.copy_rows_from(at, &Tensor::from_f32(dev, &[n, hidden], &e.values, dev.activation_dtype())?, 0, n)?;
        } else if let Some(px) = pixels {
            all.copy_rows_from(at, px, px_row, n)?;
            px_row += n;
        }
        at += n;
    }
    Ok(all)
}

/// The image features of a prompt for a family whose tower takes all the
/// prompt's pixel images in one call (`encode`, run only when there are
/// some): precomputed ones go among them in prompt order, `rows_of` rows
/// each. No video.
pub fn image_media_features(
    dev: &Device,
    hidden: usize,
    input: &PreparedInput,
    encode: impl FnOnce() -> Result<Tensor>,
    rows_of: impl Fn([usize; 3]) -> usize,
) -> Result<MediaFeatures> {
    let pixels = if input.images.grids.is_empty() { None } else { Some(encode()?) };
    let image = match (pixels, input.image_embeds.is_empty()) {
        (pixels, true) => pixels,
        (pixels, false) => Some(image_features_in_order(dev, hidden, input, pixels.as_ref(), rows_of)?),
    };
    Ok(MediaFeatures { image, video: None })
}

/// A prompt's media features, rows in placeholder order per kind.
pub struct MediaFeatures {
    pub image: Option<Tensor>,
    pub video: Option<Tensor>,
}

/// Writes media features into the rows of `x` whose tokens are
/// placeholders, for prompt tokens start..end: row `row0 + i` of `x` holds
/// prompt token `start + i`. The k-th image placeholder of the prompt takes
/// image feature row k (HF's masked_scatter), likewise for videos.
pub fn place_features(
    x: &mut Tensor,
    row0: usize,
    ids: &[u32],
    (start, end): (usize, usize),
    feats: &MediaFeatures,
    (image_token, video_token): (u32, Option<u32>),
) -> Result<()> {
    let end = end.min(ids.len());
    for (f, token) in [(&feats.image, Some(image_token)), (&feats.video, video_token)] {
        let (Some(f), Some(token)) = (f, token) else { continue };
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

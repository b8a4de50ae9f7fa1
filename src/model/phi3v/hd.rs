//! Phi-3.5-vision's image preprocessing, the "HD transform" of
//! `Phi3VImageProcessor` (`image_processing_phi3_v.py`; the copy in
//! TIGER-AI-Lab/VLM2Vec at c76a1d4e, `src/vlm_backbone/phi3_v/`), step for
//! step, as pure CPU functions:
//!
//! 1. `HD_transform`: an image taller than wide is transposed (PIL
//!    `Image.TRANSPOSE`), so width ≥ height. With ratio = w / h (f64) the
//!    crop grid is `scale` crops wide, the largest s with s·⌈s / ratio⌉ ≤
//!    num_crops, and the image is resized to new_w = 336·scale,
//!    new_h = int(new_w / ratio) by `torchvision.transforms.functional.resize`
//!    on a PIL image: torchvision's default BILINEAR becomes PIL's
//!    `Image.resize(size, BILINEAR)` (antialiased triangle, no box, no
//!    `reducing_gap`), Pillow's 8-bit fixed-point `ImagingResample`
//!    (`ResizeKernel::Pil`), not ATen's.
//! 2. `padding_336`: white rows above and below up to the next multiple of
//!    336, int((target − h) / 2) of them on top (`ImageOps.expand`); then the
//!    transpose is undone.
//! 3. `ToTensor` + `Normalize` in f32: ((v / 255) − mean) / std with CLIP's
//!    mean and std; a sample is one of 256 levels, so this is a table.
//! 4. The global view, `F.interpolate(hd[None], size=(336, 336),
//!    mode="bicubic")` of the normalized f32 image (`global_view`).
//! 5. The HD image cut into 336² crops, row-major. pixel_values is
//!    (1 + crops, 3, 336, 336), global view first; image_size [h, w] is the
//!    padded HD image's. The original then pads pixel_values with zero crops
//!    to num_crops + 1 rows so images stack into a batch; that padding
//!    carries nothing and is left to whoever batches.
//!
//! The image arrives as RGB8, `decode_rgb8`'s output, which stands for the
//! original's `convert_to_rgb` + `convert("RGB")`. For opaque images they
//! are the same; a transparent one is composited onto white there, as
//! transformers ≥ 5.24 does, where the transformers 4.x this code was
//! written against dropped the alpha channel.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::qwen2_vl::processor::{CLIP_MEAN, CLIP_STD};
use crate::multimodal::image::{resize_rgb8_with, ResizeFilter, ResizeKernel, RgbImage};

/// Side of a crop and of the global view, in pixels (CLIP ViT-L/14-336).
pub const CROP: usize = 336;
/// Most crops an image may be cut into. The model card recommends 16 for a
/// single image and 4 for several; 64 is already 9,000 tokens an image, and
/// the bound keeps a configuration typo from allocating gigabytes.
pub const MAX_NUM_CROPS: usize = 64;
/// Tokens per crop after the 2×2 merge of CLIP's 24×24 patches.
const TOKENS_PER_CROP: usize = 144;
/// Token rows per crop; each row ends with a learned separator.
const ROWS_PER_CROP: usize = 12;

/// An image after the HD transform.
#[derive(Debug, Clone, PartialEq)]
pub struct HdImage {
    pub pixels: Vec<f32>, // (1 + crops, 3, CROP, CROP), the global view first
    pub size: [usize; 2], // [h, w] of the padded HD image, multiples of CROP
}

impl HdImage {
    /// The crop grid, [rows, columns].
    pub fn grid(&self) -> [usize; 2] {
        [self.size[0] / CROP, self.size[1] / CROP]
    }

    /// Views in `pixels`: the global one and the crops.
    pub fn views(&self) -> usize {
        1 + self.grid()[0] * self.grid()[1]
    }
}

/// Where `HD_transform` takes an image, in its own frame (width ≥ height
/// after the optional transpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HdPlan {
    transposed: bool,
    new_w: usize,    // resized width, CROP · scale
    new_h: usize,    // resized height, int(new_w / ratio)
    padded_h: usize, // new_h rounded up to a multiple of CROP
}

impl HdPlan {
    /// `HD_transform`'s arithmetic in f64, as Python does it (`calc_hd_transform_size`
    /// is the same code without pixels). Refuses what the original cannot
    /// process either: no pixels, num_crops outside 1..=MAX_NUM_CROPS, or an
    /// image so elongated that new_h is 0 (PIL refuses a 0-row resize).
    fn new(width: usize, height: usize, num_crops: usize) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidInput(format!("the image is {width}x{height}: it has no pixels")));
        }
        if !(1..=MAX_NUM_CROPS).contains(&num_crops) {
            return Err(Error::InvalidInput(format!(
                "num_crops is {num_crops}; Phi-3-vision takes 1 to {MAX_NUM_CROPS} crops an image"
            )));
        }
        let transposed = width < height;
        let (w, h) = if transposed { (height, width) } else { (width, height) };
        let ratio = w as f64 / h as f64;
        // The first s with s·⌈s / ratio⌉ > num_crops, less one. s = 1 always
        // fits (ratio ≥ 1) and ⌈s / ratio⌉ ≥ 1, so 1 ≤ scale ≤ num_crops.
        let mut scale = 1usize;
        while scale as f64 * (scale as f64 / ratio).ceil() <= num_crops as f64 {
            scale += 1;
        }
        scale -= 1;
        let new_w = scale * CROP;
        let new_h = (new_w as f64 / ratio) as usize; // Python int(): truncation
        if new_h == 0 {
            return Err(Error::InvalidInput(format!(
                "the image is {width}x{height}: too elongated; scaled to {new_w} pixels long it has no rows left"
            )));
        }
        Ok(Self { transposed, new_w, new_h, padded_h: new_h.div_ceil(CROP) * CROP })
    }

    /// [h, w] of the padded HD image in the original orientation.
    fn size(&self) -> [usize; 2] {
        if self.transposed {
            [self.new_w, self.padded_h]
        } else {
            [self.padded_h, self.new_w]
        }
    }
}

/// [h, w] of the padded HD image of a `width` x `height` image, without its
/// pixels: the original's `calc_hd_transform_size` (which returns them as
/// width, height). Always equal to `hd_transform`'s `size`.
pub fn hd_size(width: usize, height: usize, num_crops: usize) -> Result<[usize; 2]> {
    Ok(HdPlan::new(width, height, num_crops)?.size())
}

/// The size (width, height) `HD_transform` resizes a `width` x `height`
/// image to before padding, in the image's own orientation (the resize
/// itself runs on the transposed image when it is taller than wide).
pub fn resized_size(width: usize, height: usize, num_crops: usize) -> Result<(usize, usize)> {
    let p = HdPlan::new(width, height, num_crops)?;
    Ok(if p.transposed { (p.new_h, p.new_w) } else { (p.new_w, p.new_h) })
}

/// Placeholder tokens of an image whose padded HD size is `size` = [h, w]
/// (`calc_num_image_tokens`): 144 per crop and for the global view, one
/// separator after each of the 12 token rows of every crop row and of the
/// global view, and one between the crops and the global view:
/// (h/336 · w/336 + 1)·144 + 1 + (h/336 + 1)·12. Python's integer
/// arithmetic, left to right (672² → 757).
pub fn num_image_tokens(size: [usize; 2]) -> usize {
    let [h, w] = size;
    (h / CROP * w / CROP + 1) * TOKENS_PER_CROP + 1 + (h / CROP + 1) * ROWS_PER_CROP
}

/// The padded uint8 HD image `HD_transform` returns (steps 1 and 2): the
/// image resized with Pillow's bilinear filter so its grid of 336² crops
/// fits `num_crops`, and white rows (columns, for a tall image) added
/// evenly on both sides to a multiple of 336.
pub fn hd_image(img: &RgbImage, num_crops: usize) -> Result<RgbImage> {
    let plan = HdPlan::new(img.width() as usize, img.height() as usize, num_crops)?;
    let src = if plan.transposed { Cow::Owned(transpose(img)) } else { Cow::Borrowed(img) };
    let resized =
        resize_rgb8_with(&src, plan.new_w as u32, plan.new_h as u32, ResizeFilter::Bilinear, ResizeKernel::Pil)?;
    let top = (plan.padded_h - plan.new_h) / 2;
    let row = plan.new_w * 3;
    let mut padded = vec![255u8; plan.padded_h * row]; // (padded_h, new_w, 3)
    padded[top * row..][..plan.new_h * row].copy_from_slice(resized.as_raw());
    let padded = RgbImage::from_raw(plan.new_w as u32, plan.padded_h as u32, padded).expect("sized above");
    Ok(if plan.transposed { transpose(&padded) } else { padded })
}

/// PIL `Image.TRANSPOSE`: pixel (x, y) to (y, x).
fn transpose(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut out = vec![0u8; w * h * 3]; // (w, h, 3)
    out.par_chunks_mut(h * 3).enumerate().for_each(|(x, row)| {
        for (y, px) in row.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&src[(y * w + x) * 3..][..3]);
        }
    });
    RgbImage::from_raw(h as u32, w as u32, out).expect("sized above")
}

/// `ToTensor()` then `Normalize(mean, std)` of every uint8 level per
/// channel: v / 255 (a true f32 division, as `div(255)` is), minus the mean,
/// divided by the std, each rounded to f32 as torch's ops do.
fn level_table() -> [[f32; 256]; 3] {
    std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]))
}

/// `HD_transform` and the rest of `Phi3VImageProcessor.preprocess` for one
/// image: pixel_values (1 + crops, 3, 336, 336) with the global view first
/// and the crops row-major, and the padded HD size.
pub fn hd_transform(img: &RgbImage, num_crops: usize) -> Result<HdImage> {
    let hd = hd_image(img, num_crops)?;
    let (h, w) = (hd.height() as usize, hd.width() as usize);
    let table = level_table();
    let (rows, cols) = (h / CROP, w / CROP);
    let view = 3 * CROP * CROP;
    let mut pixels = vec![0f32; (1 + rows * cols) * view];
    let (global, crops) = pixels.split_at_mut(view);
    global_view(hd.as_raw(), h, w, &table, global);
    // The permute of (3, rows, 336, cols, 336) to (rows, cols, 3, 336, 336).
    let src = hd.as_raw();
    crops.par_chunks_mut(view).enumerate().for_each(|(n, out)| {
        let (i, j) = (n / cols, n % cols);
        for (c, plane) in out.chunks_exact_mut(CROP * CROP).enumerate() {
            for (r, line) in plane.chunks_exact_mut(CROP).enumerate() {
                let px = &src[((i * CROP + r) * w + j * CROP) * 3..][..CROP * 3];
                for (o, p) in line.iter_mut().zip(px.chunks_exact(3)) {
                    *o = table[c][usize::from(p[c])];
                }
            }
        }
    });
    Ok(HdImage { pixels, size: [h, w] })
}

/// One axis of ATen's `upsample_bicubic2d` on CPU (align_corners=False, an
/// output size and no scale factor): for output i, four input indices
/// clamped to the border and their f32 weights, as
/// `HelperInterpCubic::compute_indices_weights` computes them in f32:
/// scale = in / out, x = scale·(i + 0.5) − 0.5, i0 = min(⌊x⌋, in − 1),
/// t = clamp(x − i0, 0, 1), Keys' cubic with A = −0.75 at 1 + t, t, 1 − t
/// and 2 − t (`get_cubic_upsample_coefficients`). Every HD side is a
/// multiple of 336, so scale is an integer k, x is exact and t is 0 (k odd:
/// weights 0, 1, 0, 0) or ½.
struct CubicAxis {
    idx: Vec<[usize; 4]>, // (out, 4) input indices
    wts: Vec<[f32; 4]>,   // (out, 4) weights
}

impl CubicAxis {
    fn new(in_size: usize, out_size: usize) -> Self {
        const A: f32 = -0.75;
        let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // cubic_convolution1
        let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // cubic_convolution2
        let scale = in_size as f32 / out_size as f32;
        let last = in_size as i64 - 1;
        let (idx, wts) = (0..out_size)
            .map(|i| {
                let x = scale * (i as f32 + 0.5) - 0.5;
                let i0 = (x.floor() as i64).min(last);
                let t = (x - i0 as f32).clamp(0.0, 1.0);
                let idx = std::array::from_fn(|j| (i0 + j as i64 - 1).clamp(0, last) as usize);
                (idx, [far(t + 1.0), near(t), near(1.0 - t), far((1.0 - t) + 1.0)])
            })
            .unzip();
        Self { idx, wts }
    }
}

/// Σ v_j·w_j in the order and rounding of ATen's `Interpolate<…, 4>::eval`
/// as the x86 builds of torch run it: the compiler contracts
/// `t0·w0 + t1·w1` into fma(t0, w0, t1·w1) and each further `+= t·w` into an
/// fma (measured against torch 2.11 on an AVX-512 CPU: bit for bit, where
/// plain multiply-add differs in the last bit on a third of the outputs).
#[inline(always)]
fn dot4(v: [f32; 4], w: [f32; 4]) -> f32 {
    let acc = v[0].mul_add(w[0], v[1] * w[1]);
    let acc = v[2].mul_add(w[2], acc);
    v[3].mul_add(w[3], acc)
}

/// The global view: the normalized HD image (samples `table[c][level]` of
/// `hd`, (h, w, 3) uint8) resized to 336² by ATen's non-antialiased bicubic
/// on f32 (`upsample_generic_Nd_kernel_impl<2, HelperInterpCubic>`): for
/// each output, the four taps along x summed for each of four rows, those
/// sums summed along y, all in f32 (`dot4`). Writes `out` (3, 336, 336),
/// one row of one channel per task.
fn global_view(hd: &[u8], h: usize, w: usize, table: &[[f32; 256]; 3], out: &mut [f32]) {
    let (ys, xs) = (CubicAxis::new(h, CROP), CubicAxis::new(w, CROP));
    out.par_chunks_mut(CROP).enumerate().for_each(|(r, line)| {
        let (c, oy) = (r / CROP, r % CROP);
        let rows = ys.idx[oy].map(|y| &hd[y * w * 3..][..w * 3]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA, checked just above.
            return unsafe { global_row_fma(rows, &table[c], c, &xs, ys.wts[oy], line) };
        }
        global_row(rows, &table[c], c, &xs, ys.wts[oy], line)
    });
}

/// One output row of channel `c` of the global view from its four input
/// rows (`rows`, RGB8) and their weights `wy`; `levels` maps the channel's
/// uint8 samples to normalized values.
#[inline(always)]
fn global_row(rows: [&[u8]; 4], levels: &[f32; 256], c: usize, xs: &CubicAxis, wy: [f32; 4], line: &mut [f32]) {
    // No closures here: `global_row_fma` needs all of this inlined into it
    // to get the FMA instructions, and dev builds do not inline closures.
    #[inline(always)]
    fn taps(row: &[u8], levels: &[f32; 256], c: usize, xi: [usize; 4], wx: [f32; 4]) -> f32 {
        let at = |k: usize| levels[usize::from(row[xi[k] * 3 + c])];
        dot4([at(0), at(1), at(2), at(3)], wx)
    }
    for (ox, o) in line.iter_mut().enumerate() {
        let (xi, wx) = (xs.idx[ox], xs.wts[ox]);
        let t = [
            taps(rows[0], levels, c, xi, wx),
            taps(rows[1], levels, c, xi, wx),
            taps(rows[2], levels, c, xi, wx),
            taps(rows[3], levels, c, xi, wx),
        ];
        *o = dot4(t, wy);
    }
}

/// `global_row` compiled with FMA, so each `mul_add` is one instruction
/// rather than a call to libm's `fmaf`; the result is the same (both are
/// the correctly rounded fused multiply-add), ~10× faster.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn global_row_fma(
    rows: [&[u8]; 4],
    levels: &[f32; 256],
    c: usize,
    xs: &CubicAxis,
    wy: [f32; 4],
    line: &mut [f32],
) {
    global_row(rows, levels, c, xs, wy, line)
}

#[cfg(test)]
#[path = "hd_tests.rs"]
mod tests;

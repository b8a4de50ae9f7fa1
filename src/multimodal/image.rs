//! Image decoding with limits, and the antialiased resize the Qwen2-VL
//! preprocessor uses.
//!
//! Decoding mirrors what Hugging Face does to an image it loads itself:
//! `transformers.image_utils.load_image` applies the EXIF orientation
//! (`PIL.ImageOps.exif_transpose`), and `image_transforms.convert_to_rgb`
//! composites any transparency onto a white background (PIL's integer
//! `alpha_composite`) before dropping alpha. That is transformers 5.24's
//! rule, and qwen-vl-utils' and vLLM's; 5.17 and 4.x called plain
//! `convert("RGB")`, which drops alpha and leaves transparent pixels at
//! whatever colour they store (often black).
//!
//! The resize is torch's `interpolate(mode="bicubic", antialias=True)` on a
//! uint8 CPU tensor, which is what torchvision's `resize` runs for the default
//! (torchvision-backend) HF image processors: ATen `UpSampleKernel.cpp`,
//! `HelperInterpBase::_compute_index_ranges_int16_weights` for the weights and
//! `UpSampleKernelAVXAntialias.h` (or `basic_loop_aa_*<uint8_t>`, the same
//! integer arithmetic) for the two passes; it matches torch bit for bit
//! (tests/preprocess.rs, and a sweep of 614 random sizes run once).
//!
//! It is the same filter as PIL's `Image.resize` (a separable triangle or
//! Keys cubic, a = -0.5, support widened by the downscale factor: the same
//! f64 weights, bounds and centres, term for term, for a resize of the whole
//! image), and `resize_rgb8_with(.., ResizeKernel::Pil)` is the PIL variant
//! (libImaging `Resample.c`, Pillow 13.0; bit for bit against Pillow in
//! src/model/phi3v/hd_tests.rs). They differ twice: torch's weights are
//! int16 with a per-axis precision where PIL uses int32 with 22 bits (±1
//! level on ~0.2–0.9% of values, measured), and Pillow 13 runs the vertical
//! pass first when the height shrinks and the width does not, where torch
//! always starts with the horizontal one; the uint8 clamp between the passes
//! then differs by up to ~20 levels on sharp edges.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use rayon::prelude::*;

pub use image::RgbImage;

use crate::error::{Error, Result};

/// PIL's `Image.MAX_IMAGE_PIXELS` (its decompression-bomb threshold): a sane
/// default for `decode_rgb8`'s `max_pixels` when the caller has no opinion.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;
/// Widest aspect ratio (long side / short side) an image may have: Qwen2-VL's
/// `smart_resize` refuses more than 200, and checking it from the header
/// spares decoding a 1×80-million-pixel strip only to refuse it then.
pub const MAX_ASPECT_RATIO: u32 = 200;
/// Shortest side an image may have: a picture one pixel high or wide (a
/// tracking pixel, a spacer) carries nothing a vision model can use.
pub const MIN_SIDE: u32 = 2;

/// The pixel_values value of every uint8 level in each channel, after an
/// optional rescale (`rescale_factor`) and normalize (mean, std).
///
/// torchvision `rescale_and_normalize`: with both on, mean and std are
/// scaled by 1/rescale_factor (f32 tensor times a Python float, i.e. in
/// f32) and the image is normalized in f32: (x - m) / s. A sample is one of
/// 256 levels, so the formula runs 768 times here and the pass over the
/// pixels is a look-up: the same f32 operations, so the same bits, without
/// a division per sample.
pub fn level_table(rescale: Option<f64>, normalize: Option<([f32; 3], [f32; 3])>) -> [[f32; 256]; 3] {
    let (mean, std, scale) = match (rescale, normalize) {
        (Some(r), Some((m, s))) => {
            let inv = (1.0 / r) as f32;
            (m.map(|m| m * inv), s.map(|s| s * inv), 1.0)
        }
        (None, Some((m, s))) => (m, s, 1.0),
        (Some(r), None) => ([0.0; 3], [1.0; 3], r as f32),
        (None, None) => ([0.0; 3], [1.0; 3], 1.0),
    };
    std::array::from_fn(|c| {
        std::array::from_fn(|level| {
            let v = level as f32;
            if normalize.is_some() {
                (v - mean[c]) / std[c]
            } else {
                v * scale
            }
        })
    })
}

/// Decode an encoded image (JPEG, PNG, WebP, GIF: first frame, BMP) to RGB8.
///
/// The dimensions are read from the header alone and checked (`check_size`)
/// before a decoder is built, so a small file that claims a huge image (a
/// decompression bomb) costs nothing. The decoder then runs under image's
/// `Limits`: the size the header gave, and an allocation cap from it, so a
/// decoder that allocates more than that size needs fails instead. EXIF
/// orientation is applied and transparency is composited onto white, as HF's
/// `load_image` + `convert_to_rgb` do.
///
/// Every failure is `InvalidInput` in words about the image, never the
/// decoder's own message (chunk names, offsets, Debug output).
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::InvalidInput("the image is empty (0 bytes)".into()));
    }
    // Reading from memory cannot fail; only the format guess can come back empty.
    let guessed = ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok().and_then(|r| r.format());
    let Some(format) = guessed else {
        return Err(Error::InvalidInput(
            "the data is not an image in a format we read (JPEG, PNG, WebP, GIF, BMP)".into(),
        ));
    };
    let (w, h) =
        ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(|e| decode_error(format, e))?;
    check_size(w, h, max_pixels)?;

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // The output buffer at up to 16 bytes a pixel (RGBA f32) plus slack for
    // the decoder's own state.
    limits.max_alloc = Some((u64::from(w) * u64::from(h)).saturating_mul(16).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let orientation = decoder.orientation().map_err(|e| decode_error(format, e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

/// Refuses, from the header's width and height, an image with no pixels, a
/// side under `MIN_SIDE`, more than `max_pixels`, or an aspect ratio over
/// `MAX_ASPECT_RATIO`.
pub fn check_size(w: u32, h: u32, max_pixels: u64) -> Result<()> {
    let bad = |why: String| Err(Error::InvalidInput(format!("the image is {w}x{h}: {why}")));
    let pixels = u64::from(w) * u64::from(h);
    let (long, short) = (w.max(h), w.min(h));
    if pixels == 0 {
        bad("it has no pixels".into())
    } else if short < MIN_SIDE {
        bad(format!("each side must be at least {MIN_SIDE} pixels"))
    } else if pixels > max_pixels {
        bad(format!("{pixels} pixels, more than the {max_pixels} allowed; send a smaller image"))
    } else if u64::from(long) > u64::from(short) * u64::from(MAX_ASPECT_RATIO) {
        let ratio = f64::from(long) / f64::from(short);
        bad(format!("an aspect ratio of {ratio:.1}, more than the {MAX_ASPECT_RATIO} allowed; crop or pad it"))
    } else {
        Ok(())
    }
}

/// A decoder's failure in words about the image. The decoder's own message
/// is left out: it describes the decoder's internals, not what to send.
fn decode_error(format: image::ImageFormat, e: image::ImageError) -> Error {
    let name = format.extensions_str().first().copied().unwrap_or("image").to_uppercase();
    let why = match e {
        image::ImageError::Limits(_) => "decoding it needs more memory than an image of its size may use",
        image::ImageError::Unsupported(_) => "it uses a feature of the format that is not supported",
        _ => "the data is malformed or truncated",
    };
    Error::InvalidInput(format!("could not decode the {name} image: {why}"))
}

/// Any colour type to RGB8 the way HF's `convert_to_rgb` does it with PIL:
/// grey is replicated, alpha is composited onto opaque white, 16-bit samples
/// keep their high byte (PIL reads 16-bit PNG as `RGB;16B`).
pub fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(g) => map_pixels(w, h, g.as_raw(), 1, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(ga) => {
            map_pixels(w, h, ga.as_raw(), 2, |p| composite_on_white([p[0], p[0], p[0]], p[1]))
        }
        DynamicImage::ImageRgba8(rgba) => {
            map_pixels(w, h, rgba.as_raw(), 4, |p| composite_on_white([p[0], p[1], p[2]], p[3]))
        }
        DynamicImage::ImageLuma16(g) => {
            let hi: Vec<u8> = g.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
            map_pixels(w, h, &hi, 1, |p| [p[0]; 3])
        }
        DynamicImage::ImageLumaA16(ga) => {
            let hi: Vec<u8> = ga.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
            map_pixels(w, h, &hi, 2, |p| composite_on_white([p[0], p[0], p[0]], p[1]))
        }
        DynamicImage::ImageRgb16(rgb) => {
            let hi: Vec<u8> = rgb.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
            RgbImage::from_raw(w, h, hi).expect("buffer size matches dimensions")
        }
        DynamicImage::ImageRgba16(rgba) => {
            let hi: Vec<u8> = rgba.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
            map_pixels(w, h, &hi, 4, |p| composite_on_white([p[0], p[1], p[2]], p[3]))
        }
        other => {
            let rgba = other.to_rgba8();
            map_pixels(w, h, rgba.as_raw(), 4, |p| composite_on_white([p[0], p[1], p[2]], p[3]))
        }
    }
}

fn map_pixels(w: u32, h: u32, src: &[u8], channels: usize, f: impl Fn(&[u8]) -> [u8; 3]) -> RgbImage {
    let mut out = Vec::with_capacity(src.len() / channels * 3);
    for p in src.chunks_exact(channels) {
        out.extend_from_slice(&f(p));
    }
    RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions")
}

/// PIL `Image.alpha_composite(white, src)` for one pixel (libImaging
/// `AlphaComposite.c`, 7 extra bits of precision, divisions by 255 rounded
/// with the shift trick), then `.convert("RGB")`.
fn composite_on_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    if a == 0 {
        return [255; 3];
    }
    let sa = u32::from(a);
    let blend = 255 * (255 - sa); // dst alpha is 255
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    rgb.map(|c| {
        let tmp = u32::from(c) * coef1 + 255 * coef2;
        (shift_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    })
}

/// Whose integer arithmetic an antialiased resize reproduces (see the module
/// notes for how the two differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeKernel {
    /// torch's uint8 `interpolate(..., antialias=True)`: int16 weights with
    /// a per-axis precision, the horizontal pass first.
    Torch,
    /// Pillow's `Image.resize` (`ImagingResample`): int32 weights with 22
    /// fractional bits, the vertical pass first when the height shrinks and
    /// the width does not.
    Pil,
}

/// Filter of an antialiased resize, by its PIL name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeFilter {
    /// Triangle, support 1 (PIL `BILINEAR` = 2).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (PIL `BICUBIC` = 3).
    Bicubic,
}

impl ResizeFilter {
    /// From PIL's `Image.Resampling` number, as preprocessor_config.json stores it.
    pub fn from_pil(resample: u32) -> Option<Self> {
        match resample {
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    /// Taps of the filter at scale 1 (ATen `interp_size`).
    fn interp_size(self) -> usize {
        match self {
            Self::Bilinear => 2,
            Self::Bicubic => 4,
        }
    }

    /// ATen `HelperInterpLinear::aa_filter` / `HelperInterpCubic::aa_filter`
    /// (a = -0.5), evaluated in the same order so the f64 weights match bit
    /// for bit. Pillow's `bilinear_filter` is the same expression, and its
    /// `bicubic_filter` writes the outer lobe `(((x - 5) x + 8) x - 4) a`,
    /// which with a = -0.5 rounds identically (each step of ATen's spelling
    /// is Pillow's scaled by -0.5, and scaling by a power of two commutes
    /// with rounding), so one `eval` serves both kernels.
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// One axis of a separable resize: for output index i, taps
/// `start[i] .. start[i] + len[i]` of the input with integer weights
/// `weights[i * ksize ..][.. len[i]]`, fixed point with `precision` bits
/// (int16 values for torch, int32 for PIL; both accumulate in i32).
struct AxisPlan {
    start: Vec<usize>, // (out,)
    len: Vec<usize>,   // (out,)
    ksize: usize,
    weights: Vec<i32>, // (out, ksize)
    precision: u32,
}

impl AxisPlan {
    /// The f64 weights are ATen `_compute_indices_min_size_weights_aa` with
    /// antialias=true, align_corners=false and no explicit scale factor
    /// (torchvision passes a size), which is also Pillow's
    /// `precompute_coeffs` for a box of the whole image: the same scale,
    /// support, centre, bounds and normalisation, term for term.
    ///
    /// To fixed point: torch (`_compute_index_ranges_int16_weights`) picks the
    /// largest precision ≤ 22 at which the biggest weight fits in int16;
    /// Pillow (`normalize_coeffs_8bpc`) always uses PRECISION_BITS =
    /// 32 - 8 - 2 = 22 in int32. Both round half away from zero.
    fn new(in_size: usize, out_size: usize, filter: ResizeFilter, kernel: ResizeKernel) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let half = filter.interp_size() as f64 * 0.5;
        let support = if scale >= 1.0 { half * scale } else { half };
        let ksize = support.ceil() as usize * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut wf = vec![0f64; out_size * ksize];
        let mut wt_max = 0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            // C casts truncate toward zero; `as i64` does too.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let w = &mut wf[i * ksize..(i + 1) * ksize];
            let mut total = 0f64;
            for (j, wj) in w.iter_mut().enumerate().take(n) {
                *wj = filter.eval(((j as i64 + xmin) as f64 - center + 0.5) * invscale);
                total += *wj;
            }
            if total != 0.0 {
                for wj in w.iter_mut().take(n) {
                    *wj /= total;
                    wt_max = wt_max.max(*wj);
                }
            }
            start.push(xmin as usize);
            len.push(n);
        }

        let precision = match kernel {
            ResizeKernel::Pil => 22,
            ResizeKernel::Torch => {
                let mut precision = 0u32;
                while precision < 22 {
                    let next = (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i32;
                    if next >= 1 << 15 {
                        break;
                    }
                    precision += 1;
                }
                precision
            }
        };
        let one = f64::from(1u32 << precision);
        let weights = wf
            .iter()
            .map(|&w| {
                let v = w * one;
                let fixed = if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 };
                match kernel {
                    ResizeKernel::Torch => i32::from(fixed as i16),
                    ResizeKernel::Pil => fixed,
                }
            })
            .collect();
        Self { start, len, ksize, weights, precision }
    }

    /// First input index and the weights of output `i`.
    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (self.start[i], &self.weights[i * self.ksize..][..self.len[i]])
    }

    /// The rounding offset every accumulator starts from.
    #[inline]
    fn bias(&self) -> i32 {
        1 << (self.precision - 1)
    }

    /// An accumulator back to a sample: drop the fixed point and clamp
    /// (ATen's `std::clamp(output >> weights_precision, 0, 255)`, Pillow's
    /// `clip8`).
    #[inline]
    fn to_u8(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Horizontal pass: each row of `src` (RGB rows of `in_w` pixels) filtered
/// along x into the same row of `dst` (rows of `plan`'s output width).
/// Per output pixel the taps are one contiguous run of input pixels, so the
/// loop walks them with `chunks_exact` and no index arithmetic; the sums are
/// integers, so their order does not change the result.
fn resize_rows(src: &[u8], in_w: usize, plan: &AxisPlan, dst: &mut [u8]) {
    let out_w = plan.start.len();
    dst.par_chunks_mut(out_w * 3).zip(src.par_chunks(in_w * 3)).for_each(|(out, row)| {
        for (x, px) in out.chunks_exact_mut(3).enumerate() {
            let (start, w) = plan.taps(x);
            let mut acc = [plan.bias(); 3];
            for (tap, &wk) in row[start * 3..].chunks_exact(3).zip(w) {
                for (a, &v) in acc.iter_mut().zip(tap) {
                    *a += i32::from(v) * wk;
                }
            }
            for (p, &a) in px.iter_mut().zip(&acc) {
                *p = plan.to_u8(a);
            }
        }
    });
}

/// Vertical pass: row y of `dst` is the weighted sum of `plan`'s input rows
/// of `src` (rows of `row_len` samples). A row is done in runs of `LANES`
/// samples so the accumulators stay in registers while the inner loop, one
/// input row times one weight, runs over contiguous bytes and vectorises.
fn resize_columns(src: &[u8], row_len: usize, plan: &AxisPlan, dst: &mut [u8]) {
    const LANES: usize = 64;
    dst.par_chunks_mut(row_len).enumerate().for_each(|(y, out)| {
        let (start, w) = plan.taps(y);
        let rows = &src[start * row_len..(start + w.len()) * row_len];
        for (j, out) in out.chunks_mut(LANES).enumerate() {
            let mut acc = [plan.bias(); LANES];
            for (row, &wk) in rows.chunks_exact(row_len).zip(w) {
                for (a, &v) in acc.iter_mut().zip(&row[j * LANES..][..out.len()]) {
                    *a += i32::from(v) * wk;
                }
            }
            for (o, &a) in out.iter_mut().zip(&acc) {
                *o = plan.to_u8(a);
            }
        }
    });
}

/// Antialiased separable resize of an RGB8 image to `width` x `height`, as
/// torch's uint8 `interpolate(..., antialias=True)` computes it: a horizontal
/// pass into a uint8 buffer, then a vertical pass; an axis whose size does
/// not change is skipped. Rows are spread over rayon's pool.
pub fn resize_rgb8(src: &RgbImage, width: u32, height: u32, filter: ResizeFilter) -> Result<RgbImage> {
    resize_rgb8_with(src, width, height, filter, ResizeKernel::Torch)
}

/// `resize_rgb8` with `kernel`'s arithmetic: `ResizeKernel::Pil` is
/// Pillow 13's `Image.resize(size, filter)` on an RGB image (no box, no
/// `reducing_gap`), whose `ImagingResampleInner` runs the vertical pass
/// first when the height shrinks and the width does not.
pub fn resize_rgb8_with(
    src: &RgbImage,
    width: u32,
    height: u32,
    filter: ResizeFilter,
    kernel: ResizeKernel,
) -> Result<RgbImage> {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return Err(Error::InvalidInput(format!("cannot resize a {in_w}x{in_h} image to {out_w}x{out_h}")));
    }
    let horizontal = |cur: &[u8], rows: usize| {
        let mut dst = vec![0u8; rows * out_w * 3]; // (rows, out_w, 3)
        resize_rows(cur, in_w, &AxisPlan::new(in_w, out_w, filter, kernel), &mut dst);
        dst
    };
    let vertical = |cur: &[u8], cols: usize| {
        let mut dst = vec![0u8; out_h * cols * 3]; // (out_h, cols, 3)
        resize_columns(cur, cols * 3, &AxisPlan::new(in_h, out_h, filter, kernel), &mut dst);
        dst
    };
    let vertical_first = kernel == ResizeKernel::Pil && out_w >= in_w && out_h < in_h;
    let out = match (out_w != in_w, out_h != in_h) {
        (false, false) => src.as_raw().clone(),
        (true, false) => horizontal(src.as_raw(), in_h),
        (false, true) => vertical(src.as_raw(), in_w),
        (true, true) if vertical_first => horizontal(&vertical(src.as_raw(), in_w), out_h),
        (true, true) => vertical(&horizontal(src.as_raw(), in_h), out_w),
    };
    Ok(RgbImage::from_raw(width, height, out).expect("buffer size matches dimensions"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;
    use image::{ImageFormat, Rgba, RgbaImage};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_and_checks_limits() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        let png = encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Png);
        assert_eq!(decode_rgb8(&png, 35).unwrap(), img);
        let err = decode_rgb8(&png, 34).unwrap_err().to_string();
        assert!(err.contains("7x5") && err.contains("34"), "{err}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    /// A PNG whose header claims `w` x `h` RGB8 pixels, followed by `idat`
    /// as its only image data: a decompression bomb's shape, without the bomb.
    fn png_claiming(w: u32, h: u32, idat: &[u8]) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8; 4], data: &[u8]| {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let body = [kind.as_slice(), data].concat();
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
        };
        let ihdr = [w.to_be_bytes().as_slice(), &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", idat);
        chunk(b"IEND", &[]);
        out
    }

    /// A GIF whose screen and one frame are `w` x `h`, the frame holding no
    /// pixel data.
    fn gif_claiming(w: u16, h: u16) -> Vec<u8> {
        let size = [w.to_le_bytes(), h.to_le_bytes()].concat();
        let screen = [b"GIF89a".as_slice(), &size, &[0, 0, 0]].concat();
        // Image descriptor at (0, 0), then LZW minimum code size 2, no data blocks, trailer.
        [screen.as_slice(), &[0x2c, 0, 0, 0, 0], &size, &[0, 2, 0, 0x3b]].concat()
    }

    fn invalid(r: Result<RgbImage>) -> String {
        match r {
            Err(e @ Error::InvalidInput(_)) => e.to_string(),
            Err(e) => panic!("expected InvalidInput, got {e}"),
            Ok(img) => panic!("expected an error, got a {}x{} image", img.width(), img.height()),
        }
    }

    #[test]
    fn the_crc_matches_a_real_png() {
        // The fixtures are only believable if their CRCs are right: check
        // the helper on the IHDR chunk of a PNG the image crate wrote.
        let png = encode(&DynamicImage::ImageRgb8(RgbImage::new(3, 2)), ImageFormat::Png);
        let ihdr = &png[12..12 + 4 + 13];
        assert_eq!(crc32(ihdr).to_be_bytes(), png[29..33]);
        assert_eq!(png_claiming(3, 2, &[])[..33], png[..33]);
    }

    #[test]
    fn decompression_bombs_are_refused_from_the_header() {
        // 10^10 pixels claimed in 60 bytes; refused before any decoding.
        let start = std::time::Instant::now();
        let bomb = png_claiming(100_000, 100_000, &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        let e = invalid(decode_rgb8(&bomb, DEFAULT_MAX_PIXELS));
        assert!(e.contains("100000x100000: 10000000000 pixels, more than the 89478485 allowed"), "{e}");
        let e = invalid(decode_rgb8(&gif_claiming(65_535, 65_535), DEFAULT_MAX_PIXELS));
        assert!(e.contains("65535x65535: 4294836225 pixels"), "{e}");
        assert!(start.elapsed() < std::time::Duration::from_millis(500), "{:?}", start.elapsed());
    }

    #[test]
    fn degenerate_sizes_are_refused() {
        let cases = [
            (0, 5, "0x5: it has no pixels"),
            (5, 0, "5x0: it has no pixels"),
            (1, 1, "1x1: each side must be at least 2 pixels"),
            (1, 50, "1x50: each side must be at least 2 pixels"),
            (2, 401, "2x401: an aspect ratio of 200.5, more than the 200 allowed"),
            (90_000, 300, "90000x300: an aspect ratio of 300.0"),
        ];
        for (w, h, want) in cases {
            let e = check_size(w, h, DEFAULT_MAX_PIXELS).unwrap_err().to_string();
            assert!(e.contains(want), "{w}x{h}: {e}");
        }
        for (w, h) in [(2, 2), (2, 400), (400, 2), (9459, 9459)] {
            assert!(check_size(w, h, DEFAULT_MAX_PIXELS).is_ok(), "{w}x{h}");
        }
        // Through the decoder: real files, refused by their header.
        let one = encode(&DynamicImage::ImageRgb8(RgbImage::new(1, 1)), ImageFormat::Png);
        assert!(invalid(decode_rgb8(&one, 100)).contains("1x1: each side"));
        let strip = encode(&DynamicImage::ImageRgb8(RgbImage::new(402, 2)), ImageFormat::Png);
        assert!(invalid(decode_rgb8(&strip, 10_000)).contains("402x2: an aspect ratio of 201.0"));
        let e = invalid(decode_rgb8(&gif_claiming(0, 7), 100));
        assert!(e.contains("0x7"), "{e}");
    }

    #[test]
    fn malformed_images_give_a_plain_message() {
        let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
        let png = encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Png);
        let mut bad_crc = png.clone();
        bad_crc[40] ^= 0xff; // inside the IDAT chunk
        let cases = [
            (png[..png.len() / 2].to_vec(), "PNG"),
            (bad_crc, "PNG"),
            // Within the pixel limit, but the promised pixels never come.
            (png_claiming(3000, 3000, &[0x78, 0x9c]), "PNG"),
            (gif_claiming(10, 10), "GIF"),
        ];
        for (bytes, name) in cases {
            let e = invalid(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS));
            assert!(e.starts_with(&format!("could not decode the {name} image: ")), "{e}");
            for internal in ["Chunk", "crc", "CRC", "{", "Some(", "0x", "Format error"] {
                assert!(!e.contains(internal), "{e}");
            }
        }
    }

    #[test]
    fn rejects_garbage_and_truncated_data() {
        assert!(matches!(decode_rgb8(b"", 100), Err(Error::InvalidInput(_))));
        let err = decode_rgb8(b"hello, not an image", 100).unwrap_err().to_string();
        assert!(err.contains("not an image"), "{err}");
        let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let png = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let err = decode_rgb8(&png[..png.len() / 2], 1 << 20).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }

    #[test]
    fn alpha_is_composited_on_white() {
        // Image.alpha_composite(white, (r, g, b, a)) in Pillow 13; the formula
        // matches it on all 256 x 256 (value, alpha) pairs (checked once in Python).
        assert_eq!(composite_on_white([10, 20, 30], 0), [255, 255, 255]);
        for c in 0..=255u8 {
            assert_eq!(composite_on_white([c, c, c], 255), [c, c, c]);
        }
        // Half transparent black on white is mid grey.
        assert_eq!(composite_on_white([0, 0, 0], 128)[0], 127);
        let rgba = RgbaImage::from_pixel(2, 2, Rgba([0, 0, 0, 0]));
        let png = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        assert_eq!(decode_rgb8(&png, 4).unwrap().get_pixel(1, 1).0, [255, 255, 255]);
    }

    #[test]
    fn grey_is_replicated() {
        let g = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 50 + y) as u8]));
        let png = encode(&DynamicImage::ImageLuma8(g), ImageFormat::Png);
        let rgb = decode_rgb8(&png, 6).unwrap();
        assert_eq!(rgb.get_pixel(2, 1).0, [101, 101, 101]);
    }

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage::from_fn(9, 4, |x, y| image::Rgb([x as u8 * 20, y as u8 * 60, 3]));
        assert_eq!(resize_rgb8(&img, 9, 4, ResizeFilter::Bicubic).unwrap(), img);
        // A flat image stays flat under a normalised filter, up or down.
        let flat = RgbImage::from_pixel(13, 7, image::Rgb([200, 17, 99]));
        for (w, h) in [(5, 3), (28, 56), (13, 20)] {
            let out = resize_rgb8(&flat, w, h, ResizeFilter::Bicubic).unwrap();
            assert!(out.pixels().all(|p| p.0 == [200, 17, 99]), "{w}x{h}");
        }
    }

    /// The straightforward resize: every output sample sums its taps by
    /// index, as the code before the row-wise passes did. It shares the plan
    /// (the weights, which the HF and Pillow goldens pin) and checks the fast
    /// loops and the pass order.
    fn resize_reference(
        src: &RgbImage,
        width: u32,
        height: u32,
        filter: ResizeFilter,
        kernel: ResizeKernel,
    ) -> RgbImage {
        let sample = |plan: &AxisPlan, i: usize, at: &dyn Fn(usize) -> u8| {
            let (start, w) = plan.taps(i);
            let acc = (0..w.len()).fold(plan.bias(), |acc, k| acc + i32::from(at(start + k)) * w[k]);
            plan.to_u8(acc)
        };
        let (mut w, mut h) = (src.width() as usize, src.height() as usize);
        let (out_w, out_h) = (width as usize, height as usize);
        let mut cur = src.as_raw().clone();
        let vertical_first = kernel == ResizeKernel::Pil && out_w >= w && out_h < h;
        for pass in if vertical_first { ["v", "h"] } else { ["h", "v"] } {
            if pass == "h" && out_w != w {
                let plan = AxisPlan::new(w, out_w, filter, kernel);
                let mut next = vec![0u8; h * out_w * 3];
                for y in 0..h {
                    for x in 0..out_w {
                        for c in 0..3 {
                            next[(y * out_w + x) * 3 + c] = sample(&plan, x, &|k| cur[(y * w + k) * 3 + c]);
                        }
                    }
                }
                (cur, w) = (next, out_w);
            }
            if pass == "v" && out_h != h {
                let plan = AxisPlan::new(h, out_h, filter, kernel);
                let mut next = vec![0u8; out_h * w * 3];
                for y in 0..out_h {
                    for x in 0..w {
                        for c in 0..3 {
                            next[(y * w + x) * 3 + c] = sample(&plan, y, &|k| cur[(k * w + x) * 3 + c]);
                        }
                    }
                }
                (cur, h) = (next, out_h);
            }
        }
        RgbImage::from_raw(width, height, cur).unwrap()
    }

    #[test]
    fn fast_resize_matches_the_reference() {
        let mut rng = Rng::from_seed(11);
        // Noise, so bicubic overshoots and the clamp is exercised. Sizes:
        // primes, one-pixel sides, each axis up, down and unchanged, heavy
        // downscales (hundreds of taps), rows longer and shorter than a run
        // of the vertical pass, and the height shrinking as the width grows
        // (Pillow's vertical-first order).
        for (iw, ih, ow, oh) in [
            (37, 23, 58, 11),
            (1, 1, 5, 3),
            (97, 61, 97, 140),
            (131, 7, 3, 7),
            (640, 17, 29, 251),
            (23, 300, 41, 9),
            (3, 2, 1, 1),
            (1021, 5, 1036, 5),
        ] {
            let img = RgbImage::from_fn(iw, ih, |_, _| {
                let v = rng.next_u64();
                image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
            });
            for filter in [ResizeFilter::Bicubic, ResizeFilter::Bilinear] {
                for kernel in [ResizeKernel::Torch, ResizeKernel::Pil] {
                    let want = resize_reference(&img, ow, oh, filter, kernel);
                    let got = resize_rgb8_with(&img, ow, oh, filter, kernel).unwrap();
                    assert_eq!(got, want, "{iw}x{ih} -> {ow}x{oh} {filter:?} {kernel:?}");
                }
            }
        }
    }

    #[test]
    fn pil_differs_from_torch_only_by_rounding_and_order() {
        // Same f64 weights: on a smooth image (no clamping between the
        // passes) the two kernels agree to a level; on noise with the
        // height shrinking as the width grows, the pass order shows.
        let smooth = RgbImage::from_fn(97, 61, |x, y| image::Rgb([(x * 2) as u8, (y * 4) as u8, (x + y) as u8]));
        let noise = {
            let mut rng = Rng::from_seed(5);
            RgbImage::from_fn(40, 90, |_, _| image::Rgb([(rng.next_u64() as u8) & 0xf0; 3]))
        };
        let (a, b) = (
            resize_rgb8_with(&smooth, 150, 40, ResizeFilter::Bicubic, ResizeKernel::Torch).unwrap(),
            resize_rgb8_with(&smooth, 150, 40, ResizeFilter::Bicubic, ResizeKernel::Pil).unwrap(),
        );
        let max = a.as_raw().iter().zip(b.as_raw()).map(|(&p, &q)| p.abs_diff(q)).max().unwrap();
        assert!(max <= 1, "{max}");
        let (a, b) = (
            resize_rgb8_with(&noise, 70, 31, ResizeFilter::Bicubic, ResizeKernel::Torch).unwrap(),
            resize_rgb8_with(&noise, 70, 31, ResizeFilter::Bicubic, ResizeKernel::Pil).unwrap(),
        );
        let max = a.as_raw().iter().zip(b.as_raw()).map(|(&p, &q)| p.abs_diff(q)).max().unwrap();
        assert!(max > 1, "{max}");
    }

    #[test]
    fn int16_weights_sum_to_one() {
        for (i, o) in [(640, 644), (100, 28), (1000, 56), (20, 56), (1024, 1036)] {
            let plan = AxisPlan::new(i, o, ResizeFilter::Bicubic, ResizeKernel::Torch);
            assert!(plan.precision > 8 && plan.precision <= 22);
            for x in 0..o {
                let s: i32 = plan.weights[x * plan.ksize..][..plan.len[x]].iter().sum();
                let one = 1i32 << plan.precision;
                assert!((s - one).abs() <= plan.len[x] as i32, "{i}->{o} at {x}: {s} vs {one}");
            }
        }
    }
}

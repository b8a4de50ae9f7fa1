//! `kestrel bench preprocess`: how long the worker threads spend turning an
//! encoded image into a model's pixel_values, stage by stage, on a synthetic
//! photo-like image (smooth shading, edges and sensor-like noise, so JPEG and
//! PNG compress it as they would a photograph).
//!
//! Stages: decode (JPEG and PNG), the resize to the size the model's
//! processor picks (`Processor::resize_target`), the rest of its
//! preprocessing on an input already at that size (rescale, normalize,
//! patchify or crop), and the whole `Processor::preprocess_image`. Each figure is the median
//! over `--repeats` runs inside a rayon pool of `--threads` threads. The
//! floor printed beside them is the time to fill a fresh buffer the size of
//! pixel_values in the same pool: the memory traffic the output alone costs.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use rayon::prelude::*;

use crate::engine::sampling::Rng;
use crate::error::{Error, Result};
use crate::multimodal::image::{decode_rgb8, resize_rgb8, ResizeFilter, DEFAULT_MAX_PIXELS};

#[derive(clap::Args, Debug)]
pub struct PreprocessArgs {
    /// Image sizes WIDTHxHEIGHT, comma-separated.
    #[arg(long, default_value = "1024x1024,4032x3024", value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Threads in the rayon pool (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Runs per stage; the median is reported.
    #[arg(long, default_value_t = 15)]
    pub repeats: usize,
    #[command(flatten)]
    pub model: crate::cli::model_args::ModelArgs,
    /// A preprocessor_config.json to use instead of the folder's (e.g.
    /// benches/configs/qwen2_vl_2b_preprocessor_config.json, the published
    /// Qwen2-VL bounds: min_pixels 3136, max_pixels 12845056).
    #[arg(long)]
    pub preprocessor_config: Option<PathBuf>,
}

/// A seeded photo-like image: low-frequency shading in each channel, a few
/// hard-edged discs, and ±8 levels of per-pixel noise.
pub fn photo_like(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::from_seed(seed);
    let discs: Vec<(f32, f32, f32, [u8; 3])> = (0..12)
        .map(|_| {
            let v = rng.next_u64();
            let (x, y) = ((v & 0xffff) as f32 / 65536.0, ((v >> 16) & 0xffff) as f32 / 65536.0);
            let r = 0.03 + ((v >> 32) & 0xff) as f32 / 255.0 * 0.15;
            (
                x * width as f32,
                y * height as f32,
                r * width.min(height) as f32,
                [(v >> 40) as u8, (v >> 48) as u8, (v >> 56) as u8],
            )
        })
        .collect();
    let (fw, fh) = (width as f32, height as f32);
    RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (x as f32 / fw, y as f32 / fh);
        let shade = |a: f32, b: f32, p: f32| 128.0 + 90.0 * (a * u * 6.3 + b * v * 6.3 + p).sin();
        let mut px = [shade(1.0, 0.5, 0.0), shade(0.3, 1.2, 1.0), shade(0.7, 0.9, 2.0)];
        for &(cx, cy, r, colour) in &discs {
            if (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) < r * r {
                px = colour.map(f32::from);
            }
        }
        let n = rng.next_u64();
        Rgb(std::array::from_fn(|c| (px[c] + ((n >> (8 * c)) & 15) as f32 - 8.0).clamp(0.0, 255.0) as u8))
    })
}

fn encode(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    let res = match format {
        ImageFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, 90).encode_image(img),
        _ => DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, format),
    };
    res.map_err(|e| Error::Engine(format!("encoding the synthetic image as {format:?}: {e}")))?;
    Ok(out.into_inner())
}

/// Median and minimum wall time of `f` over `repeats` runs, in ms.
fn time<T>(repeats: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        std::hint::black_box(f()?);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[0]))
}

fn parse_size(s: &str) -> Result<(u32, u32)> {
    let bad = || Error::InvalidInput(format!("--sizes: {s:?} is not WIDTHxHEIGHT, e.g. 1024x1024"));
    let (w, h) = s.trim().split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// The processor of `--model` (default: the built-in model), with
/// `--preprocessor-config` in place of the folder's own: the folder's
/// config.json and that file, side by side in a scratch folder.
fn processor_for(args: &PreprocessArgs) -> Result<std::sync::Arc<dyn crate::model::Processor>> {
    let dir = args.model.dir()?;
    let Some(file) = &args.preprocessor_config else { return crate::model::processor(&dir) };
    let io = |p: &std::path::Path, e: std::io::Error| Error::Io { path: p.display().to_string(), source: e };
    let scratch = std::env::temp_dir().join(format!("kestrel-bench-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| io(&scratch, e))?;
    std::fs::copy(dir.join("config.json"), scratch.join("config.json")).map_err(|e| io(&dir, e))?;
    std::fs::copy(file, scratch.join("preprocessor_config.json")).map_err(|e| io(file, e))?;
    let p = crate::model::processor(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    p
}

pub fn run(args: &PreprocessArgs) -> Result<String> {
    if args.repeats == 0 {
        return Err(Error::InvalidInput("--repeats must be positive".into()));
    }
    let processor = processor_for(args)?;
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = args.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().map_err(|e| Error::Engine(format!("starting the thread pool: {e}")))?;
    let mut report =
        format!("rayon threads: {}; median (min) of {} runs, ms\n", pool.current_num_threads(), args.repeats);
    for size in &args.sizes {
        let (w, h) = parse_size(size)?;
        let img = photo_like(w, h, 7);
        let (jpeg, png) = (encode(&img, ImageFormat::Jpeg)?, encode(&img, ImageFormat::Png)?);
        let target = processor.resize_target(w as usize, h as usize)?;
        let (rw, rh, filter) = target.unwrap_or((w as usize, h as usize, ResizeFilter::Bicubic));
        let resized = resize_rgb8(&img, rw as u32, rh as u32, filter)?;
        let out_mb = (processor.preprocess_image(&resized)?.0.len() * 4) as f64 / 1e6;
        report.push_str(&format!(
            "{w}x{h} -> {rw}x{rh}: JPEG {:.2} MB, PNG {:.2} MB, pixel_values {out_mb:.1} MB\n",
            jpeg.len() as f64 / 1e6,
            png.len() as f64 / 1e6
        ));
        let r = args.repeats;
        let line = |name: &str, (med, min): (f64, f64), extra: String| {
            format!("  {name:<30} {med:>9.3} ({min:>8.3})  {extra}\n")
        };
        pool.install(|| -> Result<()> {
            let t = time(r, || decode_rgb8(&jpeg, DEFAULT_MAX_PIXELS))?;
            report.push_str(&line("decode JPEG", t, String::new()));
            let t = time(r, || decode_rgb8(&png, DEFAULT_MAX_PIXELS))?;
            report.push_str(&line("decode PNG", t, String::new()));
            if target.is_some() {
                let t = time(r, || resize_rgb8(&img, rw as u32, rh as u32, filter))?;
                let mpix = (rw * rh) as f64 / 1e6 / (t.0 / 1e3);
                report.push_str(&line("resize", t, format!("{mpix:.0} Mpixel/s out")));
            } else {
                report.push_str("  resize                         skipped: already the target size\n");
            }
            let n = out_mb * 1e6 / 4.0;
            let floor = time(r, || {
                let mut v = vec![0f32; n as usize];
                v.par_chunks_mut(1 << 14).for_each(|c| c.fill(1.0));
                Ok(v)
            })?;
            let t = time(r, || processor.preprocess_image(&resized))?;
            let gbs = out_mb / 1e3 / (t.0 / 1e3);
            report.push_str(&line(
                "rescale+normalize+layout",
                t,
                format!("{gbs:.1} GB/s written, {:.1}x the fill floor", t.0 / floor.0),
            ));
            report.push_str(&line("  floor: fill a fresh buffer", floor, String::new()));
            let t = time(r, || processor.preprocess_image(&img))?;
            report.push_str(&line("preprocess_image (all but decode)", t, String::new()));
            Ok(())
        })?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(parse_size("4032x3024").unwrap(), (4032, 3024));
        for bad in ["1024", "0x5", "ax3", "12x"] {
            assert!(matches!(parse_size(bad), Err(Error::InvalidInput(_))), "{bad}");
        }
    }

    #[test]
    fn photo_is_seeded_and_round_trips() {
        let img = photo_like(64, 48, 3);
        assert_eq!(img, photo_like(64, 48, 3));
        assert_ne!(img, photo_like(64, 48, 4));
        let png = encode(&img, ImageFormat::Png).unwrap();
        assert_eq!(decode_rgb8(&png, DEFAULT_MAX_PIXELS).unwrap(), img);
        let jpeg = encode(&img, ImageFormat::Jpeg).unwrap();
        assert_eq!(decode_rgb8(&jpeg, DEFAULT_MAX_PIXELS).unwrap().dimensions(), (64, 48));
    }
}

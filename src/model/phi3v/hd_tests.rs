//! The HD transform against goldens from the original processor code
//! (tools/dump_phi3v_preprocess.py → tests/fixtures/phi3v-preprocess/).
//!
//! Tolerances. The padded uint8 HD image must equal PIL's byte for byte
//! (row hashes). The crops are a table look-up of those bytes made with
//! torch's f32 operations (a division, a subtraction, a division: IEEE on
//! every platform), so they must be bit-equal too; the 1e-6 of the brief
//! would let a reordered formula through. The global view sums 16 products
//! in f32; every sample must be within 1e-5 (a few ulps of values up to ~2.1,
//! far below one uint8 level, 1 / (255 · 0.2613) = 0.015), and the view
//! stored whole bit-equal: that pins ATen's order and its FMA contraction
//! as x86 builds of torch run it (`dot4`); goldens dumped where torch does
//! not contract (no FMA unit) would differ there in the last bit.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::*;
use crate::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};

const GLOBAL_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/phi3v-preprocess")
}

struct Goldens {
    meta: Value,
    bytes: Vec<u8>,
}

impl Goldens {
    fn load() -> Self {
        let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json exists");
        let bytes = std::fs::read(fixtures().join("golden.safetensors")).expect("golden.safetensors exists");
        Self { meta: serde_json::from_str(&text).unwrap(), bytes }
    }

    /// The raw little-endian data of tensor `name`, checked to be `dtype`.
    fn raw(&self, name: &str, dtype: Dtype) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), dtype, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn get<T, const N: usize>(&self, name: &str, dtype: Dtype, from: fn([u8; N]) -> T) -> Vec<T> {
        let (_, b) = self.raw(name, dtype);
        b.chunks_exact(N).map(|c| from(c.try_into().unwrap())).collect()
    }
}

fn load_png(name: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join(name)).expect("fixture image exists");
    decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).expect("fixture image decodes")
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count")) as usize
}

/// FNV-1a 64 of each row of an RGB8 image, as the dumper computes it.
fn fnv1a_rows(img: &RgbImage) -> Vec<u64> {
    img.as_raw()
        .chunks_exact(img.width() as usize * 3)
        .map(|row| row.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)))
        .collect()
}

#[test]
fn pil_resize_matches_pillow() {
    let g = Goldens::load();
    for (i, case) in g.meta["pil_resize"].as_array().unwrap().iter().enumerate() {
        let src = case["source"].as_str().unwrap();
        let (shape, data) = g.raw(&format!("pil.{src}"), Dtype::U8);
        let img = RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).unwrap();
        let (w, h) = (usize_of(&case["width"]) as u32, usize_of(&case["height"]) as u32);
        let filter = match case["filter"].as_str().unwrap() {
            "bilinear" => ResizeFilter::Bilinear,
            _ => ResizeFilter::Bicubic,
        };
        let (_, want) = g.raw(&format!("pil.{i}.out"), Dtype::U8);
        let got = resize_rgb8_with(&img, w, h, filter, ResizeKernel::Pil).unwrap();
        let off = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(off, 0, "case {i}: {src} -> {w}x{h} {filter:?}: {off} of {} samples differ", want.len());
    }
}

#[test]
fn hd_image_matches_the_original() {
    let g = Goldens::load();
    for case in g.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let img = load_png(case["image"].as_str().unwrap());
        let hd = hd_image(&img, usize_of(&case["num_crops"])).unwrap();
        let size: Vec<usize> = serde_json::from_value(case["image_size"].clone()).unwrap();
        assert_eq!([hd.height() as usize, hd.width() as usize], [size[0], size[1]], "{name}");
        let want = g.get(&format!("{name}.hd_row_fnv"), Dtype::U64, u64::from_le_bytes);
        let got = fnv1a_rows(&hd);
        if let Some(row) = (0..want.len()).find(|&r| got[r] != want[r]) {
            let bad = (0..want.len()).filter(|&r| got[r] != want[r]).count();
            panic!("{name}: {bad} of {} rows of the HD image differ, the first is row {row}", want.len());
        }
    }
}

#[test]
fn pixel_values_match_the_original() {
    let g = Goldens::load();
    let plane = 3 * CROP * CROP;
    let (mut crop_max, mut global_max) = (0f64, 0f64);
    for case in g.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let img = load_png(case["image"].as_str().unwrap());
        let n = usize_of(&case["num_crops"]);
        let out = hd_transform(&img, n).unwrap();

        let size: Vec<usize> = serde_json::from_value(case["image_size"].clone()).unwrap();
        assert_eq!(out.size.to_vec(), size, "{name}");
        assert_eq!(hd_size(img.width() as usize, img.height() as usize, n).unwrap(), out.size, "{name}");
        assert_eq!(out.views(), usize_of(&case["views"]), "{name}");
        assert_eq!(out.pixels.len(), out.views() * plane, "{name}");
        let tokens = num_image_tokens(out.size);
        for key in ["num_img_tokens", "calc_num_image_tokens", "calc_num_image_tokens_from_image_size"] {
            assert_eq!(tokens, usize_of(&case[key]), "{name}: {key}");
        }

        let index = g.get(&format!("{name}.sample_index"), Dtype::I32, i32::from_le_bytes);
        let value = g.get(&format!("{name}.sample_value"), Dtype::F32, f32::from_le_bytes);
        for (&i, &want) in index.iter().zip(&value) {
            let (i, got) = (i as usize, out.pixels[i as usize]);
            let d = f64::from((got - want).abs());
            if i < plane {
                global_max = global_max.max(d);
                assert!(d <= GLOBAL_TOL, "{name}: global view pixel_values[{i}] = {got} vs {want}");
            } else {
                crop_max = crop_max.max(d);
                assert!(got.to_bits() == want.to_bits(), "{name}: crop pixel_values[{i}] = {got} vs {want}");
            }
        }

        // Every value of every view, through sums per view and channel: one
        // uint8 level off anywhere moves a sum by ≥ 0.0142; summing 112,896
        // values in another order moves it by ~1e-10.
        let sums = g.get(&format!("{name}.view_sum"), Dtype::F64, f64::from_le_bytes);
        assert_eq!(sums.len(), out.views() * 3, "{name}");
        for (k, (chunk, &want)) in out.pixels.chunks_exact(CROP * CROP).zip(&sums).enumerate() {
            let got: f64 = chunk.iter().map(|&v| f64::from(v)).sum();
            assert!((got - want).abs() <= 1e-4, "{name}: view {} channel {}: sum {got} vs {want}", k / 3, k % 3);
        }
    }
    // The one global view stored whole.
    let name = g.meta["full_global_case"].as_str().unwrap();
    let case = g.meta["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    let out = hd_transform(&load_png(case["image"].as_str().unwrap()), usize_of(&case["num_crops"])).unwrap();
    let want = g.get(&format!("{name}.global"), Dtype::F32, f32::from_le_bytes);
    let (mut max, mut off) = (0f64, 0usize);
    for (&a, &b) in out.pixels[..plane].iter().zip(&want) {
        max = max.max(f64::from((a - b).abs()));
        off += usize::from(a != b);
    }
    println!("max |Δ|: crops {crop_max:e}, global view samples {global_max:e}; {name} global view: {max:e}, {off} of {plane} not bit-equal");
    assert!(max <= GLOBAL_TOL && off == 0, "{name}: global view off by {max}, {off} values not bit-equal");
}

/// An image of `w` x `h` with some content (the size checks ignore it).
fn ramp(w: usize, h: usize) -> RgbImage {
    RgbImage::from_fn(w as u32, h as u32, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, (x ^ y) as u8]))
}

#[test]
fn sizes_match_the_original_and_the_pixel_path() {
    let g = Goldens::load();
    let (mut pixel_runs, mut refused) = (0, 0);
    for row in g.meta["sizes"].as_array().unwrap() {
        let r: Vec<i64> = serde_json::from_value(row.clone()).unwrap();
        let (w, h, n) = (r[0] as usize, r[1] as usize, r[2] as usize);
        let (want, tokens, pixel) = ([r[3] as usize, r[4] as usize], r[5] as usize, r[6]);
        let got = hd_size(w, h, n);
        if want[0] == 0 || want[1] == 0 {
            // The original's size-only function says 0 where its pixel
            // path fails (a 0-row resize); we refuse both.
            assert!(got.is_err(), "{w}x{h} n={n}: {got:?}");
            assert!(hd_transform(&ramp(w, h), n).is_err(), "{w}x{h} n={n}");
            refused += 1;
            continue;
        }
        assert_ne!(pixel, -1, "{w}x{h} n={n}: the original's pixel path failed on a non-empty size");
        let got = got.unwrap();
        assert_eq!(got, want, "{w}x{h} n={n}");
        assert_eq!(num_image_tokens(got), tokens, "{w}x{h} n={n}");
        if pixel == 1 {
            let out = hd_transform(&ramp(w, h), n).unwrap();
            assert_eq!(out.size, got, "{w}x{h} n={n}");
            assert_eq!(out.pixels.len(), out.views() * 3 * CROP * CROP, "{w}x{h} n={n}");
            pixel_runs += 1;
        }
    }
    assert!(pixel_runs > 100 && refused >= 2, "{pixel_runs} pixel runs, {refused} refusals");
}

#[test]
fn odd_input_is_an_error() {
    for (w, h, n) in [(0, 5, 4), (5, 0, 4), (10, 10, 0), (10, 10, MAX_NUM_CROPS + 1), (1000, 1, 1), (1, 2000, 2)] {
        assert!(matches!(hd_size(w, h, n), Err(Error::InvalidInput(_))), "{w}x{h} n={n}");
    }
    assert!(hd_transform(&RgbImage::new(0, 0), 4).is_err());
    assert_eq!(hd_size(1, 1, 16).unwrap(), [1344, 1344]);
    assert_eq!(hd_size(2000, 30, 16).unwrap(), [336, 5376]);
    assert_eq!(hd_size(30, 2000, 16).unwrap(), [5376, 336]);
    assert_eq!(num_image_tokens([672, 672]), 757);
}

#[test]
fn a_single_crop_is_its_own_global_view() {
    // At scale 1 the bicubic weights are 0, 1, 0, 0: the global view of a
    // 336² HD image is that image, bit for bit; and a transposed image
    // gives the transposed crops.
    let img = RgbImage::from_fn(336, 200, |x, y| image::Rgb([(x * 7 + y) as u8, (y * 3) as u8, (x * y) as u8]));
    let out = hd_transform(&img, 1).unwrap();
    assert_eq!(out.size, [336, 336]);
    let plane = 3 * CROP * CROP;
    assert_eq!(out.pixels[..plane], out.pixels[plane..]);
    // 68 white rows on top: (336 - 200) / 2.
    let white = level_table().map(|t| t[255]);
    assert!((0..3).all(|c| out.pixels[plane + c * CROP * CROP + 67 * CROP] == white[c]));
    assert_ne!(out.pixels[plane + 68 * CROP], white[0]);
    let tall = hd_transform(&transpose(&img), 1).unwrap();
    for c in 0..3 {
        for y in 0..CROP {
            for x in 0..CROP {
                let (a, b) = (c * CROP * CROP + y * CROP + x, c * CROP * CROP + x * CROP + y);
                assert_eq!(out.pixels[plane + a], tall.pixels[plane + b]);
            }
        }
    }
}

/// Timings for the report: `cargo test --lib phi3v::hd::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    fn each<T>(mut f: impl FnMut() -> T) -> std::time::Duration {
        std::hint::black_box(f());
        let (start, reps) = (std::time::Instant::now(), 20);
        for _ in 0..reps {
            std::hint::black_box(f());
        }
        start.elapsed() / reps
    }
    let img = RgbImage::from_fn(1024, 768, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, (x ^ y) as u8]));
    for n in [4, 16] {
        let all = each(|| hd_transform(&img, n).unwrap());
        let hd = hd_image(&img, n).unwrap();
        let resize = each(|| hd_image(&img, n).unwrap());
        let mut global = vec![0f32; 3 * CROP * CROP];
        let table = level_table();
        let view = each(|| global_view(hd.as_raw(), hd.height() as usize, hd.width() as usize, &table, &mut global));
        let size = [hd.height(), hd.width()];
        println!(
            "1024x768 -> {size:?}, num_crops {n}: hd_transform {all:?} (resize + pad {resize:?}, global view {view:?})"
        );
        let (w, h) = (size[1], 1008u32.min(size[0]));
        for kernel in [ResizeKernel::Torch, ResizeKernel::Pil] {
            let t = each(|| resize_rgb8_with(&img, w, h, ResizeFilter::Bilinear, kernel).unwrap());
            println!("  resize_rgb8_with to {w}x{h} {kernel:?}: {t:?}");
        }
    }
}

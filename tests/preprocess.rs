//! Qwen2-VL preprocessing and M-RoPE positions against goldens from Hugging
//! Face transformers (tools/dump_preprocess.py → tests/fixtures/preprocess/).
//!
//! Tolerance. pixel_values = (x - 255·mean) / (255·std) with x the resized
//! uint8 image, so every difference comes from the resize: one uint8 level is
//! 1 / (255 · min std) = 1 / (255 · 0.2613) = 0.0150 in pixel_values. Against
//! the default (torchvision) processor our resize is torch's integer algorithm
//! and the normalisation torchvision's f32 formula, so we require agreement
//! to f32 rounding (1e-5). Against the PIL backend (if a golden ever comes
//! from it) we allow one level on at most 1% of the values.

use std::path::{Path, PathBuf};

use kestrel::model::qwen2_vl::mrope::rope_index;
use kestrel::model::qwen2_vl::processor::{
    num_placeholder_tokens, preprocess_image, preprocess_video, ImageProcessorConfig,
};
use kestrel::multimodal::image::{decode_rgb8, RgbImage, DEFAULT_MAX_PIXELS};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const ONE_LEVEL: f64 = 1.0 / (255.0 * 0.261_302_58);
const FLOAT_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

fn read_json(name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(fixtures().join(name)).ok()?;
    Some(serde_json::from_str(&text).expect("golden json parses"))
}

fn load_png(name: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join(name)).expect("fixture image exists");
    decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).expect("fixture image decodes")
}

fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str) -> (Vec<usize>, &'a [u8], Dtype) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    (t.shape().to_vec(), t.data(), t.dtype())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The published config with a case's overrides, as the dumper built it.
fn config(kind: &str, settings: &Value, published: &Value) -> ImageProcessorConfig {
    let mut json = published.clone();
    for (k, v) in settings.as_object().unwrap() {
        json[k] = v.clone();
    }
    let defaults =
        if kind == "video" { ImageProcessorConfig::video_default() } else { ImageProcessorConfig::default() };
    ImageProcessorConfig::from_json_with_defaults(&json.to_string(), defaults).unwrap()
}

struct Outcome {
    max_abs: f64,
    frac_off: f64,
}

fn compare(name: &str, case: &Value, st: &SafeTensors, pv: &[f32], grid: [usize; 3]) -> Outcome {
    let want_grid: Vec<usize> = serde_json::from_value(case["grid_thw"].clone()).unwrap();
    assert_eq!(grid.to_vec(), want_grid, "{name}: grid_thw");

    let (shape, rows, dt) = tensor(st, &format!("{name}.rows"));
    assert_eq!(dt, Dtype::F32);
    let (_, idx, _) = tensor(st, &format!("{name}.row_index"));
    let (rows, idx) = (f32s(rows), i64s(idx));
    let row_len = shape[1];
    let n_rows = grid.iter().product::<usize>();
    assert_eq!(pv.len(), n_rows * row_len, "{name}: pixel_values size");

    let (mut max_abs, mut off) = (0f64, 0usize);
    for (k, &r) in idx.iter().enumerate() {
        let ours = &pv[r as usize * row_len..][..row_len];
        let theirs = &rows[k * row_len..][..row_len];
        for (a, b) in ours.iter().zip(theirs) {
            let d = (f64::from(*a) - f64::from(*b)).abs();
            max_abs = max_abs.max(d);
            off += usize::from(d > FLOAT_TOL);
        }
    }

    // Whole-tensor statistics cover the rows not stored.
    let s = &case["stats"];
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in pv {
        let v = f64::from(v);
        sum += v;
        sum_sq += v * v;
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let n = pv.len() as f64;
    let close = |a: f64, b: f64, per_value: f64| (a - b).abs() <= per_value * n + 1e-6 * b.abs().max(1.0);
    let per_value = if max_abs <= FLOAT_TOL { FLOAT_TOL } else { ONE_LEVEL };
    assert!(close(sum, s["sum"].as_f64().unwrap(), per_value), "{name}: sum {sum} vs {}", s["sum"]);
    assert!(
        close(sum_sq, s["sum_sq"].as_f64().unwrap(), per_value * 2.0 * hi.abs().max(lo.abs())),
        "{name}: sum of squares {sum_sq} vs {}",
        s["sum_sq"]
    );
    assert!((lo - s["min"].as_f64().unwrap()).abs() <= per_value, "{name}: min {lo} vs {}", s["min"]);
    assert!((hi - s["max"].as_f64().unwrap()).abs() <= per_value, "{name}: max {hi} vs {}", s["max"]);
    Outcome { max_abs, frac_off: off as f64 / rows.len() as f64 }
}

#[test]
fn pixel_values_match_hf() {
    let golden = read_json("golden.json").expect("tests/fixtures/preprocess/golden.json (tools/dump_preprocess.py)");
    let bytes = std::fs::read(fixtures().join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let published = &golden["preprocessor_config"];
    println!("goldens from {}", golden["versions"]);
    println!("{:28} {:26} {:>14} {:>10} {:>10}", "case", "HF class", "grid", "max|d|", "frac>1e-5");
    for (name, case) in golden["cases"].as_object().unwrap() {
        let kind = case["kind"].as_str().unwrap();
        let cfg = config(kind, &case["settings"], published);
        let inputs: Vec<RgbImage> =
            case["inputs"].as_array().unwrap().iter().map(|f| load_png(f.as_str().unwrap())).collect();
        let (pv, grid) = if kind == "video" {
            preprocess_video(&inputs, &cfg).unwrap()
        } else {
            preprocess_image(&inputs[0], &cfg).unwrap()
        };
        let o = compare(name, case, &st, &pv, grid);
        let class = case["hf_class"].as_str().unwrap();
        println!("{name:28} {class:26} {:>14} {:>10.3e} {:>10.2e}", format!("{grid:?}"), o.max_abs, o.frac_off);
        if class.ends_with("Pil") {
            assert!(o.max_abs <= ONE_LEVEL + FLOAT_TOL && o.frac_off <= 0.01, "{name}: {} / {}", o.max_abs, o.frac_off);
        } else {
            assert!(o.max_abs <= FLOAT_TOL, "{name}: max |ours - HF| = {}", o.max_abs);
        }
        let tokens = num_placeholder_tokens(grid, cfg.merge_size);
        assert_eq!(tokens * cfg.merge_size * cfg.merge_size, grid.iter().product::<usize>());
        if kind == "image" {
            let (h, w) = (inputs[0].height() as usize, inputs[0].width() as usize);
            assert_eq!(cfg.grid_thw(1, h, w).unwrap(), grid, "{name}: grid without pixels");
        }
    }
}

#[test]
fn rope_index_matches_hf() {
    let Some(golden) = read_json("rope_golden.json") else {
        println!(
            "SKIP: tests/fixtures/preprocess/rope_golden.json is absent; run `python tools/dump_preprocess.py --rope`"
        );
        return;
    };
    let id = |k: &str| golden[k].as_u64().unwrap() as u32;
    let merge = golden["spatial_merge_size"].as_u64().unwrap() as usize;
    for (name, case) in golden["cases"].as_object().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let images: Vec<[usize; 3]> = serde_json::from_value(case["image_grid_thw"].clone()).unwrap();
        let videos: Vec<[usize; 3]> = serde_json::from_value(case["video_grid_thw"].clone()).unwrap();
        let want: Vec<Vec<i32>> = serde_json::from_value(case["positions"].clone()).unwrap();
        let (pos, delta) = rope_index(
            &ids,
            &images,
            &videos,
            merge,
            id("image_token_id"),
            id("video_token_id"),
            id("vision_start_token_id"),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(pos, want.concat(), "{name}: positions");
        assert_eq!(delta, case["delta"].as_i64().unwrap(), "{name}: delta");
        println!("rope {name}: {} tokens, delta {delta}: same as HF", ids.len());
    }
}

/// The resize and the fused normalize + patchify pass split rows over
/// rayon's pool, so the result must not depend on how many threads it has:
/// the fixtures (upscaled, downscaled, odd sizes) give the same bits on 1, 2,
/// 3 and 8 threads.
#[test]
fn pixel_values_do_not_depend_on_thread_count() {
    let golden = read_json("golden.json").expect("tests/fixtures/preprocess/golden.json");
    let cfg = config("image", &serde_json::json!({}), &golden["preprocessor_config"]);
    for name in ["square_1024.png", "noise_100x37.png", "wide_1000x50.png", "gradient_640x480.png"] {
        let img = load_png(name);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (pv, grid) = pool.install(|| preprocess_image(&img, &cfg).unwrap());
            (pv.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(), grid)
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert!(run(threads) == one, "{name}: {threads} threads differ from 1");
        }
    }
}

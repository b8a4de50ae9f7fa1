//! The tiny random Phi-3.5-vision (tests/fixtures/tiny-phi3v, built by
//! tools/make_tiny_phi3v.py) against the reference tools/phi3v_reference.py
//! computed on it (transformers 5.17 `Phi3ForCausalLM` + `CLIPVisionModel`
//! + the HD transform, prompt processing and image embedding of the
//! model's remote code, cross-checked against that code: cases.json
//! `cross_check`), on the CPU backend in f32: the prompt, token ids, pixel
//! values (row and column sums of every crop plane), the CLIP features, the
//! merged features with their separators, the projector, the placed
//! embeddings, each decoder layer, the logits, and the greedy continuation;
//! a prompt past `original_max_position_embeddings` (HF's one forward then
//! uses the long factors everywhere, as the sequence's table does here);
//! VLM2Vec's pooled embeddings; and the HD preprocessing at num_crops 1, 4
//! and 16.
//!
//! Bound: ‖ours − ref‖ / ‖ref‖ ≤ 1e-5 per stage, as for the other families
//! (both f32 on the same weights). Large tensors keep some rows only
//! (golden README): `rows` of the sequence, `image.rows` of the image
//! features, `vision.patch_index` of each crop's patches.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::golden::{rel_err, Fixture};
use kestrel::engine::engine::load;
use kestrel::engine::{EngineConfig, Event, Task};
use kestrel::model::phi3v::hd;
use kestrel::model::{registry, seq};
use kestrel::multimodal::Media;
use kestrel::Tensor;

const REL_BOUND: f64 = 1e-5;

fn fx() -> Fixture {
    Fixture::new("tiny-phi3v")
}

fn model_dir() -> PathBuf {
    fx().dir()
}

fn golden_file(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    fx().golden(name)
}

fn cases() -> serde_json::Value {
    fx().cases()
}

fn image(file: &str) -> image::RgbImage {
    fx().image(file)
}

fn messages_and_media(case: &serde_json::Value) -> (serde_json::Value, Vec<Media>) {
    fx().messages_and_media(case)
}

fn ints(v: &[f32]) -> Vec<usize> {
    v.iter().map(|&x| x as usize).collect()
}

/// Rows `pick` of a row-major (rows, width) tensor.
fn rows_of(all: &[f32], width: usize, pick: &[usize]) -> Vec<f32> {
    pick.iter().flat_map(|&r| all[r * width..][..width].iter().copied()).collect()
}

/// Per crop and channel, the sums of each row and of each column of the
/// 336² plane: (crops, 3, 336) each, as the golden keeps them.
fn plane_sums(pixels: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = hd::CROP;
    let (mut rows, mut cols) = (Vec::new(), Vec::new());
    for plane in pixels.chunks_exact(n * n) {
        rows.extend(plane.chunks_exact(n).map(|r| r.iter().map(|&x| x as f64).sum::<f64>() as f32));
        cols.extend((0..n).map(|c| (0..n).map(|r| plane[r * n + c] as f64).sum::<f64>() as f32));
    }
    (rows, cols)
}

fn engine_config(task: Task) -> EngineConfig {
    // The goldens' list content is rendered by Kestrel's built-in template
    // (the fixture's own, like the published one, takes strings only).
    let builtin = model_dir().join("../../../src/model/phi3v/chat_template.jinja");
    let chat_template = (task == Task::Generate).then(|| builtin.display().to_string());
    EngineConfig { model_dir: model_dir(), device: "cpu".into(), task, chat_template, ..Default::default() }
}

#[test]
fn tiny_phi3v_matches_the_reference_stage_by_stage() {
    let dir = model_dir();
    assert_eq!(registry::detect(&dir).unwrap().name, "phi3_v");
    let (fe, core) = load(&engine_config(Task::Generate)).unwrap();
    let model = core.runner().model.as_ref();
    let all = cases();
    assert_eq!(fe.spec().image_token_id as u64, all["image_token_id"].as_u64().unwrap());
    let mut report = Vec::new();
    for (name, case) in all["cases"].as_object().unwrap() {
        let g = golden_file(name);
        let (messages, media) = messages_and_media(case);
        assert_eq!(fe.template.render(&messages, true).unwrap(), case["prompt"].as_str().unwrap(), "{name}: prompt");
        let input = fe.prepare_chat(&messages, &media).unwrap();
        let ids: Vec<f32> = input.input_ids.iter().map(|&i| i as f32).collect();
        assert_eq!(ids, g["input_ids"].1, "{name}: input ids");
        let grids: Vec<f32> =
            input.images.grids.iter().flat_map(|g| [g[1] * 336, g[2] * 336]).map(|v| v as f32).collect();
        assert_eq!(grids, g.get("image_sizes").map_or(vec![], |t| t.1.clone()), "{name}: image sizes");
        if let Some((_, hf_rows)) = g.get("pixel_values.row_sums") {
            let (r, c) = plane_sums(&input.images.values);
            for (what, ours, hf) in [("row", &r, hf_rows), ("column", &c, &g["pixel_values.col_sums"].1)] {
                let max = ours.iter().zip(hf).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(max <= 2e-3, "{name}: pixel {what} sums differ by {max}");
            }
        }

        let mut stages: HashMap<String, Vec<f32>> = HashMap::new();
        let mut cache = seq::new_cache(model, input.input_ids.len()).unwrap();
        let h = seq::prefill(model, &input, &mut cache, &mut |stage: &str, t: &Tensor| {
            stages.insert(stage.to_string(), t.to_f32_vec().unwrap());
        })
        .unwrap();
        let rows = ints(&g["rows"].1);
        let logits = model.decoder().logits(&h).unwrap().to_f32_vec().unwrap();
        let mut compare = |key: &str, ours: Vec<f32>| {
            let (rel, max) = rel_err(&ours, &g[key].1);
            report.push(format!("{name:<13} {key:<16} rel {rel:.2e}  max abs {max:.2e}"));
            assert!(rel <= REL_BOUND, "{name}: {key} rel error {rel:.3e} > {REL_BOUND} (max abs {max:.3e})");
        };
        compare("logits", rows_of(&logits, g["logits"].0[1], &rows));
        for key in ["decoder.embeds", "decoder.layer.0", "decoder.layer.1", "decoder.norm"] {
            compare(key, rows_of(&stages[key], g[key].0[1], &rows));
        }
        if g.contains_key("image.merged") {
            let image_rows = ints(&g["image.rows"].1);
            compare("image.merged", rows_of(&stages["vision.merged"], g["image.merged"].0[1], &image_rows));
            compare("image.projected", rows_of(&stages["projector"], g["image.projected"].0[1], &image_rows));
        }
        if let Some((shape, _)) = g.get("vision.features") {
            // Our tower's output keeps each view's class token first.
            let (views, width) = (shape[0], shape[2]);
            let patches = ints(&g["vision.patch_index"].1);
            let per_view = stages["vision.features"].len() / width / views;
            let pick: Vec<usize> = (0..views).flat_map(|v| patches.iter().map(move |p| v * per_view + 1 + p)).collect();
            compare("vision.features", rows_of(&stages["vision.features"], width, &pick));
        }

        let expect_long = case["rope_table"] == "long";
        assert_eq!(seq::rope_table(model, &input, input.input_ids.len()), Some(expect_long as i32), "{name}: table");
        if let Some((_, greedy)) = g.get("greedy") {
            let hf: Vec<u32> = greedy.iter().map(|&t| t as u32).collect();
            let ours = seq::generate_greedy(model, &input, hf.len(), &[2]).unwrap();
            assert_eq!(ours, hf, "{name}: greedy continuation");
            report.push(format!("{name:<13} greedy {} tokens equal", ours.len()));
        }
    }
    println!("{}", report.join("\n"));
}

/// VLM2Vec: `--task embedding` with the built-in VLM2Vec template (the
/// fixture folder's template is a chat one, so the prompt is given as the
/// guide gives it: text and tags in one message), last token, L2-normalized.
#[test]
fn vlm2vec_embeddings_match_the_reference() {
    let cfg = EngineConfig {
        chat_template: Some(model_dir().join("../../../src/model/phi3v/vlm2vec_template.jinja").display().to_string()),
        ..engine_config(Task::Embed)
    };
    let (fe, mut core) = load(&cfg).unwrap();
    for (id, (name, case)) in cases()["embed_cases"].as_object().unwrap().iter().enumerate() {
        let g = golden_file(name);
        let prompt = case["prompt"].as_str().unwrap();
        let files: Vec<&str> = case["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        // The message as the guide's client sends it: the image, then the text.
        let text = prompt.trim_start_matches("<|image_1|> ");
        let mut content: Vec<serde_json::Value> = files.iter().map(|_| serde_json::json!({"type": "image"})).collect();
        content.push(serde_json::json!({"type": "text", "text": text}));
        let messages = serde_json::json!([{"role": "user", "content": content}]);
        assert_eq!(fe.template.render(&messages, false).unwrap(), prompt, "{name}: prompt");
        let media: Vec<Media> = files.iter().map(|f| Media::Image(image(f))).collect();
        let input = fe.prepare_chat(&messages, &media).unwrap();
        let ids: Vec<f32> = input.input_ids.iter().map(|&i| i as f32).collect();
        assert_eq!(ids, g["input_ids"].1, "{name}: input ids");
        let (tx, rx) = std::sync::mpsc::channel();
        core.add_embed(id as u64, input, tx).unwrap();
        while core.has_work() {
            core.step().unwrap();
        }
        let events: Vec<Event> = rx.try_iter().collect();
        let Some(Event::Embedding { values }) = events.first() else { panic!("{name}: {events:?}") };
        let (rel, max) = rel_err(values, &g["embedding"].1);
        assert!(rel <= REL_BOUND, "{name}: embedding rel error {rel:.3e} (max abs {max:.3e})");
    }
}

/// The HD transform against the remote image processor on wide, tall,
/// tiny and ordinary images at num_crops 1, 4 and 16: the HD size, and per
/// crop plane rows 0 and 169 in full plus every row's and column's sum.
#[test]
fn hd_preprocessing_matches_the_reference() {
    let g = golden_file("preprocess");
    for e in cases()["preprocess"]["entries"].as_array().unwrap() {
        let (i, file, crops) =
            (e["index"].as_u64().unwrap(), e["file"].as_str().unwrap(), e["num_crops"].as_u64().unwrap());
        let img = image(file);
        let out = hd::hd_transform(&img, crops as usize).unwrap();
        let size: Vec<f32> = out.size.iter().map(|&v| v as f32).collect();
        assert_eq!(size, g[&format!("{i}.image_size")].1, "{file} num_crops {crops}: size");
        let n = hd::CROP;
        let picked: Vec<f32> = out
            .pixels
            .chunks_exact(n * n)
            .flat_map(|plane| [0, 169].into_iter().flat_map(move |r| plane[r * n..][..n].iter().copied()))
            .collect();
        let (rel, max) = rel_err(&picked, &g[&format!("{i}.pixel_values.rows")].1);
        assert!(max <= 1e-5, "{file} num_crops {crops}: pixel rows differ by {max} (rel {rel})");
        let (r, c) = plane_sums(&out.pixels);
        for (what, ours, key) in [("row", &r, "row_sums"), ("col", &c, "col_sums")] {
            let hf = &g[&format!("{i}.pixel_values.{key}")].1;
            let max = ours.iter().zip(hf).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max <= 2e-3, "{file} num_crops {crops}: {what} sums differ by {max}");
        }
    }
}

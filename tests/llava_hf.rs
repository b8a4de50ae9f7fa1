//! The tiny random LLaVA-1.5 (tests/fixtures/tiny-llava, built by
//! tools/make_tiny_llava.py) against what Hugging Face transformers 5.17
//! computed on it (golden/, dumped by the same script) on the CPU backend in
//! f32: the built-in chat template's prompt, token ids, `CLIPImageProcessor`
//! pixel values (also at the real 336² size), every CLIP layer, the selected
//! features, the projector, the scattered embeddings, every decoder layer,
//! the logits at every position and the greedy continuation; and the
//! embedding task's pooled hidden states.
//!
//! Bound: ‖ours − HF‖ / ‖HF‖ ≤ 1e-5 per stage, as for Qwen2-VL (both f32 on
//! the same weights; summation order and libm differ). Pixel values: the
//! torchvision backend's resize is emulated on uint8 and the normalisation
//! in the same f32 operations, so they must agree to 1e-6 (one uint8 level
//! is 0.015; the PIL backend differs from the torchvision one by that much).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::golden::{rel_err, Fixture};
use kestrel::engine::engine::load;
use kestrel::engine::{EngineConfig, Event, Pooling, Task};
use kestrel::model::llava::config::LlavaConfig;
use kestrel::model::llava::model::clip_dims;
use kestrel::model::llava::processor::{preprocess, ClipProcessorConfig};
use kestrel::model::{registry, seq};
use kestrel::multimodal::Media;
use kestrel::Tensor;

const REL_BOUND: f64 = 1e-5;

fn fx() -> Fixture {
    Fixture::new("tiny-llava")
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

#[test]
fn tiny_llava_matches_hf_stage_by_stage() {
    let dir = model_dir();
    let family = registry::detect(&dir).unwrap();
    assert_eq!(family.name, "llava");
    let cfg = EngineConfig { model_dir: dir.clone(), device: "cpu".into(), ..Default::default() };
    // The fixture has no chat template: the built-in one must render HF's prompts.
    let (fe, core) = load(&cfg).unwrap();
    assert!(fe.template.origin().contains("built-in llava"), "{}", fe.template.origin());
    let model = core.runner().model.as_ref();
    let llava = LlavaConfig::from_dir(&dir).unwrap();
    let run = clip_dims(&llava).unwrap().layers_for(llava.vision_feature_layer).unwrap();
    assert_eq!(run, llava.vision_config.num_hidden_layers - 1);
    let mut report = Vec::new();
    for (name, case) in cases()["cases"].as_object().unwrap() {
        let g = golden_file(name);
        let (messages, media) = messages_and_media(case);
        assert_eq!(fe.template.render(&messages, true).unwrap(), case["prompt"].as_str().unwrap(), "{name}: prompt");
        let input = fe.prepare_chat(&messages, &media).unwrap();
        let ids: Vec<f32> = input.input_ids.iter().map(|&i| i as f32).collect();
        assert_eq!(ids, g["input_ids"].1, "{name}: input ids");
        let pos: Vec<f32> = input.positions[..ids.len()].iter().map(|&p| p as f32).collect();
        assert_eq!(pos, g["position_ids"].1, "{name}: positions");
        if let Some((_, hf)) = g.get("pixel_values") {
            let (rel, max) = rel_err(&input.images.values, hf);
            assert!(max <= 1e-6, "{name}: pixel_values differ by {max} (rel {rel})");
        }

        let mut stages: HashMap<String, Vec<f32>> = HashMap::new();
        let mut cache = seq::new_cache(model, input.input_ids.len()).unwrap();
        let h = seq::prefill(model, &input, &mut cache, &mut |stage: &str, t: &Tensor| {
            stages.insert(stage.to_string(), t.to_f32_vec().unwrap());
        })
        .unwrap();
        stages.insert("logits".into(), model.decoder().logits(&h).unwrap().to_f32_vec().unwrap());
        let mut checked = 0;
        for (key, (_, hf)) in &g {
            let compared = ["vision.", "decoder.", "projector", "logits"].iter().any(|p| key.starts_with(p));
            // HF runs the tower's last layer too; LLaVA reads layer −2, so we stop before it.
            let beyond = key.strip_prefix("vision.layer.").is_some_and(|i| i.parse::<usize>().unwrap() >= run);
            if !compared || beyond {
                continue;
            }
            let ours = stages.get(key).unwrap_or_else(|| panic!("{name}: no stage {key} on our side"));
            let (rel, max) = rel_err(ours, hf);
            report.push(format!("{name:<11} {key:<18} rel {rel:.2e}  max abs {max:.2e}"));
            assert!(rel <= REL_BOUND, "{name}: {key} rel error {rel:.3e} > {REL_BOUND} (max abs {max:.3e})");
            checked += 1;
        }
        assert!(checked >= 4, "{name}: only {checked} stages compared");

        let hf_greedy: Vec<u32> = g["greedy"].1.iter().map(|&t| t as u32).collect();
        let ours = seq::generate_greedy(model, &input, hf_greedy.len(), &fe.spec().eos_token_id).unwrap();
        assert_eq!(ours, hf_greedy, "{name}: greedy continuation");
        report.push(format!("{name:<11} greedy {} tokens equal", ours.len()));
    }
    println!("{}", report.join("\n"));
}

/// `CLIPImageProcessor` at LLaVA-1.5's real size (shortest edge 336, centre
/// crop 336) on a landscape, a square and a tall image; the golden keeps
/// every 5th row of each plane plus each plane's sum and max.
#[test]
fn clip_preprocessing_matches_hf_at_336() {
    let g = golden_file("preprocess_336");
    let c = cases();
    let files: Vec<&str> =
        c["preprocess_336"]["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    let cfg = ClipProcessorConfig::from_json(&c["preprocess_336"]["image_processor"].to_string(), 336).unwrap();
    let rows: Vec<usize> = g["row_index"].1.iter().map(|&r| r as usize).collect();
    let (shape, hf) = &g["pixel_values"];
    assert_eq!(shape, &vec![files.len(), 3, rows.len(), 336]);
    for (i, f) in files.iter().enumerate() {
        let ours = preprocess(&image(f), &cfg).unwrap();
        let mut picked = Vec::new();
        for c in 0..3 {
            for &r in &rows {
                picked.extend_from_slice(&ours[c * 336 * 336 + r * 336..][..336]);
            }
            let plane = &ours[c * 336 * 336..][..336 * 336];
            let sum: f64 = plane.iter().map(|&x| x as f64).sum();
            let want = g["plane_sum"].1[i * 3 + c] as f64;
            assert!((sum - want).abs() <= 1e-3 * want.abs().max(1.0), "{f} plane {c}: sum {sum} vs {want}");
        }
        let n = 3 * rows.len() * 336;
        let (rel, max) = rel_err(&picked, &hf[i * n..(i + 1) * n]);
        assert!(max <= 1e-6, "{f}: pixel_values differ by {max} (rel {rel})");
    }
}

/// The embedding task on LLaVA: last-token and mean pooling of the final
/// normed hidden states HF computed (golden `decoder.norm`), L2-normalized.
#[test]
fn llava_embeddings_match_hfs_pooled_final_hidden_states() {
    for pooling in [Pooling::Last, Pooling::Mean] {
        let cfg = EngineConfig {
            model_dir: model_dir(),
            device: "cpu".into(),
            task: Task::Embed,
            pooling: Some(pooling),
            ..Default::default()
        };
        let (fe, mut core) = load(&cfg).unwrap();
        for (id, (name, case)) in cases()["cases"].as_object().unwrap().iter().enumerate() {
            let g = golden_file(name);
            let (shape, rows) = &g["decoder.norm"];
            let (n, hidden) = (shape[0], shape[1]);
            let pick: Vec<f64> = match pooling {
                Pooling::Last => rows[(n - 1) * hidden..].iter().map(|&x| x as f64).collect(),
                _ => (0..hidden).map(|c| (0..n).map(|r| rows[r * hidden + c] as f64).sum::<f64>() / n as f64).collect(),
            };
            let norm = pick.iter().map(|x| x * x).sum::<f64>().sqrt();
            let want: Vec<f32> = pick.iter().map(|x| (x / norm) as f32).collect();
            let (messages, media) = messages_and_media(case);
            let input = fe.prepare_chat(&messages, &media).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            core.add_embed(id as u64, input, tx).unwrap();
            while core.has_work() {
                core.step().unwrap();
            }
            let events: Vec<Event> = rx.try_iter().collect();
            let Some(Event::Embedding { values }) = events.first() else { panic!("{name}: {events:?}") };
            let (rel, max) = rel_err(values, &want);
            assert!(rel <= REL_BOUND, "{name} {pooling:?}: embedding rel error {rel:.3e} (max abs {max:.3e})");
        }
    }
}

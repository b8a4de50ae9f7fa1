//! The tiny random Qwen2-VL (the built-in model, src/model/builtin/tiny-qwen2-vl,
//! built by tools/make_tiny_qwen2vl.py) against what Hugging Face transformers
//! computed on it (tests/fixtures/tiny-qwen2-vl/golden, dumped by the same script): the prompt, token ids, pixel
//! values, M-RoPE positions, every stage of the vision tower and decoder,
//! the logits at every position, and the greedy continuation — on the CPU
//! backend (f32) against HF in f32.
//!
//! Bound: ‖ours − HF‖ / ‖HF‖ ≤ 1e-5 per stage. Both are f32 on the same
//! weights; what differs is summation order and libm, measured at ≤ 1e-6 at
//! every stage (2026-11-27, transformers 5.17 / torch 2.11 on the CPU), so
//! the bound leaves 10× room and still catches any real error (a wrong RoPE
//! frequency table, for one, showed up as 7e-4). Token ids, positions and
//! greedy tokens must be equal.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::golden::rel_err;
use kestrel::model::qwen2_vl::inputs::{prepare_chat, Media, Processors};
use kestrel::model::qwen2_vl::Qwen2Vl;
use kestrel::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use kestrel::text::{chat_template::ChatTemplate, tokenizer::Tokenizer};
use kestrel::{Device, Tensor};

const REL_BOUND: f64 = 1e-5;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/builtin/tiny-qwen2-vl")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2-vl/golden")
}

/// Golden tensors of one case, as f32 (ints widened).
fn golden(case: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    common::golden::tensors(&golden_dir().join(format!("{case}.safetensors")))
}

/// HF's message parts name image files; ours carry the images separately.
fn messages_and_media(case: &serde_json::Value) -> (serde_json::Value, Vec<Media>) {
    let gdir = golden_dir();
    let load = |f: &str| decode_rgb8(&std::fs::read(gdir.join(f)).unwrap(), DEFAULT_MAX_PIXELS).unwrap();
    let mut media = Vec::new();
    let mut msgs = case["messages"].clone();
    for m in msgs.as_array_mut().unwrap() {
        for part in m["content"].as_array_mut().unwrap() {
            match part["type"].as_str().unwrap() {
                "image" => {
                    media.push(Media::Image(load(part["image"].as_str().unwrap())));
                    *part = serde_json::json!({"type": "image"});
                }
                "video" => {
                    let frames = part["video"].as_array().unwrap().iter().map(|f| load(f.as_str().unwrap())).collect();
                    media.push(Media::Video(frames));
                    *part = serde_json::json!({"type": "video"});
                }
                _ => {}
            }
        }
    }
    (msgs, media)
}

#[test]
fn tiny_qwen2_vl_matches_hf_stage_by_stage() {
    let dir = model_dir();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("cases.json")).unwrap()).unwrap();
    let model = Qwen2Vl::load(&dir, &Device::Cpu).expect("load the tiny model");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let template = ChatTemplate::from_dir(&dir).unwrap();
    let procs = Processors::from_dir(&dir).unwrap();

    let mut report = Vec::new();
    for (name, case) in cases["cases"].as_object().unwrap() {
        let g = golden(name);
        let (messages, media) = messages_and_media(case);
        let rendered = template.render(&messages, true).unwrap();
        assert_eq!(rendered, case["prompt"].as_str().unwrap(), "{name}: rendered prompt");
        let input = prepare_chat(&model.config, &tok, &template, &procs, &messages, &media).unwrap();
        let ids: Vec<f32> = input.input_ids.iter().map(|&i| i as f32).collect();
        assert_eq!(ids, g["input_ids"].1, "{name}: input ids");
        let pos: Vec<f32> = input.positions.iter().map(|&p| p as f32).collect();
        assert_eq!(pos, g["position_ids"].1, "{name}: M-RoPE positions");
        assert_eq!(input.rope_delta as f32, g["rope_delta"].1[0], "{name}: rope delta");
        for (ours, key) in [(&input.images, "pixel_values"), (&input.videos, "pixel_values_videos")] {
            if let Some((_, hf)) = g.get(key) {
                let (rel, max) = rel_err(&ours.values, hf);
                assert!(max <= 1e-5, "{name}: {key} differ by {max} (rel {rel})");
            }
        }

        let mut stages: HashMap<String, Vec<f32>> = HashMap::new();
        let mut cache = model.new_cache(input.input_ids.len()).unwrap();
        let h = model
            .prefill(&input, &mut cache, &mut |stage: &str, t: &Tensor| {
                stages.insert(stage.to_string(), t.to_f32_vec().unwrap());
            })
            .unwrap();
        stages.insert("logits".into(), model.text.logits(&h).unwrap().to_f32_vec().unwrap());
        let mut checked = 0;
        for (key, (_, hf)) in &g {
            if !(key.starts_with("vision.") || key.starts_with("decoder.") || key == "logits")
                || key == "decoder.token_embeds"
            {
                continue;
            }
            let ours = stages.get(key).unwrap_or_else(|| panic!("{name}: no stage {key} on our side"));
            let (rel, max) = rel_err(ours, hf);
            report.push(format!("{name:<11} {key:<22} rel {rel:.2e}  max abs {max:.2e}"));
            assert!(rel <= REL_BOUND, "{name}: {key} rel error {rel:.3e} > {REL_BOUND} (max abs {max:.3e})");
            checked += 1;
        }
        assert!(checked >= 4, "{name}: only {checked} stages compared");

        let hf_greedy: Vec<u32> = g["greedy"].1.iter().map(|&t| t as u32).collect();
        let ours = model.generate_greedy(&input, hf_greedy.len(), &model.config.eos_token_id).unwrap();
        assert_eq!(ours, hf_greedy, "{name}: greedy continuation");
        report.push(format!("{name:<11} greedy {} tokens equal", ours.len()));
    }
    println!("{}", report.join("\n"));
}

/// The embedding task (DSE-Qwen2's recipe and vLLM's pooling) against HF:
/// the pooled final-normed hidden states HF computed (golden `decoder.norm`),
/// L2-normalized, for last-token, mean and first-token pooling, through the
/// engine's embedding path.
#[test]
fn embeddings_match_hfs_pooled_final_hidden_states() {
    use kestrel::engine::engine::load;
    use kestrel::engine::{EngineConfig, Event, Pooling, Task};

    let dir = model_dir();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("cases.json")).unwrap()).unwrap();
    for pooling in [Pooling::Last, Pooling::Mean, Pooling::Cls] {
        let cfg = EngineConfig {
            model_dir: dir.clone(),
            device: "cpu".into(),
            task: Task::Embed,
            pooling: Some(pooling),
            ..Default::default()
        };
        let (fe, mut core) = load(&cfg).unwrap();
        for (id, (name, case)) in cases["cases"].as_object().unwrap().iter().enumerate() {
            let g = golden(name);
            let (shape, rows) = &g["decoder.norm"];
            let (n, hidden) = (shape[0], shape[1]);
            let pick: Vec<f64> = match pooling {
                Pooling::Last => rows[(n - 1) * hidden..].iter().map(|&x| x as f64).collect(),
                Pooling::Cls => rows[..hidden].iter().map(|&x| x as f64).collect(),
                Pooling::Mean => {
                    (0..hidden).map(|c| (0..n).map(|r| rows[r * hidden + c] as f64).sum::<f64>() / n as f64).collect()
                }
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
            assert!(matches!(events.last(), Some(Event::Done { usage }) if usage.prompt_tokens == n));
            let (rel, max) = rel_err(values, &want);
            assert!(rel <= REL_BOUND, "{name} {pooling:?}: embedding rel error {rel:.3e} (max abs {max:.3e})");
        }
        assert_eq!(core.pool().num_free(), core.pool().num_blocks(), "embeddings keep no KV");
    }
}

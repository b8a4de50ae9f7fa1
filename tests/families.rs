//! The model contract across families, on the CPU backend: LLaVA-1.5 through
//! the engine (batched steps equal one-sequence decoding; precomputed image
//! embeddings equal pixels; video and malformed embeddings are the user's
//! error), its checkpoint name layouts, and a headless Qwen2-VL base model
//! that serves embeddings only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use kestrel::engine::engine::load;
use kestrel::engine::request::Collector;
use kestrel::engine::sampling::SamplingParams;
use kestrel::engine::{EngineConfig, Event, Request, RequestOutput, RequestParams, Task};
use kestrel::model::{llava, registry, seq};
use kestrel::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use kestrel::multimodal::Media;
use kestrel::{Device, Error};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The built-in tiny Qwen2-VL's folder.
fn tiny_qwen() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/builtin/tiny-qwen2-vl")
}

fn cpu(dir: PathBuf) -> EngineConfig {
    EngineConfig { model_dir: dir, device: "cpu".into(), ..Default::default() }
}

fn llava_image(name: &str) -> Media {
    let bytes = std::fs::read(fixture("tiny-llava/golden").join(name)).unwrap();
    Media::Image(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).unwrap())
}

fn user(parts: serde_json::Value) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": parts}])
}

fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams { sampling: SamplingParams::greedy(), max_tokens, ignore_eos: true, ..Default::default() }
}

fn run(core: &mut kestrel::engine::core::EngineCore, reqs: Vec<Request>) -> Vec<RequestOutput> {
    let mut streams = Vec::new();
    for (id, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        streams.push((Collector::new(&r.params), rx));
        core.add(id as u64, r, tx).unwrap();
    }
    while core.has_work() {
        core.step().unwrap();
    }
    streams
        .into_iter()
        .map(|(mut c, rx)| {
            for e in rx.try_iter() {
                c.push(e);
            }
            c.finish().unwrap()
        })
        .collect()
}

#[test]
fn llava_through_the_engine_equals_one_sequence_decoding() {
    let (fe, mut core) = load(&cpu(fixture("tiny-llava"))).unwrap();
    assert_eq!(fe.family, "llava");
    let prompts = [
        (
            user(serde_json::json!([{"type": "image"}, {"type": "text", "text": "what is here?"}])),
            vec!["one_image_img0.png"],
        ),
        (user(serde_json::json!("tell me a story about the sea")), vec![]),
        (
            user(serde_json::json!([{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}])),
            vec!["two_images_img0.png", "two_images_img1.png"],
        ),
    ];
    let inputs: Vec<_> = prompts
        .iter()
        .map(|(m, imgs)| fe.prepare_chat(m, &imgs.iter().map(|n| llava_image(n)).collect::<Vec<_>>()).unwrap())
        .collect();
    let direct: Vec<Vec<u32>> =
        inputs.iter().map(|i| seq::generate_greedy(core.runner().model.as_ref(), i, 6, &[]).unwrap()).collect();
    let outs = run(&mut core, inputs.into_iter().map(|input| Request { input, params: greedy(6) }).collect());
    for (i, (o, d)) in outs.iter().zip(&direct).enumerate() {
        assert_eq!(&o.choices[0].token_ids, d, "prompt {i}: engine vs one-sequence greedy");
    }
}

#[test]
fn llava_precomputed_embeddings_equal_pixels_and_bad_media_is_refused() {
    let (fe, mut core) = load(&cpu(fixture("tiny-llava"))).unwrap();
    let msgs = user(serde_json::json!([{"type": "image"}, {"type": "text", "text": "compare"}, {"type": "image"}]));
    let pixels =
        fe.prepare_chat(&msgs, &[llava_image("two_images_img0.png"), llava_image("one_image_img0.png")]).unwrap();
    // The projector's output for the first image, as a user would save it.
    let one =
        fe.prepare_chat(&user(serde_json::json!([{"type": "image"}])), &[llava_image("two_images_img0.png")]).unwrap();
    let feats = core.runner().model.encode_media(&one, &mut |_, _| {}).unwrap().image.unwrap();
    let (tokens, hidden) = (feats.shape()[0], feats.shape()[1]);
    let values = feats.to_f32_vec().unwrap();
    let bytes = safetensors_bytes(&[("image_embeds", vec![1, tokens, hidden], &values)]);
    let mut media = fe.processor.parse_image_embeds(&bytes).unwrap();
    assert_eq!(media.len(), 1);
    media.push(llava_image("one_image_img0.png"));
    let mixed = fe.prepare_chat(&msgs, &media).unwrap();
    assert_eq!(mixed.input_ids, pixels.input_ids);
    let outs =
        run(&mut core, vec![Request { input: pixels, params: greedy(8) }, Request { input: mixed, params: greedy(8) }]);
    assert_eq!(outs[0].choices[0].token_ids, outs[1].choices[0].token_ids);

    // Wrong sizes name both; video is not this family's.
    let bad = safetensors_bytes(&[("image_embeds", vec![tokens + 1, hidden], &vec![0.0; (tokens + 1) * hidden])]);
    let e = fe.processor.parse_image_embeds(&bad).err().unwrap().to_string();
    assert!(e.contains(&format!("{}", tokens + 1)) && e.contains(&format!("{tokens} rows of {hidden}")), "{e}");
    let video = Media::Video(vec![image::RgbImage::new(56, 56); 2]);
    let e = fe.prepare_chat(&user(serde_json::json!([{"type": "video"}])), &[video]).err().unwrap();
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("video")), "{e}");
    let e =
        fe.prepare_chat(&user(serde_json::json!("no image here")), &[llava_image("one_image_img0.png")]).err().unwrap();
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("1 images were given")), "{e}");
}

fn safetensors_bytes(tensors: &[(&str, Vec<usize>, &[f32])]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: HashMap<String, safetensors::tensor::TensorView> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (n.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize(&views, None).unwrap()
}

/// A copy of a fixture with its tensors renamed by `rename` (None drops one)
/// and its config.json edited by `edit`.
fn variant(
    src: PathBuf,
    to: &str,
    rename: impl Fn(&str) -> Option<String>,
    edit: impl Fn(&mut serde_json::Value),
) -> PathBuf {
    let dir = fixture("tmp").join(format!("{to}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let raw = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter_map(|(n, v)| rename(&n).map(|m| (m, v))).collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn llava_loads_the_published_and_the_transformers_5_name_layouts_alike() {
    // The fixture stores the published llava-hf names; transformers ≥ 4.52
    // writes `model.language_model.*`, `model.vision_tower.*`, `lm_head.*`.
    let modern = variant(
        fixture("tiny-llava"),
        "llava-modern",
        |n| {
            Some(if let Some(r) = n.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = n.strip_prefix("language_model.lm_head.") {
                format!("lm_head.{r}")
            } else {
                format!("model.{n}")
            })
        },
        |_| {},
    );
    let logits = |dir: &Path| {
        let off = kestrel::cli::generate::Offline::load(dir, &Device::Cpu, None, &Default::default()).unwrap();
        let input = off
            .prepare_chat(
                &user(serde_json::json!([{"type": "image"}, {"type": "text", "text": "hi"}])),
                &[llava_image("wide_image_img0.png")],
            )
            .unwrap();
        let m = off.model.as_ref();
        let mut cache = seq::new_cache(m, input.input_ids.len()).unwrap();
        let h = seq::prefill(m, &input, &mut cache, &mut |_, _| {}).unwrap();
        m.decoder().logits(&h).unwrap().to_f32_vec().unwrap()
    };
    assert_eq!(logits(&fixture("tiny-llava")), logits(&modern));
    // Both layouts name the same canonical tensors.
    let (a, b) = (llava::open_weights(&fixture("tiny-llava")).unwrap(), llava::open_weights(&modern).unwrap());
    assert_eq!(a.names(), b.names());
    assert!(a.names().iter().all(|n| [
        "model.language_model.",
        "lm_head.",
        "model.vision_tower.vision_model.",
        "model.multi_modal_projector."
    ]
    .iter()
    .any(|p| n.starts_with(p))));
    let _ = std::fs::remove_dir_all(modern);
}

#[test]
fn a_headless_base_checkpoint_serves_embeddings_and_refuses_generation() {
    // Qwen2VLModel saved without lm_head and untied: DSE-style base models.
    let dir = variant(
        tiny_qwen(),
        "qwen-headless",
        |n| (n != "lm_head.weight").then(|| n.to_string()),
        |c| c["architectures"] = serde_json::json!(["Qwen2VLModel"]),
    );
    assert_eq!(registry::detect(&dir).unwrap().name, "qwen2_vl");
    let e = load(&cpu(dir.clone())).err().unwrap().to_string();
    assert!(e.contains("no LM head") && e.contains("--task embedding"), "{e}");
    let embed = |d: PathBuf| {
        let (fe, mut core) = load(&EngineConfig { task: Task::Embed, ..cpu(d) }).unwrap();
        let input = fe.prepare_chat(&user(serde_json::json!("a small bird")), &[]).unwrap();
        let (tx, rx) = mpsc::channel();
        core.add_embed(0, input, tx).unwrap();
        while core.has_work() {
            core.step().unwrap();
        }
        match rx.try_iter().next() {
            Some(Event::Embedding { values }) => values,
            other => panic!("{other:?}"),
        }
    };
    // The head plays no part in an embedding: equal to the full model's.
    assert_eq!(embed(dir.clone()), embed(tiny_qwen()));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_given_chat_template_wins_over_the_built_in_one() {
    let cfg = EngineConfig {
        chat_template: Some("{{ 'USER: ' + messages[0]['content'] + ' A:' }}".into()),
        ..cpu(fixture("tiny-llava"))
    };
    let (fe, _) = load(&cfg).unwrap();
    assert!(!fe.template.origin().contains("built-in"), "{}", fe.template.origin());
    assert_eq!(fe.template.render(&user(serde_json::json!("hi")), true).unwrap(), "USER: hi A:");
    // A folder with its own template keeps it (the built-in Qwen2-VL one is for folders without).
    let (fe, _) = load(&cpu(tiny_qwen())).unwrap();
    assert!(fe.template.origin().ends_with("chat_template.json"), "{}", fe.template.origin());
}

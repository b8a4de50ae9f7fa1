//! Phi-3.5-vision through the engine on the CPU backend
//! (tests/fixtures/tiny-phi3v, original_max_position_embeddings 2048):
//! batched steps equal one-sequence decoding; each sequence keeps one
//! longrope table for its life, chosen by the longest it may get (prompt +
//! max_tokens), and a prompt past the original length decodes its first
//! token as the reference's one forward does (long factors everywhere);
//! precomputed embeddings with `image_sizes` equal pixels.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use kestrel::engine::engine::load;
use kestrel::engine::request::Collector;
use kestrel::engine::sampling::SamplingParams;
use kestrel::engine::{EngineConfig, Request, RequestOutput, RequestParams};
use kestrel::model::seq;
use kestrel::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use kestrel::multimodal::Media;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-phi3v")
}

fn image(name: &str) -> Media {
    let bytes = std::fs::read(fixture().join("golden").join(name)).unwrap();
    Media::Image(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).unwrap())
}

fn cpu() -> EngineConfig {
    EngineConfig { model_dir: fixture(), device: "cpu".into(), ..Default::default() }
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

fn golden(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture().join(format!("golden/{name}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| match v.dtype() {
                    safetensors::Dtype::I32 => i32::from_le_bytes(c.try_into().unwrap()) as f32,
                    _ => f32::from_le_bytes(c.try_into().unwrap()),
                })
                .collect();
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

#[test]
fn phi3v_through_the_engine_equals_one_sequence_decoding() {
    let (fe, mut core) = load(&cpu()).unwrap();
    assert_eq!(fe.family, "phi3_v");
    let cases = [
        ("<|user|>\n<|image_1|>\nWhat is here?<|end|>\n<|assistant|>\n", vec![image("img_336x336.png")]),
        ("<|user|>\nTell me about the sea.<|end|>\n<|assistant|>\n", vec![]),
        (
            "<|user|>\n<|image_1|>\nand\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n",
            vec![image("img_500x375.png"), image("img_200x640.png")],
        ),
    ];
    let inputs: Vec<_> = cases.iter().map(|(p, m)| fe.prepare_prompt(p.to_string(), m).unwrap()).collect();
    let model = core.runner().model.as_ref();
    let direct: Vec<Vec<u32>> = inputs.iter().map(|i| seq::generate_greedy(model, i, 6, &[]).unwrap()).collect();
    let outs = run(&mut core, inputs.into_iter().map(|input| Request { input, params: greedy(6) }).collect());
    for (i, (o, d)) in outs.iter().zip(&direct).enumerate() {
        assert_eq!(&o.choices[0].token_ids, d, "prompt {i}: engine vs one-sequence greedy");
    }
}

/// The reference's `long_context` prompt (2602 tokens, past 2048): the
/// engine's first token is the argmax of the reference's last-position
/// logits, which its single forward computed with the long factors.
#[test]
fn a_prompt_past_the_original_length_decodes_with_the_long_table() {
    let (fe, mut core) = load(&cpu()).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("golden/cases.json")).unwrap()).unwrap();
    let case = &cases["cases"]["long_context"];
    assert_eq!(case["rope_table"], "long");
    let input = fe.prepare_prompt(case["prompt"].as_str().unwrap().to_string(), &[image("img_640x480.png")]).unwrap();
    let g = golden("long_context");
    assert_eq!(input.input_ids.len(), g["input_ids"].1.len());
    let (shape, logits) = &g["logits"];
    let last = &logits[(shape[0] - 1) * shape[1]..];
    let want = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
    let outs = run(&mut core, vec![Request { input, params: greedy(1) }]);
    assert_eq!(outs[0].choices[0].token_ids, vec![want]);
}

/// A 2040-token prompt: with max_tokens 4 it may reach 2044 tokens and
/// keeps the short table; with 40 it may pass 2048 and takes the long one
/// from its first token on. The engine agrees with one-sequence decoding
/// in both, and the two tables give different hidden states.
#[test]
fn each_sequence_keeps_the_table_its_longest_length_needs() {
    let (fe, mut core) = load(&cpu()).unwrap();
    let ids: Vec<u32> = std::iter::once(1).chain((0..2039).map(|i| 20 + (i * 7 % 400) as u32)).collect();
    let make = || fe.processor.text_input(String::new(), ids.clone());
    let model = core.runner().model.as_ref();
    let lr = model.decoder().dims.longrope.clone().unwrap();
    assert_eq!((lr.table_for(2040 + 4), lr.table_for(2040 + 40)), (0, 1));
    let direct: Vec<Vec<u32>> =
        [4, 40].iter().map(|&n| seq::generate_greedy(model, &make(), n, &[]).unwrap()).collect();
    let mut hidden = Vec::new();
    for table in [0, 1] {
        let mut input = make();
        input.set_rope_table(table);
        let mut cache = seq::new_cache(model, ids.len()).unwrap();
        hidden.push(seq::prefill(model, &input, &mut cache, &mut |_, _| {}).unwrap().to_f32_vec().unwrap());
    }
    assert_ne!(hidden[0], hidden[1], "the two tables must differ");
    let outs = run(
        &mut core,
        vec![Request { input: make(), params: greedy(4) }, Request { input: make(), params: greedy(40) }],
    );
    assert_eq!(outs[0].choices[0].token_ids, direct[0]);
    assert_eq!(outs[1].choices[0].token_ids, direct[1]);
}

#[test]
fn precomputed_embeddings_with_image_sizes_equal_pixels() {
    let (fe, mut core) = load(&cpu()).unwrap();
    let prompt = "<|user|>\n<|image_1|>\nvs\n<|image_2|>\n?<|end|>\n<|assistant|>\n".to_string();
    let pixels = fe.prepare_prompt(prompt.clone(), &[image("img_640x200.png"), image("img_336x336.png")]).unwrap();
    let one = fe.prepare_prompt("<|image_1|>".into(), &[image("img_640x200.png")]).unwrap();
    let feats = core.runner().model.encode_media(&one, &mut |_, _| {}).unwrap().image.unwrap();
    let (tokens, hidden) = (feats.shape()[0], feats.shape()[1]);
    let g = one.images.grids[0];
    let size = [(g[1] * 336) as i64, (g[2] * 336) as i64];
    let file = |rows: usize, size: [i64; 2]| {
        let vals: Vec<u8> = feats.to_f32_vec().unwrap()[..rows.min(tokens) * hidden]
            .iter()
            .chain(std::iter::repeat(&0.0).take(rows.saturating_sub(tokens) * hidden))
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let sizes: Vec<u8> = size.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = [
            (
                "image_embeds",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, hidden], &vals).unwrap(),
            ),
            ("image_sizes", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 2], &sizes).unwrap()),
        ];
        safetensors::serialize(views, None).unwrap()
    };
    let mut media = fe.processor.parse_image_embeds(&file(tokens, size)).unwrap();
    media.push(image("img_336x336.png"));
    let mixed = fe.prepare_prompt(prompt, &media).unwrap();
    assert_eq!(mixed.input_ids, pixels.input_ids);
    let outs =
        run(&mut core, vec![Request { input: pixels, params: greedy(6) }, Request { input: mixed, params: greedy(6) }]);
    assert_eq!(outs[0].choices[0].token_ids, outs[1].choices[0].token_ids);

    // A row count that does not fit the size names both; a size that is no
    // HD image's is refused.
    let e = fe.processor.parse_image_embeds(&file(tokens + 1, size)).err().unwrap().to_string();
    assert!(e.contains(&format!("{}", tokens + 1)) && e.contains(&tokens.to_string()), "{e}");
    let e = fe.processor.parse_image_embeds(&file(tokens, [300, 672])).err().unwrap().to_string();
    assert!(e.contains("multiples of 336"), "{e}");
}

/// `--mm-processor-kwargs '{"num_crops": N}'` over preprocessor_config.json's
/// 4: a 672×672 image is a 2×2 grid at 4 and a single crop at 1; keys the
/// processor does not have are refused by name.
#[test]
fn num_crops_comes_from_the_processor_kwargs() {
    use kestrel::model::ProcessorKwargs;
    let grid = |kwargs: serde_json::Value| {
        let kwargs: ProcessorKwargs = kwargs.as_object().unwrap().clone();
        kestrel::model::processor_with(&fixture(), &kwargs).map(|p| p.image_grid(672, 672).unwrap())
    };
    assert_eq!(grid(serde_json::json!({})).unwrap(), [1, 2, 2]);
    assert_eq!(grid(serde_json::json!({"num_crops": 1})).unwrap(), [1, 1, 1]);
    assert_eq!(grid(serde_json::json!({"num_crops": 16})).unwrap(), [1, 4, 4]);
    let e = grid(serde_json::json!({"max_pixels": 100})).err().unwrap().to_string();
    assert!(e.contains("max_pixels") && e.contains("num_crops"), "{e}");
    let e = grid(serde_json::json!({"num_crops": 0})).err().unwrap().to_string();
    assert!(e.contains("num_crops"), "{e}");
}

/// The guide's offline multi-image prompt: `kestrel generate --model DIR
/// --image a --image b --prompt ...` answers with the greedy tokens the
/// engine's one-sequence decoding gives for the same message.
#[test]
fn generate_takes_several_images() {
    let dir = fixture();
    let files = ["img_336x336.png", "img_640x200.png"];
    let (fe, core) = load(&cpu()).unwrap();
    let prompt = "What are the animals in these images?";
    let msgs = serde_json::json!([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]}]);
    let input = fe.prepare_chat(&msgs, &files.map(image)).unwrap();
    let stop = {
        let mut s = fe.spec().eos_token_id.clone();
        s.extend_from_slice(fe.tokenizer.eos_token_ids());
        s
    };
    let tokens = seq::generate_greedy(core.runner().model.as_ref(), &input, 8, &stop).unwrap();
    let expected = fe.tokenizer.decode(&tokens, true).unwrap();
    let golden = dir.join("golden");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["generate", "--device", "cpu", "--max-tokens", "8", "--prompt", prompt, "--model"])
        .arg(&dir)
        .args(files.iter().flat_map(|f| ["--image".into(), golden.join(f).display().to_string()]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.strip_suffix('\n').unwrap_or(&stdout), expected);
}

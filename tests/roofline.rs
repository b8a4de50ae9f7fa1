//! The roofline's counts against published parameter counts
//! (../shared/REFERENCE.md): the shared decoder's step bytes for the
//! Qwen2-VL-2B/7B shapes, each family's vision flops, and the random-mm
//! bound's split into prefill and decode.

use std::path::Path;

use kestrel::cli::roofline::{decoder_step_params, random_mm, Ceilings, Workload};
use kestrel::model::config::Qwen2VlConfig;
use kestrel::model::llava::config::LlavaConfig;
use kestrel::model::qwen2_vl::{model::decoder_dims, vision_flops};

fn published(name: &str) -> Qwen2VlConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/loader/configs").join(name);
    Qwen2VlConfig::from_json_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn decoder_bytes_match_the_published_parameter_counts() {
    // The 2B language model has 1.544 B parameters (tied head), the 7B one
    // 7.616 B (untied: its 0.545 B embedding is read one row per token, so a
    // step reads 7.07 B).
    let c2 = published("qwen2_vl_2b_instruct.json");
    let b2 = decoder_step_params(&decoder_dims(&c2, false)) as f64;
    assert!((b2 / 1e9 - 1.544).abs() < 0.002, "{b2}");
    let c7 = published("qwen2_vl_7b_instruct.json");
    let t7 = &c7.text_config;
    let b7 = decoder_step_params(&decoder_dims(&c7, true)) as f64 + (t7.vocab_size * t7.hidden_size) as f64;
    assert!((b7 / 1e9 - 7.616).abs() < 0.002, "{b7}");
}

#[test]
fn llava_7b_decoder_and_tower_match_their_parameter_counts() {
    // Llama-2-7B with LLaVA's 32064 vocabulary: 6.74 B + 64·4096·2 more
    // embedding and head rows; a step reads all but the embedding.
    let c = LlavaConfig::from_json_str(
        r#"{"text_config": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064}}"#,
    )
    .unwrap();
    let d = kestrel::model::llava::spec(&c).decoder;
    let all = decoder_step_params(&d) as f64 + (d.vocab * d.hidden) as f64;
    assert!((all / 1e9 - (6.738 + 2.0 * 64.0 * 4096.0 / 1e9)).abs() < 0.002, "{all}");
    // CLIP ViT-L/14-336 (0.303 B) up to layer 23 of 24 plus the 21 M
    // projector: every parameter sees each of the 577 rows (576 for the
    // projector), 2 flops each, besides attention.
    let f = kestrel::model::llava::vision_flops(&c);
    let (e, m) = (1024.0f64, 4096.0f64);
    let attention = 23.0 * 4.0 * 577.0 * 577.0 * e;
    let per_layer = 4.0 * e * e + 2.0 * e * m;
    let linear = 2.0 * 577.0 * 23.0 * per_layer + 2.0 * 576.0 * (3.0 * 14.0 * 14.0 * e + e * 4096.0 + 4096.0 * 4096.0);
    assert!((f / (attention + linear) - 1.0).abs() < 1e-9, "{f}");
}

#[test]
fn vision_flops_count_each_parameter_once_per_patch_it_sees() {
    // 0.665 B vision parameters. All but the merger's see every patch (2
    // flops each); the merger's see one merged row per 4 patches, so a
    // quarter of them count per patch.
    let v = published("qwen2_vl_2b_instruct.json").vision_config;
    let mh = v.merger_hidden_size();
    let merger = (mh * mh + mh * v.hidden_size) as f64;
    let one = vision_flops(&v, [1, 2, 2]) / 4.0;
    assert!((one / 2.0 - (0.665e9 - 0.75 * merger)).abs() < 0.002e9, "{one}");
    // Attention grows with the square of a frame, not across frames.
    let (a, b) = (vision_flops(&v, [1, 36, 36]), vision_flops(&v, [2, 36, 36]));
    assert!((b / a - 2.0).abs() < 1e-9);
    let big = vision_flops(&v, [1, 72, 72]);
    assert!(big > 4.0 * a);
}

#[test]
fn random_mm_splits_into_prefill_and_decode() {
    let cfg = published("qwen2_vl_2b_instruct.json");
    let d = decoder_dims(&cfg, false);
    let c = Ceilings { copy_gbps: 3000.0, gemm_tflops: 600.0 };
    let w = Workload { requests: 1, concurrency: 1, prompt_tokens: 1, vision_flops: 0.0, output_len: 2 };
    let r = random_mm(&d, &w, &c, 2);
    // One decode step at batch 1 reads 3.09 GB (1.03 ms at 3.0 TB/s).
    assert!((r.decode_s * 1e3 - 1.03).abs() < 0.01, "{r:?}");
    // Doubling the batch halves the weight reads per token.
    let w64 = Workload {
        requests: 64,
        concurrency: 64,
        prompt_tokens: 452,
        vision_flops: vision_flops(&cfg.vision_config, [1, 36, 36]),
        output_len: 128,
    };
    let w32 = Workload { concurrency: 32, ..w64 };
    let (r64, r32) = (random_mm(&d, &w64, &c, 2), random_mm(&d, &w32, &c, 2));
    assert_eq!(r64.prefill_s, r32.prefill_s);
    assert!(r64.decode_s < r32.decode_s && r64.output_tps > r32.output_tps);
    assert!((r64.output_tps / r64.requests_per_s - 128.0).abs() < 1e-9);
}

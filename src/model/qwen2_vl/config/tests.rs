use super::*;

/// Qwen/Qwen2-VL-2B-Instruct config.json as published (flat layout).
const QWEN2_VL_2B: &str = include_str!("../../../../tests/loader/configs/qwen2_vl_2b_instruct.json");

/// Qwen/Qwen2-VL-7B-Instruct config.json as published (flat layout).
const QWEN2_VL_7B: &str = include_str!("../../../../tests/loader/configs/qwen2_vl_7b_instruct.json");

/// What `Qwen2VLConfig(**published).save_pretrained()` writes, per
/// transformers version (4.46.3: flat, `rope_scaling.type` "default",
/// vision fields equal to the class defaults left out; 4.53.3: flat and
/// `text_config` both; 5.24.0: `text_config` with `rope_parameters`).
const RESAVED: [(&str, &str, &str); 6] = [
    ("2b", "4.46.3", include_str!("../../../../tests/loader/configs/qwen2_vl_2b_saved_by_transformers_4.46.3.json")),
    ("7b", "4.46.3", include_str!("../../../../tests/loader/configs/qwen2_vl_7b_saved_by_transformers_4.46.3.json")),
    ("2b", "4.53.3", include_str!("../../../../tests/loader/configs/qwen2_vl_2b_saved_by_transformers_4.53.3.json")),
    ("7b", "4.53.3", include_str!("../../../../tests/loader/configs/qwen2_vl_7b_saved_by_transformers_4.53.3.json")),
    ("2b", "5.24.0", include_str!("../../../../tests/loader/configs/qwen2_vl_2b_saved_by_transformers_5.24.0.json")),
    ("7b", "5.24.0", include_str!("../../../../tests/loader/configs/qwen2_vl_7b_saved_by_transformers_5.24.0.json")),
];
const NESTED_4_53: &str = RESAVED[2].2;
const V5_24: &str = RESAVED[5].2;

fn parse(s: &str) -> Qwen2VlConfig {
    Qwen2VlConfig::from_json_str(s).unwrap()
}

/// Applies `edit` to a parsed copy of `base` and parses the result.
fn edited(base: &str, edit: impl FnOnce(&mut Value)) -> Result<Qwen2VlConfig> {
    let mut v: Value = serde_json::from_str(base).unwrap();
    edit(&mut v);
    Qwen2VlConfig::from_json_str(&v.to_string())
}

fn config_err(r: Result<Qwen2VlConfig>) -> String {
    match r {
        Err(Error::Config(msg)) => msg,
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

fn vision_2b() -> VisionConfig {
    VisionConfig {
        depth: 32,
        embed_dim: 1280,
        num_heads: 16,
        head_dim: 80,
        mlp_ratio: 4.0,
        mlp_hidden_dim: 5120,
        hidden_size: 1536,
        hidden_act: Activation::QuickGelu,
        in_channels: 3,
        patch_size: 14,
        temporal_patch_size: 2,
        spatial_merge_size: 2,
        rope_theta: 10000.0,
    }
}

#[test]
fn qwen2_vl_2b_instruct() {
    let c = parse(QWEN2_VL_2B);
    assert_eq!(c.architecture, Architecture::ConditionalGeneration);
    assert_eq!(
        c.text_config,
        TextConfig {
            hidden_size: 1536,
            intermediate_size: 8960,
            num_hidden_layers: 28,
            num_attention_heads: 12,
            num_key_value_heads: 2,
            head_dim: 128,
            vocab_size: 151936,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            mrope_section: [16, 24, 24],
            max_position_embeddings: 32768,
            hidden_act: Activation::Silu,
            tie_word_embeddings: true,
        }
    );
    assert_eq!(c.vision_config, vision_2b());
    assert_eq!(c.vision_config.patch_dim(), 3 * 2 * 14 * 14);
    assert_eq!(c.vision_config.merger_hidden_size(), 5120);
    assert_eq!(
        (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id),
        (151655, 151656, 151652, 151653)
    );
    assert_eq!(c.bos_token_id, Some(151643));
    assert_eq!(c.eos_token_id, vec![151645]);
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn qwen2_vl_7b_instruct() {
    let c = parse(QWEN2_VL_7B);
    let t = &c.text_config;
    assert_eq!((t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size), (3584, 28, 18944, 152064));
    assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (28, 4, 128));
    assert_eq!((t.rope_theta, t.mrope_section, t.rms_norm_eps), (1e6, [16, 24, 24], 1e-6));
    assert!(!t.tie_word_embeddings);
    assert_eq!(c.vision_config, VisionConfig { hidden_size: 3584, ..vision_2b() });
}

#[test]
fn every_resaved_file_matches_the_published_one() {
    for (size, version, text) in RESAVED {
        let published = if size == "2b" { QWEN2_VL_2B } else { QWEN2_VL_7B };
        assert_eq!(parse(text), parse(published), "{size} saved by transformers {version}");
    }
}

#[test]
fn v5_rope_parameters_keyed_by_layer_type_and_theta_inside() {
    let c = edited(V5_24, |v| {
        v["text_config"]["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "default", "rope_theta": 10000, "mrope_section": [8, 28, 28]}
        });
    })
    .unwrap();
    assert_eq!(c.text_config.rope_theta, 10000.0);
    assert_eq!(c.text_config.mrope_section, [8, 28, 28]);
}

#[test]
fn tied_when_either_level_says_so() {
    for (top, text, tied) in [
        (None, None, false),
        (Some(false), None, false),
        (None, Some(true), true),
        (Some(true), Some(false), true),
        (Some(false), Some(true), true),
        (Some(false), Some(false), false),
    ] {
        let c = edited(V5_24, |v| {
            let o = v.as_object_mut().unwrap();
            o.remove("tie_word_embeddings");
            if let Some(t) = top {
                o.insert("tie_word_embeddings".into(), t.into());
            }
            if let Some(t) = text {
                v["text_config"]["tie_word_embeddings"] = t.into();
            }
        })
        .unwrap();
        assert_eq!(c.text_config.tie_word_embeddings, tied, "top {top:?}, text_config {text:?}");
    }
}

#[test]
fn vision_rope_theta() {
    assert_eq!(parse(V5_24).vision_config.rope_theta, 10000.0);
    let c = edited(V5_24, |v| v["vision_config"]["rope_parameters"]["rope_theta"] = 5e5.into()).unwrap();
    assert_eq!(c.vision_config.rope_theta, 5e5);
    let msg = config_err(edited(V5_24, |v| v["vision_config"]["rope_parameters"]["rope_type"] = "default".into()));
    assert!(msg.contains("`vision_config.rope_parameters.rope_type` is `default`"), "{msg}");
}

#[test]
fn head_dim_field_must_agree() {
    let c = edited(QWEN2_VL_2B, |v| v["head_dim"] = 128.into()).unwrap();
    assert_eq!(c.text_config.head_dim, 128);
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["head_dim"] = 64.into()));
    assert!(msg.contains("`head_dim` is 64") && msg.contains("= 128"), "{msg}");
}

#[test]
fn absent_optionals_take_hf_defaults() {
    let c = edited(QWEN2_VL_2B, |v| {
        let o = v.as_object_mut().unwrap();
        for k in ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"] {
            o.remove(k);
        }
        for k in ["rope_theta", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"] {
            o.remove(k);
        }
        o.remove("torch_dtype");
        let vc = o["vision_config"].as_object_mut().unwrap();
        vc.remove("in_chans");
        vc.remove("mlp_ratio");
    })
    .unwrap();
    assert_eq!((c.image_token_id, c.video_token_id), (151655, 151656));
    assert_eq!((c.vision_start_token_id, c.vision_end_token_id), (151652, 151653));
    assert_eq!((c.text_config.rope_theta, c.text_config.rms_norm_eps), (1e6, 1e-5));
    assert!(!c.text_config.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_id.len(), c.torch_dtype), (None, 0, None));
    assert_eq!(c.vision_config, vision_2b());
}

#[test]
fn qwen2vlmodel_architecture_and_eos_list() {
    let c = edited(QWEN2_VL_2B, |v| {
        v["architectures"] = serde_json::json!(["Qwen2VLModel"]);
        v["eos_token_id"] = serde_json::json!([151645, 151643]);
    })
    .unwrap();
    assert_eq!(c.architecture, Architecture::Model);
    assert_eq!(c.eos_token_id, vec![151645, 151643]);
}

#[test]
fn null_kv_heads_means_as_many_as_query_heads() {
    let c = edited(QWEN2_VL_2B, |v| v["num_key_value_heads"] = Value::Null).unwrap();
    assert_eq!(c.text_config.num_key_value_heads, 12);
}

#[test]
fn wrong_architecture_names_found_and_supported() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v["architectures"] = serde_json::json!(["Qwen2_5_VLForConditionalGeneration"]);
    }));
    assert!(msg.contains("Qwen2_5_VLForConditionalGeneration"), "{msg}");
    assert!(msg.contains("Qwen2VLForConditionalGeneration") && msg.contains("Qwen2VLModel"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v.as_object_mut().unwrap().remove("architectures");
    }));
    assert!(msg.contains("`architectures` is missing"), "{msg}");
}

#[test]
fn missing_field_is_named() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    }));
    assert!(msg.contains("`hidden_size` is missing"), "{msg}");
    let msg = config_err(edited(V5_24, |v| {
        v["text_config"].as_object_mut().unwrap().remove("num_key_value_heads");
    }));
    assert!(msg.contains("`text_config.num_key_value_heads` is missing"), "{msg}");
}

#[test]
fn wrong_type_is_named() {
    let msg = config_err(edited(NESTED_4_53, |v| v["text_config"]["num_hidden_layers"] = "28".into()));
    assert!(msg.contains("`text_config.num_hidden_layers` must be a non-negative integer"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["vision_config"]["depth"] = (-1).into()));
    assert!(msg.contains("`vision_config.depth`"), "{msg}");
}

#[test]
fn bad_mrope_section_sum() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 16]);
    }));
    assert!(msg.contains("`mrope_section` [16, 24, 16] sums to 56") && msg.contains("head_dim / 2 = 64"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v["rope_scaling"]["mrope_section"] = serde_json::json!([32, 32]);
    }));
    assert!(msg.contains("`rope_scaling.mrope_section` must hold three"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v.as_object_mut().unwrap().remove("rope_scaling");
    }));
    assert!(msg.contains("mrope_section"), "{msg}");
}

#[test]
fn unsupported_rope_type() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| {
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]});
    }));
    assert!(msg.contains("`rope_scaling.rope_type` is `yarn`"), "{msg}");
}

#[test]
fn divisibility_errors_name_the_fields() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["num_attention_heads"] = 7.into()));
    assert!(msg.contains("`hidden_size` (1536) must be divisible by `num_attention_heads` (7)"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["num_key_value_heads"] = 5.into()));
    assert!(msg.contains("`num_attention_heads` (12) must be divisible by `num_key_value_heads` (5)"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["vision_config"]["num_heads"] = 3.into()));
    assert!(msg.contains("`vision_config.embed_dim` (1280) must be divisible by `vision_config.num_heads` (3)"));
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["num_attention_heads"] = 0.into()));
    assert!(msg.contains("`num_attention_heads` is 0"), "{msg}");
}

#[test]
fn merger_width_must_match_the_language_model() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["vision_config"]["hidden_size"] = 3584.into()));
    assert!(msg.contains("`vision_config.hidden_size` (3584)") && msg.contains("(1536)"), "{msg}");
}

#[test]
fn sliding_window_and_other_model_types_are_refused() {
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["use_sliding_window"] = true.into()));
    assert!(msg.contains("`use_sliding_window` is true"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["model_type"] = "qwen2_5_vl".into()));
    assert!(msg.contains("`model_type` is `qwen2_5_vl`"), "{msg}");
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["hidden_act"] = "gelu".into()));
    assert!(msg.contains("`hidden_act` is `gelu`"), "{msg}");
}

#[test]
fn layer_types_must_cover_every_layer() {
    let msg = config_err(edited(V5_24, |v| {
        v["text_config"]["layer_types"] = Value::from(vec!["full_attention"; 4]);
    }));
    assert!(msg.contains("`text_config.layer_types` has 4 entries; `num_hidden_layers` is 28"), "{msg}");
    let msg = config_err(edited(V5_24, |v| {
        v["text_config"]["layer_types"][27] = "sliding_attention".into();
    }));
    assert!(msg.contains("other than `full_attention`"), "{msg}");
}

#[test]
fn not_json_or_not_an_object() {
    assert!(config_err(Qwen2VlConfig::from_json_str("{\"hidden_size\": 1536,")).contains("not valid JSON"));
    assert!(config_err(Qwen2VlConfig::from_json_str("[1, 2]")).contains("must be a JSON object"));
    let msg = config_err(edited(QWEN2_VL_2B, |v| v["vision_config"] = 3.into()));
    assert!(msg.contains("`vision_config` must be a JSON object"), "{msg}");
}

#[test]
fn from_dir_reads_config_json_and_names_the_path() {
    let dir = std::env::temp_dir().join(format!("kestrel-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    match Qwen2VlConfig::from_dir(&dir) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("config.json"), "{path}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
    std::fs::write(dir.join("config.json"), QWEN2_VL_7B).unwrap();
    assert_eq!(Qwen2VlConfig::from_dir(&dir).unwrap(), parse(QWEN2_VL_7B));
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let msg = config_err(Qwen2VlConfig::from_dir(&dir));
    assert!(msg.contains("config.json: `architectures` is missing"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

use super::*;

/// microsoft/Phi-3.5-vision-instruct's config.json as published (the 48
/// factors of each table replaced by a ramp; the values do not matter here).
fn published() -> Value {
    let ramp = |a: f64| (0..48).map(|i| a + i as f64 * 0.01).collect::<Vec<_>>();
    serde_json::json!({
        "architectures": ["Phi3VForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": true, "with_learnable_separator": true},
        "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 3072,
        "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": 144},
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "model_type": "phi3_v", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": ramp(1.0), "short_factor": ramp(1.05), "type": "su"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "transformers_version": "4.38.1", "use_cache": true, "vocab_size": 32064
    })
}

#[test]
fn the_published_config_reads_as_phi3_mini_with_clip_l14() {
    let c = Phi3VConfig::from_value(&published()).unwrap();
    let t = &c.text_config;
    assert_eq!((t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads), (3072, 32, 32, 32));
    assert_eq!((t.head_dim, t.intermediate_size, t.vocab_size, t.max_position_embeddings), (96, 8192, 32064, 131072));
    assert_eq!((t.rms_norm_eps, t.rope_theta, t.tie_word_embeddings), (1e-5, 10000.0, false));
    let lr = t.longrope.as_ref().unwrap();
    assert_eq!((lr.original_max_positions, lr.short_factor.len(), lr.long_factor.len()), (4096, 48, 48));
    assert_eq!((lr.short_factor[0], lr.long_factor[47]), (1.05, 1.47));
    // √(1 + ln 32 / ln 4096) = √(1 + 5/12).
    assert!((lr.attention_factor as f64 - (17.0f64 / 12.0).sqrt()).abs() < 1e-7, "{}", lr.attention_factor);
    let v = &c.vision_config;
    assert_eq!((v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size), (1024, 24, 16, 14));
    assert_eq!((v.image_size, v.intermediate_size, v.hidden_act), (336, 4096, Activation::QuickGelu));
    assert_eq!((c.layer_idx, c.num_img_tokens, c.merged_side(), c.bos_token_id), (-2, 144, 12, 1));
    assert_eq!(c.eos_token_id, vec![2]);
}

#[test]
fn the_table_is_fixed_by_the_longest_the_sequence_may_get() {
    let c = Phi3VConfig::from_value(&published()).unwrap();
    let lr = c.text_config.longrope.unwrap();
    assert_eq!((lr.table_for(1), lr.table_for(4096), lr.table_for(4097), lr.table_for(131072)), (0, 0, 1, 1));
}

#[test]
fn the_tiny_fixture_key_overrides_the_tower() {
    let mut v = published();
    v["img_processor"]["vision_config"] = serde_json::json!({"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 3, "intermediate_size": 64});
    v["img_processor"]["image_dim_out"] = 32.into();
    let c = Phi3VConfig::from_value(&v).unwrap();
    assert_eq!(
        (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.vision_config.patch_size),
        (32, 3, 14)
    );
}

#[test]
fn what_is_not_implemented_is_refused_by_name() {
    let e = |f: &dyn Fn(&mut Value)| {
        let mut v = published();
        f(&mut v);
        Phi3VConfig::from_value(&v).unwrap_err().to_string()
    };
    let m = e(&|v| v["embd_layer"]["hd_transform_order"] = "glb_sub".into());
    assert!(m.contains("hd_transform_order") && m.contains("glb_sub"), "{m}");
    let m = e(&|v| v["embd_layer"]["projection_cls"] = "linear".into());
    assert!(m.contains("projection_cls"), "{m}");
    let m = e(&|v| v["embd_layer"]["use_hd_transform"] = false.into());
    assert!(m.contains("use_hd_transform"), "{m}");
    let m = e(&|v| v["rope_scaling"]["type"] = "yarn".into());
    assert!(m.contains("yarn"), "{m}");
    let m = e(&|v| v["rope_scaling"]["short_factor"] = serde_json::json!([1.0, 2.0]));
    assert!(m.contains("short_factor") && m.contains("48"), "{m}");
    let m = e(&|v| v["img_processor"]["image_dim_out"] = 768.into());
    assert!(m.contains("image_dim_out"), "{m}");
    let m = e(&|v| v["img_processor"]["num_img_tokens"] = 576.into());
    assert!(m.contains("num_img_tokens"), "{m}");
    let m = e(&|v| v["partial_rotary_factor"] = 0.5.into());
    assert!(m.contains("partial_rotary_factor"), "{m}");
    let m = e(&|v| {
        v.as_object_mut().unwrap().remove("original_max_position_embeddings");
    });
    assert!(m.contains("original_max_position_embeddings"), "{m}");
    let m = e(&|v| {
        v.as_object_mut().unwrap().remove("embd_layer");
    });
    assert!(m.contains("embd_layer"), "{m}");
}

#[test]
fn no_scaling_means_plain_rope() {
    let mut v = published();
    v["rope_scaling"] = Value::Null;
    assert_eq!(Phi3VConfig::from_value(&v).unwrap().text_config.longrope, None);
}

//! Checkpoint loading on the CPU: small safetensors files written here with
//! the safetensors crate, in every name layout Qwen2-VL checkpoints use,
//! single-file and sharded, bf16/f16/f32 on disk, and the malformed cases.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kestrel::model::config::Qwen2VlConfig;
use kestrel::model::weights::{Layout, Weights, EMBED_TOKENS, LM_HEAD};
use kestrel::{DType, Device, Error};
use safetensors::tensor::TensorView as StView;
use safetensors::Dtype;

/// A folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kestrel-loader-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A tensor to write: dtype, shape, little-endian bytes.
#[derive(Clone)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32s(shape: &[usize], v: &[f32]) -> Raw {
    Raw { dtype: Dtype::F32, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}
fn bf16_bits(shape: &[usize], v: &[u16]) -> Raw {
    Raw { dtype: Dtype::BF16, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}
fn f16_bits(shape: &[usize], v: &[u16]) -> Raw {
    Raw { dtype: Dtype::F16, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}
fn i64s(shape: &[usize], v: &[i64]) -> Raw {
    Raw { dtype: Dtype::I64, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

fn write(path: &Path, tensors: &[(String, Raw)]) {
    let views: Vec<(String, StView)> =
        tensors.iter().map(|(n, r)| (n.clone(), StView::new(r.dtype, r.shape.clone(), &r.data).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// `model.safetensors.index.json` for `shards` (file name → tensors).
fn write_sharded(dir: &Path, shards: &[(&str, Vec<(String, Raw)>)]) {
    let mut weight_map = BTreeMap::new();
    for (file, tensors) in shards {
        write(&dir.join(file), tensors);
        for (name, _) in tensors {
            weight_map.insert(name.clone(), file.to_string());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn weights_err(r: kestrel::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Weights(msg)) => msg,
        other => panic!("expected Error::Weights, got {other:?}"),
    }
}

/// One tensor of each kind the model asks for, as (canonical name, data).
/// Values are small integers and halves, exact in every dtype.
fn tiny_model(with_lm_head: bool) -> Vec<(&'static str, Raw)> {
    let seq = |n: usize| (0..n).map(|i| i as f32 * 0.5 - 1.0).collect::<Vec<_>>();
    let mut v = vec![
        (EMBED_TOKENS, f32s(&[4, 2], &seq(8))),
        // bf16 1.0, -2.5, 0.5, 3.0
        (
            "model.language_model.layers.0.self_attn.q_proj.weight",
            bf16_bits(&[2, 2], &[0x3F80, 0xC020, 0x3F00, 0x4040]),
        ),
        // f16 1.0, -2.5
        ("model.language_model.layers.0.self_attn.q_proj.bias", f16_bits(&[2], &[0x3C00, 0xC100])),
        ("model.language_model.norm.weight", f32s(&[2], &[1.0, 2.0])),
        ("model.visual.patch_embed.proj.weight", f32s(&[2, 3], &seq(6))),
        ("model.visual.blocks.0.attn.qkv.weight", f32s(&[6, 2], &seq(12))),
        ("model.visual.merger.mlp.0.weight", f32s(&[2, 2], &[4.0, 3.0, 2.0, 1.0])),
    ];
    if with_lm_head {
        v.push((LM_HEAD, f32s(&[4, 2], &[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])));
    }
    v
}

/// `tiny_model` with names as `layout` stores them.
fn stored(layout: Layout, tensors: &[(&'static str, Raw)]) -> Vec<(String, Raw)> {
    tensors
        .iter()
        .map(|(name, raw)| {
            let s = if let Some(r) = name.strip_prefix("model.language_model.") {
                format!("{}{r}", layout.text_prefix())
            } else if let Some(r) = name.strip_prefix("model.visual.") {
                format!("{}{r}", layout.vision_prefix())
            } else {
                name.to_string()
            };
            (s, raw.clone())
        })
        .collect()
}

fn expected_f32(raw: &Raw) -> Vec<f32> {
    match raw.dtype {
        Dtype::F32 => raw.data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::BF16 => raw.data.chunks(2).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
        Dtype::F16 => raw.data.chunks(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
        d => panic!("{d:?}"),
    }
}

/// Every canonical tensor loads with its values, `names()` is the canonical
/// set, and nothing is left unused.
fn check_all_canonical(w: &Weights, model: &[(&'static str, Raw)]) {
    let mut want: Vec<String> = model.iter().map(|(n, _)| n.to_string()).collect();
    want.sort();
    assert_eq!(w.names(), want);
    for (name, raw) in model {
        let t = w.load(&Device::Cpu, name, &raw.shape).unwrap();
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert_eq!(t.shape(), raw.shape.as_slice(), "{name}");
        assert_eq!(t.to_f32_vec().unwrap(), expected_f32(raw), "{name}");
    }
    assert!(w.unused().is_empty(), "{:?}", w.unused());
}

#[test]
fn each_layout_maps_to_canonical_names() {
    let model = tiny_model(true);
    for (tag, layout, sample) in [
        ("current", Layout::Current, "model.language_model.layers.0.self_attn.q_proj.weight"),
        ("legacy", Layout::Legacy, "model.layers.0.self_attn.q_proj.weight"),
        ("current-base", Layout::CurrentBase, "language_model.layers.0.self_attn.q_proj.weight"),
        ("legacy-bare", Layout::LegacyBare, "layers.0.self_attn.q_proj.weight"),
    ] {
        let dir = TempDir::new(tag);
        let tensors = stored(layout, &model);
        assert!(tensors.iter().any(|(n, _)| n == sample), "{tag}: fixture does not use the layout");
        write(&dir.path().join("model.safetensors"), &tensors);
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.layout(), layout, "{tag}");
        assert_eq!(w.stored_name("model.language_model.layers.0.self_attn.q_proj.weight"), sample);
        let mut raw_names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        raw_names.sort();
        assert_eq!(w.stored_names(), raw_names);
        check_all_canonical(&w, &model);
    }
}

#[test]
fn published_legacy_names_resolve() {
    // Names as Qwen/Qwen2-VL-2B-Instruct stores them (transformers 4.41).
    let dir = TempDir::new("published");
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.27.mlp.down_proj.weight",
        "model.norm.weight",
        "visual.patch_embed.proj.weight",
        "visual.blocks.31.attn.qkv.weight",
        "visual.merger.ln_q.weight",
        "visual.merger.mlp.2.bias",
    ];
    let tensors: Vec<(String, Raw)> = names.iter().map(|n| (n.to_string(), f32s(&[1], &[1.0]))).collect();
    write(&dir.path().join("model.safetensors"), &tensors);
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.layout(), Layout::Legacy);
    for canonical in [
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.0.self_attn.k_proj.bias",
        "model.language_model.layers.27.mlp.down_proj.weight",
        "model.language_model.norm.weight",
        "model.visual.patch_embed.proj.weight",
        "model.visual.blocks.31.attn.qkv.weight",
        "model.visual.merger.ln_q.weight",
        "model.visual.merger.mlp.2.bias",
    ] {
        assert!(w.contains(canonical), "{canonical} -> {}", w.stored_name(canonical));
        assert!(w.names().contains(&canonical.to_string()));
    }
}

#[test]
fn disk_dtypes_convert_exactly_to_f32_on_cpu() {
    let dir = TempDir::new("dtypes");
    // bf16: 1, -2.5, 0.15625, bf16::MAX, the smallest subnormal, -0.
    let bf = [0x3F80u16, 0xC020, 0x3E20, 0x7F7F, 0x0001, 0x8000];
    // f16: 1, -2.5, 65504 (f16::MAX), 2^-24 (smallest subnormal), 1365/4096 (nearest to 1/3).
    let hf = [0x3C00u16, 0xC100, 0x7BFF, 0x0001, 0x3555];
    let fl = [0.1f32, -1e-30, 123456.79, f32::MIN_POSITIVE, -0.0];
    let tensors = vec![
        ("a.bf16".to_string(), bf16_bits(&[2, 3], &bf)),
        ("a.f16".to_string(), f16_bits(&[5], &hf)),
        ("a.f32".to_string(), f32s(&[5, 1], &fl)),
    ];
    write(&dir.path().join("model.safetensors"), &tensors);
    let w = Weights::open(dir.path()).unwrap();

    let v = w.get("a.bf16").unwrap();
    assert_eq!((v.dtype(), v.shape(), v.numel()), (DType::BF16, &[2usize, 3][..], 6));
    let want: Vec<f32> = bf.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    assert_eq!(want[..3], [1.0, -2.5, 0.15625]);
    let got = w.load(&Device::Cpu, "a.bf16", &[2, 3]).unwrap().to_f32_vec().unwrap();
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );

    let got = w.load(&Device::Cpu, "a.f16", &[5]).unwrap().to_f32_vec().unwrap();
    assert_eq!(got, [1.0, -2.5, 65504.0, 2f32.powi(-24), 1365.0 / 4096.0]);

    let got = w.load(&Device::Cpu, "a.f32", &[5, 1]).unwrap().to_f32_vec().unwrap();
    assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), fl.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}

#[test]
fn views_borrow_the_map() {
    let dir = TempDir::new("borrow");
    let tensors = vec![("x".to_string(), bf16_bits(&[3], &[0x3F80, 0x4000, 0x4040]))];
    write(&dir.path().join("model.safetensors"), &tensors);
    let w = Weights::open(dir.path()).unwrap();
    let (a, b) = (w.get("x").unwrap(), w.get("x").unwrap());
    assert_eq!(a.data(), tensors[0].1.data.as_slice());
    assert!(std::ptr::eq(a.data().as_ptr(), b.data().as_ptr()), "two gets should see the same mapped bytes");
}

#[test]
fn two_shards_with_an_index() {
    let dir = TempDir::new("sharded");
    let model = tiny_model(true);
    let all = stored(Layout::Legacy, &model);
    let (first, second) = all.split_at(3);
    write_sharded(
        dir.path(),
        &[("model-00001-of-00002.safetensors", first.to_vec()), ("model-00002-of-00002.safetensors", second.to_vec())],
    );
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.files().len(), 2);
    assert_eq!(w.layout(), Layout::Legacy);
    check_all_canonical(&w, &model);
}

#[test]
fn single_file_wins_over_an_index() {
    // transformers looks for model.safetensors before the index.
    let dir = TempDir::new("both");
    write(&dir.path().join("model.safetensors"), &[("a".to_string(), f32s(&[1], &[1.0]))]);
    fs::write(dir.path().join("model.safetensors.index.json"), "not json").unwrap();
    assert_eq!(Weights::open(dir.path()).unwrap().stored_names(), ["a"]);
}

#[test]
fn tied_and_untied_lm_head() {
    let cpu = Device::Cpu;
    let dir = TempDir::new("tied");
    write(&dir.path().join("model.safetensors"), &stored(Layout::Legacy, &tiny_model(false)));
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.lm_head_name(true).unwrap(), EMBED_TOKENS);
    let head = w.lm_head(&cpu, true, &[4, 2]).unwrap().to_f32_vec().unwrap();
    assert_eq!(head, w.load(&cpu, EMBED_TOKENS, &[4, 2]).unwrap().to_f32_vec().unwrap());
    let msg = weights_err(w.lm_head(&cpu, false, &[4, 2]));
    assert!(msg.contains("`lm_head.weight`") && msg.contains("tie_word_embeddings"), "{msg}");

    let dir = TempDir::new("untied");
    write(&dir.path().join("model.safetensors"), &stored(Layout::Current, &tiny_model(true)));
    let w = Weights::open(dir.path()).unwrap();
    for tie in [false, true] {
        assert_eq!(w.lm_head_name(tie).unwrap(), LM_HEAD);
        let head = w.lm_head(&cpu, tie, &[4, 2]).unwrap().to_f32_vec().unwrap();
        assert_eq!(head, [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]);
    }
}

#[test]
fn missing_tensor_names_canonical_and_stored() {
    let dir = TempDir::new("missing");
    write(&dir.path().join("model.safetensors"), &stored(Layout::Legacy, &tiny_model(true)));
    let w = Weights::open(dir.path()).unwrap();
    let msg = weights_err(w.get("model.language_model.layers.5.mlp.up_proj.weight"));
    assert!(msg.contains("`model.language_model.layers.5.mlp.up_proj.weight`"), "{msg}");
    assert!(msg.contains("`model.layers.5.mlp.up_proj.weight`"), "{msg}");
    let msg = weights_err(w.load(&Device::Cpu, "model.visual.blocks.9.mlp.fc1.weight", &[1]));
    assert!(msg.contains("`visual.blocks.9.mlp.fc1.weight`"), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let dir = TempDir::new("shape");
    write(&dir.path().join("model.safetensors"), &stored(Layout::Current, &tiny_model(true)));
    let w = Weights::open(dir.path()).unwrap();
    let msg = weights_err(w.load(&Device::Cpu, EMBED_TOKENS, &[3, 2]));
    assert!(msg.contains(EMBED_TOKENS) && msg.contains("expected shape [3, 2], found [4, 2]"), "{msg}");
}

#[test]
fn unsupported_disk_dtype_is_refused() {
    let dir = TempDir::new("i64");
    write(
        &dir.path().join("model.safetensors"),
        &[("model.position_ids".to_string(), i64s(&[3], &[0, 1, 2])), ("ok".to_string(), f32s(&[1], &[1.0]))],
    );
    let w = Weights::open(dir.path()).unwrap();
    assert!(w.stored_names().contains(&"model.position_ids"));
    let msg = weights_err(w.get("model.position_ids"));
    assert!(msg.contains("`model.position_ids`") && msg.contains("I64"), "{msg}");
    let msg = weights_err(w.load(&Device::Cpu, "model.position_ids", &[3]));
    assert!(msg.contains("BF16, F16 or F32"), "{msg}");
}

#[test]
fn malformed_files_are_errors_not_panics() {
    let dir = TempDir::new("malformed");
    write(&dir.path().join("good.safetensors"), &stored(Layout::Legacy, &tiny_model(true)));
    let good = fs::read(dir.path().join("good.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", vec![]),
        ("shorter than the length prefix", vec![1, 2, 3]),
        ("garbage", b"this is not a safetensors file, just words".to_vec()),
        ("huge header length", u64::MAX.to_le_bytes().to_vec()),
        ("header length past the end", [&100u64.to_le_bytes()[..], b"{}"].concat()),
        ("header not JSON", [&4u64.to_le_bytes()[..], b"abcd"].concat()),
        ("truncated data", good[..good.len() - 3].to_vec()),
        ("truncated header", good[..8 + header_len / 2].to_vec()),
        ("trailing bytes", [&good[..], &[0u8; 4]].concat()),
    ];
    // A header whose offsets point past the data.
    let bad_offsets = br#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    cases
        .push(("offsets past the end", [&(bad_offsets.len() as u64).to_le_bytes()[..], bad_offsets, &[0; 8]].concat()));
    // Offsets that disagree with dtype x shape.
    let bad_size = br#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    cases.push(("size mismatch", [&(bad_size.len() as u64).to_le_bytes()[..], bad_size, &[0; 8]].concat()));

    for (what, bytes) in cases {
        let sub = TempDir::new(&format!("malformed-{}", what.replace(' ', "-")));
        fs::write(sub.path().join("model.safetensors"), &bytes).unwrap();
        match Weights::open(sub.path()) {
            Err(Error::Weights(msg)) => assert!(msg.contains("model.safetensors"), "{what}: {msg}"),
            Err(Error::Io { path, .. }) => assert!(path.contains("model.safetensors"), "{what}: {path}"),
            other => panic!("{what}: expected an error, got {other:?}"),
        }
    }
}

#[test]
fn index_problems_are_named() {
    let model = stored(Layout::Legacy, &tiny_model(true));
    let (first, second) = model.split_at(3);

    // The index lists a shard that is not there.
    let dir = TempDir::new("index-missing-shard");
    write_sharded(dir.path(), &[("a.safetensors", first.to_vec()), ("b.safetensors", second.to_vec())]);
    fs::remove_file(dir.path().join("b.safetensors")).unwrap();
    let msg = weights_err(Weights::open(dir.path()));
    assert!(msg.contains("`b.safetensors`") && msg.contains("model.safetensors.index.json"), "{msg}");

    // The index puts a tensor in a shard that lacks it.
    let dir = TempDir::new("index-wrong-shard");
    write_sharded(dir.path(), &[("a.safetensors", first.to_vec()), ("b.safetensors", second.to_vec())]);
    let index = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&index).unwrap()).unwrap();
    v["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "a.safetensors".into();
    fs::write(&index, v.to_string()).unwrap();
    let msg = weights_err(Weights::open(dir.path()));
    assert!(msg.contains("`model.layers.9.mlp.up_proj.weight`") && msg.contains("`a.safetensors`"), "{msg}");

    // A tensor in two shards that the index both lists.
    let dir = TempDir::new("index-duplicate");
    write_sharded(dir.path(), &[("a.safetensors", first.to_vec()), ("b.safetensors", second.to_vec())]);
    write(&dir.path().join("b.safetensors"), &[second, &first[..1]].concat());
    let msg = weights_err(Weights::open(dir.path()));
    assert!(msg.contains("is in both"), "{msg}");

    for (what, text, needle) in [
        ("not json", "{", "not valid JSON"),
        ("no weight_map", r#"{"metadata": {}}"#, "no `weight_map`"),
        ("not a name", r#"{"weight_map": {"x": 3}}"#, "`weight_map.x` must be a file name"),
        ("escapes the folder", r#"{"weight_map": {"x": "../model.safetensors"}}"#, "same folder"),
    ] {
        let dir = TempDir::new(&format!("index-{}", what.replace(' ', "-")));
        fs::write(dir.path().join("model.safetensors.index.json"), text).unwrap();
        let msg = weights_err(Weights::open(dir.path()));
        assert!(msg.contains(needle), "{what}: {msg}");
    }
}

#[test]
fn no_checkpoint_and_mixed_layouts() {
    let dir = TempDir::new("empty");
    let msg = weights_err(Weights::open(dir.path()));
    assert!(msg.contains("model.safetensors") && msg.contains("model.safetensors.index.json"), "{msg}");
    let msg = weights_err(Weights::open(dir.path().join("does-not-exist")));
    assert!(msg.contains("no checkpoint"), "{msg}");

    let dir = TempDir::new("mixed");
    let tensors = vec![
        ("model.layers.0.mlp.up_proj.weight".to_string(), f32s(&[1], &[1.0])),
        ("model.language_model.layers.0.mlp.up_proj.weight".to_string(), f32s(&[1], &[1.0])),
    ];
    write(&dir.path().join("model.safetensors"), &tensors);
    let msg = weights_err(Weights::open(dir.path()));
    assert!(msg.contains("mixes name layouts"), "{msg}");
}

#[test]
fn config_and_weights_from_one_folder() {
    // The 2B config names the shapes; a checkpoint cut to match two of them.
    let dir = TempDir::new("with-config");
    let config = include_str!("loader/configs/qwen2_vl_2b_instruct.json");
    fs::write(dir.path().join("config.json"), config).unwrap();
    let cfg = Qwen2VlConfig::from_dir(dir.path()).unwrap();
    let t = &cfg.text_config;
    let kv = t.num_key_value_heads * t.head_dim;
    let tensors = vec![
        ("model.layers.0.self_attn.k_proj.bias".to_string(), f32s(&[kv], &vec![0.25; kv])),
        ("model.norm.weight".to_string(), f32s(&[t.hidden_size], &vec![1.0; t.hidden_size])),
    ];
    write(&dir.path().join("model.safetensors"), &tensors);
    let w = Weights::open(dir.path()).unwrap();
    let b = w.load(&Device::Cpu, "model.language_model.layers.0.self_attn.k_proj.bias", &[kv]).unwrap();
    assert_eq!(b.shape(), [256]);
    w.load(&Device::Cpu, "model.language_model.norm.weight", &[t.hidden_size]).unwrap();
    // 2B ties its head: the embedding would stand in, and here it is missing.
    assert_eq!(w.lm_head_name(t.tie_word_embeddings).unwrap(), EMBED_TOKENS);
    let msg = weights_err(w.lm_head(&Device::Cpu, t.tie_word_embeddings, &[t.vocab_size, t.hidden_size]));
    assert!(msg.contains("`model.embed_tokens.weight`"), "{msg}");
}

#[test]
fn weights_can_move_to_the_engine_thread() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Weights>();
}

/// On a GPU (skipped without one): bf16 on disk goes up byte for byte, f16
/// and f32 are rounded to bf16 once, the same numbers the CPU path gives
/// after `DType::BF16.round`.
#[test]
fn gpu_load_is_bf16_of_the_disk_values() {
    let gpu = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            return;
        }
    };
    let dir = TempDir::new("gpu");
    let fl = [0.1f32, -1e-30, 123456.79, 3.0e38, -0.0, 1.0 + 1.0 / 256.0];
    let tensors = vec![
        ("a.bf16".to_string(), bf16_bits(&[2, 3], &[0x3F80, 0xC020, 0x3E20, 0x7F7F, 0x0001, 0x8000])),
        ("a.f16".to_string(), f16_bits(&[5], &[0x3C00, 0xC100, 0x7BFF, 0x0001, 0x3555])),
        ("a.f32".to_string(), f32s(&[6], &fl)),
    ];
    write(&dir.path().join("model.safetensors"), &tensors);
    let w = Weights::open(dir.path()).unwrap();
    for (name, raw) in &tensors {
        let t = w.load(&gpu, name, &raw.shape).unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::BF16, raw.shape.as_slice()), "{name}");
        let want: Vec<u32> = expected_f32(raw).iter().map(|&x| DType::BF16.round(x).to_bits()).collect();
        let got: Vec<u32> = t.to_f32_vec().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "{name}");
    }
}

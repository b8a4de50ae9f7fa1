//! Text pipeline against Hugging Face: chat-template rendering, tokenization
//! and decoding compared with tests/fixtures/text/golden.json, which
//! tools/dump_text_golden.py writes with transformers (never edited by hand).
//!
//! The tiny tokenizer (the built-in model's, src/model/builtin/tiny-qwen2-vl) is always checked. The
//! real Qwen tokenizer is checked when KESTREL_QWEN_TOKENIZER_DIR points to a
//! folder holding it:
//!
//!     export KESTREL_QWEN_TOKENIZER_DIR=$(tools/fetch_qwen_tokenizer.sh)
//!
//! Without it those comparisons are skipped and say so on stderr; with
//! KESTREL_REQUIRE_QWEN_TOKENIZER=1 (CI) a missing folder fails instead.

mod common;

use std::path::{Path, PathBuf};

use kestrel::text::chat_template::ChatTemplate;
use kestrel::text::tokenizer::{SpecialTokens, Tokenizer};
use kestrel::Error;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_dir() -> PathBuf {
    root().join("src/model/builtin/tiny-qwen2-vl")
}

fn golden() -> Value {
    let path = root().join("tests/fixtures/text/golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden.json is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn s(v: &Value) -> &str {
    v.as_str().expect("string")
}

fn kwargs(case: &Value) -> Value {
    case.get("kwargs").cloned().unwrap_or(Value::Null)
}

fn gen_prompt(case: &Value) -> bool {
    case["add_generation_prompt"].as_bool().unwrap_or(false)
}

/// Whether JSON objects keep their key order through serde_json (its
/// `preserve_order` feature); Python dicts do, so key-order cases need it.
fn json_keeps_key_order() -> bool {
    let v: Value = serde_json::from_str(r#"{"b": 1, "a": 2}"#).unwrap();
    v.as_object().unwrap().keys().next().map(String::as_str) == Some("b")
}

/// Tokenizer facts HF reports: len(tokenizer), eos id, special-token ids.
fn check_info(tok: &Tokenizer, info: &Value, which: &str) {
    assert_eq!(tok.vocab_size() as u64, info["len"].as_u64().unwrap(), "{which}: len(tokenizer)");
    assert_eq!(tok.eos_token_ids().first().map(|&i| i as u64), info["eos_token_id"].as_u64(), "{which}: eos");
    for (token, id) in info["special_ids"].as_object().unwrap() {
        let id = id.as_u64().unwrap() as u32;
        assert_eq!(tok.token_id(token), Some(id), "{which}: id of {token}");
        assert!(tok.is_special(id), "{which}: {token} is special");
    }
    let st = tok.special_tokens();
    let map = info["special_tokens_map"].as_object().unwrap();
    let named: Vec<(String, String)> = st.named().into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    let want: Vec<(String, String)> = map.iter().map(|(k, v)| (k.clone(), s(v).to_owned())).collect();
    assert_eq!(named, want, "{which}: special_tokens_map");
}

/// Ids and decodes of the tricky strings and of the cut-in-half prefixes.
fn check_texts(tok: &Tokenizer, g: &Value, which: &str) {
    for t in g["texts"].as_array().unwrap() {
        let text = s(&t["text"]);
        let want = ids(&t[format!("ids_{which}")]);
        assert_eq!(tok.encode(text).unwrap(), want, "{which}: ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), s(&t[format!("decoded_{which}")]), "{which}: decode {text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            s(&t[format!("decoded_skip_{which}")]),
            "{which}: decode(skip_special_tokens) {text:?}"
        );
    }
    let mut n = 0;
    for d in g["decodes"].as_array().unwrap().iter().filter(|d| d["tokenizer"] == which) {
        let i = ids(&d["ids"]);
        assert_eq!(tok.decode(&i, false).unwrap(), s(&d["decoded"]), "{which}: decode {i:?}");
        assert_eq!(tok.decode(&i, true).unwrap(), s(&d["decoded_skip"]), "{which}: decode(skip) {i:?}");
        n += 1;
    }
    assert!(n > 3, "{which}: golden has decode cases");
}

/// Every Qwen2-VL conversation: our render == HF's, our ids == HF's, and
/// decoding the ids gives the prompt back.
fn check_chats(tmpl: &ChatTemplate, tok: &Tokenizer, g: &Value, which: &str) {
    for chat in g["chats"].as_array().unwrap() {
        let name = s(&chat["name"]);
        let rendered = tmpl.render_with(&chat["messages"], gen_prompt(chat), &kwargs(chat)).unwrap();
        assert_eq!(rendered, s(&chat["rendered"]), "{name}: rendered prompt");
        if kwargs(chat).is_null() {
            assert_eq!(tmpl.render(&chat["messages"], gen_prompt(chat)).unwrap(), rendered);
        }
        let want = ids(&chat[format!("ids_{which}")]);
        assert_eq!(tok.encode_prompt(&rendered).unwrap(), want, "{name}: {which} ids");
        assert_eq!(tok.decode(&want, false).unwrap(), rendered, "{name}: {which} decode round trip");
    }
}

#[test]
fn tiny_tokenizer_matches_hf() {
    let g = golden();
    let tok = Tokenizer::from_dir(tiny_dir()).unwrap();
    check_info(&tok, &g["tiny"], "tiny");
    check_texts(&tok, &g, "tiny");
}

#[test]
fn qwen2_vl_chats_match_hf_on_tiny_tokenizer() {
    let g = golden();
    let tmpl = ChatTemplate::from_dir(tiny_dir()).unwrap();
    assert!(tmpl.origin().ends_with("chat_template.json"), "{}", tmpl.origin());
    let tok = Tokenizer::from_dir(tiny_dir()).unwrap();
    check_chats(&tmpl, &tok, &g, "tiny");
}

#[test]
fn template_environment_matches_hf() {
    let g = golden();
    let special = SpecialTokens::from_dir(tiny_dir()).unwrap();
    let keeps_order = json_keeps_key_order();
    for case in g["template_cases"].as_array().unwrap() {
        let name = s(&case["name"]);
        if case["needs_key_order"].as_bool() == Some(true) && !keeps_order {
            common::notice(&format!(
                "text: SKIPPED template case {name:?}: serde_json does not keep object key order \
                 (enable serde_json's `preserve_order` feature to check it)"
            ));
            continue;
        }
        let tmpl = ChatTemplate::new(s(&case["template"]), name, special.clone()).unwrap();
        let got = tmpl.render_with(&case["messages"], gen_prompt(case), &kwargs(case));
        match (&case["rendered"], &case["error"]) {
            (Value::String(want), _) => assert_eq!(got.unwrap(), *want, "template case {name}"),
            (_, Value::String(err)) => match got {
                Err(Error::Template(msg)) => {
                    if let Some(m) = err.strip_prefix("TemplateError: ") {
                        assert!(msg.contains(m), "{name}: {msg:?} lacks HF's message {m:?}");
                    }
                }
                other => panic!("{name}: HF fails with {err:?}, we gave {other:?}"),
            },
            _ => panic!("{name}: golden case has neither `rendered` nor `error`"),
        }
    }
}

#[test]
fn qwen_tokenizer_matches_hf() {
    let Some(dir) = common::qwen_tokenizer_dir("text: real Qwen tokenizer comparisons") else { return };
    let g = golden();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    check_info(&tok, &g["qwen"], "qwen");
    check_texts(&tok, &g, "qwen");

    // The Qwen2-VL template with the real tokenizer.
    let src: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("chat_template.json")).unwrap()).unwrap();
    let tmpl = ChatTemplate::new(s(&src["chat_template"]), "qwen2-vl", SpecialTokens::from_dir(&dir).unwrap()).unwrap();
    check_chats(&tmpl, &tok, &g, "qwen");

    // The real tokenizer's own template (tokenizer_config.json: a Qwen3
    // template with string methods, namespaces, slicing and tojson).
    let own = ChatTemplate::from_dir(&dir).unwrap();
    assert!(own.origin().ends_with("tokenizer_config.json"), "{}", own.origin());
    for chat in g["qwen_template_chats"].as_array().unwrap() {
        let name = s(&chat["name"]);
        let rendered = own.render_with(&chat["messages"], gen_prompt(chat), &kwargs(chat)).unwrap();
        assert_eq!(rendered, s(&chat["rendered"]), "{name}: rendered with the Qwen tokenizer's own template");
        let want = ids(&chat["ids_qwen"]);
        assert_eq!(tok.encode_prompt(&rendered).unwrap(), want, "{name}: ids");
        assert_eq!(tok.decode(&want, false).unwrap(), rendered, "{name}: decode round trip");
    }
}

#[test]
fn tiny_special_ids_are_the_fixture_layout() {
    // The tiny model's config (image_token_id etc.) depends on these; they are
    // whatever tools/make_tiny_tokenizer.py assigned, read back from HF's view.
    let g = golden();
    let tok = Tokenizer::from_dir(tiny_dir()).unwrap();
    let special = g["tiny"]["special_ids"].as_object().unwrap();
    for name in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"] {
        assert_eq!(tok.token_id(name).map(u64::from), special[name].as_u64(), "{name}");
    }
    // Qwen's order: each id one above the previous, starting right after the BPE vocabulary.
    let base = tok.token_id("<|endoftext|>").unwrap();
    assert_eq!(tok.token_id("<|video_pad|>"), Some(base + 13));
    assert_eq!(tok.vocab_size() as u32, base + 14);
}

#[test]
fn missing_folder_errors_do_not_panic() {
    let nowhere = Path::new("/nonexistent/kestrel-text");
    assert!(matches!(Tokenizer::from_dir(nowhere), Err(Error::Io { .. })));
    assert!(matches!(ChatTemplate::from_dir(nowhere), Err(Error::Template(_))));
}

#[test]
fn shareable_across_server_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<ChatTemplate>();
}

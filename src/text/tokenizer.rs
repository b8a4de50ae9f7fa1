//! Tokenizer: a Hugging Face `tokenizer.json` run by the `tokenizers` crate,
//! set up the way transformers sets it up from `tokenizer_config.json`.
//!
//! Mirrors transformers 5.x `TokenizersBackend.__init__` / `_post_init` /
//! `_decode` (tokenization_utils_tokenizers.py) for what serving needs:
//! - named special tokens (`bos_token`, `eos_token`, ...) and the extra ones
//!   (`additional_special_tokens` / `extra_special_tokens`) are registered as
//!   special added tokens, as are `added_tokens_decoder` entries the
//!   tokenizer.json lacks;
//! - `add_bos_token` / `add_eos_token`, when the config names either, replace
//!   the post-processor with `bos? $A eos?` (`update_post_processor`);
//! - `split_special_tokens` maps to the backend's `encode_special_tokens`;
//! - `clean_up_tokenization_spaces` applies only to non-BPE models, as in 5.x.
//!
//! For Qwen2 this all comes to: special-token text inside the input (the
//! chat template's `<|im_start|>` etc.) becomes one special id each, and
//! nothing is added at the start or end (Qwen2 has no BOS).

use std::path::Path;

use serde_json::Value;
use tokenizers::models::ModelWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// The named special tokens of a HF tokenizer (`SPECIAL_TOKENS_ATTRIBUTES`),
/// as strings. Read from `tokenizer_config.json` (then the legacy
/// `special_tokens_map.json` for any not set there). These are also the
/// variables a chat template sees (`special_tokens_map` in transformers 5.x).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub sep_token: Option<String>,
    pub pad_token: Option<String>,
    pub cls_token: Option<String>,
    pub mask_token: Option<String>,
    /// `additional_special_tokens` (4.x name) or `extra_special_tokens` (5.x).
    pub extra: Vec<String>,
}

impl SpecialTokens {
    /// Named special tokens from `dir/tokenizer_config.json` (and
    /// `dir/special_tokens_map.json`); all unset when neither file exists.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let legacy = read_json_opt(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        Ok(Self::from_configs(&config, &legacy))
    }

    fn from_configs(config: &Value, legacy: &Value) -> Self {
        let named = |key: &str| token_content(&config[key]).or_else(|| token_content(&legacy[key]));
        let mut extra = Vec::new();
        for src in [config, legacy] {
            for key in ["additional_special_tokens", "extra_special_tokens"] {
                let items: Vec<&Value> = match &src[key] {
                    Value::Array(a) => a.iter().collect(),
                    Value::Object(m) => m.values().collect(),
                    _ => Vec::new(),
                };
                for t in items.into_iter().filter_map(token_content) {
                    if !extra.contains(&t) {
                        extra.push(t);
                    }
                }
            }
        }
        SpecialTokens {
            bos_token: named("bos_token"),
            eos_token: named("eos_token"),
            unk_token: named("unk_token"),
            sep_token: named("sep_token"),
            pad_token: named("pad_token"),
            cls_token: named("cls_token"),
            mask_token: named("mask_token"),
            extra,
        }
    }

    /// `(name, token)` for each named token that is set, in HF's attribute order.
    pub fn named(&self) -> Vec<(&'static str, &str)> {
        [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("sep_token", &self.sep_token),
            ("pad_token", &self.pad_token),
            ("cls_token", &self.cls_token),
            ("mask_token", &self.mask_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// A special token in tokenizer_config.json is a string, null, or a
/// serialized `AddedToken` (`{"__type": "AddedToken", "content": ...}`).
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Tokenizer(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: path.display().to_string(), source }),
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    /// Ids that end generation: `eos_token`, then generation_config.json's
    /// `eos_token_id` (int or list) when the folder has one.
    eos_ids: Vec<u32>,
    /// HF's `clean_up_tokenization` after decoding (never for BPE models).
    clean_up: bool,
    /// How a token's string maps to its raw bytes (from the decoder).
    bytes_kind: BytesKind,
}

/// How a vocabulary string holds a token's raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BytesKind {
    /// GPT-2 / Qwen byte-level BPE: each byte is one printable char of the
    /// byte-to-unicode table.
    ByteLevel,
    /// SentencePiece style (Llama, LLaVA): `▁` is a space and, with byte
    /// fallback, `<0xNN>` is the byte NN.
    Metaspace { byte_fallback: bool },
    /// Anything else: the token's decoded text.
    Text,
}

impl BytesKind {
    /// From the decoder's JSON (`tokenizer.json`'s `decoder`): the types it
    /// (or any decoder of a `Sequence`) has, and a `Replace` of `▁`.
    fn of_decoder(decoder: &Value) -> Self {
        fn walk(v: &Value, types: &mut Vec<String>, replaces_meta: &mut bool) {
            match v {
                Value::Object(m) => {
                    if let Some(t) = m.get("type").and_then(Value::as_str) {
                        types.push(t.to_owned());
                        if t == "Replace" && m.get("pattern").is_some_and(|p| p.to_string().contains('\u{2581}')) {
                            *replaces_meta = true;
                        }
                    }
                    m.values().for_each(|x| walk(x, types, replaces_meta));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, types, replaces_meta)),
                _ => {}
            }
        }
        let (mut types, mut replaces_meta) = (Vec::new(), false);
        walk(decoder, &mut types, &mut replaces_meta);
        let has = |t: &str| types.iter().any(|x| x == t);
        if has("ByteLevel") {
            BytesKind::ByteLevel
        } else if has("Metaspace") || has("ByteFallback") || replaces_meta {
            BytesKind::Metaspace { byte_fallback: has("ByteFallback") }
        } else {
            BytesKind::Text
        }
    }
}

/// The byte a char of GPT-2's byte-to-unicode table stands for: printable
/// Latin-1 chars stand for themselves, the other 68 bytes (0-32, 127-160,
/// 173) map in order to U+0100 onwards.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
    let code = c as u32;
    if code < 256 {
        return printable(code as u8).then_some(code as u8);
    }
    let n = code.checked_sub(256)? as usize;
    (0..=255u8).filter(|&b| !printable(b)).nth(n)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Load `dir/tokenizer.json`, configured by `dir/tokenizer_config.json`
    /// (optional) like transformers' `AutoTokenizer.from_pretrained(dir)`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let legacy = read_json_opt(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let generation = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        Self::new(inner, &config, &legacy, &generation)
    }

    /// Configure a loaded tokenizer from the parsed tokenizer_config.json,
    /// special_tokens_map.json and generation_config.json (`Value::Null` for
    /// a missing file).
    fn new(mut inner: tokenizers::Tokenizer, config: &Value, legacy: &Value, generation: &Value) -> Result<Self> {
        let special = SpecialTokens::from_configs(config, legacy);

        // added_tokens_decoder entries missing from tokenizer.json are added;
        // HF lets the backend pick their ids, we insist they land where the
        // config says (a mismatch would silently shift ids against the model).
        if let Some(decoder) = config["added_tokens_decoder"].as_object() {
            let mut entries: Vec<(u32, &Value)> = Vec::new();
            for (id, tok) in decoder {
                let id = id
                    .parse::<u32>()
                    .map_err(|_| Error::Tokenizer(format!("added_tokens_decoder: key {id:?} is not a token id")))?;
                entries.push((id, tok));
            }
            entries.sort_by_key(|e| e.0);
            for (id, tok) in entries {
                let Some(content) = token_content(tok) else {
                    return Err(Error::Tokenizer(format!("added_tokens_decoder[{id}] has no content")));
                };
                match inner.token_to_id(&content) {
                    Some(have) if have == id => {}
                    Some(have) => {
                        return Err(Error::Tokenizer(format!(
                            "tokenizer_config.json gives {content:?} id {id}, tokenizer.json gives {have}"
                        )))
                    }
                    None => {
                        let flag = |k: &str, d: bool| tok[k].as_bool().unwrap_or(d);
                        let t = AddedToken::from(content.clone(), flag("special", false))
                            .single_word(flag("single_word", false))
                            .lstrip(flag("lstrip", false))
                            .rstrip(flag("rstrip", false))
                            .normalized(flag("normalized", !flag("special", false)));
                        inner.add_tokens(&[t]);
                        let got = inner.token_to_id(&content);
                        if got != Some(id) {
                            return Err(Error::Tokenizer(format!(
                                "added token {content:?}: tokenizer_config.json says id {id}, adding it gave {got:?}"
                            )));
                        }
                    }
                }
            }
        }

        // Named and extra special tokens are always special added tokens
        // (`_post_init`), even when they are ordinary vocabulary entries; the
        // backend skips tokens it already has with the same flags and keeps
        // the id of known content.
        let specials: Vec<AddedToken> = special
            .named()
            .into_iter()
            .map(|(_, t)| t.to_owned())
            .chain(special.extra.iter().cloned())
            .map(|t| AddedToken::from(t, true).normalized(false))
            .collect();
        if !specials.is_empty() {
            inner.add_special_tokens(&specials);
        }

        // `add_bos_token` / `add_eos_token` named in the config (or no
        // post-processor at all) rebuild the post-processor from the flags.
        let add_bos = config["add_bos_token"].as_bool();
        let add_eos = config["add_eos_token"].as_bool();
        if add_bos.is_some() || add_eos.is_some() || inner.get_post_processor().is_none() {
            let pp = bos_eos_post_processor(&inner, &special, add_bos.unwrap_or(false), add_eos.unwrap_or(false))?;
            inner.with_post_processor(Some(pp));
        }

        inner.set_encode_special_tokens(config["split_special_tokens"].as_bool().unwrap_or(false));

        let is_bpe = matches!(inner.get_model(), ModelWrapper::BPE(_));
        let clean_up = config["clean_up_tokenization_spaces"].as_bool().unwrap_or(false)
            && (!is_bpe
                || config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"]
                    .as_bool()
                    .unwrap_or(false));

        let mut eos_ids = Vec::new();
        if let Some(eos) = &special.eos_token {
            match inner.token_to_id(eos) {
                Some(id) => eos_ids.push(id),
                None => return Err(Error::Tokenizer(format!("eos_token {eos:?} is not in the vocabulary"))),
            }
        }
        let gen_eos: Vec<&Value> = match &generation["eos_token_id"] {
            Value::Array(a) => a.iter().collect(),
            v @ Value::Number(_) => vec![v],
            _ => Vec::new(),
        };
        for v in gen_eos {
            let id = v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                Error::Tokenizer(format!("generation_config.json: eos_token_id {v} is not a token id"))
            })?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }

        let decoder = inner.get_decoder().and_then(|d| serde_json::to_value(d).ok()).unwrap_or(Value::Null);
        let bytes_kind = BytesKind::of_decoder(&decoder);
        Ok(Tokenizer { inner, special, eos_ids, clean_up, bytes_kind })
    }

    /// `tokenizer(text).input_ids` in HF: special-token text in `text` is
    /// recognised, and the post-processor adds what the model's tokenizer
    /// adds by default (nothing for Qwen2; BOS for Llama-style tokenizers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// `tokenizer(text, add_special_tokens=...)`. Special-token text inside
    /// `text` is recognised either way; the flag only controls what the
    /// post-processor adds around it.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode a rendered chat prompt the way transformers'
    /// `processor.apply_chat_template(..., tokenize=True)` does: special
    /// tokens are added unless the prompt already starts with `bos_token`
    /// (templates that write the BOS themselves must not get a second one).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let starts_with_bos = self.special.bos_token.as_deref().is_some_and(|b| prompt.starts_with(b));
        self.encode_with(prompt, !starts_with_bos)
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`. Ids outside the
    /// vocabulary are dropped, as in HF; invalid UTF-8 (a token sequence cut
    /// inside a character) decodes to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up { clean_up_tokenization(&text) } else { text })
    }

    /// The id of a token (vocabulary entry or added token), as
    /// `convert_tokens_to_ids` for a single known token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (byte-level symbols for BPE tokens).
    pub fn id_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes of one token, as OpenAI's logprobs `bytes` carry them:
    /// a token that holds part of a UTF-8 character gives that part, so the
    /// bytes of consecutive tokens join into the text. Byte-level BPE
    /// symbols map back through the byte-to-unicode table; SentencePiece
    /// `<0xNN>` is the byte and `▁` a space (the leading space a decode
    /// strips is kept); added tokens are their text; other tokenizers give
    /// the token's decoded text. Unknown ids give no bytes.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.inner.id_to_token(id) else { return Vec::new() };
        if self.inner.get_added_vocabulary().get_added_tokens_decoder().contains_key(&id) {
            return tok.into_bytes();
        }
        match self.bytes_kind {
            BytesKind::ByteLevel => {
                let mut out = Vec::with_capacity(tok.len());
                for c in tok.chars() {
                    match byte_level_byte(c) {
                        Some(b) => out.push(b),
                        None => out.extend_from_slice(c.to_string().as_bytes()),
                    }
                }
                out
            }
            BytesKind::Metaspace { byte_fallback } => {
                let hex = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')).filter(|h| h.len() == 2);
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) if byte_fallback => vec![b],
                    _ => tok.replace('\u{2581}', " ").into_bytes(),
                }
            }
            BytesKind::Text => self.decode(&[id], false).unwrap_or_default().into_bytes(),
        }
    }

    /// Ids that end generation: `eos_token`, then generation_config.json's
    /// `eos_token_id`s (Qwen2-VL-Instruct: `<|im_end|>`, `<|endoftext|>`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// `len(tokenizer)` in HF: base vocabulary plus added tokens. The model's
    /// embedding table can be larger (Qwen2-VL-2B: 151936 rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is a special token (dropped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The `tokenizers` tokenizer underneath (for incremental decoding).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// transformers' `update_post_processor`: `bos? $A eos?` for single
/// sequences, `bos? $A eos? bos? $B eos?` for pairs.
fn bos_eos_post_processor(
    inner: &tokenizers::Tokenizer,
    special: &SpecialTokens,
    add_bos: bool,
    add_eos: bool,
) -> Result<TemplateProcessing> {
    let mut tokens: Vec<(String, u32)> = Vec::new();
    let mut edge = |name: &str, tok: &Option<String>, on: bool| -> Result<Option<String>> {
        match (on, tok) {
            (true, Some(t)) => {
                let id = inner
                    .token_to_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("{name} {t:?} is not in the vocabulary")))?;
                tokens.push((t.clone(), id));
                Ok(Some(t.clone()))
            }
            _ => Ok(None),
        }
    };
    let bos = edge("bos_token", &special.bos_token, add_bos)?;
    let eos = edge("eos_token", &special.eos_token, add_eos)?;
    let side = |seq: &str, type_id: u32| {
        let mut parts = Vec::new();
        if let Some(b) = &bos {
            parts.push(format!("{b}:{type_id}"));
        }
        parts.push(format!("${seq}:{type_id}"));
        if let Some(e) = &eos {
            parts.push(format!("{e}:{type_id}"));
        }
        parts.join(" ")
    };
    let single = side("A", 0);
    let pair = format!("{single} {}", side("B", 1));
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| Error::Tokenizer(format!("post-processor template: {e}")))?
        .special_tokens(tokens)
        .build()
        .map_err(|e| Error::Tokenizer(format!("post-processor: {e}")))
}

/// transformers' `clean_up_tokenization` (WordPiece-era space removal).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tiny_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/model/builtin/tiny-qwen2-vl")
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kestrel-tok-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn missing_tokenizer_json_is_io_error() {
        let d = scratch("missing");
        match Tokenizer::from_dir(&d) {
            Err(Error::Io { path, .. }) => assert!(path.ends_with("tokenizer.json"), "{path}"),
            other => panic!("expected Error::Io, got {other:?}"),
        }
    }

    #[test]
    fn malformed_tokenizer_json_is_tokenizer_error() {
        let d = scratch("malformed");
        std::fs::write(d.join("tokenizer.json"), "{\"model\": 3").unwrap();
        assert!(matches!(Tokenizer::from_dir(&d), Err(Error::Tokenizer(_))));
        std::fs::write(d.join("tokenizer.json"), std::fs::read(tiny_dir().join("tokenizer.json")).unwrap()).unwrap();
        std::fs::write(d.join("tokenizer_config.json"), "not json").unwrap();
        assert!(matches!(Tokenizer::from_dir(&d), Err(Error::Tokenizer(_))));
    }

    #[test]
    fn config_id_mismatch_is_an_error() {
        let d = scratch("mismatch");
        std::fs::copy(tiny_dir().join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
        let cfg = r#"{"added_tokens_decoder": {"7": {"content": "<|im_end|>", "special": true}}}"#;
        std::fs::write(d.join("tokenizer_config.json"), cfg).unwrap();
        let err = Tokenizer::from_dir(&d).unwrap_err();
        assert!(err.to_string().contains("<|im_end|>"), "{err}");
    }

    #[test]
    fn tiny_special_tokens_and_eos() {
        let tok = Tokenizer::from_dir(tiny_dir()).unwrap();
        let im_start = tok.token_id("<|im_start|>").unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        assert_eq!(tok.eos_token_ids(), &[im_end]);
        assert!(tok.is_special(im_start));
        assert!(!tok.is_special(0));
        // No BOS: the prompt encodes to exactly its own tokens.
        let ids = tok.encode("<|im_start|>user").unwrap();
        assert_eq!(ids[0], im_start);
        assert_eq!(tok.encode_prompt("<|im_start|>user").unwrap(), ids);
        assert_eq!(tok.decode(&ids, true).unwrap(), "user");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user");
        // Unknown ids are dropped, never a panic.
        assert_eq!(tok.decode(&[u32::MAX, ids[1]], false).unwrap(), tok.decode(&ids[1..2], false).unwrap());
    }

    #[test]
    fn generation_config_adds_eos_ids() {
        let d = scratch("gen");
        std::fs::copy(tiny_dir().join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
        std::fs::copy(tiny_dir().join("tokenizer_config.json"), d.join("tokenizer_config.json")).unwrap();
        let tok = Tokenizer::from_dir(&d).unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let eot = tok.token_id("<|endoftext|>").unwrap();
        std::fs::write(d.join("generation_config.json"), format!("{{\"eos_token_id\": [{im_end}, {eot}]}}")).unwrap();
        let tok = Tokenizer::from_dir(&d).unwrap();
        assert_eq!(tok.eos_token_ids(), &[im_end, eot]);
    }

    #[test]
    fn add_bos_token_rebuilds_post_processor() {
        let d = scratch("bos");
        std::fs::copy(tiny_dir().join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
        let cfg = r#"{"bos_token": "<|endoftext|>", "add_bos_token": true, "eos_token": "<|im_end|>"}"#;
        std::fs::write(d.join("tokenizer_config.json"), cfg).unwrap();
        let tok = Tokenizer::from_dir(&d).unwrap();
        let bos = tok.token_id("<|endoftext|>").unwrap();
        let ids = tok.encode("hi").unwrap();
        assert_eq!(ids[0], bos);
        assert_eq!(tok.encode_with("hi", false).unwrap(), ids[1..]);
        // A prompt that already starts with the BOS text gets no second one.
        assert_eq!(tok.encode_prompt("<|endoftext|>hi").unwrap(), ids);
    }

    /// Ids of `text` (no special tokens added), their raw bytes joined, and
    /// the ids whose decoded text alone is U+FFFD (a split character).
    fn joined_bytes(tok: &Tokenizer, text: &str) -> (Vec<u8>, Vec<u32>) {
        let ids = tok.encode_with(text, false).unwrap();
        let joined = ids.iter().flat_map(|&i| tok.token_bytes(i)).collect();
        let split = ids.iter().copied().filter(|&i| tok.decode(&[i], false).unwrap() == "\u{FFFD}").collect();
        (joined, split)
    }

    const MULTI_BYTE: &str = "naïve café 名字 😀 x\ny";

    #[test]
    fn byte_level_token_bytes_are_raw() {
        let tok = Tokenizer::from_dir(tiny_dir()).unwrap();
        assert_eq!(tok.bytes_kind, BytesKind::ByteLevel);
        let (joined, split) = joined_bytes(&tok, MULTI_BYTE);
        assert_eq!(joined, MULTI_BYTE.as_bytes());
        assert!(!split.is_empty(), "some token splits a character");
        for id in split {
            let b = tok.token_bytes(id);
            assert!(std::str::from_utf8(&b).is_err() && !b.starts_with(&[0xEF, 0xBF, 0xBD]), "{id}: {b:?}");
        }
        // GPT-2's table: `Ġ` is a space, `Ċ` a newline, `Ń` the soft hyphen.
        assert_eq!(
            [byte_level_byte('Ġ'), byte_level_byte('Ċ'), byte_level_byte('Ń')],
            [Some(b' '), Some(b'\n'), Some(0xAD)]
        );
        assert_eq!((byte_level_byte('a'), byte_level_byte(' '), byte_level_byte('名')), (Some(b'a'), None, None));
        // Added tokens are their text; unknown ids have no bytes.
        assert_eq!(tok.token_bytes(tok.token_id("<|im_end|>").unwrap()), b"<|im_end|>");
        assert!(tok.token_bytes(u32::MAX).is_empty());
    }

    #[test]
    fn sentencepiece_token_bytes_are_raw() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llava");
        let tok = Tokenizer::from_dir(dir).unwrap();
        assert_eq!(tok.bytes_kind, BytesKind::Metaspace { byte_fallback: true });
        let (joined, split) = joined_bytes(&tok, MULTI_BYTE);
        // Metaspace puts `▁` before the text: a leading space the decode strips.
        assert_eq!(joined, format!(" {MULTI_BYTE}").as_bytes());
        assert!(!split.is_empty(), "some token is a byte-fallback piece of a character");
        for id in split {
            assert!(tok.id_token(id).unwrap().starts_with("<0x"));
            assert_eq!(tok.token_bytes(id).len(), 1);
        }
    }

    #[test]
    fn decoder_kinds() {
        use serde_json::json;
        assert_eq!(BytesKind::of_decoder(&json!({"type": "ByteLevel"})), BytesKind::ByteLevel);
        let meta = json!({"type": "Metaspace", "replacement": "\u{2581}"});
        assert_eq!(BytesKind::of_decoder(&meta), BytesKind::Metaspace { byte_fallback: false });
        assert_eq!(BytesKind::of_decoder(&json!({"type": "WordPiece"})), BytesKind::Text);
        assert_eq!(BytesKind::of_decoder(&Value::Null), BytesKind::Text);
    }

    #[test]
    fn clean_up_is_hf_text_replacement() {
        assert_eq!(clean_up_tokenization("a , b . c n't 's"), "a, b. cn't's");
    }
}

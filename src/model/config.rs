//! What every family's config parsing shares: a reader over config.json's
//! JSON that names each bad field as the file spells it, and the activation
//! functions by their transformers names. Each family parses its own
//! `config.json` (`qwen2_vl::config`, `llava::config`) with these.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub use super::qwen2_vl::config::{Architecture, Qwen2VlConfig, TextConfig, VisionConfig, SUPPORTED_ARCHITECTURES};

/// `<dir>/config.json` parsed as JSON (errors name the file).
pub fn read_json(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))
}

/// `parse` over `<dir>/config.json`; its config errors name the file.
pub fn parse_dir<T>(dir: &Path, parse: impl FnOnce(&Value) -> Result<T>) -> Result<T> {
    parse(&read_json(dir)?).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("{}: {m}", dir.join("config.json").display())),
        e => e,
    })
}

/// `parse` over config.json's text.
pub fn parse_str<T>(s: &str, parse: impl FnOnce(&Value) -> Result<T>) -> Result<T> {
    let v: Value = serde_json::from_str(s).map_err(|e| Error::Config(format!("config.json is not valid JSON: {e}")))?;
    parse(&v)
}

/// Activation functions by their transformers `ACT2FN` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu`: the exact erf form.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x · sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Self::GeluTanh),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

/// A JSON object and where it sits (`""`, `"text_config."`, ...), so that
/// errors name the field as the file spells it. `null` reads as absent.
pub struct Obj<'a> {
    map: Option<&'a Map<String, Value>>,
    pub path: String,
}

impl<'a> Obj<'a> {
    pub fn new(v: &'a Value, path: &str) -> Result<Self> {
        match v {
            Value::Object(map) => Ok(Self { map: Some(map), path: path.to_string() }),
            _ => {
                let what = if path.is_empty() {
                    "config.json".to_string()
                } else {
                    format!("`{}`", path.trim_end_matches('.'))
                };
                Err(Error::Config(format!("{what} must be a JSON object, found {v}")))
            }
        }
    }
    pub fn empty(path: &str) -> Self {
        Self { map: None, path: path.to_string() }
    }
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map?.get(key).filter(|v| !v.is_null())
    }
    pub fn is_null(&self, key: &str) -> bool {
        self.map.and_then(|m| m.get(key)).is_some_and(Value::is_null)
    }
    pub fn bad(&self, key: &str, expected: &str, v: &Value) -> Error {
        Error::Config(format!("`{}{key}` must be {expected}, found {v}", self.path))
    }
    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        // Integral floats (`28.0`) pass; HF would accept them as well.
        let n = v.as_u64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64));
        n.and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| self.bad(key, "a non-negative integer", v))
    }
    pub fn u32(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or_else(|| self.bad(key, "a token id", v))
    }
    /// A token id or a list of them.
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let Some(v) = self.get(key) else { return Ok(vec![]) };
        let one = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        match v {
            Value::Array(a) => {
                a.iter().map(|x| one(x).ok_or_else(|| self.bad(key, "a token id or a list of them", v))).collect()
            }
            _ => Ok(vec![one(v).ok_or_else(|| self.bad(key, "a token id or a list of them", v))?]),
        }
    }
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_f64().map(Some).ok_or_else(|| self.bad(key, "a number", v))
    }
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_bool().map(Some).ok_or_else(|| self.bad(key, "true or false", v))
    }
    pub fn str(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_str().map(Some).ok_or_else(|| self.bad(key, "a string", v))
    }
}

/// A per-channel value of a preprocessor config (`image_mean`, `image_std`):
/// one number for all channels, or one each.
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(untagged)]
pub enum OneOrThree {
    One(f64),
    Three([f64; 3]),
}

impl OneOrThree {
    /// The three channels' values, as f32 (`torch.tensor(image_mean)` rounds them so).
    pub fn get(&self) -> [f32; 3] {
        match *self {
            Self::One(v) => [v as f32; 3],
            Self::Three(v) => v.map(|x| x as f32),
        }
    }
}

/// An error naming the first of `fields` (config key, value) that is 0.
pub fn require_positive(fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(Error::Config(format!("`{name}` is 0; it must be positive"))),
        None => Ok(()),
    }
}

/// GQA needs `heads` divisible by `kv_heads`; the keys are the config's
/// names of the two fields (with their prefix).
pub fn require_gqa(heads: (&str, usize), kv_heads: (&str, usize)) -> Result<()> {
    if heads.1.is_multiple_of(kv_heads.1) {
        return Ok(());
    }
    Err(Error::Config(format!("`{}` ({}) must be divisible by `{}` ({})", heads.0, heads.1, kv_heads.0, kv_heads.1)))
}

//! The families Kestrel serves, and which one a checkpoint is: config.json's
//! `architectures` first (as transformers' Auto classes and vLLM pick the
//! class), then its `model_type`.

use std::path::Path;

use serde_json::Value;

use super::contract::Family;
use crate::error::{Error, Result};

/// Every family, in the order `kestrel info` lists them.
pub static FAMILIES: &[&Family] = &[&super::qwen2_vl::FAMILY, &super::llava::FAMILY, &super::phi3v::FAMILY];

/// The family of the checkpoint whose config.json is `config`.
pub fn family_of(config: &Value) -> Result<&'static Family> {
    let archs: Vec<&str> = match config.get("architectures") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => vec![s.as_str()],
        _ => Vec::new(),
    };
    for a in &archs {
        if let Some(f) = FAMILIES.iter().find(|f| f.architectures.contains(a)) {
            return Ok(f);
        }
    }
    let model_type = config.get("model_type").and_then(Value::as_str);
    if let Some(mt) = model_type {
        if let Some(f) = FAMILIES.iter().find(|f| f.model_types.contains(&mt)) {
            return Ok(f);
        }
    }
    let supported: Vec<String> =
        FAMILIES.iter().map(|f| format!("{} ({})", f.name, f.architectures.join(", "))).collect();
    Err(Error::Config(format!(
        "this checkpoint's architectures {archs:?} (model_type {}) is not one Kestrel serves; supported: {}",
        model_type.map_or("absent".into(), |m| format!("`{m}`")),
        supported.join("; ")
    )))
}

/// The family of the model folder `dir`.
pub fn detect(dir: &Path) -> Result<&'static Family> {
    family_of(&super::config::read_json(dir)?).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("{}: {m}", dir.join("config.json").display())),
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_by_architecture_then_model_type_and_names_the_supported() {
        let f = |s: &str| family_of(&serde_json::from_str(s).unwrap()).map(|f| f.name);
        assert_eq!(f(r#"{"architectures": ["Qwen2VLForConditionalGeneration"]}"#).unwrap(), "qwen2_vl");
        assert_eq!(f(r#"{"architectures": ["LlavaForConditionalGeneration"]}"#).unwrap(), "llava");
        assert_eq!(f(r#"{"model_type": "llava"}"#).unwrap(), "llava");
        let e = f(r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba"}"#).unwrap_err().to_string();
        assert!(e.contains("MambaForCausalLM") && e.contains("qwen2_vl") && e.contains("llava"), "{e}");
    }
}

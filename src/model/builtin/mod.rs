//! The built-in default model: the tiny random Qwen2-VL whose folder lives
//! beside this file, in tiny-qwen2-vl/ (made by tools/make_tiny_qwen2vl.py,
//! about 1.5 MB; its HF goldens are test data, in
//! tests/fixtures/tiny-qwen2-vl/golden), embedded in the binary so that `kestrel generate` and `kestrel
//! serve` work on a fresh machine with nothing downloaded. Its answers are
//! random-weight noise; it exists to exercise the whole pipeline.

use std::path::PathBuf;

use crate::error::{Error, Result};

macro_rules! file {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/model/builtin/tiny-qwen2-vl/", $name)) as &[u8],
        )
    };
}

const FILES: &[(&str, &[u8])] = &[
    file!("config.json"),
    file!("generation_config.json"),
    file!("model.safetensors"),
    file!("tokenizer.json"),
    file!("tokenizer_config.json"),
    file!("chat_template.json"),
    file!("preprocessor_config.json"),
    file!("video_preprocessor_config.json"),
];

/// Name under which the built-in model is served.
pub const NAME: &str = "kestrel-tiny-qwen2-vl";

/// FNV-1a over every file: names the cache folder, so a new build's model
/// never mixes with an old one's.
fn fingerprint() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Writes the embedded model folder once (to `$KESTREL_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/kestrel`, else `~/.cache/kestrel`, else the temp dir)
/// and returns its path. Safe against concurrent first runs: files are
/// written under a temporary name and renamed into place.
pub fn materialize() -> Result<PathBuf> {
    let base = std::env::var_os("KESTREL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("kestrel")))
        .or_else(|| std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache/kestrel")))
        .unwrap_or_else(|| std::env::temp_dir().join("kestrel"));
    let dir = base.join(format!("{NAME}-{:016x}", fingerprint()));
    let io = |p: &std::path::Path, e: std::io::Error| Error::Io { path: p.display().to_string(), source: e };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if std::fs::metadata(&path).map(|m| m.len() == bytes.len() as u64).unwrap_or(false) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    }
    Ok(dir)
}

/// Whether `dir` is a materialized built-in model folder (served as `NAME`).
pub fn is_builtin(dir: &std::path::Path) -> bool {
    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{NAME}-")))
}

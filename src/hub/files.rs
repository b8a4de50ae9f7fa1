//! Which files of a Hub repo a model needs, and whether a snapshot folder
//! holds them. As vLLM asks for `*.safetensors` and falls back to PyTorch
//! `*.bin` files (vllm/model_executor/model_loader/weight_utils.py), Kestrel
//! asks for safetensors only and refuses a repo that has nothing else, with
//! the reason.

use std::path::Path;

use serde::Deserialize;

use super::{RepoId, Want};
use crate::error::{Error, Result};

/// The index of a sharded checkpoint: which tensor lives in which shard.
pub(crate) const WEIGHT_INDEX: &str = "model.safetensors.index.json";

/// Files read beside the weights (model config, tokenizer, processor, templates).
const MODEL_FILES: [&str; 11] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    WEIGHT_INDEX,
];

/// Files `--tokenizer ID` reads.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
];

/// Weight formats Kestrel does not load, for the refusal's reason.
const OTHER_WEIGHTS: [&str; 8] = [".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx"];

/// One entry of the Hub's file listing (`GET /api/models/{repo}/revision/{rev}?blobs=true`).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    /// The git blob id (sha1 of `blob <len>\0<bytes>`): the ETag of a file kept in git.
    #[serde(default, rename = "blobId")]
    pub blob_id: Option<String>,
    /// Set for files kept in LFS (weights): their sha256 is their ETag.
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Lfs {
    pub sha256: String,
    pub size: u64,
}

/// A file to fetch: its name in the repo, and its size and ETag when the
/// listing gave them (else they are asked for with a HEAD request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Remote {
    pub name: String,
    pub size: Option<u64>,
    /// The blob's name in the cache, as huggingface_hub names it: the LFS
    /// sha256, else the git blob id.
    pub etag: Option<String>,
}

pub(crate) fn is_weight(name: &str) -> bool {
    name.ends_with(".safetensors")
}

fn wanted(name: &str, want: Want) -> bool {
    match want {
        Want::Model => MODEL_FILES.contains(&name) || is_weight(name),
        Want::Tokenizer => TOKENIZER_FILES.contains(&name),
    }
}

/// The files of the listing `want` needs, small ones first; refuses a repo
/// without them (with the reason when its weights are in another format).
pub(crate) fn select(repo: &RepoId, revision: &str, siblings: &[Sibling], want: Want) -> Result<Vec<Remote>> {
    // Top-level files only: subfolders hold other formats (onnx/, original/).
    let top: Vec<&Sibling> = siblings.iter().filter(|s| !s.rfilename.contains('/')).collect();
    let has = |name: &str| top.iter().any(|s| s.rfilename == name);
    let refuse = |why: String| Err(Error::Hub(format!("model {repo} (revision {revision}): {why}")));
    match want {
        Want::Model if !has("config.json") => return refuse("the repo has no config.json".into()),
        Want::Model if !top.iter().any(|s| is_weight(&s.rfilename)) => {
            let other: Vec<&str> = top
                .iter()
                .map(|s| s.rfilename.as_str())
                .filter(|n| OTHER_WEIGHTS.iter().any(|ext| n.ends_with(ext)))
                .take(3)
                .collect();
            return refuse(if other.is_empty() {
                "the repo has no *.safetensors weights".into()
            } else {
                format!(
                    "the repo's weights are not in safetensors format ({}); Kestrel loads *.safetensors only \
                     (convert them, e.g. with transformers' save_pretrained(safe_serialization=True), or pick a \
                     repo that has them)",
                    other.join(", ")
                )
            });
        }
        Want::Tokenizer if !has("tokenizer.json") => return refuse("the repo has no tokenizer.json".into()),
        _ => {}
    }
    let mut files: Vec<Remote> = top
        .iter()
        .filter(|s| wanted(&s.rfilename, want))
        .map(|s| Remote {
            name: s.rfilename.clone(),
            size: s.lfs.as_ref().map(|l| l.size).or(s.size),
            etag: s.lfs.as_ref().map(|l| l.sha256.clone()).or_else(|| s.blob_id.clone()),
        })
        .collect();
    files.sort_by_key(|f| (is_weight(&f.name), f.name.clone()));
    Ok(files)
}

/// The shard files a `model.safetensors.index.json` names, each once.
pub(crate) fn index_shards(path: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let index: Index = serde_json::from_str(&text).map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// What a snapshot folder lacks for `want` (None: it is complete): config.json
/// and every shard the index names, or some *.safetensors file without one;
/// tokenizer.json for a tokenizer.
pub(crate) fn missing(dir: &Path, want: Want) -> Option<String> {
    // `exists` follows the links, so a link to a deleted blob counts as missing.
    let lacks = |name: &str| !dir.join(name).exists();
    if want == Want::Tokenizer {
        return lacks("tokenizer.json").then(|| "tokenizer.json".into());
    }
    if lacks("config.json") {
        return Some("config.json".into());
    }
    let index = dir.join(WEIGHT_INDEX);
    if index.exists() {
        return match index_shards(&index) {
            Ok(shards) => shards.into_iter().find(|s| lacks(s)),
            Err(_) => Some(format!("a readable {WEIGHT_INDEX}")),
        };
    }
    let any_weights = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| e.path().exists() && is_weight(&e.file_name().to_string_lossy())))
        .unwrap_or(false);
    (!any_weights).then(|| "*.safetensors weights".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib(name: &str) -> Sibling {
        Sibling { rfilename: name.into(), size: Some(3), blob_id: Some("b".repeat(40)), lfs: None }
    }

    fn names(files: &[Remote]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn only_what_a_model_needs_small_files_first() {
        let repo = RepoId::parse("o/m").unwrap();
        let mut weights = sib("model-00001-of-00002.safetensors");
        weights.lfs = Some(Lfs { sha256: "a".repeat(64), size: 9 });
        let listing = [
            sib(".gitattributes"),
            sib("README.md"),
            weights,
            sib("pytorch_model.bin"),
            sib("onnx/model.safetensors"),
            sib("config.json"),
            sib("tokenizer.json"),
            sib("chat_template.jinja"),
            sib("vocab.json"),
        ];
        let files = select(&repo, "main", &listing, Want::Model).unwrap();
        assert_eq!(
            names(&files),
            ["chat_template.jinja", "config.json", "tokenizer.json", "model-00001-of-00002.safetensors"]
        );
        let w = &files[3];
        assert_eq!((w.size, w.etag.as_deref()), (Some(9), Some("a".repeat(64).as_str())));
        assert_eq!(files[0].etag.as_deref(), Some("b".repeat(40).as_str()));
        let tok = select(&repo, "main", &listing, Want::Tokenizer).unwrap();
        assert_eq!(names(&tok), ["chat_template.jinja", "tokenizer.json"]);
    }

    #[test]
    fn other_weight_formats_are_refused_with_the_reason() {
        let repo = RepoId::parse("o/m").unwrap();
        let e = select(&repo, "v1", &[sib("config.json"), sib("pytorch_model.bin")], Want::Model).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("o/m") && e.contains("pytorch_model.bin") && e.contains("safetensors only"), "{e}");
        let e = select(&repo, "v1", &[sib("config.json")], Want::Model).unwrap_err().to_string();
        assert!(e.contains("no *.safetensors"), "{e}");
        let e = select(&repo, "v1", &[sib("model.safetensors")], Want::Model).unwrap_err().to_string();
        assert!(e.contains("no config.json"), "{e}");
        let e = select(&repo, "v1", &[sib("config.json")], Want::Tokenizer).unwrap_err().to_string();
        assert!(e.contains("no tokenizer.json"), "{e}");
    }

    #[test]
    fn a_snapshot_is_complete_with_every_indexed_shard() {
        let dir = std::env::temp_dir().join(format!("kestrel-hub-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(missing(&dir, Want::Model).as_deref(), Some("config.json"));
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(missing(&dir, Want::Model).as_deref(), Some("*.safetensors weights"));
        let index = r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}"#;
        std::fs::write(dir.join(WEIGHT_INDEX), index).unwrap();
        std::fs::write(dir.join("s1.safetensors"), "x").unwrap();
        assert_eq!(missing(&dir, Want::Model).as_deref(), Some("s2.safetensors"));
        std::fs::write(dir.join("s2.safetensors"), "x").unwrap();
        assert_eq!(missing(&dir, Want::Model), None);
        assert_eq!(missing(&dir, Want::Tokenizer).as_deref(), Some("tokenizer.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

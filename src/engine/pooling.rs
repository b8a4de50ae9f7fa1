//! The embedding task: a prompt's final-normed hidden states pooled into one
//! vector. Mirrors vLLM's pooling models (`vllm/model_executor/layers/pooler.py`)
//! as they serve Qwen2-VL-based embedders such as DSE-Qwen2 (last token, L2
//! normalized): the pooling type and normalization come from the model
//! folder's sentence-transformers config (`modules.json`,
//! `1_Pooling/config.json`) when it has one, else last token + normalize
//! (vLLM's default for these models); `--pooling` overrides the type.

use std::path::Path;

use crate::error::{Error, Result};

/// What the engine serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Task {
    #[default]
    Generate,
    Embed,
}

impl Task {
    /// vLLM's `--task` names (`embedding` and `embed` both mean Embed).
    pub fn parse(s: &str) -> Result<Task> {
        match s {
            "generate" => Ok(Task::Generate),
            "embedding" | "embed" => Ok(Task::Embed),
            other => Err(Error::InvalidInput(format!("--task {other}: expected generate or embedding"))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The last prompt token's hidden state (DSE-Qwen2, VLM2Vec, GME).
    Last,
    /// The mean over the prompt's tokens.
    Mean,
    /// The first token's.
    Cls,
}

impl Pooling {
    pub fn parse(s: &str) -> Result<Pooling> {
        match s.to_ascii_lowercase().as_str() {
            "last" | "lasttoken" => Ok(Pooling::Last),
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            other => Err(Error::InvalidInput(format!("--pooling {other}: expected last, mean or cls"))),
        }
    }
}

/// How a prompt becomes one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolingConfig {
    pub pooling: Pooling,
    pub normalize: bool,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        PoolingConfig { pooling: Pooling::Last, normalize: true }
    }
}

impl PoolingConfig {
    /// From a model folder's sentence-transformers files, else the default.
    pub fn from_dir(dir: &Path) -> Result<PoolingConfig> {
        let read = |p: &Path| -> Result<Option<serde_json::Value>> {
            match std::fs::read_to_string(p) {
                Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| Error::Config(format!("{}: {e}", p.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::Io { path: p.display().to_string(), source: e }),
            }
        };
        let Some(modules) = read(&dir.join("modules.json"))? else { return Ok(PoolingConfig::default()) };
        let modules = modules.as_array().cloned().unwrap_or_default();
        let kind = |m: &serde_json::Value| m["type"].as_str().unwrap_or_default().to_owned();
        let normalize = modules.iter().any(|m| kind(m).ends_with("Normalize"));
        let Some(pool_mod) = modules.iter().find(|m| kind(m).ends_with("Pooling")) else {
            return Ok(PoolingConfig { pooling: Pooling::Last, normalize });
        };
        let path = dir.join(pool_mod["path"].as_str().unwrap_or("1_Pooling")).join("config.json");
        let cfg = read(&path)?.unwrap_or_default();
        let on = |k: &str| cfg[k].as_bool().unwrap_or(false);
        let pooling = if on("pooling_mode_lasttoken") {
            Pooling::Last
        } else if on("pooling_mode_mean_tokens") {
            Pooling::Mean
        } else if on("pooling_mode_cls_token") {
            Pooling::Cls
        } else {
            return Err(Error::Config(format!(
                "{}: no supported pooling mode (lasttoken, mean_tokens or cls_token)",
                path.display()
            )));
        };
        Ok(PoolingConfig { pooling, normalize })
    }

    /// Pools `rows` (n rows of `hidden` values, the prompt's final-normed
    /// hidden states, in order), in f64, then normalizes if configured.
    pub fn pool(&self, rows: &[f32], hidden: usize) -> Vec<f32> {
        let n = rows.len() / hidden.max(1);
        let mut v: Vec<f64> = match self.pooling {
            Pooling::Last => rows[(n - 1) * hidden..n * hidden].iter().map(|&x| x as f64).collect(),
            Pooling::Cls => rows[..hidden].iter().map(|&x| x as f64).collect(),
            Pooling::Mean => {
                let mut acc = vec![0f64; hidden];
                for r in rows.chunks_exact(hidden) {
                    acc.iter_mut().zip(r).for_each(|(a, &x)| *a += x as f64);
                }
                acc.iter_mut().for_each(|a| *a /= n as f64);
                acc
            }
        };
        if self.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v.into_iter().map(|x| x as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_by_hand() {
        let rows = [3.0, 4.0, 0.0, 1.0, 1.0, 1.0]; // 3 rows of 2
        let last = PoolingConfig { pooling: Pooling::Last, normalize: false };
        assert_eq!(last.pool(&rows, 2), vec![1.0, 1.0]);
        let cls = PoolingConfig { pooling: Pooling::Cls, normalize: true };
        assert_eq!(cls.pool(&rows, 2), vec![0.6, 0.8]);
        let mean = PoolingConfig { pooling: Pooling::Mean, normalize: false };
        assert_eq!(mean.pool(&rows, 2), vec![4.0 / 3.0, 2.0]);
    }

    #[test]
    fn sentence_transformers_config_is_read() {
        let dir = std::env::temp_dir().join(format!("kestrel-pooling-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        assert_eq!(PoolingConfig::from_dir(&dir).unwrap(), PoolingConfig::default());
        std::fs::write(
            dir.join("modules.json"),
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
        )
        .unwrap();
        std::fs::write(dir.join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": true}"#).unwrap();
        assert_eq!(PoolingConfig::from_dir(&dir).unwrap(), PoolingConfig { pooling: Pooling::Mean, normalize: false });
        std::fs::write(dir.join("1_Pooling/config.json"), r#"{"pooling_mode_max_tokens": true}"#).unwrap();
        assert!(PoolingConfig::from_dir(&dir).unwrap_err().to_string().contains("no supported pooling mode"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(Task::parse("embed").unwrap(), Task::Embed);
        assert!(Pooling::parse("max").is_err());
    }
}

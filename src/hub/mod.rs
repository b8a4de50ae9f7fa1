//! Models by Hugging Face Hub id, as vLLM finds them: a model folder is used
//! as it is; an id (`Qwen/Qwen2-VL-2B-Instruct`) is looked up in the local
//! Hugging Face cache and, when missing there, downloaded into it
//! (huggingface_hub's `snapshot_download`, src/huggingface_hub/_snapshot_download.py,
//! and `hf_hub_download`, file_download.py, are the reference).
//!
//! `resolve_model` is the one function the CLI (`generate`, `serve`,
//! `bench`) resolves MODEL with. It reads the variables huggingface_hub reads
//! (`HubConfig::from_env`): `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`,
//! `HF_TOKEN` (else the token file `huggingface-cli login` writes),
//! `HF_HUB_OFFLINE`.
//!
//! The cache layout is huggingface_hub's, so both share one cache
//! (`cache`): `models--org--name/blobs/<etag>`, `snapshots/<commit>/<file>`
//! (links to the blobs), `refs/<revision>` (the commit). Only the files a
//! model needs are fetched (`files`), each into `blobs/<etag>.incomplete`,
//! resumed with a Range request after an interruption, checked against the
//! Hub's size and hash, and only then moved into place (`client`).
//!
//! A snapshot already complete in the cache is used without asking the Hub,
//! so a second start makes no request; a newer commit on the branch is
//! picked up only once the ref is gone (`huggingface-cli download` refreshes it).

mod cache;
mod client;
mod files;
mod progress;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use progress::ProgressMode;

/// Where and how the Hub is reached; `from_env` reads it as huggingface_hub does.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Base URL, no trailing slash: `$HF_ENDPOINT`, else https://huggingface.co.
    pub endpoint: String,
    /// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub cache: PathBuf,
    /// Sent as `Authorization: Bearer`: `$HF_TOKEN`, else the file
    /// `$HF_TOKEN_PATH`, else `$HF_HOME/token`.
    pub token: Option<String>,
    /// `$HF_HUB_OFFLINE=1`: only the cache is read; no request is made.
    pub offline: bool,
    pub progress: ProgressMode,
    /// Attempts per file when the connection fails mid-download (each resumes).
    pub attempts: u32,
}

impl HubConfig {
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// `from_env` over any lookup (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let home = get("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let expand = |p: String| match p.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None => PathBuf::from(p),
        };
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            get("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache")).join("huggingface")
        });
        let cache =
            get("HF_HUB_CACHE").or_else(|| get("HUGGINGFACE_HUB_CACHE")).map(expand).unwrap_or(hf_home.join("hub"));
        let token_file = get("HF_TOKEN_PATH").map(expand).unwrap_or(hf_home.join("token"));
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let truthy =
            |k: &str| get(k).is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"));
        let progress =
            if truthy("HF_HUB_DISABLE_PROGRESS_BARS") { ProgressMode::Lines } else { ProgressMode::for_stderr() };
        HubConfig {
            endpoint: get("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .into(),
            cache,
            token,
            offline: truthy("HF_HUB_OFFLINE"),
            progress,
            attempts: 5,
        }
    }
}

/// What a snapshot must hold to be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// config.json, the safetensors weights, tokenizer and processor files.
    Model,
    /// The tokenizer and chat template files alone (`--tokenizer ID`).
    Tokenizer,
}

/// A Hub model id, `org/name`, checked as huggingface_hub's
/// `validate_repo_id` does: it names a cache folder, so it can hold no path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId(String);

impl RepoId {
    pub fn parse(s: &str) -> Option<RepoId> {
        let ok_part = |p: &str| {
            (1..=96).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
                && !p.contains("--")
                && !p.contains("..")
        };
        let (org, name) = s.split_once('/')?;
        (ok_part(org) && ok_part(name)).then(|| RepoId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The cache folder name: `models--org--name`.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.0.replace('/', "--"))
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A revision is a branch, tag or commit; it names a file under `refs/`, so
/// no part of it may climb out.
fn check_revision(rev: &str) -> Result<()> {
    let bad = rev.is_empty()
        || rev.starts_with('/')
        || rev.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        || rev.chars().any(|c| c.is_control() || c == '\\');
    if bad {
        return Err(Error::InvalidInput(format!("--revision {rev:?} is not a branch, tag or commit name")));
    }
    Ok(())
}

/// MODEL from the command line at `revision` (default `main`): a folder as
/// it is, else a Hub id from the cache, downloaded first when missing.
pub fn resolve_model(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_with(&HubConfig::from_env(), model, revision, Want::Model)
}

/// `resolve_model` with a given configuration and need.
pub fn resolve_with(cfg: &HubConfig, spec: &str, revision: Option<&str>, want: Want) -> Result<PathBuf> {
    let given = Path::new(spec);
    if given.is_dir() {
        return Ok(given.to_path_buf());
    }
    let Some(repo) = RepoId::parse(spec) else {
        return Err(Error::InvalidInput(format!(
            "model {spec:?}: no such folder (nor a Hugging Face id, which reads org/name)"
        )));
    };
    let revision = revision.unwrap_or("main");
    check_revision(revision)?;
    snapshot(cfg, &repo, revision, want)
}

/// The snapshot folder of `repo` at `revision` holding what `want` needs,
/// downloaded into the cache first if it is not complete there.
pub fn snapshot(cfg: &HubConfig, repo: &RepoId, revision: &str, want: Want) -> Result<PathBuf> {
    let local = cache::RepoCache::new(&cfg.cache, repo);
    let missing = match local.snapshot_for(revision) {
        Some(dir) => match files::missing(&dir, want) {
            None => return Ok(dir),
            Some(m) => Some(m),
        },
        None => None,
    };
    if cfg.offline {
        let why = match missing {
            Some(m) => format!("its snapshot there lacks {m}"),
            None => format!("there is no snapshot of revision {revision:?}"),
        };
        return Err(Error::Hub(format!(
            "model {repo} is not in the Hugging Face cache at {} ({why}), and HF_HUB_OFFLINE is set, so it is \
             not downloaded (unset HF_HUB_OFFLINE, or fetch it first: `huggingface-cli download {repo}`)",
            local.root().display()
        )));
    }
    download(cfg, &local, repo, revision, want)
}

/// Lists the repo at `revision`, fetches the files `want` needs that the
/// snapshot lacks (small ones first: the weight index says which shards to
/// fetch), then points `refs/<revision>` at the commit.
fn download(cfg: &HubConfig, local: &cache::RepoCache, repo: &RepoId, revision: &str, want: Want) -> Result<PathBuf> {
    let client = client::Client::new(cfg);
    let info = client.repo_info(repo, revision)?;
    let commit = info.commit(repo)?;
    let mut plan = files::select(repo, revision, &info.siblings, want)?;
    let snapshot = local.snapshot_dir(&commit);
    if let Some(index) = plan.iter().find(|f| f.name == files::WEIGHT_INDEX) {
        if !snapshot.join(&index.name).exists() {
            client.fetch(local, repo, &commit, index, &mut progress::Progress::new(ProgressMode::Quiet, ""))?;
        }
        let shards = files::index_shards(&snapshot.join(files::WEIGHT_INDEX))?;
        if let Some(absent) = shards.iter().find(|s| !plan.iter().any(|f| &&f.name == s)) {
            return Err(Error::Hub(format!(
                "model {repo}: {} names the shard {absent}, which the repo does not have",
                files::WEIGHT_INDEX
            )));
        }
        // Other *.safetensors beside the shards (a consolidated copy) are not needed.
        plan.retain(|f| !files::is_weight(&f.name) || shards.contains(&f.name));
    }
    plan.retain(|f| !snapshot.join(&f.name).exists());
    if !plan.is_empty() {
        let mut progress = progress::Progress::new(cfg.progress, repo.as_str());
        progress.start(plan.len(), plan.iter().map(|f| f.size.unwrap_or(0)).sum(), local.root());
        for f in &plan {
            client.fetch(local, repo, &commit, f, &mut progress)?;
        }
        progress.finish();
    }
    local.write_ref(revision, &commit)?;
    match files::missing(&snapshot, want) {
        None => Ok(snapshot),
        Some(m) => Err(Error::Hub(format!("model {repo}: the download left {} without {m}", snapshot.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn config_follows_huggingface_hub() {
        let c = HubConfig::from_vars(env(&[("HOME", "/h")]));
        assert_eq!(c.cache, PathBuf::from("/h/.cache/huggingface/hub"));
        assert_eq!((c.endpoint.as_str(), c.offline), ("https://huggingface.co", false));
        let c = HubConfig::from_vars(env(&[("HOME", "/h"), ("HF_HOME", "~/hf"), ("HF_ENDPOINT", "http://m:1/")]));
        assert_eq!((c.cache, c.endpoint.as_str()), (PathBuf::from("/h/hf/hub"), "http://m:1"));
        let c = HubConfig::from_vars(env(&[("HF_HOME", "/a"), ("HF_HUB_CACHE", "/b"), ("HF_HUB_OFFLINE", "1")]));
        assert_eq!((c.cache, c.offline), (PathBuf::from("/b"), true));
        let c = HubConfig::from_vars(env(&[("XDG_CACHE_HOME", "/x"), ("HF_TOKEN", " t \n")]));
        assert_eq!((c.cache, c.token.as_deref()), (PathBuf::from("/x/huggingface/hub"), Some("t")));
        assert!(!HubConfig::from_vars(env(&[("HF_HUB_OFFLINE", "0")])).offline);
        assert!(HubConfig::from_vars(env(&[("HF_HUB_OFFLINE", "true")])).offline);
    }

    #[test]
    fn token_file_under_hf_home() {
        let dir = std::env::temp_dir().join(format!("kestrel-hub-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "hf_abc\n").unwrap();
        let home = dir.to_str().unwrap().to_owned();
        let c = HubConfig::from_vars(|k| (k == "HF_HOME").then(|| home.clone()));
        assert_eq!(c.token.as_deref(), Some("hf_abc"));
        let c = HubConfig::from_vars(|k| match k {
            "HF_HOME" => Some(home.clone()),
            "HF_TOKEN" => Some("env".into()),
            _ => None,
        });
        assert_eq!(c.token.as_deref(), Some("env"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn repo_ids_hold_no_paths() {
        assert_eq!(
            RepoId::parse("Qwen/Qwen2-VL-2B-Instruct").unwrap().folder_name(),
            "models--Qwen--Qwen2-VL-2B-Instruct"
        );
        for bad in ["gpt2", "a/b/c", "../x", "a/..", "a/.b", "a--b/c", "/abs", "a/b c", "a/", "org/na..me"] {
            assert!(RepoId::parse(bad).is_none(), "{bad}");
        }
        for rev in ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"] {
            check_revision(rev).unwrap();
        }
        for rev in ["", "../x", "a/../../b", "/main", "a//b", "a\\b"] {
            assert!(check_revision(rev).is_err(), "{rev}");
        }
    }

    #[test]
    fn folders_win_and_bad_ids_say_so() {
        let cfg = HubConfig { offline: true, ..HubConfig::from_vars(|_| None) };
        let dir = std::env::temp_dir();
        assert_eq!(resolve_with(&cfg, dir.to_str().unwrap(), None, Want::Model).unwrap(), dir);
        let e = resolve_with(&cfg, "/no/such/model", None, Want::Model).unwrap_err().to_string();
        assert!(e.contains("no such folder"), "{e}");
        let e = resolve_with(&cfg, "./a/b", None, Want::Model).unwrap_err().to_string();
        assert!(e.contains("no such folder"), "{e}");
    }
}

//! The Hub's HTTP API, as much of it as a download needs, on ureq:
//!
//! - `GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true`: the
//!   commit and the file listing with sizes and hashes (huggingface_hub's
//!   `HfApi.repo_info(files_metadata=True)`).
//! - `GET {endpoint}/{repo}/resolve/{commit}/{file}`: the bytes, with
//!   `Range: bytes=N-` to resume; large files redirect to a CDN (the token
//!   is not sent to another host).
//! - `HEAD` on the same URL, only when the listing lacks a file's size or
//!   hash: `X-Linked-Etag`/`ETag` and `X-Linked-Size`/`Content-Length`, as
//!   huggingface_hub's `get_hf_file_metadata` reads them.
//!
//! A file is written to `blobs/<etag>.incomplete`, hashed as it arrives,
//! and moved to `blobs/<etag>` only when its size and hash (sha256 for LFS
//! files, the git blob sha1 for others) match the Hub's.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use ring::digest;
use serde::Deserialize;

use super::cache::{is_commit, RepoCache};
use super::files::{Remote, Sibling};
use super::progress::Progress;
use super::{HubConfig, RepoId};
use crate::error::{Error, Result};

/// `GET /api/models/{repo}/revision/{rev}`'s answer, the fields used.
#[derive(Debug, Deserialize)]
pub(crate) struct RepoInfo {
    #[serde(default)]
    sha: Option<String>,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

impl RepoInfo {
    /// The commit the revision resolved to.
    pub fn commit(&self, repo: &RepoId) -> Result<String> {
        match &self.sha {
            Some(c) if is_commit(c) => Ok(c.clone()),
            other => Err(Error::Hub(format!("model {repo}: the Hub's listing names no commit (sha: {other:?})"))),
        }
    }
}

/// Percent-encodes all but unreserved characters (and `/` when `keep_slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An ETag as huggingface_hub normalizes it: no `W/`, no quotes.
fn normalize_etag(raw: &str) -> String {
    raw.trim().trim_start_matches("W/").trim_matches('"').to_owned()
}

fn header<'a>(resp: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// What the downloaded bytes must hash to, told by the ETag's form: 64 hex
/// digits are an LFS sha256, 40 a git blob id (sha1 of `blob <len>\0` and
/// the bytes); anything else is checked by size alone.
struct Check {
    ctx: Option<digest::Context>,
    kind: &'static str,
}

impl Check {
    fn new(etag: &str, size: u64) -> Check {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        let (ctx, kind) = match etag.len() {
            64 if hex => (Some(digest::Context::new(&digest::SHA256)), "sha256"),
            40 if hex => {
                let mut c = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
                c.update(format!("blob {size}\0").as_bytes());
                (Some(c), "git blob sha1")
            }
            _ => (None, "size"),
        };
        Check { ctx, kind }
    }

    fn update(&mut self, bytes: &[u8]) {
        if let Some(c) = &mut self.ctx {
            c.update(bytes);
        }
    }

    /// The hex digest, if this check hashes.
    fn finish(self) -> Option<String> {
        let d = self.ctx?.finish();
        Some(d.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// One file to download: where from, and what it must be.
#[derive(Clone, Copy)]
struct Target<'a> {
    url: &'a str,
    repo: &'a RepoId,
    commit: &'a str,
    name: &'a str,
    etag: &'a str,
    size: u64,
}

pub(crate) struct Client {
    agent: ureq::Agent,
    /// For HEAD: redirects followed by hand, so the Hub's own answer (with
    /// its X-Linked-* headers) is read rather than the CDN's.
    no_redirect: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    attempts: u32,
}

impl Client {
    pub fn new(cfg: &HubConfig) -> Client {
        let agent = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(false)
                .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_recv_response(Some(Duration::from_secs(30)))
                .timeout_per_read(Some(Duration::from_secs(30)))
                .user_agent(concat!("kestrel/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Client {
            agent: agent(10),
            no_redirect: agent(0),
            endpoint: cfg.endpoint.clone(),
            token: cfg.token.clone(),
            attempts: cfg.attempts.max(1),
        }
    }

    fn get(&self, agent: &ureq::Agent, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = agent.get(url).header("Accept-Encoding", "identity");
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    fn unreachable(&self, repo: &RepoId, e: &ureq::Error) -> Error {
        Error::Hub(format!(
            "model {repo}: could not reach {} ({e}); it is not in the local Hugging Face cache either \
             (HF_ENDPOINT names a mirror; HF_HUB_OFFLINE=1 uses the cache alone)",
            self.endpoint
        ))
    }

    /// The error for a non-success answer about `what` (the listing or a file).
    fn status_error(
        &self,
        resp: &ureq::http::Response<ureq::Body>,
        repo: &RepoId,
        revision: &str,
        what: &str,
    ) -> Error {
        let status = resp.status().as_u16();
        let token = match &self.token {
            Some(_) => "a token was sent (HF_TOKEN or the saved login)",
            None => {
                "no token was sent: set HF_TOKEN, or log in with `huggingface-cli login`, for a private or gated repo"
            }
        };
        let msg = match header(resp, "x-error-code") {
            Some("GatedRepo") => format!(
                "model {repo} is gated: accept its conditions at {}/{repo} and use a token of that account; {token}",
                self.endpoint
            ),
            Some("RevisionNotFound") => format!("model {repo} has no revision {revision:?} on {}", self.endpoint),
            Some("EntryNotFound") => format!("model {repo}: {what} is not in revision {revision:?}"),
            _ if matches!(status, 401 | 403 | 404) => format!(
                "model {repo} is not a local folder, and {} answered {status} for it: no such repo, or one this \
                 account may not read ({token})",
                self.endpoint
            ),
            _ => format!("model {repo}: {what}: {} answered HTTP {status}", self.endpoint),
        };
        Error::Hub(match header(resp, "x-error-message") {
            Some(m) if !m.is_empty() => format!("{msg} (the Hub says: {m})"),
            _ => msg,
        })
    }

    /// The commit `revision` names and its file listing.
    pub fn repo_info(&self, repo: &RepoId, revision: &str) -> Result<RepoInfo> {
        let url = format!("{}/api/models/{repo}/revision/{}?blobs=true", self.endpoint, encode(revision, false));
        let mut resp = self.get(&self.agent, &url).call().map_err(|e| self.unreachable(repo, &e))?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, repo, revision, "the file listing"));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| Error::Hub(format!("model {repo}: reading the Hub's file listing: {e}")))?;
        serde_json::from_str(&body).map_err(|e| Error::Hub(format!("model {repo}: the Hub's file listing: {e}")))
    }

    /// A file's ETag and size from a HEAD request, for listings without them.
    fn head(&self, url: &str, repo: &RepoId, commit: &str, name: &str) -> Result<(String, u64)> {
        let mut url = url.to_owned();
        for _ in 0..5 {
            let req = self.no_redirect.head(&url).header("Accept-Encoding", "identity");
            let req = match &self.token {
                Some(t) => req.header("Authorization", format!("Bearer {t}")),
                None => req,
            };
            let resp = req.call().map_err(|e| self.unreachable(repo, &e))?;
            let linked = header(&resp, "x-linked-etag");
            if resp.status().is_redirection() && linked.is_none() {
                // Only the Hub's own (relative) redirects, as huggingface_hub.
                match header(&resp, "location").filter(|l| l.starts_with('/')) {
                    Some(loc) => {
                        url = format!("{}{loc}", self.endpoint);
                        continue;
                    }
                    None => break,
                }
            }
            if !resp.status().is_success() && !resp.status().is_redirection() {
                return Err(self.status_error(&resp, repo, commit, name));
            }
            let etag = linked.or_else(|| header(&resp, "etag")).map(normalize_etag);
            let size = header(&resp, "x-linked-size").or_else(|| header(&resp, "content-length"));
            if let (Some(etag), Some(size)) = (etag, size.and_then(|s| s.trim().parse().ok())) {
                return Ok((etag, size));
            }
            break;
        }
        Err(Error::Hub(format!("model {repo}: {name}: the Hub gave neither its size nor its ETag")))
    }

    /// Puts `f` into the snapshot of `commit`: from its blob if the cache
    /// has it, else downloaded (resuming a partial download), checked, and
    /// moved into `blobs/` under the blob's lock.
    pub fn fetch(
        &self,
        local: &RepoCache,
        repo: &RepoId,
        commit: &str,
        f: &Remote,
        progress: &mut Progress,
    ) -> Result<()> {
        let url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, encode(&f.name, true));
        let (etag, size) = match (&f.etag, f.size) {
            (Some(e), Some(s)) => (e.clone(), s),
            _ => {
                let (etag, size) = self.head(&url, repo, commit, &f.name)?;
                if f.size.is_none() {
                    progress.add_total(size);
                }
                (etag, size)
            }
        };
        // The ETag names a file in blobs/: nothing but a plain name.
        if etag.is_empty() || !etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(Error::Hub(format!("model {repo}: {}: the Hub gave an unusable ETag {etag:?}", f.name)));
        }
        progress.file(&f.name);
        let blob = local.blob(&etag);
        if blob.is_file() {
            progress.advance(size);
        } else {
            let _lock = local.lock(&etag)?;
            if blob.is_file() {
                progress.advance(size);
            } else {
                let tmp = local.incomplete(&etag);
                let target = Target { url: &url, repo, commit, name: &f.name, etag: &etag, size };
                self.download(&target, &tmp, progress)?;
                std::fs::rename(&tmp, &blob)
                    .map_err(|source| Error::Io { path: blob.display().to_string(), source })?;
            }
        }
        local.link(commit, &f.name, &etag)
    }

    /// Fills `tmp` to the target's size, resuming from what it holds and
    /// retrying a failed transfer from where it stopped, then checks the
    /// whole file against the ETag. A file that fails the check is deleted.
    fn download(&self, t: &Target, tmp: &Path, progress: &mut Progress) -> Result<()> {
        let mut part = Partial::open(t, tmp, progress)?;
        let mut buf = vec![0u8; 256 << 10];
        let mut failures = 0;
        while part.have < t.size {
            let before = part.have;
            let Some(why) = self.attempt(t, &mut part, progress, &mut buf)? else { break };
            // A try that brought bytes resets the count: only a stuck transfer gives up.
            failures = if part.have > before { 1 } else { failures + 1 };
            if failures >= self.attempts {
                return Err(Error::Hub(format!(
                    "model {}: downloading {} failed {failures} times in a row ({why}); the {} bytes fetched are \
                     kept in {} and the next run resumes from them",
                    t.repo,
                    t.name,
                    part.have,
                    tmp.display()
                )));
            }
            progress.note(&format!("kestrel: downloading {}: {why}; retrying from byte {}", t.name, part.have));
            std::thread::sleep(Duration::from_millis(250 << failures.min(5)));
        }
        part.file.sync_all().map_err(|e| part.io(e))?;
        let kind = part.check.kind;
        if let Some(got) = part.check.finish().filter(|h| h != t.etag) {
            let _ = std::fs::remove_file(tmp);
            return Err(Error::Hub(format!(
                "model {}: {} failed its {kind} check (the Hub says {}, the {} bytes received hash to {got}); the \
                 download was discarded and nothing was put in the cache",
                t.repo, t.name, t.etag, t.size
            )));
        }
        Ok(())
    }

    /// One request for the rest of the file: Ok(None) once it is all
    /// there, Ok(Some(why)) when another try may do better.
    fn attempt(
        &self,
        t: &Target,
        part: &mut Partial,
        progress: &mut Progress,
        buf: &mut [u8],
    ) -> Result<Option<String>> {
        let mut req = self.get(&self.agent, t.url);
        if part.have > 0 {
            req = req.header("Range", format!("bytes={}-", part.have));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(e) => return Ok(Some(e.to_string())),
        };
        match resp.status().as_u16() {
            // The whole file, Range or not.
            200 => part.restart(t, progress)?,
            206 => {
                let start = header(&resp, "content-range")
                    .and_then(|r| r.strip_prefix("bytes "))
                    .and_then(|r| r.split('-').next())
                    .map(|s| s.trim().parse::<u64>().ok());
                if start.is_some_and(|s| s != Some(part.have)) {
                    part.restart(t, progress)?;
                    return Ok(Some("the server answered another range".into()));
                }
            }
            // The partial file is no prefix the server can extend.
            416 => {
                part.restart(t, progress)?;
                return Ok(Some("the server refused the resume range".into()));
            }
            s @ (408 | 429 | 500..=599) => return Ok(Some(format!("HTTP {s}"))),
            _ => return Err(self.status_error(&resp, t.repo, t.commit, t.name)),
        }
        let mut body = resp.into_body().into_reader();
        loop {
            let n = match body.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Ok(Some(format!("{e} at byte {} of {}", part.have, t.size))),
            };
            if part.have + n as u64 > t.size {
                let _ = std::fs::remove_file(part.path);
                return Err(Error::Hub(format!(
                    "model {}: {}: the server sent more than the Hub's size of {} bytes; the download was discarded",
                    t.repo, t.name, t.size
                )));
            }
            part.write(&buf[..n], progress)?;
        }
        Ok((part.have < t.size).then(|| format!("the connection closed at byte {} of {}", part.have, t.size)))
    }
}

/// A download in progress: `blobs/<etag>.incomplete`, how much of it is
/// there, and the hash of those bytes.
struct Partial<'a> {
    path: &'a Path,
    file: std::fs::File,
    have: u64,
    check: Check,
}

impl<'a> Partial<'a> {
    /// Opens (or creates) the partial file; the bytes already there count
    /// toward the hash and the progress.
    fn open(t: &Target, path: &'a Path, progress: &mut Progress) -> Result<Partial<'a>> {
        let io = |source: std::io::Error| Error::Io { path: path.display().to_string(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = std::fs::File::options().create(true).append(true).open(path).map_err(io)?;
        let mut part = Partial { path, file, have: 0, check: Check::new(t.etag, t.size) };
        let have = part.file.metadata().map_err(io)?.len();
        if have > t.size {
            part.file.set_len(0).map_err(io)?;
            return Ok(part);
        }
        let mut prefix = std::fs::File::open(path).map_err(io)?.take(have);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = prefix.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            part.check.update(&buf[..n]);
            part.have += n as u64;
        }
        progress.advance(part.have);
        Ok(part)
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io { path: self.path.display().to_string(), source }
    }

    fn write(&mut self, bytes: &[u8], progress: &mut Progress) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| self.io(e))?;
        self.check.update(bytes);
        self.have += bytes.len() as u64;
        progress.advance(bytes.len() as u64);
        Ok(())
    }

    /// Empties the file (appends then start at 0).
    fn restart(&mut self, t: &Target, progress: &mut Progress) -> Result<()> {
        if self.have > 0 {
            self.file.set_len(0).map_err(|e| self.io(e))?;
            progress.rewind(self.have);
            (self.have, self.check) = (0, Check::new(t.etag, t.size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_etags() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }

    #[test]
    fn checks_follow_the_etag() {
        // sha256("hello") and git's blob id of "hello" (`git hash-object`).
        let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let mut c = Check::new(sha, 5);
        c.update(b"hel");
        c.update(b"lo");
        assert_eq!(c.finish().as_deref(), Some(sha));
        let git = "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0";
        let mut c = Check::new(git, 5);
        c.update(b"hello");
        assert_eq!((c.kind, c.finish().as_deref()), ("git blob sha1", Some(git)));
        assert_eq!(Check::new("abc", 5).finish(), None);
    }
}

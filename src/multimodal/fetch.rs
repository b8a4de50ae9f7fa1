//! Fetching media bytes from what a request names: `http(s)://` URLs,
//! `data:<mime>;base64,` URLs, and local files under an allowed root.
//!
//! Mirrors vLLM's `MediaConnector` (vllm/multimodal/utils.py): the same
//! three sources, local files only under `--allowed-local-media-path`, hosts
//! limited by `--allowed-media-domains`, a fetch deadline from the
//! environment (`VLLM_IMAGE_FETCH_TIMEOUT` there, `KESTREL_IMAGE_FETCH_TIMEOUT`
//! here, whole seconds, default 5). Unlike vLLM we also cap the size of
//! what one fetch may return, and accept a bare absolute path as a local file.
//!
//! A URL that could not be fetched — connection refused, unknown host,
//! timeout, an error status, too many redirects, a broken body — is
//! `Error::MediaFetch` (the server's 422); every other failure (malformed or
//! refused URL, bad data URL, a response over the size cap) is
//! `Error::InvalidInput` (400): the URL came from a user.
//!
//! Addresses: by default a fetch may only reach public addresses (see
//! `policy`; `--allow-private-media-urls` lifts it). Every TCP connection,
//! each redirect hop included, resolves its host through `MediaResolver`,
//! which drops the addresses the policy refuses, so the check is made on the
//! addresses actually connected to. Redirects are followed here, hop by hop,
//! so each hop's host is also seen by `check_host` (the domain allowlist and
//! `policy::check_host`).
//! With an HTTP proxy configured in the environment (ureq honours
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`, as vLLM's aiohttp session does)
//! the proxy resolves the target's name, so only the URL's host as written
//! is checked here; the proxy's own address, chosen by the operator, is not.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use crate::error::{Error, Result};
use crate::multimodal::video::{VideoLimits, VideoSampling};

pub mod policy;

/// Default fetch deadline (vLLM's `VLLM_IMAGE_FETCH_TIMEOUT` default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Environment variable holding the fetch deadline in seconds.
pub const TIMEOUT_ENV: &str = "KESTREL_IMAGE_FETCH_TIMEOUT";
/// Default cap on the bytes one fetch may return.
pub const DEFAULT_MAX_BYTES: usize = 32 << 20;
/// Redirects followed before a fetch fails.
pub const MAX_REDIRECTS: usize = 3;
/// Default deadline for fetching a video file (vLLM's
/// `VLLM_VIDEO_FETCH_TIMEOUT` default).
pub const DEFAULT_VIDEO_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable holding the video fetch deadline in seconds.
pub const VIDEO_TIMEOUT_ENV: &str = "KESTREL_VIDEO_FETCH_TIMEOUT";
/// Default cap on the bytes of one video file (vLLM has none): about a
/// minute of 1080p phone video. A data URL is also bounded by the request
/// body cap.
pub const DEFAULT_VIDEO_MAX_BYTES: usize = 128 << 20;

/// Where media may come from and how much of it.
#[derive(Clone, Debug)]
pub struct FetchSettings {
    /// Local files (`file://` URLs, absolute paths) are read only from under
    /// this directory; None refuses them (vLLM `--allowed-local-media-path`).
    pub allowed_local_media_path: Option<PathBuf>,
    /// Deadline for one whole fetch: connect, redirects and body.
    pub timeout: Duration,
    /// Most bytes one fetch may return (after base64 decoding for data URLs).
    pub max_bytes: usize,
    /// When set, http(s) URLs (and each redirect target) must name one of
    /// these hosts exactly, ignoring case (vLLM `--allowed-media-domains`).
    pub allowed_domains: Option<Vec<String>>,
    /// Let http(s) URLs reach loopback, private, link-local and other
    /// non-public addresses (`--allow-private-media-urls`); cloud metadata
    /// endpoints stay refused (see `policy`).
    pub allow_private_addresses: bool,
    /// Deadline for fetching one video file (`video_url`).
    pub video_timeout: Duration,
    /// Most bytes one video file may have.
    pub video_max_bytes: usize,
    /// Which frames of a video file are kept (`--media-io-kwargs`).
    pub video_sampling: VideoSampling,
    /// Bounds on decoding one video file.
    pub video_limits: VideoLimits,
}

impl Default for FetchSettings {
    /// Defaults without looking at the environment; see `from_env`.
    fn default() -> Self {
        FetchSettings {
            allowed_local_media_path: None,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
            allowed_domains: None,
            allow_private_addresses: false,
            video_timeout: DEFAULT_VIDEO_TIMEOUT,
            video_max_bytes: DEFAULT_VIDEO_MAX_BYTES,
            video_sampling: VideoSampling::default(),
            video_limits: VideoLimits::default(),
        }
    }
}

impl FetchSettings {
    /// The defaults, with the timeouts from `KESTREL_IMAGE_FETCH_TIMEOUT`
    /// and `KESTREL_VIDEO_FETCH_TIMEOUT`, else vLLM's
    /// `VLLM_IMAGE_FETCH_TIMEOUT` / `VLLM_VIDEO_FETCH_TIMEOUT` (seconds,
    /// fractions allowed).
    pub fn from_env() -> Result<Self> {
        let mut s = FetchSettings::default();
        for (env, slot) in [(TIMEOUT_ENV, &mut s.timeout), (VIDEO_TIMEOUT_ENV, &mut s.video_timeout)] {
            if let Some((name, v)) = crate::cli::vllm_flags::env_alias(env) {
                *slot = parse_timeout(&v).ok_or_else(|| {
                    Error::InvalidInput(format!("{name}={v:?}: expected a positive number of seconds"))
                })?;
            }
        }
        Ok(s)
    }
}

/// A timeout in seconds, as `KESTREL_IMAGE_FETCH_TIMEOUT` holds it.
fn parse_timeout(v: &str) -> Option<Duration> {
    v.trim().parse::<f64>().ok().filter(|t| t.is_finite() && *t > 0.0).and_then(|t| Duration::try_from_secs_f64(t).ok())
}

/// How long one fetch may take and how many bytes it may bring.
#[derive(Clone, Copy)]
struct Budget {
    timeout: Duration,
    max_bytes: usize,
}

/// Fetches media bytes under `FetchSettings`. Cheap to share between threads
/// (the HTTP agent pools connections).
pub struct MediaFetcher {
    settings: FetchSettings,
    /// `allowed_local_media_path`, canonicalized once.
    local_root: Option<PathBuf>,
    agent: ureq::Agent,
}

impl MediaFetcher {
    /// Checks the settings: the local media root must be an existing directory.
    pub fn new(settings: FetchSettings) -> Result<Self> {
        let local_root = match &settings.allowed_local_media_path {
            None => None,
            Some(p) => {
                let root = p
                    .canonicalize()
                    .map_err(|e| Error::InvalidInput(format!("--allowed-local-media-path {}: {e}", p.display())))?;
                if !root.is_dir() {
                    return Err(Error::InvalidInput(format!(
                        "--allowed-local-media-path {} is not a directory",
                        p.display()
                    )));
                }
                Some(root)
            }
        };
        let config = ureq::Agent::config_builder()
            // Redirects are followed in `fetch_http`, so each hop is checked.
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(settings.timeout))
            .user_agent(concat!("kestrel/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            DefaultConnector::new(),
            MediaResolver { inner: DefaultResolver::default(), allow_private: settings.allow_private_addresses },
        );
        Ok(MediaFetcher { settings, local_root, agent })
    }

    pub fn settings(&self) -> &FetchSettings {
        &self.settings
    }

    /// The bytes `url` names: `http://`, `https://`, `data:<mime>;base64,...`,
    /// `file:///abs/path` or `/abs/path` (the last two only under the allowed
    /// local root).
    pub fn fetch(&self, url: &str) -> Result<Vec<u8>> {
        self.fetch_within(url, Budget { timeout: self.settings.timeout, max_bytes: self.settings.max_bytes })
    }

    /// `fetch` for a video file: the video timeout and byte cap.
    pub fn fetch_video(&self, url: &str) -> Result<Vec<u8>> {
        let s = &self.settings;
        self.fetch_within(url, Budget { timeout: s.video_timeout, max_bytes: s.video_max_bytes })
    }

    fn fetch_within(&self, url: &str, budget: Budget) -> Result<Vec<u8>> {
        if url.trim().is_empty() {
            return Err(Error::InvalidInput("the media URL is empty".into()));
        }
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("http" | "https") => self.fetch_http(url, budget),
            Some("data") => self.fetch_data(url, budget.max_bytes),
            Some("file") => self.fetch_local(&file_url_path(url)?, url, budget.max_bytes),
            _ if url.starts_with('/') => self.fetch_local(Path::new(url), url, budget.max_bytes),
            _ => Err(Error::InvalidInput(format!(
                "media URL {}: unsupported; use an http(s):// URL, a data:<mime>;base64, URL, \
                 or a file:// URL or absolute path (with --allowed-local-media-path)",
                shown(url)
            ))),
        }
    }

    fn fetch_http(&self, url: &str, budget: Budget) -> Result<Vec<u8>> {
        let bad = |msg: String| Error::InvalidInput(format!("media URL {}: {msg}", shown(url)));
        let failed = |msg: String| Error::MediaFetch(format!("media URL {}: {msg}", shown(url)));
        let timeout = budget.timeout;
        let timed_out = || failed(format!("timed out after {} s", timeout.as_secs_f64()));
        let deadline = Instant::now() + timeout;
        let mut current = url.to_string();
        let mut redirects = 0;
        loop {
            let uri = Uri::try_from(current.as_str()).map_err(|e| bad(format!("not a valid URL ({e})")))?;
            self.check_host(&uri).map_err(bad)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            let mut resp =
                self.agent.get(uri.clone()).config().timeout_global(Some(left)).build().call().map_err(|e| {
                    match Refused::of(&e) {
                        Some(why) => bad(why),
                        None if is_timeout(&e) => timed_out(),
                        None => failed(transport_error(&e)),
                    }
                })?;
            let status = resp.status();
            if status.is_redirection() {
                if let Some(loc) = resp.headers().get("location") {
                    if redirects == MAX_REDIRECTS {
                        return Err(failed(format!("more than {MAX_REDIRECTS} redirects")));
                    }
                    redirects += 1;
                    let loc = loc.to_str().map_err(|_| bad("a redirect Location is not text".into()))?;
                    current = join_location(&uri, loc);
                    if !(current.starts_with("http://") || current.starts_with("https://")) {
                        return Err(bad(format!("redirects to {}, which is not http(s)", shown(&current))));
                    }
                    continue;
                }
            }
            if !status.is_success() {
                let reason = status.canonical_reason().unwrap_or("");
                return Err(failed(format!("the server answered HTTP {} {reason}", status.as_u16())));
            }
            let cap = budget.max_bytes;
            let too_big = || bad(format!("the response is larger than the {} allowed", bytes(cap)));
            if resp.body().content_length().is_some_and(|n| n > cap as u64) {
                return Err(too_big());
            }
            return resp.body_mut().with_config().limit(cap as u64).read_to_vec().map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => too_big(),
                e if is_timeout(&e) => timed_out(),
                e => failed(format!("reading the response failed: {}", transport_error(&e))),
            });
        }
    }

    /// Ok when the URI's host is among `allowed_domains` (if set) and is
    /// not, as written, an address or name the address policy refuses.
    fn check_host(&self, uri: &Uri) -> std::result::Result<(), String> {
        let host = uri.host().unwrap_or("");
        if let Some(allowed) = &self.settings.allowed_domains {
            if !allowed.iter().any(|d| d.eq_ignore_ascii_case(host)) {
                return Err(format!("host {host:?} is not among the allowed media domains (--allowed-media-domains)"));
            }
        }
        match policy::check_host(host, self.settings.allow_private_addresses) {
            Some(why) => Err(format!("refused: {why}")),
            None => Ok(()),
        }
    }

    fn fetch_data(&self, url: &str, cap: usize) -> Result<Vec<u8>> {
        let bad = |msg: String| Error::InvalidInput(format!("data URL {}: {msg}", shown(url)));
        let (header, payload) =
            url["data:".len()..].split_once(',').ok_or_else(|| bad("expected data:<mime>;base64,<data>".into()))?;
        if !header.to_ascii_lowercase().ends_with(";base64") {
            return Err(bad("only base64 data URLs are supported (data:<mime>;base64,<data>)".into()));
        }
        let media_type = &header[..header.len() - ";base64".len()];
        if !valid_media_type(media_type) {
            return Err(bad(format!(
                "{:?} is not a media type; expected data:<type>/<subtype>;base64,<data>",
                shown(media_type)
            )));
        }
        let max_len = cap.div_ceil(3).saturating_mul(4);
        if payload.len() > max_len {
            return Err(bad(format!(
                "{} of base64 is more than the {} allowed (the decoded data may be at most {})",
                bytes(payload.len()),
                bytes(max_len),
                bytes(cap)
            )));
        }
        const B64: GeneralPurpose = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let data = B64.decode(payload).map_err(|e| bad(format!("invalid base64: {e}")))?;
        if data.len() > cap {
            return Err(bad(format!("the decoded data is larger than the {} allowed", bytes(cap))));
        }
        Ok(data)
    }

    /// Reads `path` if it resolves, through `..` and symlinks, to a regular
    /// file under the allowed root. `url` is what the user sent, for messages.
    fn fetch_local(&self, path: &Path, url: &str, cap: usize) -> Result<Vec<u8>> {
        let Some(root) = &self.local_root else {
            return Err(Error::InvalidInput(format!(
                "media URL {}: local media paths are not allowed; start kestrel with --allowed-local-media-path <dir>",
                shown(url)
            )));
        };
        let bad = |msg: &str| Error::InvalidInput(format!("local media file {}: {msg}", shown(url)));
        let outside = || bad("is outside the allowed local media directory");
        // Refuse what is outside the root on its face before touching the
        // file system, so the answer does not tell whether such a file exists.
        let given_root = self.settings.allowed_local_media_path.as_deref().unwrap_or(root);
        let lexical = normalize_lexically(path);
        if !lexical.starts_with(root) && !lexical.starts_with(normalize_lexically(given_root)) {
            return Err(outside());
        }
        let canon = path.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => bad("no such file"),
            _ => bad(&io_reason(&e)),
        })?;
        if !canon.starts_with(root) {
            return Err(outside());
        }
        // Look before opening: opening a FIFO for reading blocks until a
        // writer comes, and a device may never end. Checked again on the open
        // file, in case the path changed in between.
        let not_regular = || bad("is not a regular file");
        if !std::fs::metadata(&canon).map_err(|e| bad(&io_reason(&e)))?.is_file() {
            return Err(not_regular());
        }
        let file = File::open(&canon).map_err(|e| bad(&io_reason(&e)))?;
        let meta = file.metadata().map_err(|e| bad(&io_reason(&e)))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let too_big = || bad(&format!("is larger than the {} allowed", bytes(cap)));
        if meta.len() > cap as u64 {
            return Err(too_big());
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.take(cap as u64 + 1).read_to_end(&mut data).map_err(|e| bad(&io_reason(&e)))?;
        if data.len() > cap {
            return Err(too_big());
        }
        Ok(data)
    }
}

/// Name resolution for media fetches: every connection, redirect hops
/// included, resolves here, and only the addresses `policy::check_ip`
/// allows are handed to the connector, which connects to nothing else.
#[derive(Debug)]
struct MediaResolver {
    inner: DefaultResolver,
    allow_private: bool,
}

impl Resolver for MediaResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> std::result::Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = self.inner.resolve(uri, config, timeout)?;
        // The configured proxy itself is the operator's choice, not the user's.
        let is_proxy = config.proxy().is_some_and(|p| {
            let port = uri.port_u16().or_else(|| default_port(uri));
            uri.host().is_some_and(|h| h.eq_ignore_ascii_case(p.host())) && port == Some(p.port())
        });
        if is_proxy {
            return Ok(resolved);
        }
        let mut allowed = self.inner.empty();
        let mut why = None;
        for addr in resolved.iter() {
            match policy::check_ip(addr.ip(), self.allow_private) {
                None => allowed.push(*addr),
                Some(w) => why = why.or(Some(w)),
            }
        }
        match why {
            Some(why) if allowed.is_empty() => {
                let host = uri.host().unwrap_or("");
                let why = format!("refused: host {host:?} resolves to no address media URLs may reach: {why}");
                Err(ureq::Error::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, Refused(why))))
            }
            _ => Ok(allowed),
        }
    }
}

fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    }
}

/// The resolver's refusal, carried through ureq inside an io::Error so that
/// `fetch_http` can tell it (the user's fault, 400) from a network failure.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    fn of(e: &ureq::Error) -> Option<String> {
        match e {
            ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<Refused>().map(|r| r.0.clone()),
            _ => None,
        }
    }
}

fn is_timeout(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock),
        _ => false,
    }
}

/// A transport failure in words (ureq's Display, which never holds Debug output).
fn transport_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::HostNotFound => "the host name does not resolve".into(),
        ureq::Error::ConnectionFailed => "could not connect".into(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        e => e.to_string(),
    }
}

/// Whether a data URL's `<mime>` part is empty (RFC 2397's default) or
/// `type/subtype` with `;name=value` parameters, all RFC 9110 tokens (no
/// quoted values: nothing a data URL of media needs). Which
/// types are accepted is left to the decoder: clients label the same bytes
/// image/jpg, image/jpeg or application/octet-stream, and image embeddings
/// come as the latter.
fn valid_media_type(s: &str) -> bool {
    let token =
        |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
    let mut parts = s.split(';');
    let mime = parts.next().unwrap_or("");
    let mime_ok = mime.is_empty() || mime.split_once('/').is_some_and(|(t, sub)| token(t) && token(sub));
    s.len() <= 200 && mime_ok && parts.all(|p| p.trim().split_once('=').is_some_and(|(k, v)| token(k) && token(v)))
}

/// The absolute URL a redirect's `Location` names, relative to `base` (RFC
/// 3986 §5.2 without dot-segment removal, which servers do themselves).
fn join_location(base: &Uri, loc: &str) -> String {
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    if loc.contains("://") && loc.split("://").next().is_some_and(|s| s.chars().all(|c| c.is_ascii_alphanumeric())) {
        loc.to_string()
    } else if let Some(rest) = loc.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if loc.starts_with('/') {
        format!("{scheme}://{authority}{loc}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{authority}{dir}{loc}")
    }
}

/// The path of a `file://` URL: `file:///abs/path` or
/// `file://localhost/abs/path`, percent-decoded.
fn file_url_path(url: &str) -> Result<PathBuf> {
    let bad = |msg: &str| Error::InvalidInput(format!("file URL {}: {msg}", shown(url)));
    let prefix_ok = url.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("file://"));
    let rest = if prefix_ok { &url[7..] } else { return Err(bad("expected file:///absolute/path")) };
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    if !rest.starts_with('/') {
        return Err(bad("expected file:///absolute/path (no host other than localhost)"));
    }
    let mut out = Vec::with_capacity(rest.len());
    let mut b = rest.bytes();
    while let Some(c) = b.next() {
        if c == b'%' {
            let hex = [b.next(), b.next()];
            let v = match hex {
                [Some(h), Some(l)] => std::str::from_utf8(&[h, l]).ok().and_then(|s| u8::from_str_radix(s, 16).ok()),
                _ => None,
            };
            out.push(v.ok_or_else(|| bad("invalid percent-encoding"))?);
        } else {
            out.push(c);
        }
    }
    let s = String::from_utf8(out).map_err(|_| bad("the path is not UTF-8"))?;
    Ok(PathBuf::from(s))
}

/// `path` with `.` and `..` components resolved as text (no file system).
fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Why a local file could not be read, as the error's kind ("permission
/// denied"), without the OS error number.
fn io_reason(e: &std::io::Error) -> String {
    format!("cannot be read ({})", e.kind())
}

/// A URL as messages show it: data URLs and other long ones are cut short.
fn shown(url: &str) -> String {
    const MAX: usize = 80;
    if url.chars().count() <= MAX {
        url.to_string()
    } else {
        format!("{}...", url.chars().take(MAX).collect::<String>())
    }
}

/// A byte count for people: "32 MiB", "1.5 KiB", "17 bytes".
fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", trim(n as f64 / (1 << 20) as f64)),
        n if n >= 1 << 10 => format!("{} KiB", trim(n as f64 / (1 << 10) as f64)),
        n => format!("{n} bytes"),
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests;

//! Hub ids downloaded into the Hugging Face cache (`kestrel::hub`), against
//! a fake Hub on 127.0.0.1 (tests/common/fake_hub.rs) serving the built-in
//! tiny Qwen2-VL folder as `org/tiny`: a fresh download, the cache alone on
//! the second run and offline, a resumed download, a corrupt file refused,
//! the token, the Hub's errors, a repo of .bin weights; then the `kestrel`
//! binary's `generate` and `serve` with HF_ENDPOINT at the fake Hub.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fake_hub::{Behaviour, FakeHub, File, Repo};
use kestrel::hub::{resolve_with, HubConfig, ProgressMode, Want};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn model_src() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/model/builtin/tiny-qwen2-vl"))
}

/// A fresh, empty HF_HOME for one test.
fn temp_home(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_repo() -> Repo {
    let mut r = Repo::from_dir("org/tiny", COMMIT, model_src());
    r.revisions.push(("v1".into(), V1.into()));
    r
}

fn hub(b: Behaviour) -> FakeHub {
    let bin_only = Repo {
        id: "org/bin-only".into(),
        revisions: vec![("main".into(), COMMIT.into())],
        files: vec![
            File { name: "config.json".into(), bytes: b"{}".to_vec(), lfs: false },
            File { name: "pytorch_model.bin".into(), bytes: vec![1; 100], lfs: true },
        ],
    };
    FakeHub::start(vec![tiny_repo(), bin_only], b)
}

fn config(hub: &FakeHub, home: &Path) -> HubConfig {
    HubConfig {
        endpoint: hub.url.clone(),
        cache: home.join("hub"),
        token: None,
        offline: false,
        progress: ProgressMode::Quiet,
        attempts: 5,
    }
}

/// The model files a download must bring (all of the folder's).
fn model_files() -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(model_src()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// The snapshot holds exactly the model's files, each a relative link to
/// its blob, byte for byte the fake Hub's.
fn assert_snapshot(hub: &FakeHub, home: &Path, dir: &Path, commit: &str) {
    let repo = home.join("hub/models--org--tiny");
    assert_eq!(dir, repo.join("snapshots").join(commit));
    let mut got: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    got.sort();
    assert_eq!(got, model_files());
    for name in &got {
        let (bytes, etag) = hub.file("org/tiny", name);
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        assert_eq!(std::fs::read_link(dir.join(name)).unwrap(), Path::new("../../blobs").join(&etag), "{name}");
    }
}

#[test]
fn fresh_download_then_the_cache_alone() {
    let (hub, home) = (hub(Behaviour::default()), temp_home("fresh"));
    let cfg = config(&hub, &home);
    let dir = resolve_with(&cfg, "org/tiny", None, Want::Model).unwrap();
    assert_snapshot(&hub, &home, &dir, COMMIT);
    let refs = std::fs::read_to_string(home.join("hub/models--org--tiny/refs/main")).unwrap();
    assert_eq!(refs, COMMIT);
    let log = hub.log();
    assert!(log.iter().all(|r| !r.path.ends_with("README.md") && !r.path.contains(".bin")), "{log:?}");
    assert!(log.iter().all(|r| r.headers.get("authorization").is_none()), "a token was sent: {log:?}");
    // The model loads and answers.
    let dev = kestrel::Device::Cpu;
    let off = kestrel::cli::generate::Offline::load(&dir, &dev, None, &Default::default()).unwrap();
    let input = off.prepare_chat(&serde_json::json!([{"role": "user", "content": "hi"}]), &[]).unwrap();
    let out = kestrel::model::seq::generate_greedy(off.model.as_ref(), &input, 2, &[]).unwrap();
    assert_eq!(out.len(), 2);

    // Again, and offline: the cache alone, no request.
    let n = hub.requests();
    assert_eq!(resolve_with(&cfg, "org/tiny", None, Want::Model).unwrap(), dir);
    let offline = HubConfig { offline: true, ..cfg.clone() };
    assert_eq!(resolve_with(&offline, "org/tiny", Some("main"), Want::Model).unwrap(), dir);
    assert_eq!(resolve_with(&offline, "org/tiny", Some(COMMIT), Want::Model).unwrap(), dir);
    assert_eq!(hub.requests(), n);

    // A tag is another commit: its own snapshot and ref, blobs shared.
    let v1 = resolve_with(&cfg, "org/tiny", Some("v1"), Want::Model).unwrap();
    assert_snapshot(&hub, &home, &v1, V1);
    assert_eq!(std::fs::read_to_string(home.join("hub/models--org--tiny/refs/v1")).unwrap(), V1);
    let gets = hub.log().into_iter().skip(n).filter(|r| r.path.contains("/resolve/") || r.path.contains("/cdn/"));
    assert_eq!(gets.count(), 0, "blobs already in the cache were fetched again");
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn offline_without_the_model_names_the_cache() {
    let (hub, home) = (hub(Behaviour::default()), temp_home("offline"));
    let cfg = HubConfig { offline: true, ..config(&hub, &home) };
    let e = resolve_with(&cfg, "org/tiny", None, Want::Model).unwrap_err().to_string();
    let path = home.join("hub/models--org--tiny");
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains(path.to_str().unwrap()) && e.contains("org/tiny"), "{e}");
    assert_eq!(hub.requests(), 0);
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn a_dropped_connection_resumes_with_a_range_request() {
    let at = 500_000;
    let drop = || Behaviour { drop_once: Some(("model.safetensors".into(), at)), ..Default::default() };
    // Within one run: the retry asks for the rest.
    let (hub1, home) = (hub(drop()), temp_home("resume"));
    let dir = resolve_with(&config(&hub1, &home), "org/tiny", None, Want::Model).unwrap();
    assert_snapshot(&hub1, &home, &dir, COMMIT);
    // (Sent to the Hub's URL, kept through its redirect to the CDN, which answers it.)
    let cdn = |h: &FakeHub| h.log().into_iter().filter(|r| r.path.starts_with("/cdn/")).collect::<Vec<_>>();
    let ranges: Vec<String> = cdn(&hub1).iter().filter_map(|r| r.headers.get("range").cloned()).collect();
    assert_eq!(ranges, [format!("bytes={at}-")]);
    std::fs::remove_dir_all(&home).unwrap();

    // Across runs: a run that gives up keeps the partial file; the next resumes it.
    let (hub2, home) = (hub(drop()), temp_home("resume2"));
    let once = HubConfig { attempts: 1, ..config(&hub2, &home) };
    let e = resolve_with(&once, "org/tiny", None, Want::Model).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("resumes"), "{e}");
    let (_, etag) = hub2.file("org/tiny", "model.safetensors");
    let partial = home.join("hub/models--org--tiny/blobs").join(format!("{etag}.incomplete"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), at as u64);
    assert!(!home.join("hub/models--org--tiny/refs/main").exists());
    let dir = resolve_with(&once, "org/tiny", None, Want::Model).unwrap();
    assert_snapshot(&hub2, &home, &dir, COMMIT);
    let ranges: Vec<String> = cdn(&hub2).iter().filter_map(|r| r.headers.get("range").cloned()).collect();
    assert_eq!(ranges, [format!("bytes={at}-")]);
    assert!(!partial.exists());
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn a_server_that_ignores_range_gets_the_file_afresh() {
    let b =
        Behaviour { drop_once: Some(("model.safetensors".into(), 300_000)), ignore_range: true, ..Default::default() };
    let (hub, home) = (hub(b), temp_home("norange"));
    let dir = resolve_with(&config(&hub, &home), "org/tiny", None, Want::Model).unwrap();
    assert_snapshot(&hub, &home, &dir, COMMIT);
    let cdn: Vec<_> = hub.log().into_iter().filter(|r| r.path.starts_with("/cdn/")).collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[1].headers.get("range").map(String::as_str), Some("bytes=300000-"));
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn a_corrupt_file_is_refused_and_kept_out_of_the_cache() {
    let b = Behaviour { corrupt: Some("model.safetensors".into()), ..Default::default() };
    let (hub, home) = (hub(b), temp_home("corrupt"));
    let e = resolve_with(&config(&hub, &home), "org/tiny", None, Want::Model).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("sha256") && e.contains("discarded"), "{e}");
    let repo = home.join("hub/models--org--tiny");
    let (_, etag) = hub.file("org/tiny", "model.safetensors");
    assert!(!repo.join("snapshots").join(COMMIT).join("model.safetensors").exists());
    assert!(!repo.join("blobs").join(&etag).exists());
    assert!(!repo.join("blobs").join(format!("{etag}.incomplete")).exists());
    assert!(!repo.join("refs/main").exists());
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn the_token_is_sent_to_the_hub_alone() {
    let b = Behaviour { token: Some("hf_secret".into()), ..Default::default() };
    let (hub, home) = (hub(b), temp_home("token"));
    let cfg = config(&hub, &home);
    let e = resolve_with(&cfg, "org/tiny", None, Want::Model).unwrap_err().to_string();
    assert!(e.contains("org/tiny") && e.contains("401") && e.contains("no token was sent"), "{e}");
    let cfg = HubConfig { token: Some("hf_secret".into()), ..cfg };
    let dir = resolve_with(&cfg, "org/tiny", None, Want::Model).unwrap();
    assert_snapshot(&hub, &home, &dir, COMMIT);
    let log = hub.log();
    for r in log.iter().filter(|r| r.headers.get("authorization").is_some()) {
        assert_eq!(r.headers["authorization"], "Bearer hf_secret");
    }
    let to_hub = log.iter().filter(|r| r.host == "127.0.0.1" && !r.path.starts_with("/cdn/"));
    assert!(to_hub.skip(1).all(|r| r.headers.contains_key("authorization")), "{log:?}");
    if hub.cdn_elsewhere {
        let cdn: Vec<_> = log.iter().filter(|r| r.host == "127.0.0.2").collect();
        assert!(!cdn.is_empty() && cdn.iter().all(|r| !r.headers.contains_key("authorization")), "{cdn:?}");
    } else {
        common::notice("hub_download: 127.0.0.2 could not be bound; the token's stop at another host is unchecked");
    }
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn hub_errors_name_the_repo() {
    let (hub, home) = (hub(Behaviour::default()), temp_home("errors"));
    let cfg = config(&hub, &home);
    let e = resolve_with(&cfg, "org/nope", None, Want::Model).unwrap_err().to_string();
    assert!(e.contains("org/nope") && e.contains("404") && e.contains("not a local folder"), "{e}");
    let e = resolve_with(&cfg, "org/tiny", Some("v9"), Want::Model).unwrap_err().to_string();
    assert!(e.contains("org/tiny") && e.contains("no revision \"v9\""), "{e}");
    let e = resolve_with(&cfg, "org/bin-only", None, Want::Model).unwrap_err().to_string();
    assert!(e.contains("org/bin-only") && e.contains("pytorch_model.bin") && e.contains("safetensors only"), "{e}");
    let unreachable = HubConfig { endpoint: "http://127.0.0.1:9".into(), ..cfg };
    let e = resolve_with(&unreachable, "org/tiny", None, Want::Model).unwrap_err().to_string();
    assert!(e.contains("org/tiny") && e.contains("could not reach"), "{e}");
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn a_listing_without_sizes_falls_back_to_head() {
    let b = Behaviour { bare_listing: true, ..Default::default() };
    let (hub, home) = (hub(b), temp_home("head"));
    let dir = resolve_with(&config(&hub, &home), "org/tiny", None, Want::Model).unwrap();
    assert_snapshot(&hub, &home, &dir, COMMIT);
    let heads = hub.log().iter().filter(|r| r.method == "HEAD").count();
    assert_eq!(heads, model_files().len());
    // A tokenizer alone.
    let tok_home = temp_home("tok");
    let tok = resolve_with(&config(&hub, &tok_home), "org/tiny", None, Want::Tokenizer).unwrap();
    assert!(tok.join("tokenizer.json").exists() && !tok.join("model.safetensors").exists());
    std::fs::remove_dir_all(&home).unwrap();
    std::fs::remove_dir_all(&tok_home).unwrap();
}

/// The `kestrel` binary with a fresh HF_HOME, HF_ENDPOINT at `hub`, and no
/// other HF variable of the caller's.
fn kestrel(hub: &FakeHub, home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kestrel"));
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"] {
        c.env_remove(k);
    }
    c.env("HF_HOME", home).env("HF_ENDPOINT", &hub.url).env("KESTREL_CACHE_DIR", home.join("kestrel"));
    c
}

#[test]
fn cli_generate_and_serve_take_a_hub_id() {
    let (hub, home) = (hub(Behaviour::default()), temp_home("cli"));
    let args = ["generate", "--device", "cpu", "--model", "org/tiny", "--prompt", "hi", "--max-tokens", "2"];
    let out = kestrel(&hub, &home).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("downloading org/tiny") && err.contains("downloaded org/tiny"), "{err}");
    assert!(err.lines().count() <= 8, "a few progress lines, not one per chunk: {err}");
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!answer.trim().is_empty());
    assert_snapshot(&hub, &home, &home.join("hub/models--org--tiny/snapshots").join(COMMIT), COMMIT);

    let n = hub.requests();
    let out = kestrel(&hub, &home).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), answer);
    assert_eq!(hub.requests(), n);

    let nope = ["generate", "--device", "cpu", "--model", "org/nope", "--prompt", "hi"];
    let out = kestrel(&hub, &home).args(nope).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("kestrel generate: model org/nope"), "{err}");

    // serve: the same resolution, served under the id it was given; the
    // model from the cache, the tokenizer of tag v1 fetched (its files alone).
    let n = hub.requests();
    let cache = home.join("hub");
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "0"),
        ("HF_ENDPOINT", hub.url.as_str()),
    ];
    let args = ["org/tiny", "--revision", "main", "--tokenizer-revision", "v1"];
    let (mut child, _, line) = common::spawn_serve(&args, &env);
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("kestrel: serving org/tiny on "), "{line}");
    let v1 = home.join("hub/models--org--tiny/snapshots").join(V1);
    assert!(v1.join("tokenizer.json").exists() && !v1.join("model.safetensors").exists());
    let asked: Vec<String> = hub.log().into_iter().skip(n).map(|r| r.path).collect();
    assert_eq!(asked, ["/api/models/org/tiny/revision/v1"], "blobs in the cache are not fetched again");
    std::fs::remove_dir_all(&home).unwrap();
}

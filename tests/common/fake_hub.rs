//! A stand-in for the Hugging Face Hub on 127.0.0.1, answering the requests
//! `kestrel::hub` makes, as the Hub does:
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]`: `sha` and
//!   `siblings` (`rfilename`, `size`, `blobId`, `lfs {sha256, size}`);
//! - `GET`/`HEAD /{org}/{name}/resolve/{rev}/{file}`: the bytes, with
//!   `X-Repo-Commit`, `ETag` (the git blob id), for LFS files
//!   `X-Linked-Etag` (sha256) and `X-Linked-Size`, `Range: bytes=N-`
//!   answered 206; LFS files redirect (302) to `/cdn/{sha256}` on a second
//!   listener at 127.0.0.2 when that address can be bound (another host:
//!   no token may follow).
//!
//! Errors carry `X-Error-Code` as the Hub's do (RepoNotFound,
//! RevisionNotFound, EntryNotFound). Every request is logged. Each
//! connection serves one request and closes, so dropping one mid-body is
//! exact.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One request the hub saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub host: String,
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
}

pub struct File {
    pub name: String,
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

impl File {
    pub fn sha256(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, &self.bytes).as_ref())
    }

    /// git's blob id: sha1 of `blob <len>\0` and the bytes.
    pub fn blob_id(&self) -> String {
        let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        c.update(format!("blob {}\0", self.bytes.len()).as_bytes());
        c.update(&self.bytes);
        hex(c.finish().as_ref())
    }

    /// What huggingface_hub names the blob: the sha256 of an LFS file, else the blob id.
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.blob_id()
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Repo {
    pub id: String,
    /// (branch or tag, commit)
    pub revisions: Vec<(String, String)>,
    pub files: Vec<File>,
}

impl Repo {
    /// `dir`'s files (safetensors as LFS), plus a README.md and a
    /// pytorch_model.bin a model download must skip.
    pub fn from_dir(id: &str, commit: &str, dir: &Path) -> Repo {
        let mut files: Vec<File> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| File {
                name: p.file_name().unwrap().to_str().unwrap().to_owned(),
                lfs: p.extension().is_some_and(|e| e == "safetensors"),
                bytes: std::fs::read(&p).unwrap(),
            })
            .collect();
        files.push(File { name: "README.md".into(), bytes: b"# tiny\n".to_vec(), lfs: false });
        files.push(File { name: "pytorch_model.bin".into(), bytes: vec![7; 1000], lfs: true });
        Repo { id: id.into(), revisions: vec![("main".into(), commit.into())], files }
    }
}

/// What the hub does besides answering.
#[derive(Default)]
pub struct Behaviour {
    /// Every request but /cdn/ must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// (file, byte): the first GET of `file` stops after `byte` bytes and the
    /// connection closes.
    pub drop_once: Option<(String, usize)>,
    /// This file is served with one byte changed.
    pub corrupt: Option<String>,
    /// The listing gives names only (as without `?blobs=true`).
    pub bare_listing: bool,
    /// Range headers are ignored: every answer is the whole file, 200.
    pub ignore_range: bool,
}

struct State {
    repos: Vec<Repo>,
    behaviour: Behaviour,
    log: Vec<Seen>,
    cdn: String,
}

pub struct FakeHub {
    pub url: String,
    /// Whether LFS files come from another host (127.0.0.2).
    pub cdn_elsewhere: bool,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start(repos: Vec<Repo>, behaviour: Behaviour) -> FakeHub {
        let main = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", main.local_addr().unwrap().port());
        let cdn = TcpListener::bind("127.0.0.2:0").ok();
        let cdn_url = cdn.as_ref().map_or(url.clone(), |l| format!("http://{}", l.local_addr().unwrap()));
        let state = Arc::new(Mutex::new(State { repos, behaviour, log: Vec::new(), cdn: cdn_url }));
        for listener in std::iter::once(main).chain(cdn.iter().map(|l| l.try_clone().unwrap())) {
            let state = state.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &state);
                    });
                }
            });
        }
        FakeHub { url, cdn_elsewhere: cdn.is_some(), state }
    }

    pub fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }

    pub fn file(&self, repo: &str, name: &str) -> (Vec<u8>, String) {
        let st = self.state.lock().unwrap();
        let r = st.repos.iter().find(|r| r.id == repo).unwrap();
        let f = r.files.iter().find(|f| f.name == name).unwrap();
        (f.bytes.clone(), f.etag())
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn error(s: &mut TcpStream, status: &str, code: &str) -> std::io::Result<()> {
    let headers = [("X-Error-Code".to_owned(), code.to_owned()), ("X-Error-Message".to_owned(), code.to_owned())];
    respond(s, status, &headers, code.as_bytes())
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let path = target.split('?').next().unwrap_or("").to_owned();
    let host = stream.local_addr()?.ip().to_string();
    let mut st = state.lock().unwrap();
    st.log.push(Seen { host, method: method.clone(), path: path.clone(), headers: headers.clone() });

    if let Some(sha) = path.strip_prefix("/cdn/") {
        let found = st.repos.iter().flat_map(|r| &r.files).find(|f| f.sha256() == sha);
        let Some(f) = found else { return error(&mut stream, "404 Not Found", "EntryNotFound") };
        let (name, bytes) = (f.name.clone(), f.bytes.clone());
        return send_file(&mut stream, &mut st, &method, &headers, &name, bytes, Vec::new());
    }
    if let Some(t) = &st.behaviour.token {
        if headers.get("authorization") != Some(&format!("Bearer {t}")) {
            return error(&mut stream, "401 Unauthorized", "RepoNotFound");
        }
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(r) => (true, r),
        None => (false, path.trim_start_matches('/')),
    };
    let segs: Vec<&str> = rest.splitn(5, '/').collect();
    let id = segs[..2.min(segs.len())].join("/");
    let Some(repo) = st.repos.iter().find(|r| r.id == id) else {
        return error(&mut stream, "404 Not Found", "RepoNotFound");
    };
    let rev = segs.get(3).copied().unwrap_or("");
    let Some((_, commit)) = repo.revisions.iter().find(|(b, c)| b == rev || c == rev) else {
        return error(&mut stream, "404 Not Found", "RevisionNotFound");
    };
    let commit = commit.clone();
    if api && segs.get(2) == Some(&"revision") {
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| match st.behaviour.bare_listing {
                true => serde_json::json!({"rfilename": f.name}),
                false if f.lfs => {
                    serde_json::json!({"rfilename": f.name, "size": f.bytes.len(), "blobId": "1".repeat(40),
                    "lfs": {"sha256": f.sha256(), "size": f.bytes.len(), "pointerSize": 134}})
                }
                false => serde_json::json!({"rfilename": f.name, "size": f.bytes.len(), "blobId": f.blob_id()}),
            })
            .collect();
        let body = serde_json::json!({"id": id, "sha": commit, "siblings": siblings}).to_string();
        return respond(&mut stream, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes());
    }
    if api || segs.get(2) != Some(&"resolve") {
        return error(&mut stream, "404 Not Found", "EntryNotFound");
    }
    let name = segs.get(4).copied().unwrap_or("");
    let Some(f) = repo.files.iter().find(|f| f.name == name) else {
        return error(&mut stream, "404 Not Found", "EntryNotFound");
    };
    let mut extra = vec![("X-Repo-Commit".to_owned(), commit)];
    if f.lfs {
        extra.push(("X-Linked-Etag".into(), format!("\"{}\"", f.sha256())));
        extra.push(("X-Linked-Size".into(), f.bytes.len().to_string()));
        extra.push(("ETag".into(), format!("\"{}\"", "1".repeat(40))));
        let location = format!("{}/cdn/{}", st.cdn, f.sha256());
        extra.push(("Location".into(), location));
        return respond(&mut stream, "302 Found", &extra, b"");
    }
    extra.push(("ETag".into(), format!("\"{}\"", f.blob_id())));
    let (name, bytes) = (f.name.clone(), f.bytes.clone());
    send_file(&mut stream, &mut st, &method, &headers, &name, bytes, extra)
}

/// The file's bytes (or the range asked for), as the behaviour has them.
fn send_file(
    s: &mut TcpStream,
    st: &mut State,
    method: &str,
    req: &HashMap<String, String>,
    name: &str,
    mut bytes: Vec<u8>,
    mut headers: Vec<(String, String)>,
) -> std::io::Result<()> {
    if st.behaviour.corrupt.as_deref() == Some(name) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let len = bytes.len();
    let start = req
        .get("range")
        .filter(|_| !st.behaviour.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let status = match start {
        Some(n) if n >= len => return respond(s, "416 Range Not Satisfiable", &headers, b""),
        Some(n) => {
            headers.push(("Content-Range".into(), format!("bytes {n}-{}/{len}", len - 1)));
            "206 Partial Content"
        }
        None => "200 OK",
    };
    let body = &bytes[start.unwrap_or(0)..];
    headers.push(("Content-Length".into(), body.len().to_string()));
    if method == "HEAD" {
        return respond(s, status, &headers, b"");
    }
    let cut = match &st.behaviour.drop_once {
        Some((file, at)) if file == name && method == "GET" => Some(at.saturating_sub(start.unwrap_or(0))),
        _ => None,
    };
    if let Some(cut) = cut {
        st.behaviour.drop_once = None;
        respond(s, status, &headers, &body[..cut.min(body.len())])?;
        return s.shutdown(std::net::Shutdown::Both);
    }
    respond(s, status, &headers, body)
}

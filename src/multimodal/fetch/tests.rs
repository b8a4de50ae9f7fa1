use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use super::*;

fn fetcher(settings: FetchSettings) -> MediaFetcher {
    MediaFetcher::new(settings).unwrap()
}

fn err(r: Result<Vec<u8>>) -> String {
    match r {
        Err(e @ Error::InvalidInput(_)) => e.to_string(),
        Err(e) => panic!("expected InvalidInput, got {e}"),
        Ok(b) => panic!("expected an error, got {} bytes", b.len()),
    }
}

/// The message of a fetch that failed on the remote side (`MediaFetch`).
fn fetch_err(r: Result<Vec<u8>>) -> String {
    match r {
        Err(e @ Error::MediaFetch(_)) => e.to_string(),
        Err(e) => panic!("expected MediaFetch, got {e}"),
        Ok(b) => panic!("expected an error, got {} bytes", b.len()),
    }
}

// ---- data: URLs ----

#[test]
fn data_urls_decode_with_or_without_padding() {
    let f = fetcher(FetchSettings::default());
    assert_eq!(f.fetch("data:image/png;base64,aGVsbG8=").unwrap(), b"hello");
    assert_eq!(f.fetch("data:application/octet-stream;base64,aGVsbG8").unwrap(), b"hello");
    assert_eq!(f.fetch("DATA:image/png;BASE64,aGk=").unwrap(), b"hi");
}

#[test]
fn data_urls_reject_bad_base64_and_other_encodings() {
    let f = fetcher(FetchSettings::default());
    let e = err(f.fetch("data:image/png;base64,aGVs!G8="));
    assert!(e.contains("invalid base64") && e.starts_with("data URL data:image/png"), "{e}");
    let e = err(f.fetch("data:text/plain,hello"));
    assert!(e.contains("only base64"), "{e}");
    let e = err(f.fetch("data:image/png;base64"));
    assert!(e.contains("expected data:<mime>;base64,<data>"), "{e}");
}

#[test]
fn data_urls_are_capped_before_decoding() {
    let f = fetcher(FetchSettings { max_bytes: 30, ..Default::default() });
    // 30 bytes encode to 40 characters: exactly at the cap.
    let ok = base64::engine::general_purpose::STANDARD.encode([7u8; 30]);
    assert_eq!(f.fetch(&format!("data:x/y;base64,{ok}")).unwrap(), vec![7u8; 30]);
    let long = "A".repeat(41);
    let e = err(f.fetch(&format!("data:x/y;base64,{long}")));
    assert!(e.contains("41 bytes of base64 is more than the 40 bytes allowed"), "{e}");
    // Messages never echo a whole data URL.
    let huge = "A".repeat(10_000);
    let e = err(f.fetch(&format!("data:x/y;base64,{huge}")));
    assert!(e.len() < 300, "{e}");
}

#[test]
fn unknown_schemes_and_relative_paths_are_refused() {
    let f = fetcher(FetchSettings::default());
    for url in ["ftp://example.com/cat.png", "cat.png", "gopher:x"] {
        let e = err(f.fetch(url));
        assert!(e.contains("unsupported"), "{url}: {e}");
    }
    assert_eq!(err(f.fetch(" ")), "the media URL is empty");
}

#[test]
fn timeout_parses_seconds() {
    assert_eq!(parse_timeout("5").unwrap(), Duration::from_secs(5));
    assert_eq!(parse_timeout(" 0.25 ").unwrap(), Duration::from_millis(250));
    for bad in ["0", "-1", "soon", "inf", ""] {
        assert!(parse_timeout(bad).unwrap_err().to_string().contains(TIMEOUT_ENV), "{bad}");
    }
}

// ---- local files ----

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kestrel-fetch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// root/{cat.png, sub/, link-in -> cat.png, link-out -> ../outside/secret}, outside/secret.
fn local_tree(name: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new(name);
    let root = tmp.0.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(tmp.0.join("outside")).unwrap();
    std::fs::write(root.join("cat.png"), b"meow").unwrap();
    std::fs::write(tmp.0.join("outside/secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(root.join("cat.png"), root.join("link-in")).unwrap();
    std::os::unix::fs::symlink(tmp.0.join("outside/secret"), root.join("link-out")).unwrap();
    (tmp, root)
}

#[test]
fn local_files_under_the_root_are_read() {
    let (_tmp, root) = local_tree("ok");
    let f = fetcher(FetchSettings { allowed_local_media_path: Some(root.clone()), ..Default::default() });
    let p = root.join("cat.png").display().to_string();
    assert_eq!(f.fetch(&p).unwrap(), b"meow");
    assert_eq!(f.fetch(&format!("file://{p}")).unwrap(), b"meow");
    assert_eq!(f.fetch(&format!("file://localhost{p}")).unwrap(), b"meow");
    assert_eq!(f.fetch(&format!("file://{}", p.replace("cat", "%63at"))).unwrap(), b"meow");
    assert_eq!(f.fetch(&root.join("sub/../link-in").display().to_string()).unwrap(), b"meow");
}

#[test]
fn local_files_cannot_leave_the_root() {
    let (_tmp, root) = local_tree("escape");
    let f = fetcher(FetchSettings { allowed_local_media_path: Some(root.clone()), ..Default::default() });
    let via_dots = root.join("../outside/secret").display().to_string();
    let e = err(f.fetch(&via_dots));
    assert!(e.contains("outside the allowed local media directory"), "{e}");
    // Outside on its face: refused the same way whether or not the file exists.
    let exists = err(f.fetch("/etc/passwd"));
    let missing = err(f.fetch("/etc/kestrel-missing"));
    assert_eq!(exists.replace("/etc/passwd", "P"), missing.replace("/etc/kestrel-missing", "P"));
    assert!(exists.contains("outside"), "{exists}");
    let e = err(f.fetch(&root.join("link-out").display().to_string()));
    assert!(e.contains("outside the allowed local media directory"), "{e}");
    let e = err(f.fetch(&format!("file://{}", root.join("link-out").display())));
    assert!(e.contains("outside"), "{e}");
}

#[test]
fn local_directories_missing_files_and_big_files_are_refused() {
    let (_tmp, root) = local_tree("kinds");
    let f = fetcher(FetchSettings { allowed_local_media_path: Some(root.clone()), max_bytes: 3, ..Default::default() });
    let e = err(f.fetch(&root.join("sub").display().to_string()));
    assert!(e.contains("not a regular file"), "{e}");
    let e = err(f.fetch(&root.join("dog.png").display().to_string()));
    assert!(e.contains("no such file"), "{e}");
    let e = err(f.fetch(&root.join("cat.png").display().to_string()));
    assert!(e.contains("larger than the 3 bytes allowed"), "{e}");
    let e = err(f.fetch("file://example.com/etc/passwd"));
    assert!(e.contains("no host other than localhost"), "{e}");
}

#[test]
fn local_files_need_the_flag() {
    let (_tmp, root) = local_tree("off");
    let f = fetcher(FetchSettings::default());
    for url in [root.join("cat.png").display().to_string(), format!("file://{}", root.join("cat.png").display())] {
        let e = err(f.fetch(&url));
        assert!(e.contains("local media paths are not allowed") && e.contains("--allowed-local-media-path"), "{e}");
    }
    let e =
        MediaFetcher::new(FetchSettings { allowed_local_media_path: Some(root.join("cat.png")), ..Default::default() })
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("not a directory"), "{e}");
}

// ---- http ----

/// What the test server does with one connection, given the request path.
type Handler = dyn Fn(&str, &mut TcpStream) + Send + Sync;

/// A server on 127.0.0.1 that accepts up to `conns` connections, each
/// handled on its own thread, then stops; its base URL (no trailing slash).
fn serve(conns: usize, handler: Box<Handler>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handler: std::sync::Arc<Handler> = handler.into();
    thread::spawn(move || {
        for stream in listener.incoming().take(conns) {
            let Ok(mut stream) = stream else { continue };
            let handler = handler.clone();
            thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                // Skip the headers.
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
                        break;
                    }
                }
                handler(&path, &mut stream);
            });
        }
    });
    format!("http://{addr}")
}

fn reply(stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n", body.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

#[test]
fn http_200_returns_the_body() {
    let base = serve(1, Box::new(|path, s| reply(s, "200 OK", "", format!("got {path}").as_bytes())));
    let f = fetcher(FetchSettings::default());
    assert_eq!(f.fetch(&format!("{base}/img/cat.png?x=1")).unwrap(), b"got /img/cat.png?x=1");
}

#[test]
fn http_404_is_an_error() {
    let base = serve(1, Box::new(|_, s| reply(s, "404 Not Found", "", b"nope")));
    let e = fetch_err(fetcher(FetchSettings::default()).fetch(&format!("{base}/cat.png")));
    assert!(e.contains("HTTP 404 Not Found") && e.contains("/cat.png"), "{e}");
}

#[test]
fn http_bodies_over_the_cap_are_refused() {
    // With a Content-Length that says so, and streamed without one.
    let base = serve(
        2,
        Box::new(|path, s| {
            if path == "/sized" {
                reply(s, "200 OK", "", &[1u8; 5000]);
            } else {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                for _ in 0..50 {
                    let _ = s.write_all(&[2u8; 100]);
                }
            }
        }),
    );
    let f = fetcher(FetchSettings { max_bytes: 1000, ..Default::default() });
    for path in ["/sized", "/streamed"] {
        let e = err(f.fetch(&format!("{base}{path}")));
        assert!(e.contains("larger than the 1000 bytes allowed"), "{path}: {e}");
    }
}

#[test]
fn slow_servers_time_out() {
    let base = serve(
        2,
        Box::new(|path, s| {
            if path == "/late" {
                thread::sleep(Duration::from_millis(1500));
                reply(s, "200 OK", "", b"too late");
            } else {
                // Headers at once, then the body a byte at a time.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n");
                for _ in 0..100 {
                    if s.write_all(b"x").is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }),
    );
    let f = fetcher(FetchSettings { timeout: Duration::from_millis(300), ..Default::default() });
    for path in ["/late", "/drip"] {
        let start = Instant::now();
        let e = fetch_err(f.fetch(&format!("{base}{path}")));
        assert!(e.contains("timed out after 0.3 s"), "{path}: {e}");
        assert!(start.elapsed() < Duration::from_millis(1200), "{path}: took {:?}", start.elapsed());
    }
}

#[test]
fn redirects_are_followed_up_to_three() {
    // /n/<k> redirects to /n/<k-1> (alternating absolute and relative
    // Locations) until /n/0, which answers.
    let handler = |path: &str, s: &mut TcpStream| {
        let k: usize = path.rsplit('/').next().unwrap().parse().unwrap();
        if k == 0 {
            reply(s, "200 OK", "", b"landed");
        } else {
            let loc = if k.is_multiple_of(2) { format!("/n/{}", k - 1) } else { format!("{}", k - 1) };
            reply(s, "302 Found", &format!("Location: {loc}\r\n"), b"");
        }
    };
    let base = serve(4, Box::new(handler));
    let f = fetcher(FetchSettings::default());
    assert_eq!(f.fetch(&format!("{base}/n/3")).unwrap(), b"landed");
    let base = serve(4, Box::new(handler));
    let e = fetch_err(f.fetch(&format!("{base}/n/4")));
    assert!(e.contains("more than 3 redirects"), "{e}");
}

#[test]
fn allowed_domains_apply_to_every_hop() {
    let base = serve(
        2,
        Box::new(|path, s| {
            if path == "/away" {
                let port = s.local_addr().unwrap().port();
                reply(s, "301 Moved Permanently", &format!("Location: http://localhost:{port}/x\r\n"), b"");
            } else {
                reply(s, "200 OK", "", b"ok");
            }
        }),
    );
    let f = fetcher(FetchSettings { allowed_domains: Some(vec!["127.0.0.1".into()]), ..Default::default() });
    assert_eq!(f.fetch(&format!("{base}/here")).unwrap(), b"ok");
    let e = err(f.fetch(&format!("{base}/away")));
    assert!(e.contains("host \"localhost\" is not among the allowed media domains"), "{e}");
    let e =
        err(fetcher(FetchSettings { allowed_domains: Some(vec![]), ..Default::default() })
            .fetch(&format!("{base}/here")));
    assert!(e.contains("not among the allowed"), "{e}");
}

#[test]
fn refused_connections_say_so() {
    // Bind then drop a listener: its port is (almost surely) closed now.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = fetch_err(fetcher(FetchSettings::default()).fetch(&format!("http://127.0.0.1:{port}/x")));
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn location_joining() {
    let base = Uri::try_from("http://h:1/a/b/c.png?q").unwrap();
    assert_eq!(join_location(&base, "https://x/y"), "https://x/y");
    assert_eq!(join_location(&base, "//x/y"), "http://x/y");
    assert_eq!(join_location(&base, "/y"), "http://h:1/y");
    assert_eq!(join_location(&base, "d.png"), "http://h:1/a/b/d.png");
    assert_eq!(bytes(32 << 20), "32 MiB");
    assert_eq!(bytes(1536), "1.5 KiB");
}

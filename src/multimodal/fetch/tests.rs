use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use super::*;

fn fetcher(settings: FetchSettings) -> MediaFetcher {
    MediaFetcher::new(settings).unwrap()
}

/// Settings for the tests' servers on 127.0.0.1: loopback is refused unless allowed.
fn loopback_ok() -> FetchSettings {
    FetchSettings { allow_private_addresses: true, ..Default::default() }
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
fn videos_have_their_own_byte_cap() {
    let f = fetcher(FetchSettings { max_bytes: 30, video_max_bytes: 60, ..Default::default() });
    let url = format!("data:video/mp4;base64,{}", base64::engine::general_purpose::STANDARD.encode([7u8; 45]));
    assert!(err(f.fetch(&url)).contains("more than the 40 bytes allowed"));
    assert_eq!(f.fetch_video(&url).unwrap().len(), 45);
    let big = format!("data:video/mp4;base64,{}", base64::engine::general_purpose::STANDARD.encode([7u8; 61]));
    assert!(err(f.fetch_video(&big)).contains("may be at most 60 bytes"));
    let d = FetchSettings::default();
    assert_eq!((d.video_timeout, d.video_max_bytes), (DEFAULT_VIDEO_TIMEOUT, 128 << 20));
}

#[test]
fn base64_length_is_checked_before_decoding() {
    // 100 KB of characters that are not base64 at all: refused for their
    // length, which is only possible if the length is checked first.
    let f = fetcher(FetchSettings { max_bytes: 1 << 10, ..Default::default() });
    let e = err(f.fetch(&format!("data:image/png;base64,{}", "!".repeat(100_000))));
    assert!(e.contains("is more than the 1.34 KiB allowed") && !e.contains("invalid base64"), "{e}");
}

#[test]
fn data_url_media_types_must_be_well_formed() {
    let f = fetcher(FetchSettings::default());
    for ok in ["image/png", "image/jpg", "application/octet-stream", "", "image/png;name=cat.png"] {
        assert_eq!(f.fetch(&format!("data:{ok};base64,aGk=")).unwrap(), b"hi", "{ok:?}");
    }
    for bad in ["image", "image/", "/png", "image/png ", "<svg>/x", "image/png;charset", "text/html;x=\"a b\""] {
        let e = err(f.fetch(&format!("data:{bad};base64,aGk=")));
        assert!(e.contains("is not a media type"), "{bad:?}: {e}");
    }
    let e = err(f.fetch(&format!("data:image/{};base64,aGk=", "x".repeat(300))));
    assert!(e.contains("is not a media type") && e.len() < 400, "{e}");
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
        assert!(parse_timeout(bad).is_none(), "{bad}");
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

#[test]
fn percent_encoded_dots_cannot_leave_the_root() {
    let (tmp, root) = local_tree("pct");
    let f = fetcher(FetchSettings { allowed_local_media_path: Some(root.clone()), ..Default::default() });
    for dots in ["%2e%2e", "%2E%2E", ".%2e", "%2e."] {
        let url = format!("file://{}/{dots}/outside/secret", root.display());
        let e = err(f.fetch(&url));
        assert!(e.contains("outside the allowed local media directory"), "{url}: {e}");
    }
    // The same file, reached without leaving the root, is fine.
    std::fs::write(root.join("sub/x.png"), b"x").unwrap();
    assert_eq!(f.fetch(&format!("file://{}/sub/%2e%2e/sub/x.png", root.display())).unwrap(), b"x");
    drop(tmp);
}

#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let (_tmp, root) = local_tree("fifo");
    let fifo = root.join("pipe.png");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let f = fetcher(FetchSettings { allowed_local_media_path: Some(root.clone()), ..Default::default() });
    // Opening a FIFO for reading would block until a writer came.
    let start = Instant::now();
    let e = err(f.fetch(&fifo.display().to_string()));
    assert!(e.contains("not a regular file"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // A device under the root: /dev/zero never ends.
    let dev = fetcher(FetchSettings { allowed_local_media_path: Some("/dev".into()), ..Default::default() });
    let e = err(dev.fetch("/dev/zero"));
    assert!(e.contains("not a regular file"), "{e}");
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
    let f = fetcher(loopback_ok());
    assert_eq!(f.fetch(&format!("{base}/img/cat.png?x=1")).unwrap(), b"got /img/cat.png?x=1");
}

#[test]
fn http_404_is_an_error() {
    let base = serve(1, Box::new(|_, s| reply(s, "404 Not Found", "", b"nope")));
    let e = fetch_err(fetcher(loopback_ok()).fetch(&format!("{base}/cat.png")));
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
    let f = fetcher(FetchSettings { max_bytes: 1000, ..loopback_ok() });
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
    let f = fetcher(FetchSettings { timeout: Duration::from_millis(300), ..loopback_ok() });
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
    let f = fetcher(loopback_ok());
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
    let f = fetcher(FetchSettings { allowed_domains: Some(vec!["127.0.0.1".into()]), ..loopback_ok() });
    assert_eq!(f.fetch(&format!("{base}/here")).unwrap(), b"ok");
    let e = err(f.fetch(&format!("{base}/away")));
    assert!(e.contains("host \"localhost\" is not among the allowed media domains"), "{e}");
    let e =
        err(fetcher(FetchSettings { allowed_domains: Some(vec![]), ..loopback_ok() }).fetch(&format!("{base}/here")));
    assert!(e.contains("not among the allowed"), "{e}");
}

#[test]
fn refused_connections_say_so() {
    // Bind then drop a listener: its port is (almost surely) closed now.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = fetch_err(fetcher(loopback_ok()).fetch(&format!("http://127.0.0.1:{port}/x")));
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

// ---- addresses ----

/// A listener on 127.0.0.1 that never accepts; `connected` says whether
/// anything connected to it (the kernel completes handshakes into the backlog).
struct Silent(TcpListener);

impl Silent {
    fn new() -> Self {
        Silent(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    fn connected(&self) -> bool {
        self.0.set_nonblocking(true).unwrap();
        self.0.accept().is_ok()
    }
}

#[test]
fn loopback_is_refused_by_default_without_connecting() {
    let l = Silent::new();
    let port = l.port();
    let f = fetcher(FetchSettings::default());
    for host in ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"] {
        let e = err(f.fetch(&format!("http://{host}:{port}/cat.png")));
        assert!(e.contains("refused:") && e.contains(policy::ALLOW_FLAG), "{host}: {e}");
    }
    // Spellings only name resolution turns into 127.0.0.1: judged on the
    // resolved address, the one a connection would be made to.
    for host in ["2130706433", "127.1", "0x7f000001"] {
        let e = err(f.fetch(&format!("http://{host}:{port}/cat.png")));
        assert!(e.contains(&format!("host \"{host}\" resolves to no address")), "{host}: {e}");
        assert!(e.contains("127.0.0.1 is a loopback address") && e.contains(policy::ALLOW_FLAG), "{host}: {e}");
    }
    assert!(!l.connected(), "a refused fetch connected");
}

#[test]
fn private_and_metadata_literals_are_refused_before_connecting() {
    let f = fetcher(FetchSettings { timeout: Duration::from_millis(200), ..Default::default() });
    for (url, why) in [
        ("http://10.1.2.3/x.png", "private-network"),
        ("http://192.168.0.1:8080/x.png", "private-network"),
        ("https://172.20.0.1/x.png", "private-network"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fd12::1]/", "private-network"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://224.0.0.1/", "multicast"),
        ("http://255.255.255.255/", "broadcast"),
        ("http://169.254.169.254/latest/meta-data/", "instance-metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "instance-metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "instance-metadata"),
    ] {
        // Refused at once, not after a connection attempt timed out (422).
        let e = err(f.fetch(url));
        assert!(e.contains("refused:") && e.contains(why), "{url}: {e}");
    }
    // Metadata stays refused with private addresses allowed, also when only
    // resolution reveals it (2852039166 is 169.254.169.254).
    let f = fetcher(FetchSettings { timeout: Duration::from_millis(200), ..loopback_ok() });
    for url in ["http://169.254.169.254/", "http://2852039166/", "http://metadata/"] {
        let e = err(f.fetch(url));
        assert!(e.contains("instance-metadata") && !e.contains(policy::ALLOW_FLAG), "{url}: {e}");
    }
}

#[test]
fn the_allow_setting_reaches_loopback() {
    let base = serve(1, Box::new(|_, s| reply(s, "200 OK", "", b"local")));
    let port = base.rsplit(':').next().unwrap();
    let e = err(fetcher(FetchSettings::default()).fetch(&format!("http://localhost:{port}/x")));
    assert!(e.contains("loopback"), "{e}");
    assert_eq!(fetcher(loopback_ok()).fetch(&format!("{base}/x")).unwrap(), b"local");
}

#[test]
fn every_redirect_hop_is_checked() {
    let base = serve(
        4,
        Box::new(|path, s| {
            let loc = match path {
                "/aws" => "http://169.254.169.254/latest/meta-data/iam/".to_string(),
                "/gce" => "http://metadata.google.internal/computeMetadata/v1/".to_string(),
                "/decimal" => "http://2852039166/latest/".to_string(),
                _ => "file:///etc/passwd".to_string(),
            };
            reply(s, "302 Found", &format!("Location: {loc}\r\n"), b"");
        }),
    );
    let f = fetcher(FetchSettings { timeout: Duration::from_secs(2), ..loopback_ok() });
    for path in ["/aws", "/gce", "/decimal"] {
        let e = err(f.fetch(&format!("{base}{path}")));
        assert!(e.contains("refused:") && e.contains("instance-metadata"), "{path}: {e}");
    }
    let e = err(f.fetch(&format!("{base}/file")));
    assert!(e.contains("redirects to file:///etc/passwd, which is not http(s)"), "{e}");
}

#[test]
fn the_deadline_covers_the_whole_fetch() {
    // Each hop answers within the timeout; the redirects together do not.
    let base = serve(
        4,
        Box::new(|path, s| {
            thread::sleep(Duration::from_millis(200));
            let k: usize = path.trim_start_matches('/').parse().unwrap();
            if k == 0 {
                reply(s, "200 OK", "", b"late");
            } else {
                reply(s, "302 Found", &format!("Location: /{}\r\n", k - 1), b"");
            }
        }),
    );
    let f = fetcher(FetchSettings { timeout: Duration::from_millis(500), ..loopback_ok() });
    let start = Instant::now();
    let e = fetch_err(f.fetch(&format!("{base}/3")));
    assert!(e.contains("timed out after 0.5 s"), "{e}");
    assert!(start.elapsed() < Duration::from_millis(750), "took {:?}", start.elapsed());
}

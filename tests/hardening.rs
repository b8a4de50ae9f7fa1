//! `kestrel serve` against slow, oversized, vanishing and faulty clients,
//! overload, engine faults and signals: the real debug binary on the CPU
//! backend and the built-in tiny model, spoken to over raw sockets where the
//! test needs control of the connection (and ureq elsewhere). Engine faults
//! come from `KESTREL_FAULT` (src/engine/fault.rs; debug builds only).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running server; killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        Server::start_env(args, &[])
    }

    fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let workers: &[&str] = if args.contains(&"--workers") { &[] } else { &["--workers", "4"] };
        let (child, port, _) = common::spawn_serve(&[workers, args].concat(), env);
        Server { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn agent() -> ureq::Agent {
        common::http::agent()
    }

    /// POSTs raw text; (status, body).
    fn post_text(&self, path: &str, body: &str) -> (u16, String) {
        let rq = Self::agent().post(self.url(path)).header("Content-Type", "application/json");
        let mut resp = rq.send(body).expect("a response");
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_text(path, &body.to_string());
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut resp = Self::agent().get(self.url(path)).call().expect("a response");
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Sends a POST of `body` on a new connection and reads the answer's head.
    fn raw_post(&self, path: &str, body: &Value) -> (TcpStream, String) {
        let body = body.to_string();
        let mut s = self.connect();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let head = read_head(&mut s);
        (s, head)
    }

    /// A figure from /metrics (the first line starting with `prefix`).
    fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics");
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Waits until `metric` reads `want`, for at most `within`.
    fn wait_metric(&self, metric: &str, want: f64, within: Duration) {
        let end = Instant::now() + within;
        while self.metric(metric) != Some(want) {
            assert!(Instant::now() < end, "{metric} stayed at {:?}, not {want}", self.metric(metric));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    /// The exit status, if the process ends within `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads up to the blank line that ends an HTTP head ("" at end of stream).
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut b), Ok(1)) {
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Everything the peer sends until it closes (or the read timeout).
fn read_rest(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn chat_body(content: Value, extra: Value) -> Value {
    let mut body = json!({"model": "kestrel-tiny-qwen2-vl", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn error_message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

/// A request that generates for a long time (tens of seconds on the CPU).
fn long_chat(text: &str, stream: bool) -> Value {
    chat_body(json!(text), json!({"max_tokens": 4000, "ignore_eos": true, "stream": stream}))
}

fn short_chat() -> Value {
    chat_body(json!("hi"), json!({"max_tokens": 1}))
}

#[test]
fn slow_heads_time_out_without_starving_the_workers() {
    let s = Server::start(&["--workers", "2", "--http-header-timeout", "1"]);
    // 64 clients that start a request head and never finish it (slowloris),
    // and 16 that connect and say nothing.
    let mut slow: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut c = s.connect();
            c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: a").unwrap();
            c
        })
        .collect();
    let mut idle: Vec<TcpStream> = (0..16).map(|_| s.connect()).collect();

    // A normal request is answered at once meanwhile: the slow clients hold
    // only their connections' threads, never the two workers.
    let t = Instant::now();
    let (status, v) = s.post("/v1/chat/completions", &short_chat());
    let took = t.elapsed();
    assert_eq!(status, 200, "{v}");
    eprintln!("hardening: a request with 80 slow connections open took {took:?}");
    assert!(took < Duration::from_millis(900), "{took:?}: the request waited for the slow clients");

    // By the deadline: 408 for a partial head, a quiet close for silence.
    let t = Instant::now();
    for c in &mut slow {
        let answer = read_rest(c);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    for c in &mut idle {
        assert_eq!(read_rest(c), "");
    }
    // Without the deadline these reads would wait out the test's 60 s read
    // timeout; the bound is loose for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // A trickle of header lines does not extend the deadline: it runs from
    // the connection's start, not from the last byte.
    let mut c = s.connect();
    let t = Instant::now();
    c.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    while t.elapsed() < Duration::from_millis(800) {
        std::thread::sleep(Duration::from_millis(100));
        c.write_all(b"X-A: b\r\n").unwrap();
    }
    let answer = read_head(&mut c);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    // Had each line restarted the clock, the 408 would come 1 s after the last.
    assert!(t.elapsed() < Duration::from_millis(1800), "{:?}", t.elapsed());
}

#[test]
fn oversized_heads_are_431() {
    let s = Server::start(&[]);
    let mut c = s.connect();
    let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70 << 10));
    let _ = c.write_all(big.as_bytes());
    let answer = read_head(&mut c);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // A head just under the cap is fine.
    let mut c = s.connect();
    let ok = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(60 << 10));
    c.write_all(ok.as_bytes()).unwrap();
    assert!(read_head(&mut c).starts_with("HTTP/1.1 200"));
}

#[test]
fn a_slow_body_is_408_and_frees_its_worker() {
    let s = Server::start(&["--workers", "1", "--http-body-timeout", "1"]);
    let mut c = s.connect();
    c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"mess").unwrap();
    let t = Instant::now();
    let head = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(10), "{took:?}");
    let (status, v) = s.post("/v1/chat/completions", &short_chat());
    assert_eq!(status, 200, "{v}");
}

#[test]
fn connections_past_the_cap_are_503() {
    let s = Server::start(&["--max-connections", "3", "--http-header-timeout", "60"]);
    let held: Vec<TcpStream> = (0..3).map(|_| s.connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = s.connect();
    let answer = read_rest(&mut extra);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("Retry-After: 1"), "{answer:?}");
    // A closed connection gives its place back.
    drop(held);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = s.connect();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let head = read_head(&mut c);
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(head.starts_with("HTTP/1.1 503") && Instant::now() < end, "{head:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_non_streaming_client_that_leaves_is_aborted_and_its_blocks_freed() {
    let s = Server::start(&[]);
    let body = long_chat("go on", false).to_string();
    let mut c = s.connect();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    s.wait_metric("kestrel:num_requests_running{", 1.0, Duration::from_secs(30));
    let used = s.metric("kestrel:kv_cache_used_blocks{").unwrap();
    assert!(used > 0.0, "a running request holds blocks");

    let t = Instant::now();
    drop(c);
    s.wait_metric("kestrel:num_requests_running{", 0.0, Duration::from_secs(10));
    s.wait_metric("kestrel:kv_cache_used_blocks{", 0.0, Duration::from_secs(10));
    eprintln!("hardening: a non-streaming request was aborted {:?} after its client left", t.elapsed());
    // Counted only when noticed before the request's end: it was cut short.
    assert_eq!(s.metric("kestrel:client_disconnects_total{"), Some(1.0));
    assert_eq!(s.metric("kestrel:generation_tokens_total{"), Some(0.0), "the request never finished");
    let (status, v) = s.post("/v1/chat/completions", &short_chat());
    assert_eq!(status, 200, "{v}");
}

#[test]
fn health_is_503_while_the_engine_hangs() {
    if !faults_compiled("health_is_503_while_the_engine_hangs") {
        return;
    }
    let s = Server::start_env(&["--engine-iteration-timeout", "1"], &[("KESTREL_FAULT", "engine-hang:HANG-HERE")]);
    assert_eq!(s.get("/health").0, 200);
    // An ordinary request's steps stay far under the timeout.
    let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({"max_tokens": 20})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(s.get("/health").0, 200);

    let hung = chat_body(json!("HANG-HERE"), json!({"max_tokens": 1}));
    let (_c, _) = {
        // The answer never comes: send, and do not wait.
        let body = hung.to_string();
        let mut c = s.connect();
        let req =
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        c.write_all(req.as_bytes()).unwrap();
        (c, ())
    };
    let t = Instant::now();
    let body = loop {
        let (status, body) = s.get("/health");
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200);
        assert!(t.elapsed() < Duration::from_secs(10), "/health never noticed the hung engine");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(t.elapsed() >= Duration::from_millis(700), "503 before the timeout: {:?}", t.elapsed());
    assert!(body.contains("engine_unresponsive") && body.contains("--engine-iteration-timeout"), "{body}");
}

#[test]
fn a_panic_fails_only_its_own_request() {
    if !faults_compiled("a_panic_fails_only_its_own_request") {
        return;
    }
    let s = Server::start_env(&[], &[("KESTREL_FAULT", "engine-panic:PANIC-ENGINE,worker-panic:PANIC-WORKER")]);
    // A stream in flight through both panics.
    let (mut stream, head) = s.raw_post("/v1/chat/completions", &long_chat("go on", true));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = [0u8; 256];
    assert!(stream.read(&mut buf).unwrap() > 0);

    for marker in ["PANIC-ENGINE", "PANIC-WORKER"] {
        let (status, v) = s.post("/v1/chat/completions", &chat_body(json!(marker), json!({"max_tokens": 2})));
        assert_eq!(status, 500, "{marker}: {v}");
        assert!(error_message(&v).contains("internal error"), "{marker}: {v}");
    }
    // The stream still flows, others are served, and the server is healthy.
    let mut more = 0;
    for _ in 0..20 {
        more += stream.read(&mut buf).unwrap();
    }
    assert!(more > 0);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({"max_tokens": 3})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(s.get("/health").0, 200);
}

/// Sends `sig` while a stream of `max_tokens` runs; returns the stream's
/// text to the end, how long the server took to exit, and its status.
fn signal_during_stream(sig: &str, grace: &str, max_tokens: u32) -> (String, Duration, ExitStatus) {
    let mut s = Server::start(&["--shutdown-timeout", grace]);
    let body = chat_body(json!("go on"), json!({"max_tokens": max_tokens, "ignore_eos": true, "stream": true}));
    let (mut stream, head) = s.raw_post("/v1/chat/completions", &body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut first = [0u8; 64];
    assert!(stream.read(&mut first).unwrap() > 0);

    // The stream is still generating when the signal comes.
    s.wait_metric("kestrel:num_requests_running{", 1.0, Duration::from_secs(10));
    let t = Instant::now();
    s.signal(sig);
    // New connections are refused (the listener is closed) or, for one
    // accepted just before, answered 503.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(("127.0.0.1", s.port)) {
            Err(_) => break,
            Ok(mut c) => {
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
                let head = read_head(&mut c);
                if head.starts_with("HTTP/1.1 503") || head.is_empty() {
                    break;
                }
                assert!(Instant::now() < end, "still accepting after {sig}: {head}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let rest = read_rest(&mut stream);
    let status = s.wait_exit(Duration::from_secs(60)).expect("the server exits");
    (rest, t.elapsed(), status)
}

#[test]
fn sigterm_lets_a_stream_finish_and_exits_0() {
    let (rest, took, status) = signal_during_stream("-TERM", "60", 600);
    eprintln!("hardening: SIGTERM to exit, a 600-token stream draining: {took:?}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "the stream was cut: {rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(!rest.contains("shutting down"), "{rest}");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[test]
fn sigint_past_the_grace_period_stops_the_stream_and_exits_0() {
    let (rest, took, status) = signal_during_stream("-INT", "1", 4000);
    assert!(rest.contains("shutting down"), "the stream should end with the shutdown error: {rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn bad_requests_are_refused_before_any_work() {
    // A listener that records whether anyone fetched from it.
    let media = TcpListener::bind("127.0.0.1:0").unwrap();
    media.set_nonblocking(true).unwrap();
    let url = format!("http://127.0.0.1:{}/cat.png", media.local_addr().unwrap().port());
    let s = Server::start(&["--limit-mm-per-prompt", "image=1", "--max-model-len", "48"]);
    let bad = |body: &Value, status: u16, expect: &str| {
        let (got, v) = s.post("/v1/chat/completions", body);
        assert_eq!(got, status, "{v}");
        assert!(error_message(&v).contains(expect), "{:?} should say {expect:?}", error_message(&v));
    };
    let image = |u: &str| json!({"type": "image_url", "image_url": {"url": u}});

    bad(&chat_body(json!([image(&url), image(&url)]), json!({})), 400, "At most 1 image(s)");
    assert!(media.accept().is_err(), "the images were fetched before the count was checked");

    bad(&chat_body(json!("hi"), json!({"max_tokens": 0})), 400, "max_tokens must be at least 1");
    bad(&chat_body(json!("hi"), json!({"max_tokens": -1})), 400, "max_tokens");
    bad(&chat_body(json!("hi"), json!({"n": 17})), 400, "n must be between 1 and 16");
    for token in ["<|image_pad|>", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"] {
        bad(&chat_body(json!(format!("look: {token}")), json!({})), 400, token);
        let parts = json!([{"type": "text", "text": format!("x{token}y")}]);
        bad(&chat_body(parts, json!({})), 400, token);
        let (status, v) = s.post("/v1/completions", &json!({"prompt": format!("a {token} b"), "max_tokens": 1}));
        assert_eq!(status, 400, "{v}");
        assert!(error_message(&v).contains("media token"), "{v}");
    }
    // Prompt plus image tokens over --max-model-len: both numbers named.
    let png = {
        let img = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
        use base64::Engine as _;
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
    };
    let (status, v) =
        s.post("/v1/chat/completions", &chat_body(json!([image(&png), {"type": "text", "text": "hi"}]), json!({})));
    assert_eq!(status, 400, "{v}");
    let msg = error_message(&v);
    let prompt_tokens: String =
        msg.split("your request has ").nth(1).unwrap_or("").chars().take_while(char::is_ascii_digit).collect();
    assert!(msg.contains("48 tokens") && prompt_tokens.parse::<usize>().is_ok_and(|n| n > 48), "{msg}");

    let (status, text) = s.post_text("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\",}]}");
    assert_eq!(status, 400);
    assert!(text.contains("trailing comma at line 1 column 31"), "{text}");
    let mut unknown = short_chat();
    unknown["model"] = json!("no-such-model");
    bad(&unknown, 404, "The model `no-such-model` does not exist.");
    // None of the above reached the engine.
    assert_eq!(s.metric("kestrel:prompt_tokens_total{"), Some(0.0));
}

/// Fault injection (`KESTREL_FAULT`) exists only in debug builds of the
/// binary, which the test binary shares its profile with: under `cargo test
/// --release` the tests that need it say they are skipped and return.
fn faults_compiled(test: &str) -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("{test}: skipped (release build: KESTREL_FAULT is compiled out of the server)");
    }
    cfg!(debug_assertions)
}

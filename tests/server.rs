//! `kestrel serve` end to end: the real binary on the CPU backend and the
//! built-in tiny model, on a free port of 127.0.0.1, spoken to over HTTP
//! (ureq, or a raw socket where the test needs control of the connection).
//! Each test starts its own server (about 0.1 s) and kills it when done.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use base64::Engine as _;
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
        let (child, port, line) = common::spawn_serve(&[workers, args].concat(), env);
        // kestrel: serving NAME on http://127.0.0.1:PORT (device cpu)
        assert!(line.starts_with("kestrel: serving kestrel-tiny-qwen2-vl on http://127.0.0.1:"), "{line}");
        assert!(line.ends_with("(device cpu)"), "{line}");
        Server { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn agent() -> ureq::Agent {
        common::http::agent()
    }

    /// POSTs `body` (raw text) with extra headers; (status, body text, headers).
    fn post_text(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String, Vec<(String, String)>) {
        let mut rq = Self::agent().post(self.url(path)).header("Content-Type", "application/json");
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        let mut resp = rq.send(body).expect("a response");
        let status = resp.status().as_u16();
        let hs = resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
        (status, resp.body_mut().read_to_string().unwrap(), hs)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text, _) = self.post_text(path, &body.to_string(), &[]);
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut resp = Self::agent().get(self.url(path)).call().expect("a response");
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
    }

    /// A streamed request's `data:` payloads, `[DONE]` included.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let resp = Self::agent().post(self.url(path)).send(body.to_string()).expect("a response");
        assert_eq!(resp.status().as_u16(), 200);
        let ct = resp.headers().get("content-type").unwrap().to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let reader = BufReader::new(resp.into_body().into_reader());
        let lines: Vec<String> = reader.lines().map(Result::unwrap).collect();
        // Events are `data: ...` lines, each followed by a blank line.
        for pair in lines.chunks(2) {
            assert!(pair[0].starts_with("data: ") && pair.get(1).is_none_or(|l| l.is_empty()), "{pair:?}");
        }
        lines.iter().filter_map(|l| l.strip_prefix("data: ").map(str::to_owned)).collect()
    }

    /// Sends raw bytes on a new connection and reads the answer's head.
    fn raw(&self, request: &[u8]) -> (TcpStream, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(request).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap() == 1 {
            head.push(b[0]);
        }
        (s, String::from_utf8_lossy(&head).into_owned())
    }

    /// A figure from /metrics (the first line starting with `prefix`).
    fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics");
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

impl Server {
    /// `start`, with the server's stderr lines captured.
    fn start_logged(args: &[&str]) -> (Server, std::sync::mpsc::Receiver<String>) {
        let (child, port, _, rx) = common::spawn_serve_capturing(&[&["--workers", "4"], args].concat(), &[]);
        (Server { child, port }, rx)
    }
}

/// The request-log lines received within `wait` (stops early at `want`).
fn request_lines(rx: &std::sync::mpsc::Receiver<String>, want: usize, wait: Duration) -> Vec<String> {
    let end = Instant::now() + wait;
    let mut lines = Vec::new();
    while lines.len() < want {
        let Some(left) = end.checked_duration_since(Instant::now()) else { break };
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("kestrel: request ") => lines.push(l),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    lines
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn png_url(w: u32, h: u32, seed: u8) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn chat_body(content: Value, extra: Value) -> Value {
    let mut body = json!({"model": "kestrel-tiny-qwen2-vl", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// An http URL on 127.0.0.1 where nothing listens.
fn closed_port_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}/cat.png")
}

fn error_of(v: &Value) -> (&str, &str) {
    (v["error"]["type"].as_str().unwrap_or(""), v["error"]["message"].as_str().unwrap_or(""))
}

#[test]
fn chat_with_one_and_two_images() {
    let s = Server::start(&[]);
    let text_only = s.post("/v1/chat/completions", &chat_body(json!("Describe."), json!({"max_tokens": 4})));
    assert_eq!(text_only.0, 200, "{}", text_only.1);
    let base = text_only.1["usage"]["prompt_tokens"].as_u64().unwrap();

    let one = json!([image_part(&png_url(56, 56, 1)), {"type": "text", "text": "Describe."}]);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(one, json!({"max_tokens": 4})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "kestrel-tiny-qwen2-vl");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // A 56x56 image is 4x4 patches, merged 2x2: 4 image tokens and the two
    // vision start/end tokens.
    let one_img = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(one_img, base + 6, "{v}");

    let two =
        json!([image_part(&png_url(56, 56, 1)), image_part(&png_url(28, 84, 2)), {"type": "text", "text": "Compare."}]);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(two, json!({"max_tokens": 3})));
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > one_img);
}

#[test]
fn streamed_chat_equals_the_whole_answer() {
    let s = Server::start(&[]);
    let content = json!([image_part(&png_url(28, 28, 3)), {"type": "text", "text": "What is this?"}]);
    let opts = json!({"max_tokens": 24, "temperature": 0, "n": 2, "logprobs": true, "top_logprobs": 2});
    let (status, whole) = s.post("/v1/chat/completions", &chat_body(content.clone(), opts.clone()));
    assert_eq!(status, 200, "{whole}");

    let mut sopts = opts.clone();
    sopts["stream"] = json!(true);
    sopts["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &chat_body(content, sopts));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    for (i, c) in chunks.iter().take(2).enumerate() {
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant", "{c}");
        assert_eq!(c["choices"][0]["index"], i);
    }
    let (mut text, mut finishes, mut logprobs) = (vec![String::new(); 2], vec![0; 2], vec![0; 2]);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            text[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            logprobs[i] += ch["logprobs"]["content"].as_array().map_or(0, |a| a.len());
            if !ch["finish_reason"].is_null() {
                finishes[i] += 1;
                assert_eq!(ch["finish_reason"], whole["choices"][i]["finish_reason"]);
            }
        }
    }
    for i in 0..2 {
        assert_eq!(text[i], whole["choices"][i]["message"]["content"].as_str().unwrap(), "choice {i}");
        assert_eq!(finishes[i], 1, "choice {i} must finish exactly once");
        assert_eq!(logprobs[i], whole["choices"][i]["logprobs"]["content"].as_array().unwrap().len());
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[test]
fn completions_from_text_and_token_ids() {
    let s = Server::start(&[]);
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 1, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 8);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();

    let (_, t) = s.post("/tokenize", &json!({"prompt": "Once upon a time"}));
    let (status, by_ids) =
        s.post("/v1/completions", &json!({"prompt": t["tokens"], "max_tokens": 8, "temperature": 0}));
    assert_eq!(status, 200, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], text.as_str());
    assert_eq!(by_ids["usage"]["prompt_tokens"], t["count"]);

    let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "stream": true, "temperature": 0});
    let events = s.stream("/v1/completions", &body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count(), 1);

    let (status, v) = s.post("/v1/completions", &json!({"prompt": [100000], "max_tokens": 2}));
    assert_eq!(status, 400);
    assert!(error_of(&v).1.contains("out of vocabulary"), "{v}");
}

#[test]
fn embeddings_from_inputs_and_messages() {
    let s = Server::start(&["--task", "embedding"]);
    let (status, v) = s.post("/v1/embeddings", &json!({"input": ["a cat", "a dog"]}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!((data[1]["index"].clone(), data[1]["object"].clone()), (json!(1), json!("embedding")));
    let full: Vec<f64> = data[0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(full.len() > 16);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(s.metric("kestrel:prompt_tokens_total"), v["usage"]["prompt_tokens"].as_f64());

    let (status, v) = s.post("/v1/embeddings", &json!({"input": "a cat", "dimensions": 16}));
    assert_eq!(status, 200, "{v}");
    let short: Vec<f64> = v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(short.len(), 16);
    let norm = short.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    let scale = short[0] / full[0];
    assert!(short.iter().zip(&full).all(|(s, f)| (s - f * scale).abs() < 1e-4), "a prefix, rescaled");

    let (status, v) = s.post("/v1/embeddings", &json!({"input": "a cat", "encoding_format": "base64"}));
    assert_eq!(status, 200, "{v}");
    let bytes = base64::engine::general_purpose::STANDARD.decode(v["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(decoded.len(), full.len());
    assert!(decoded.iter().zip(&full).all(|(a, b)| (*a as f64 - b).abs() < 1e-6));

    let messages =
        json!([{"role": "user", "content": [image_part(&png_url(56, 28, 4)), {"type": "text", "text": "x"}]}]);
    let (status, v) = s.post("/v1/embeddings", &json!({"messages": messages}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), full.len());

    // The embedding server refuses generation, and the other way around.
    let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({})));
    assert_eq!(status, 400);
    assert!(error_of(&v).1.contains("embedding task"), "{v}");
    let g = Server::start(&[]);
    let (status, v) = g.post("/v1/embeddings", &json!({"input": "a"}));
    assert_eq!(status, 400);
    assert!(error_of(&v).1.contains("--task embedding"), "{v}");
}

#[test]
fn models_health_version_tokenize_and_metrics() {
    let s = Server::start(&[]);
    let (status, body) = s.get("/health");
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "kestrel-tiny-qwen2-vl");
    assert_eq!(
        (v["data"][0]["owned_by"].clone(), v["data"][0]["max_model_len"].clone()),
        (json!("kestrel"), json!(4096))
    );
    let (status, body) = s.get("/version");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], env!("CARGO_PKG_VERSION"));

    let (status, t) = s.post("/tokenize", &json!({"prompt": "Hello world, hello!"}));
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        (t["count"].as_u64().unwrap() as usize, t["max_model_len"].clone()),
        (t["tokens"].as_array().unwrap().len(), json!(4096))
    );
    let (status, d) = s.post("/detokenize", &json!({"tokens": t["tokens"]}));
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["prompt"], "Hello world, hello!");
    let (_, c) = s.post("/tokenize", &json!({"messages": [{"role": "user", "content": "Hello world, hello!"}]}));
    assert!(c["count"].as_u64().unwrap() > t["count"].as_u64().unwrap(), "the template adds its tokens");

    let content = json!([image_part(&png_url(28, 28, 5)), {"type": "text", "text": "hi"}]);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(content, json!({"max_tokens": 5})));
    assert_eq!(status, 200, "{v}");
    let _ = s.get("/nope");
    let (status, text) = s.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "kestrel:http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"} 1",
        "kestrel:http_requests_total{route=\"/tokenize\",method=\"POST\",status=\"200\"} 2",
        "kestrel:http_requests_total{route=\"other\",method=\"GET\",status=\"404\"} 1",
        "kestrel:generation_tokens_total{model_name=\"kestrel-tiny-qwen2-vl\"} 5",
        "kestrel:time_to_first_token_seconds_count{model_name=\"kestrel-tiny-qwen2-vl\"} 1",
        "kestrel:e2e_request_latency_seconds_count{model_name=\"kestrel-tiny-qwen2-vl\"} 1",
        "kestrel:media_fetch_seconds_count{model_name=\"kestrel-tiny-qwen2-vl\"} 1",
        "kestrel:media_decode_seconds_count{model_name=\"kestrel-tiny-qwen2-vl\"} 1",
        "kestrel:media_preprocess_seconds_count{model_name=\"kestrel-tiny-qwen2-vl\"} 1",
        "kestrel:num_requests_running{model_name=\"kestrel-tiny-qwen2-vl\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(s.metric("kestrel:prompt_tokens_total").unwrap() > 5.0);
    assert!(text.contains("# TYPE kestrel:kv_cache_usage_perc gauge"));
    assert!(text.contains("# TYPE kestrel:num_preemptions_total counter"));
}

#[test]
fn bad_requests_are_400_with_a_reason() {
    let s = Server::start(&["--limit-mm-per-prompt", "image=1"]);
    let bad = |body: &Value, expect: &str| {
        let (status, v) = s.post("/v1/chat/completions", body);
        assert_eq!(status, 400, "{v}");
        let (kind, message) = error_of(&v);
        assert_eq!(kind, "invalid_request_error");
        assert!(message.contains(expect), "{message:?} should say {expect:?}");
        // No message shows Rust's Debug formatting.
        assert!(!message.contains("Some(") && !message.contains("Error {"), "{message}");
    };
    let (status, text, _) = s.post_text("/v1/chat/completions", "{\"messages\": [}", &[]);
    assert_eq!(status, 400);
    assert!(text.contains("line 1 column 15"), "{text}");

    // Over the limit: refused before fetching (the URLs would fail with 422).
    let two = json!([image_part(&closed_port_url()), image_part(&closed_port_url())]);
    bad(&chat_body(two, json!({})), "At most 1 image(s)");
    let b64 = json!([image_part("data:image/png;base64,!!!!"), {"type": "text", "text": "x"}]);
    bad(&chat_body(b64, json!({})), "invalid base64");
    bad(&chat_body(json!("hi"), json!({"max_tokens": 0})), "max_tokens must be at least 1");
    bad(&chat_body(json!("hi"), json!({"n": 1000})), "n must be between 1 and");
    bad(&chat_body(json!("hi"), json!({"max_tokens": 5000})), "maximum context length is 4096");
    bad(&json!({"messages": "hi"}), "invalid request body");
    // Unknown fields are ignored.
    let (status, v) =
        s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({"max_tokens": 1, "frobnicate": 1})));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn api_key_guards_the_v1_routes() {
    for s in [Server::start(&["--api-key", "sesame"]), Server::start_env(&[], &[("VLLM_API_KEY", "sesame")])] {
        let body = chat_body(json!("hi"), json!({"max_tokens": 1})).to_string();
        let (status, text, _) = s.post_text("/v1/chat/completions", &body, &[]);
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("invalid_api_key"), "{text}");
        let (status, _, _) = s.post_text("/v1/chat/completions", &body, &[("Authorization", "Bearer nope")]);
        assert_eq!(status, 401);
        let (status, text, _) = s.post_text("/v1/chat/completions", &body, &[("Authorization", "Bearer sesame")]);
        assert_eq!(status, 200, "{text}");
        assert_eq!(s.get("/v1/models").0, 401);
        assert_eq!(s.get("/health").0, 200);
        assert_eq!(s.get("/metrics").0, 200);
    }
}

#[test]
fn unknown_models_routes_and_methods() {
    let s = Server::start(&[]);
    let mut body = chat_body(json!("hi"), json!({"max_tokens": 1}));
    body["model"] = json!("gpt-17");
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 404);
    assert_eq!(error_of(&v).1, "The model `gpt-17` does not exist.");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, body) = s.get("/v1/nothing-here");
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = s.get("/v1/chat/completions");
    assert_eq!(status, 405, "{body}");
}

#[test]
fn bodies_over_the_cap_are_413_before_reading() {
    // One worker: a client that declares a huge body and then sends nothing
    // must not keep it.
    let s = Server::start(&["--workers", "1"]);
    let req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
               Content-Length: 1000000000000\r\n\r\n";
    let t = Instant::now();
    let (_sock, head) = s.raw(req.as_bytes());
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // The connection is still open, and the one worker serves others.
    assert_eq!(s.get("/health").0, 200);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({"max_tokens": 1})));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn unreachable_media_is_422() {
    // Loopback is refused unless allowed (see below); allowed, the closed
    // port is a failed fetch.
    let s = Server::start(&["--allow-private-media-urls"]);
    let content = json!([image_part(&closed_port_url()), {"type": "text", "text": "x"}]);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(content, json!({})));
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "media_fetch_failed");
    assert!(error_of(&v).1.starts_with("media item 0 (image): media URL http://127.0.0.1:"), "{v}");
}

#[test]
fn private_and_metadata_media_urls_are_400() {
    let s = Server::start(&[]);
    for (url, why) in [
        (closed_port_url(), "127.0.0.1 is a loopback address"),
        ("http://192.168.1.10/cat.png".into(), "192.168.1.10 is a private-network address"),
        ("http://169.254.169.254/latest/meta-data/".into(), "instance-metadata endpoint"),
    ] {
        let content = json!([image_part(&url), {"type": "text", "text": "x"}]);
        let (status, v) = s.post("/v1/chat/completions", &chat_body(content, json!({})));
        assert_eq!(status, 400, "{v}");
        let (kind, message) = error_of(&v);
        assert_eq!(kind, "invalid_request_error");
        assert!(message.starts_with("media item 0 (image): media URL http://") && message.contains(why), "{v}");
        if !why.contains("metadata") {
            assert!(message.contains("--allow-private-media-urls"), "{v}");
        }
    }
}

/// A streamed request that runs long: opened on a raw socket, its head read.
fn open_slow_stream(s: &Server) -> TcpStream {
    let body = chat_body(json!("go on"), json!({"max_tokens": 4000, "ignore_eos": true, "stream": true})).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (sock, head) = s.raw(req.as_bytes());
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    sock
}

#[test]
fn overload_is_429_and_a_client_that_leaves_is_aborted() {
    let s = Server::start(&["--max-queue", "1"]);
    let mut sock = open_slow_stream(&s);
    let mut first = [0u8; 64];
    assert!(sock.read(&mut first).unwrap() > 0);

    let body = chat_body(json!("hi"), json!({"max_tokens": 1})).to_string();
    let (status, text, headers) = s.post_text("/v1/chat/completions", &body, &[]);
    assert_eq!(status, 429, "{text}");
    assert!(headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("retry-after") && v == "1"), "{headers:?}");
    assert!(text.contains("rate_limit_error"), "{text}");
    // Cheap routes are not bounded.
    assert_eq!(s.get("/health").0, 200);

    // The streaming client leaves: its request is aborted and the slot frees.
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text, _) = s.post_text("/v1/chat/completions", &body, &[]);
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{text}");
        assert!(Instant::now() < deadline, "the slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("kestrel:client_disconnects_total"), Some(1.0));
    assert_eq!(s.metric("kestrel:num_requests_running"), Some(0.0));
}

#[test]
fn a_stream_cut_mid_way_leaves_the_server_serving() {
    let s = Server::start(&[]);
    for _ in 0..2 {
        let mut sock = open_slow_stream(&s);
        let mut buf = [0u8; 256];
        assert!(sock.read(&mut buf).unwrap() > 0);
        drop(sock);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.metric("kestrel:client_disconnects_total") != Some(2.0) {
        assert!(Instant::now() < deadline, "the disconnects were not noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({"max_tokens": 3})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

const SECRET_PROMPT: &str = "a prompt that must stay out of the log";

/// One good and one bad request through `s`: (good status, bad status).
fn good_and_bad(s: &Server) -> (u16, u16) {
    let good = json!({"prompt": SECRET_PROMPT, "max_tokens": 3, "temperature": 0});
    let (g, v) = s.post("/v1/completions", &good);
    assert_eq!(g, 200, "{v}");
    let (b, v) = s.post("/v1/completions", &json!({"prompt": SECRET_PROMPT, "max_tokens": 3, "temperature": -1}));
    assert_eq!(b, 400, "{v}");
    (g, b)
}

#[test]
fn request_log_has_a_line_per_request_and_no_prompt_text() {
    let (s, rx) = Server::start_logged(&[]);
    good_and_bad(&s);
    let lines = request_lines(&rx, 2, Duration::from_secs(30));
    assert_eq!(lines.len(), 2, "{lines:?}");
    let ok = &lines[0];
    assert!(ok.contains("POST /v1/completions status=200"), "{ok}");
    assert!(ok.contains(" id=cmpl-") && ok.contains(" output_tokens=3 ") && ok.contains(" media=0 "), "{ok}");
    assert!(ok.contains(" prompt_tokens=") && !ok.contains("prompt_tokens=-"), "{ok}");
    assert!(ok.contains(" ttft_ms=") && !ok.contains("ttft_ms=-") && ok.contains(" total_ms="), "{ok}");
    let bad = &lines[1];
    assert!(bad.contains("POST /v1/completions status=400") && bad.contains("output_tokens=-"), "{bad}");
    assert!(lines.iter().all(|l| !l.contains(SECRET_PROMPT)), "{lines:?}");
}

#[test]
fn request_log_off_and_failures_only() {
    let (s, rx) = Server::start_logged(&["--disable-log-requests"]);
    good_and_bad(&s);
    let lines = request_lines(&rx, 1, Duration::from_secs(2));
    assert!(lines.is_empty(), "{lines:?}");
    drop(s);

    let (s, rx) = Server::start_logged(&["--uvicorn-log-level", "warning"]);
    good_and_bad(&s);
    let lines = request_lines(&rx, 2, Duration::from_secs(3));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("status=400"), "{lines:?}");
}

/// The text one fresh server with `args` samples (temperature 1, no seed)
/// for its first two requests.
fn first_sampled_texts(args: &[&str]) -> (String, String) {
    let s = Server::start(args);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0});
    let text = || {
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    (text(), text())
}

#[test]
fn server_seed_makes_unseeded_sampling_repeat_across_restarts() {
    let a = first_sampled_texts(&["--seed", "1234"]);
    let b = first_sampled_texts(&["--seed", "1234"]);
    assert_eq!(a, b);
    // Each request gets its own stream, and another seed others.
    assert_ne!(a.0, a.1);
    let c = first_sampled_texts(&["--seed", "99"]);
    assert_ne!(a.0, c.0);
}

#[test]
fn tokenizer_from_another_folder() {
    let builtin = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/model/builtin/tiny-qwen2-vl"));
    let dir = std::env::temp_dir().join(format!("kestrel-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(builtin.join(f), dir.join(f)).unwrap();
    }
    let (_, base) = Server::start(&[]).post("/tokenize", &json!({"prompt": "Hello world"}));
    let s = Server::start(&["--tokenizer", dir.to_str().unwrap()]);
    let (status, t) = s.post("/tokenize", &json!({"prompt": "Hello world"}));
    assert_eq!((status, &t["tokens"]), (200, &base["tokens"]), "{t}");
    // The chat template stays with the model folder (the copy has none).
    let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), json!({"max_tokens": 2})));
    assert_eq!(status, 200, "{v}");
    drop(s);

    // The tokenizer really is read from there: without its files, no start.
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["serve", "--device", "cpu", "--port", "0", "--tokenizer", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir.join("tokenizer.json").display().to_string()), "{err}");
}

#[test]
fn vllm_metrics_mirror_kestrels() {
    let s = Server::start(&[]);
    let (status, v) = s.post("/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_f64().unwrap();
    let m = |p: &str| s.metric(p).unwrap_or_else(|| panic!("no {p} in /metrics"));
    let model = "{model_name=\"kestrel-tiny-qwen2-vl\"}";
    assert_eq!(m(&format!("vllm:prompt_tokens_total{model}")), prompt);
    assert_eq!(m(&format!("vllm:generation_tokens_total{model}")), 4.0);
    assert_eq!(m(&format!("vllm:e2e_request_latency_seconds_count{model}")), 1.0);
    assert_eq!(m(&format!("vllm:time_to_first_token_seconds_count{model}")), 1.0);
    assert_eq!(m("vllm:request_success_total{model_name=\"kestrel-tiny-qwen2-vl\",finished_reason=\"length\"}"), 1.0);
    assert_eq!(m(&format!("vllm:num_requests_running{model}")), 0.0);
    assert_eq!(m(&format!("vllm:num_requests_waiting{model}")), 0.0);
    let kv = m(&format!("vllm:kv_cache_usage_perc{model}"));
    assert!((0.0..=1.0).contains(&kv), "{kv}");
    assert_eq!(m(&format!("vllm:prompt_tokens_total{model}")), m(&format!("kestrel:prompt_tokens_total{model}")));
}

#[test]
fn request_chat_template_kwargs_and_developer_role() {
    let s = Server::start(&[]);
    let tokenize = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": [image_part("http://x/a.png"), {"type": "text", "text": "hi"}]}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, t) = s.post("/tokenize", &body);
        assert_eq!(status, 200, "{t}");
        let (status, d) = s.post("/detokenize", &json!({"tokens": t["tokens"]}));
        assert_eq!(status, 200, "{d}");
        (t["count"].as_u64().unwrap(), d["prompt"].as_str().unwrap().to_string())
    };
    // Qwen2-VL's template numbers the images when asked.
    let (plain_n, plain) = tokenize(json!({}));
    let (vid_n, vid) = tokenize(json!({"chat_template_kwargs": {"add_vision_id": true}}));
    assert!(!plain.contains("Picture 1: "), "{plain}");
    assert!(vid.contains("Picture 1: <|vision_start|>"), "{vid}");
    assert!(vid_n > plain_n);
    let (no_gen_n, no_gen) = tokenize(json!({"add_generation_prompt": false}));
    assert!(plain.ends_with("<|im_start|>assistant\n") && !no_gen.ends_with("assistant\n"), "{no_gen}");
    assert!(no_gen_n < plain_n);

    // A request's own template replaces the server's: the prompt is the
    // message text alone, as many tokens as the text.
    let text = "Hello world, hello!";
    let (_, t) = s.post("/tokenize", &json!({"prompt": text, "add_special_tokens": false}));
    let body = chat_body(json!(text), json!({"max_tokens": 1, "chat_template": "{{ messages[0].content }}"}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);

    // A template that does not compile is the request's fault.
    let body = chat_body(json!(text), json!({"chat_template": "{% for m in messages %}{{ m.role }"}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    assert!(error_of(&v).1.contains("chat_template:") && error_of(&v).1.contains("syntax error"), "{v}");
    let body = chat_body(json!(text), json!({"continue_final_message": true}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");

    // `developer` is `system` for a template without a rule of its own.
    let as_role = |role: &str| {
        let msgs = json!([{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}]);
        let (status, t) = s.post("/tokenize", &json!({"messages": msgs}));
        assert_eq!(status, 200, "{t}");
        t["tokens"].clone()
    };
    assert_eq!(as_role("developer"), as_role("system"));
    let body = json!({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
}

#[test]
fn logprob_bytes_are_raw_token_bytes() {
    let s = Server::start(&[]);
    let mut split_seen = false;
    for seed in 0..8 {
        let extra = json!({"max_tokens": 24, "temperature": 1.0, "seed": seed, "ignore_eos": true,
            "skip_special_tokens": false, "logprobs": true, "top_logprobs": 2});
        let (status, v) = s.post("/v1/chat/completions", &chat_body(json!("hi"), extra));
        assert_eq!(status, 200, "{v}");
        let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
        let as_bytes =
            |b: &Value| -> Vec<u8> { b.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect() };
        let mut joined = Vec::new();
        for e in &entries {
            let b = as_bytes(&e["bytes"]);
            // A token that splits a character gives its part of it, never U+FFFD's bytes.
            if std::str::from_utf8(&b).is_err() {
                split_seen = true;
            }
            if e["token"].as_str().unwrap() != "\u{FFFD}" {
                assert_eq!(b, e["token"].as_str().unwrap().as_bytes(), "{e}");
            }
            assert!(!b.windows(3).any(|w| w == [0xEF, 0xBF, 0xBD]), "{e}");
            for t in e["top_logprobs"].as_array().unwrap() {
                assert!(!as_bytes(&t["bytes"]).windows(3).any(|w| w == [0xEF, 0xBF, 0xBD]), "{t}");
            }
            joined.extend(b);
        }
        // The bytes join into the text (invalid runs read as U+FFFD).
        assert_eq!(String::from_utf8_lossy(&joined), v["choices"][0]["message"]["content"].as_str().unwrap(), "{v}");
    }
    assert!(split_seen, "no sampled token split a character; pick other seeds");
}

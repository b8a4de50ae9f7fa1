//! `kestrel serve` on the tiny Phi-3.5-vision (tests/fixtures/tiny-phi3v)
//! as vLLM's "Using VLMs" guide runs Phi-3.5-vision-instruct: `--task
//! generate --trust-remote-code --max-model-len 4096 --limit-mm-per-prompt
//! image=2`, two image URLs in one message, streaming; the folder's own
//! template takes strings only, so content lists are flattened with
//! `<|image_N|>` tags as vLLM does; misnumbered tags and a third image are
//! 400s. Then VLM2Vec: `--task embedding` on a copy of the folder without a
//! chat template (Kestrel's built-in VLM2Vec template), whose embedding of
//! the reference's image + text equals the reference's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-phi3v")
}

impl Server {
    fn start(dir: &Path, args: &[&str]) -> (Server, Vec<String>) {
        let dir = dir.display().to_string();
        let base = [dir.as_str(), "--served-model-name", "tiny-phi3v"];
        let (child, port, line, rx) = common::spawn_serve_capturing(&[&base[..], args].concat(), &[]);
        assert!(line.starts_with("kestrel: serving tiny-phi3v on http://127.0.0.1:"), "{line}");
        let logs: Vec<String> = rx.try_iter().collect();
        (Server { child, port }, logs)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let mut r = agent.post(format!("http://127.0.0.1:{}{path}", self.port)).send(body.to_string()).unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

fn data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn png_url(w: u32, h: u32, seed: u8) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
    data_url(&out.into_inner())
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn chat(content: Value, extra: Value) -> Value {
    let mut body = json!({"model": "tiny-phi3v", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[test]
fn the_guides_server_walk_through() {
    let args = ["--task", "generate", "--trust-remote-code", "--max-model-len", "4096"];
    let (s, _) = Server::start(&fixture(), &[&args[..], &["--limit-mm-per-prompt", "image=2"]].concat());
    // Two images of known HD grids: 336×336 at num_crops 4 is 2×2 (757
    // tokens), 640×200 is 1×3 (601).
    let two = json!([
        {"type": "text", "text": "What are the animals in these images?"},
        image_part(&png_url(336, 336, 1)),
        image_part(&png_url(640, 200, 2)),
    ]);
    let body = chat(two.clone(), json!({"max_tokens": 6, "temperature": 0, "ignore_eos": true}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text_only = s.post("/v1/chat/completions", &chat(json!("What are the animals in these images?"), json!({})));
    assert_eq!(text_only.0, 200, "{}", text_only.1);
    // vLLM's flattening puts "<|image_1|>\n<|image_2|>\n" before the text: two
    // chunks more, each with its BOS, plus the images' runs.
    let with = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let without = text_only.1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((without + 757 + 601 + 2..=without + 757 + 601 + 8).contains(&with), "{without} -> {with}");
    let whole = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, events) = s.post("/v1/chat/completions", &streamed);
    assert_eq!(status, 200);
    let joined: String = events
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(joined, whole, "streamed equals whole");

    // The user's errors: tags out of order, missing, or more images than allowed.
    for (content, why) in [
        (json!("<|image_2|> and <|image_1|>"), "in order"),
        (json!([image_part(&png_url(40, 40, 1)), {"type": "text", "text": "<|image_2|>"}]), "has 2 image tags"),
        (json!("What is in <|image_1|>?"), "0 images were given"),
        (
            json!([image_part(&png_url(40, 40, 1)), image_part(&png_url(40, 40, 2)), image_part(&png_url(40, 40, 3))]),
            "--limit-mm-per-prompt",
        ),
        (json!("a raw <|image|> token"), "image"),
    ] {
        let (status, v) = s.post("/v1/chat/completions", &chat(content.clone(), json!({"max_tokens": 2})));
        assert_eq!(status, 400, "{content}: {v}");
        assert!(message(&v).contains(why), "{content}: {v}");
    }
    // Still serving.
    let (status, _) = s.post("/v1/chat/completions", &chat(json!("hi"), json!({"max_tokens": 1})));
    assert_eq!(status, 200);
}

#[test]
fn vlm2vec_embeddings_over_http_equal_the_reference() {
    // The folder without its chat template, as a VLM2Vec download may be.
    let dir = std::env::temp_dir().join(format!("kestrel-vlm2vec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture()).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    let tc = dir.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, v.to_string()).unwrap();

    let (s, logs) = Server::start(&dir, &["--task", "embedding", "--trust-remote-code", "--max-model-len", "4096"]);
    assert!(logs.iter().any(|l| l.contains("built-in VLM2Vec template")), "{logs:?}");
    let golden = fixture().join("golden");
    let img = data_url(&std::fs::read(golden.join("img_640x480.png")).unwrap());
    let text = "Represent the given image with the following question: What is in the image";
    let msgs = json!([{"role": "user", "content": [image_part(&img), {"type": "text", "text": text}]}]);
    let (status, v) =
        s.post("/v1/embeddings", &json!({"model": "tiny-phi3v", "messages": msgs, "encoding_format": "float"}));
    assert_eq!(status, 200, "{v}");
    let ours: Vec<f32> =
        v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let g = common::golden::tensors(&golden.join("vlm2vec_image_text.safetensors"));
    let (rel, max) = common::golden::rel_err(&ours, &g["embedding"].1);
    assert!(rel <= 1e-5, "embedding rel error {rel:.3e} (max abs {max:.3e})");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() as usize, g["input_ids"].1.len());
    // Text only and plain `input` work too.
    let msgs = json!([{"role": "user", "content": [{"type": "text", "text": "A cat and a dog"}]}]);
    let (status, v) = s.post("/v1/embeddings", &json!({"model": "tiny-phi3v", "messages": msgs}));
    assert_eq!(status, 200, "{v}");
    let ours: Vec<f32> =
        v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let g = common::golden::tensors(&golden.join("vlm2vec_text.safetensors"));
    assert!(common::golden::rel_err(&ours, &g["embedding"].1).0 <= 1e-5);
    let (status, v) = s.post("/v1/embeddings", &json!({"model": "tiny-phi3v", "input": ["a cat", "a dog"]}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

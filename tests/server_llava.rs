//! `kestrel serve` on the tiny LLaVA-1.5 (tests/fixtures/tiny-llava, a folder
//! without a chat template, as most llava-hf downloads are): the built-in
//! template, chat with data-URL and local images, streaming equal to the
//! whole answer, logprobs and n, precomputed image embeddings, the
//! embedding task with messages, and the user's errors (video, too many
//! images, too long) as 400s.

mod common;

use std::path::Path;
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

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llava").display().to_string()
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let dir = fixture();
        let base = [dir.as_str(), "--workers", "4", "--served-model-name", "tiny-llava"];
        let (child, port, line) = common::spawn_serve(&[&base[..], args].concat(), &[]);
        assert!(line.starts_with("kestrel: serving tiny-llava on http://127.0.0.1:"), "{line}");
        Server { child, port }
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

    /// The concatenated content of a streamed chat completion.
    fn stream_text(&self, body: &Value) -> String {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let (status, v) = self.post("/v1/chat/completions", &body);
        assert_eq!(status, 200);
        let text = v.as_str().expect("an event stream").to_string();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect()
    }
}

fn png_url(w: u32, h: u32, seed: u8) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
}

fn chat(content: Value, extra: Value) -> Value {
    let mut body = json!({"model": "tiny-llava", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[test]
fn llava_chat_streaming_logprobs_n_and_embeds() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llava/golden");
    let root = golden.display().to_string();
    let s = Server::start(&["--allowed-local-media-path", &root, "--limit-mm-per-prompt", "image=2"]);
    let text_only = s.post("/v1/chat/completions", &chat(json!("Describe."), json!({"max_tokens": 4})));
    assert_eq!(text_only.0, 200, "{}", text_only.1);
    let base = text_only.1["usage"]["prompt_tokens"].as_u64().unwrap();

    // One image: the 16 image tokens of the tiny tower, the "\n" after
    // them, and the question tokenized after a newline instead of a space.
    let one = json!([image_part(&png_url(80, 60, 3)), {"type": "text", "text": "Describe."}]);
    let body = chat(one.clone(), json!({"max_tokens": 6, "ignore_eos": true, "temperature": 0}));
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let with_image = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((base + 17..=base + 20).contains(&with_image), "{base} -> {v}");
    let whole = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(s.stream_text(&body), whole, "streamed equals whole");

    // A local file under the allowed root, two images, logprobs and n.
    let local = format!("file://{}", golden.join("one_image_img0.png").display());
    let two = json!([image_part(&local), {"type": "text", "text": "and"}, image_part(&png_url(40, 90, 9))]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &chat(two, json!({"max_tokens": 3, "n": 2, "logprobs": true, "top_logprobs": 2, "seed": 5})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    let lp = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(lp.as_array().unwrap().len(), 3, "{v}");
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);

    // Precomputed embeddings (the projector's rows, 16 x 128), as a data URL.
    let vals: Vec<u8> = (0..16 * 128).flat_map(|i| ((i % 11) as f32 * 0.07 - 0.3).to_le_bytes()).collect();
    let file = safetensors::serialize(
        [(
            "image_embeds",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 16, 128], &vals).unwrap(),
        )],
        None,
    )
    .unwrap();
    let url =
        format!("data:application/octet-stream;base64,{}", base64::engine::general_purpose::STANDARD.encode(file));
    let part = json!([{"type": "image_embeds", "image_embeds": url}, {"type": "text", "text": "Describe."}]);
    let (status, v) = s.post("/v1/chat/completions", &chat(part, json!({"max_tokens": 2})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), with_image);

    // The user's errors.
    let video =
        json!([{"type": "video", "video": [png_url(56, 56, 1), png_url(56, 56, 2)]}, {"type": "text", "text": "?"}]);
    let (status, v) = s.post("/v1/chat/completions", &chat(video, json!({"max_tokens": 2})));
    assert_eq!(status, 400, "{v}");
    assert!(message(&v).contains("video"), "{v}");
    let three =
        json!([image_part(&png_url(56, 56, 1)), image_part(&png_url(56, 56, 2)), image_part(&png_url(56, 56, 3))]);
    let (status, v) = s.post("/v1/chat/completions", &chat(three, json!({"max_tokens": 2})));
    assert_eq!(status, 400, "{v}");
    assert!(message(&v).contains("--limit-mm-per-prompt"), "{v}");
    let typed = json!([{"type": "text", "text": "what is <image> here"}]);
    let (status, v) = s.post("/v1/chat/completions", &chat(typed, json!({"max_tokens": 2})));
    assert_eq!(status, 400, "{v}");
}

#[test]
fn llava_max_model_len_and_the_embedding_task() {
    let s = Server::start(&["--max-model-len", "24"]);
    let one = json!([image_part(&png_url(56, 56, 1)), {"type": "text", "text": "Describe this picture in detail."}]);
    let (status, v) = s.post("/v1/chat/completions", &chat(one, json!({"max_tokens": 2})));
    assert_eq!(status, 400, "{v}");
    assert!(message(&v).contains("24"), "{v}");
    drop(s);

    let s = Server::start(&["--task", "embedding"]);
    let msgs = json!([{"role": "user", "content": [image_part(&png_url(56, 56, 1)), {"type": "text", "text": "a"}]}]);
    let (status, v) = s.post("/v1/embeddings", &json!({"model": "tiny-llava", "messages": msgs}));
    assert_eq!(status, 200, "{v}");
    let e: Vec<f64> = v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(e.len(), 128);
    assert!((e.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-4, "L2-normalized");
    let (status, v) = s.post("/v1/embeddings", &json!({"model": "tiny-llava", "input": ["a cat", "a dog"]}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

/// `kestrel generate --model DIR --image ... --prompt ...` (vLLM's guide, offline)
/// prints HF's greedy answer for the same message on the same weights; the
/// throughput benchmark runs on a LLaVA folder with its roofline.
#[test]
fn llava_generate_prints_hfs_greedy_answer_and_benches_run() {
    let dir = fixture();
    let golden = Path::new(&dir).join("golden");
    let st = std::fs::read(golden.join("one_image.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let greedy: Vec<u32> = st
        .tensor("greedy")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let expected = kestrel::text::tokenizer::Tokenizer::from_dir(&dir).unwrap().decode(&greedy, true).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["generate", "--device", "cpu", "--model", &dir, "--prompt", "What is shown in this image?"])
        .args(["--max-tokens", &greedy.len().to_string(), "--image"])
        .arg(golden.join("one_image_img0.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.strip_suffix('\n').unwrap_or(&stdout), expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("built-in llava template"), "{stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["bench", "throughput", "--model", &dir, "--device", "cpu", "--concurrency", "2", "--num-prompts", "2"])
        .args([
            "--image-size",
            "64",
            "--input-len",
            "8",
            "--output-len",
            "3",
            "--copy-gbps",
            "100",
            "--gemm-tflops",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tiny-llava"), "{stdout}");
}

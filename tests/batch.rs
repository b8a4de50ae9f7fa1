//! `kestrel generate --batch` end to end on the built-in tiny model (CPU):
//! OpenAI batch lines and bare bodies in, OpenAI batch output lines out, in
//! order, a bad line answered with a 400 without stopping the others.

use std::io::Cursor;
use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use image::{DynamicImage, ImageFormat, RgbImage};
use serde_json::{json, Value};

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-batch-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn kestrel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kestrel"));
    // Keep the test's model cache out of the user's home.
    c.env("KESTREL_CACHE_DIR", temp_dir().join("cache"));
    c
}

/// A 40x28 PNG with a gradient, as a data URL.
fn png_data_url() -> String {
    let img = RgbImage::from_fn(40, 28, |x, y| image::Rgb([(x * 6) as u8, (y * 9) as u8, ((x + y) * 3) as u8]));
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
}

/// Runs `kestrel generate --batch` on `lines` with `extra` flags; the
/// summary it printed and the output lines as JSON.
fn run_batch(name: &str, lines: &[String], extra: &[&str]) -> (String, Vec<Value>) {
    let dir = temp_dir();
    let (input, output) = (dir.join(format!("{name}.jsonl")), dir.join(format!("{name}.out.jsonl")));
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = kestrel()
        .args(["generate", "--device", "cpu", "--cpu-kv-cache-space", "0.25", "--batch"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&output).unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
    )
}

fn batch_lines() -> Vec<String> {
    let image_req = json!({
        "custom_id": "with-image",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "kestrel-tiny",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in"},
                {"type": "image_url", "image_url": {"url": png_data_url()}},
                {"type": "text", "text": "this picture?"}
            ]}],
            "max_tokens": 8,
            "logprobs": true,
            "top_logprobs": 2
        }
    });
    // A bare body (custom_id line-2); ignore_eos so the random tiny model
    // cannot stop before max_tokens.
    let greedy = json!({
        "messages": [{"role": "user", "content": "Count to ten."}],
        "temperature": 0,
        "max_tokens": 5,
        "ignore_eos": true
    });
    let bad_image = json!({
        "custom_id": "bad-image",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64"}},
            {"type": "text", "text": "?"}
        ]}]}
    });
    vec![image_req.to_string(), greedy.to_string(), bad_image.to_string(), "{\"messages\": [".to_string()]
}

#[test]
fn batch_file_in_openai_batch_format() {
    let (summary, out) = run_batch("first", &batch_lines(), &[]);
    assert!(summary.contains("4 requests: 2 succeeded, 2 failed"), "{summary}");
    assert_eq!(out.len(), 4, "{out:#?}");
    let ids: Vec<&str> = out.iter().map(|o| o["custom_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["with-image", "line-2", "bad-image", "line-4"]);
    let status: Vec<u64> = out.iter().map(|o| o["response"]["status_code"].as_u64().unwrap()).collect();
    assert_eq!(status, [200, 200, 400, 400]);
    for o in &out {
        assert!(o["id"].as_str().unwrap().starts_with("batch_req_"), "{o}");
        assert!(o["error"].is_null(), "{o}");
    }

    // The image request: a chat.completion with logprobs.
    let body = &out[0]["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion), "{body}");
    let lps = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len() as u64, completion, "{body}");
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2, "{body}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "the image's tokens count: {body}");

    // The greedy text request stops at max_tokens.
    let body = &out[1]["response"]["body"];
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 5, "{body}");
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);

    // Bad lines: OpenAI error bodies that say what is wrong.
    for (o, what) in [(&out[2], "invalid base64"), (&out[3], "line 4 is not valid JSON")] {
        let err = &o["response"]["body"]["error"];
        assert_eq!(err["type"], "invalid_request_error", "{o}");
        assert!(err["message"].as_str().unwrap().contains(what), "{o}");
        assert!(err["param"].is_null() && err["code"].is_null(), "{o}");
    }

    // The same greedy request in another run gives the same text.
    let (_, again) = run_batch("second", &batch_lines(), &[]);
    let text = |o: &Value| o["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(text(&out[1]), text(&again[1]));
}

/// A safetensors file of precomputed embeddings for one image of grid
/// [1, 4, 4] (4 tokens at merge 2, the tiny model's hidden size 128), as a data URL.
fn embeds_data_url() -> String {
    use safetensors::{tensor::TensorView, Dtype};
    let vals: Vec<u8> = (0..4 * 128).flat_map(|i| ((i % 13) as f32 * 0.05 - 0.3).to_le_bytes()).collect();
    let grid: Vec<u8> = [1i64, 4, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let file = safetensors::serialize(
        [
            ("image_embeds", TensorView::new(Dtype::F32, vec![4, 128], &vals).unwrap()),
            ("image_grid_thw", TensorView::new(Dtype::I64, vec![1, 3], &grid).unwrap()),
        ],
        None,
    )
    .unwrap();
    format!("data:application/octet-stream;base64,{}", base64::engine::general_purpose::STANDARD.encode(file))
}

/// Precomputed embeddings, a video as frames, and local files under
/// --allowed-local-media-path (and one outside it) through the whole path.
#[test]
fn embeds_video_and_local_files() {
    let golden = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-qwen2-vl/golden"));
    let local = golden.join("one_image_img0.png").display().to_string();
    let body =
        |content: Value| json!({"messages": [{"role": "user", "content": content}], "max_tokens": 3}).to_string();
    let lines = [
        body(json!([{"type": "image_embeds", "image_embeds": embeds_data_url()}, {"type": "text", "text": "?"}])),
        body(json!([{"type": "video", "video": [png_data_url(), png_data_url()]}, {"type": "text", "text": "?"}])),
        body(json!([{"type": "image_url", "image_url": format!("file://{local}")}, {"type": "text", "text": "?"}])),
        body(json!([{"type": "image_url", "image_url": {"url": "/etc/hostname"}}, {"type": "text", "text": "?"}])),
    ];
    let root = golden.display().to_string();
    let (summary, out) = run_batch("media", &lines, &["--allowed-local-media-path", &root]);
    assert!(summary.contains("4 requests: 3 succeeded, 1 failed"), "{summary}");
    for o in &out[..3] {
        assert_eq!(o["response"]["status_code"], 200, "{o}");
        let n = o["response"]["body"]["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=3).contains(&n), "{o}");
    }
    let err = &out[3]["response"]["body"]["error"]["message"];
    assert!(err.as_str().unwrap().contains("outside the allowed local media directory"), "{}", out[3]);
}

#[test]
fn batch_needs_output_and_excludes_prompt() {
    let out = kestrel().args(["generate", "--batch", "in.jsonl"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--output"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = kestrel().args(["generate", "--batch", "a", "--output", "b", "--prompt", "hi"]).output().unwrap();
    assert!(!out.status.success());
    let out = kestrel().args(["generate"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prompt"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_batch_file_is_reported() {
    let out = kestrel()
        .args(["generate", "--device", "cpu", "--batch", "/nonexistent/in.jsonl", "--output", "/tmp/x.jsonl"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/in.jsonl") && err.contains("No such file"), "{err}");
}

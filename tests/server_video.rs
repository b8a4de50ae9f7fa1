//! `video_url` parts end to end: `kestrel serve` (CPU, the built-in tiny
//! Qwen2-VL) takes an H.264 MP4 as a data URL, decodes and samples it, and
//! answers 200 with as many prompt tokens as the same frames sent as
//! images; files it cannot use are a 400 that says why. The MP4s are made
//! here (tests/common/mp4.rs), so no network or fixture file is needed.

mod common;

use std::process::Child;
use std::time::Duration;

use base64::Engine as _;
use image::{Rgb, RgbImage};
use serde_json::{json, Value};

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let (child, port, line) = common::spawn_serve(&[&["--workers", "2"], args].concat(), &[]);
        assert!(line.starts_with("kestrel: serving kestrel-tiny-qwen2-vl on http://127.0.0.1:"), "{line}");
        Server { child, port }
    }

    /// Posts a chat with `content` as the user message; (status, body).
    fn chat(&self, content: Value) -> (u16, Value) {
        let body = json!({"model": "kestrel-tiny-qwen2-vl", "max_tokens": 2,
                          "messages": [{"role": "user", "content": content}]});
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let url = format!("http://127.0.0.1:{}/v1/chat/completions", self.port);
        let mut resp = agent.post(url).send(body.to_string()).expect("a response");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `n` solid 56x56 frames of distinct colours.
fn frames(n: usize) -> Vec<RgbImage> {
    (0..n).map(|i| RgbImage::from_pixel(56, 56, Rgb([40 + 20 * i as u8, 120, 200 - 15 * i as u8]))).collect()
}

fn video_url(bytes: &[u8]) -> Value {
    json!({"type": "video_url", "video_url": {"url": format!("data:video/mp4;base64,{}", b64(bytes))}})
}

fn png_url(img: &RgbImage) -> String {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", b64(&out.into_inner()))
}

fn prompt_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens"].as_u64().unwrap_or_else(|| panic!("no usage in {v}"))
}

#[test]
fn a_video_file_counts_as_its_frames() {
    let s = Server::start(&[]);
    let text = json!({"type": "text", "text": "What happens?"});
    let (status, v) = s.chat(json!([text.clone()]));
    assert_eq!(status, 200, "{v}");
    let base = prompt_tokens(&v);

    let clip = frames(6);
    let (status, v) = s.chat(json!([video_url(&common::mp4::h264_mp4(&clip, 30)), text.clone()]));
    assert_eq!(status, 200, "{v}");
    let from_file = prompt_tokens(&v);
    // 6 frames (fewer than vLLM's 32: all kept), 2 per temporal patch: 3
    // steps of 56x56 = 4x4 patches merged 2x2, 4 tokens each, plus the
    // vision start/end tokens.
    assert_eq!(from_file, base + 3 * 4 + 2, "{v}");

    // The same frames as images: the same prompt length.
    let urls: Vec<String> = clip.iter().map(png_url).collect();
    let (status, v) = s.chat(json!([{"type": "video", "video": urls}, text]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(prompt_tokens(&v), from_file, "{v}");
}

#[test]
fn num_frames_from_media_io_kwargs_samples_fewer() {
    let s = Server::start(&["--media-io-kwargs", r#"{"video": {"num_frames": 2}}"#]);
    let text = json!({"type": "text", "text": "What happens?"});
    let base = prompt_tokens(&s.chat(json!([text.clone()])).1);
    let (status, v) = s.chat(json!([video_url(&common::mp4::h264_mp4(&frames(9), 30)), text]));
    assert_eq!(status, 200, "{v}");
    // Frames 0 and 8: one temporal step of 4 tokens.
    assert_eq!(prompt_tokens(&v), base + 4 + 2, "{v}");
}

#[test]
fn files_that_are_not_h264_mp4_are_400_with_the_reason() {
    let s = Server::start(&[]);
    let clip = common::mp4::h264_mp4(&frames(3), 30);
    let hevc = common::mp4::mp4_with_entry(*b"hvc1", 56, 56, &[vec![0, 0, 0, 1, 0x40]]);
    let cases: [(Vec<u8>, &str); 4] = [
        (b"just some bytes, not a video".to_vec(), "is not an MP4 file"),
        (hevc, "is HEVC (H.265) video; only H.264 (avc1) is supported"),
        (clip[..clip.len() - 40].to_vec(), "is truncated"),
        (Vec::new(), "is not an MP4 file"),
    ];
    for (bytes, why) in cases {
        let (status, v) = s.chat(json!([video_url(&bytes), {"type": "text", "text": "?"}]));
        assert_eq!(status, 400, "{why}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("media item 0 (video_url)") && msg.contains(why), "{why}: {msg}");
    }
    // Still serving.
    let (status, _) = s.chat(json!([video_url(&clip), {"type": "text", "text": "?"}]));
    assert_eq!(status, 200);
}

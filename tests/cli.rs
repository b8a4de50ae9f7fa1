//! The `kestrel` binary end to end on its built-in model.

use std::path::Path;
use std::process::Command;

use kestrel::text::tokenizer::Tokenizer;
use safetensors::SafeTensors;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-qwen2-vl"))
}

fn kestrel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kestrel"));
    // Keep the test's model cache out of the user's home.
    c.env("KESTREL_CACHE_DIR", std::env::temp_dir().join(format!("kestrel-cli-test-{}", std::process::id())));
    c
}

/// `kestrel generate --prompt ... --image ...` prints what HF transformers
/// generated greedily for the same message on the same (built-in) model.
#[test]
fn generate_with_an_image_prints_hfs_greedy_answer() {
    let golden = std::fs::read(fixtures().join("golden/one_image.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&golden).unwrap();
    let greedy: Vec<u32> = st
        .tensor("greedy")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let model = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/model/builtin/tiny-qwen2-vl"));
    let expected = Tokenizer::from_dir(model).unwrap().decode(&greedy, true).unwrap();

    let out = kestrel()
        .args(["generate", "--device", "cpu", "--prompt", "What is in this picture?", "--max-tokens"])
        .arg(greedy.len().to_string())
        .arg("--image")
        .arg(fixtures().join("golden/one_image_img0.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.strip_suffix('\n').unwrap_or(&stdout), expected);
}

#[test]
fn generate_reports_a_missing_image_clearly() {
    let out = kestrel()
        .args(["generate", "--device", "cpu", "--prompt", "hi", "--image", "/nonexistent/cat.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cat.png") && err.contains("No such file"), "{err}");
}

#[test]
fn generate_on_cuda_without_a_gpu_says_why() {
    if kestrel::Device::cuda(0).is_ok() {
        eprintln!("SKIPPED: a GPU is present, so --device cuda does not fail here");
        return;
    }
    let out = kestrel().args(["generate", "--device", "cuda", "--prompt", "hi"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA") || err.contains("kernels"), "{err}");
}

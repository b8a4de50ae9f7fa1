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

/// `kestrel generate` with an output constraint: the answer follows it
/// (the tiny model's weights are random; only the constraint shapes it),
/// with an image too; a constraint that cannot compile is a clear error.
#[test]
fn generate_holds_the_answer_to_a_constraint() {
    let run = |args: &[&str]| {
        let out = kestrel().args(["generate", "--device", "cpu", "--max-tokens", "120"]).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim_end().to_owned(), out.stderr)
    };
    let (ok, text, err) = run(&["--prompt", "Answer", "--choice", "yes", "--choice", "no"]);
    assert!(ok && (text == "yes" || text == "no"), "{text:?} {}", String::from_utf8_lossy(&err));
    let img = fixtures().join("golden/one_image_img0.png");
    let (ok, text, _) = run(&["--prompt", "Phone?", "--regex", "[0-9]{3}-[0-9]{4}", "--image", img.to_str().unwrap()]);
    assert!(ok && text.len() == 8 && text.as_bytes()[3] == b'-', "{text:?}");
    let schema = std::env::temp_dir().join(format!("kestrel-cli-schema-{}.json", std::process::id()));
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "n"], "additionalProperties": false}"#,
    )
    .unwrap();
    let (ok, text, _) =
        run(&["--prompt", "JSON", "--json-schema", schema.to_str().unwrap(), "--disable-any-whitespace"]);
    let _ = std::fs::remove_file(&schema);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(ok && ["x", "y"].contains(&v["a"].as_str().unwrap()) && v["n"].as_i64().unwrap() <= 9, "{text}");
    let (ok, _, err) = run(&["--prompt", "x", "--regex", "("]);
    let err = String::from_utf8_lossy(&err);
    assert!(!ok && err.contains("regular expression cannot be used"), "{err}");
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

/// The flags named in the first column of README's "vLLM flags" table.
fn readme_vllm_flags() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section =
        readme.split("\n## vLLM flags\n").nth(1).expect("a vLLM flags section").split("\n## ").next().unwrap();
    let rows = section.lines().filter(|l| l.starts_with("| `"));
    let cells = rows.map(|l| l.split('|').nth(1).unwrap().to_owned());
    cells.flat_map(|c| c.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>()).collect()
}

/// `flag` as a whole word of `text`.
fn names(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(i, _)| {
        let before = text[..i].chars().next_back().is_none_or(|c| c.is_whitespace() || c == '(' || c == ',');
        let after =
            text[i + flag.len()..].chars().next().is_none_or(|c| !(c.is_alphanumeric() || c == '-' || c == '_'));
        before && after
    })
}

#[test]
fn readme_vllm_flags_match_serve_help() {
    let out = kestrel().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let table = readme_vllm_flags();
    assert!(table.len() > 20, "{table:?}");
    for flag in &table {
        assert!(flag.starts_with('-'), "{flag:?} in the table is not a flag");
        assert!(names(&help, flag), "README names {flag}, which `kestrel serve --help` does not");
    }
    // Every vLLM-compat flag is in the table (and so in --help).
    use clap::Args as _;
    let cmd = kestrel::cli::vllm_flags::VllmFlags::augment_args(clap::Command::new("x"));
    let cmd = kestrel::cli::tool_flags::ToolFlags::augment_args(cmd);
    let compat: Vec<String> = cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect();
    assert!(compat.len() >= 14, "{compat:?}");
    // Shared with `generate` (EngineArgs), so not among VllmFlags, but vLLM's.
    assert!(table.iter().any(|f| f == "--mm-processor-kwargs"), "{table:?}");
    assert!(table.iter().any(|f| f == "--media-io-kwargs"), "{table:?}");
    for flag in compat {
        assert!(table.contains(&flag), "{flag} is missing from README's vLLM flags table");
        assert!(names(&help, &flag), "{flag} is missing from `kestrel serve --help`");
    }
}

/// `kestrel serve ARGS` with `env`: it must fail at start; its stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = kestrel()
        .args(["serve", "--device", "cpu", "--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env_remove("KESTREL_IMAGE_FETCH_TIMEOUT")
        .env_remove("VLLM_IMAGE_FETCH_TIMEOUT")
        .env_remove("KESTREL_VIDEO_FETCH_TIMEOUT")
        .env_remove("VLLM_VIDEO_FETCH_TIMEOUT")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refused_vllm_flags_exit_with_the_reason() {
    for (args, why) in [
        (&["--enable-prefix-caching"][..], "no prefix cache"),
        (&["--dtype", "float16"], "bfloat16 end to end"),
        (&["--quantization", "awq"], "bf16/f16/f32 checkpoints only"),
        (&["-tp", "2"], "one GPU per process"),
        (&["--kv-cache-dtype", "fp8"], "activation dtype"),
        (&["--mm-processor-kwargs", r#"{"num_crops": 4}"#], "not a setting of Qwen2-VL's processor"),
        (&["--mm-processor-kwargs", "[4]"], "expected a JSON object"),
        (&["--media-io-kwargs", r#"{"video": {"num_frames": 0}}"#], "num_frames must be an integer > 0, or -1"),
        (&["--media-io-kwargs", r#"{"video": {"video_backend": "opencv"}}"#], "one video decoder"),
    ] {
        let err = refused(args, &[]);
        assert!(err.contains("kestrel serve: ") && err.contains(why), "{args:?}: {err}");
    }
    // A Hub id offline and not in the cache (tests/hub_download.rs downloads).
    let home = std::env::temp_dir().join(format!("kestrel-cli-hf-{}", std::process::id()));
    let cache = home.join("hub");
    let env = [("HF_HOME", home.to_str().unwrap()), ("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let err = refused(&["Qwen/not-in-the-cache", "--revision", "main"], &env);
    assert!(err.contains("kestrel serve: model Qwen/not-in-the-cache is not in the Hugging Face cache"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains(cache.to_str().unwrap()), "{err}");
}

#[test]
fn vllm_image_fetch_timeout_is_read_and_ours_wins() {
    let err = refused(&[], &[("VLLM_IMAGE_FETCH_TIMEOUT", "soon")]);
    assert!(err.contains("VLLM_IMAGE_FETCH_TIMEOUT=\"soon\""), "{err}");
    let err = refused(&[], &[("VLLM_IMAGE_FETCH_TIMEOUT", "5"), ("KESTREL_IMAGE_FETCH_TIMEOUT", "later")]);
    assert!(err.contains("KESTREL_IMAGE_FETCH_TIMEOUT=\"later\""), "{err}");
    // The video fetch timeout is read the same way.
    let err = refused(&[], &[("VLLM_VIDEO_FETCH_TIMEOUT", "0")]);
    assert!(err.contains("VLLM_VIDEO_FETCH_TIMEOUT=\"0\""), "{err}");
    let err = refused(&[], &[("VLLM_VIDEO_FETCH_TIMEOUT", "5"), ("KESTREL_VIDEO_FETCH_TIMEOUT", "-1")]);
    assert!(err.contains("KESTREL_VIDEO_FETCH_TIMEOUT=\"-1\""), "{err}");
}

//! The benchmark harness end to end on the CPU backend and the built-in tiny
//! model: `kestrel bench serve` against a `kestrel serve` started here (and
//! one it launches itself), `bench startup`, `bench decode` and `bench
//! kernels` (which skips without a GPU). Counts are asserted from the
//! `--result-json` files, so the harness's bookkeeping is what is tested.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use kestrel::cli::roofline;
use serde_json::Value;

fn kestrel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kestrel"));
    // Keep the test's model cache out of the user's home.
    c.env("KESTREL_CACHE_DIR", std::env::temp_dir().join(format!("kestrel-bench-test-{}", std::process::id())));
    c.env_remove("KESTREL_API_KEY").env_remove("VLLM_API_KEY");
    c
}

/// A `kestrel serve` on the CPU; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Server {
        let mut child = kestrel()
            .args(["serve", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--workers", "4"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kestrel serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // kestrel: serving NAME on http://127.0.0.1:PORT (device cpu)
        let url = line.split(" on ").nth(1).and_then(|r| r.split(' ').next()).expect("the ready line").to_owned();
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kestrel-bench-{}-{name}", std::process::id()))
}

fn run(args: &[&str]) -> (Output, String) {
    let out = kestrel().args(args).output().expect("run kestrel");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn json(path: &PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the result file")).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn bench_serve_counts_every_request_and_token() {
    let server = Server::start();
    let out_json = tmp("serve.json");
    let (out, stdout) = run(&[
        "bench",
        "serve",
        "--base-url",
        &server.url,
        "--image-size",
        "64x48",
        "--input-len",
        "8",
        "--output-len",
        "5",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--ignore-eos",
        "--result-json",
        out_json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let s = json(&out_json);
    assert_eq!((s["completed"].as_u64(), s["failed"].as_u64()), (Some(6), Some(0)), "{s:#}");
    // ignore_eos: exactly output_len tokens each, by the server's usage.
    assert_eq!(s["total_output_tokens"].as_u64(), Some(30));
    assert!(s["output_lens"].as_array().unwrap().iter().all(|n| n.as_u64() == Some(5)));
    // Each prompt, by the server's usage: 8 words (a token or more each in
    // the tiny vocabulary), the template and the image's 4 placeholders.
    let ins: Vec<u64> = s["input_lens"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert!(ins.len() == 6 && ins.iter().all(|&n| n > 8 + 4), "{ins:?}");
    assert_eq!(s["total_input_tokens"].as_u64(), Some(ins.iter().sum()));
    // Times are ordered per request and the summaries agree with them.
    let (ttfts, e2es) = (s["ttfts_s"].as_array().unwrap(), s["e2els_s"].as_array().unwrap());
    for (t, e) in ttfts.iter().zip(e2es) {
        assert!(f(t) > 0.0 && f(t) <= f(e), "{t} {e}");
    }
    assert!(s["itls_s"].as_array().unwrap().iter().all(|l| l.as_array().unwrap().len() <= 4));
    let mean_e2e = e2es.iter().map(f).sum::<f64>() / 6.0 * 1e3;
    assert!((f(&s["e2el_ms"]["mean"]) - mean_e2e).abs() < 1e-6 * mean_e2e);
    assert!(f(&s["tpot_ms"]["mean"]) > 0.0 && f(&s["ttft_ms"]["p99"]) >= f(&s["ttft_ms"]["median"]));
    let rps = f(&s["request_throughput"]);
    assert!((rps - 6.0 / f(&s["duration_s"])).abs() < 1e-9 * rps);
    assert!(stdout.contains("successful requests:   6"), "{stdout}");
    let _ = std::fs::remove_file(out_json);
}

#[test]
fn bench_serve_honours_the_request_rate() {
    let server = Server::start();
    let out_json = tmp("rate.json");
    let (n, rate, seed) = (5, 20.0, 3);
    let (out, stdout) = run(&[
        "bench",
        "serve",
        "--base-url",
        &server.url,
        "--image-size",
        "0",
        "--input-len",
        "4",
        "--output-len",
        "2",
        "--num-prompts",
        &n.to_string(),
        "--request-rate",
        &rate.to_string(),
        "--seed",
        &seed.to_string(),
        "--result-json",
        out_json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{stdout}");
    let s = json(&out_json);
    assert_eq!(s["completed"].as_u64(), Some(n as u64));
    // The run lasts at least until the last request was due to arrive.
    let last = *kestrel::cli::bench_serve::arrivals(n, rate, seed).last().unwrap();
    assert!(last > 0.05 && f(&s["duration_s"]) >= last, "last arrival {last} s, {s:#}");
    assert_eq!(s["request_rate"].as_f64(), Some(rate));
    let _ = std::fs::remove_file(out_json);
}

#[test]
fn bench_serve_launches_its_server_and_counts_failures() {
    // Prompts longer than --max-model-len: every request is refused (400),
    // counted with its message, and the exit status says so.
    let out_json = tmp("fail.json");
    let (out, stdout) = run(&[
        "bench",
        "serve",
        "--launch",
        "--image-size",
        "0",
        "--input-len",
        "80",
        "--output-len",
        "4",
        "--num-prompts",
        "3",
        "--warmup",
        "0",
        "--result-json",
        out_json.to_str().unwrap(),
        "--",
        "--device",
        "cpu",
        "--workers",
        "2",
        "--max-model-len",
        "32",
    ]);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let s = json(&out_json);
    assert_eq!((s["completed"].as_u64(), s["failed"].as_u64()), (Some(0), Some(3)), "{s:#}");
    // Distinct messages with their counts (here each names its prompt's length).
    let errors = s["errors"].as_array().unwrap();
    assert_eq!(errors.iter().map(|e| e[1].as_u64().unwrap()).sum::<u64>(), 3, "{errors:?}");
    for e in errors {
        let msg = e[0].as_str().unwrap();
        assert!(msg.starts_with("HTTP 400: ") && msg.contains("maximum context length is 32"), "{msg}");
    }
    assert!(stdout.contains("failed requests:       3"), "{stdout}");
    // With the default warm-up request the same failure stops the run at once.
    let (out, _) = run(&[
        "bench",
        "serve",
        "--launch",
        "--image-size",
        "0",
        "--input-len",
        "80",
        "--num-prompts",
        "3",
        "--",
        "--device",
        "cpu",
        "--max-model-len",
        "32",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the warm-up request failed (HTTP 400: "), "{err}");

    // Ceilings without the model folder: refused before any request.
    let (out, _) = run(&["bench", "serve", "--copy-gbps", "3000", "--gemm-tflops", "700"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --model"));

    // The built-in model's folder, served with room and given ceilings: all
    // succeed, and the roofline is the library's for the measured prompts.
    let dir = kestrel::model::builtin::materialize().unwrap();
    let (out, stdout) = run(&[
        "bench",
        "serve",
        "--launch",
        "--model",
        dir.to_str().unwrap(),
        "--image-size",
        "32",
        "--input-len",
        "4",
        "--output-len",
        "3",
        "--num-prompts",
        "2",
        "--ignore-eos",
        "--copy-gbps",
        "3000",
        "--gemm-tflops",
        "700",
        "--result-json",
        out_json.to_str().unwrap(),
        "--",
        "--device",
        "cpu",
        "--workers",
        "2",
    ]);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let s = json(&out_json);
    assert_eq!(s["total_output_tokens"].as_u64(), Some(6));
    let processor = kestrel::model::processor(&dir).unwrap();
    let vision_flops = processor.vision_flops(processor.image_grid(32, 32).unwrap());
    let w = roofline::Workload {
        requests: 2,
        concurrency: 2,
        prompt_tokens: s["total_input_tokens"].as_u64().unwrap() as usize / 2,
        vision_flops,
        output_len: 3,
    };
    let c = roofline::Ceilings { copy_gbps: 3000.0, gemm_tflops: 700.0 };
    let want = roofline::random_mm(&processor.spec().decoder, &w, &c, 2);
    let got = &s["roofline"];
    assert!((f(&got["output_throughput"]) / want.output_tps - 1.0).abs() < 1e-9, "{got}");
    assert!((f(&got["ratio"]) * want.output_tps / f(&s["output_throughput"]) - 1.0).abs() < 1e-9, "{got}");
    assert!(stdout.contains("roofline: "), "{stdout}");
    let _ = std::fs::remove_file(out_json);
}

#[test]
fn bench_startup_times_each_start() {
    let out_json = tmp("startup.json");
    let (out, stdout) = run(&[
        "bench",
        "startup",
        "--repeat",
        "2",
        "--result-json",
        out_json.to_str().unwrap(),
        "--",
        "--device",
        "cpu",
        "--workers",
        "2",
    ]);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let s = json(&out_json);
    let runs = s["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        let (line, health, first) = (f(&r["ready_line_ms"]), f(&r["health_ms"]), f(&r["first_token_ms"]));
        assert!(0.0 < line && line <= health && health <= first && first < 120e3, "{r}");
    }
    let healths: Vec<f64> = runs.iter().map(|r| f(&r["health_ms"])).collect();
    assert!(healths.contains(&f(&s["median_health_ms"])), "{s:#}");
    assert!(stdout.contains("median of 2"), "{stdout}");
    let _ = std::fs::remove_file(out_json);
}

#[test]
fn bench_decode_reports_each_batch_size() {
    let (out, stdout) =
        run(&["bench", "decode", "--device", "cpu", "--batch", "1,3", "--input-len", "6", "--output-len", "48"]);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("not meaningful on the CPU backend"), "{stdout}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 8 && w[0].parse::<usize>().is_ok())
        .collect();
    assert_eq!(rows.iter().map(|w| w[0]).collect::<Vec<_>>(), ["1", "3"], "{stdout}");
    for w in &rows {
        let tps: f64 = w[3].parse().unwrap();
        let ms_step: f64 = w[4].parse().unwrap();
        // tokens/s = batch / seconds per step.
        let b: f64 = w[0].parse().unwrap();
        assert!(tps > 0.0 && (tps - b * 1e3 / ms_step).abs() < 0.01 * tps + 0.2, "{w:?}");
        assert_eq!(w[7], "-");
    }
}

#[test]
fn bench_kernels_without_a_gpu_says_it_skipped() {
    if kestrel::cuda::Gpu::new(0).is_ok() {
        eprintln!("SKIPPED: a GPU is present (tools/gpu_bench.sh runs the benchmark there)");
        return;
    }
    let out_json = tmp("kernels.json");
    let (out, stdout) = run(&["bench", "kernels", "--json", out_json.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(stdout.starts_with("kernel benchmarks skipped: no GPU"), "{stdout}");
    assert!(json(&out_json)["skipped"].as_str().unwrap().starts_with("no GPU"));
    let _ = std::fs::remove_file(out_json);
}

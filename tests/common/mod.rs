//! Helpers shared by integration test files (`mod common;` in each).
#![allow(dead_code)] // each test binary uses its own subset

pub mod fake_hub;
pub mod golden;
pub mod http;
pub mod mp4;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Printed past the test harness's capture, so a skip is always visible.
pub fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The real Qwen tokenizer folder from `KESTREL_QWEN_TOKENIZER_DIR`, or None
/// after printing that `what` was skipped. With
/// `KESTREL_REQUIRE_QWEN_TOKENIZER=1` (CI) a missing folder fails instead.
pub fn qwen_tokenizer_dir(what: &str) -> Option<PathBuf> {
    match std::env::var_os("KESTREL_QWEN_TOKENIZER_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            assert!(
                d.join("tokenizer.json").is_file(),
                "KESTREL_QWEN_TOKENIZER_DIR={} has no tokenizer.json",
                d.display()
            );
            Some(d)
        }
        _ => {
            let require = std::env::var("KESTREL_REQUIRE_QWEN_TOKENIZER").is_ok_and(|v| v == "1");
            let msg = format!(
                "{what}: SKIPPED: KESTREL_QWEN_TOKENIZER_DIR is not set \
                 (export KESTREL_QWEN_TOKENIZER_DIR=$(tools/fetch_qwen_tokenizer.sh))"
            );
            assert!(!require, "{msg}; KESTREL_REQUIRE_QWEN_TOKENIZER=1 makes this a failure");
            notice(&msg);
            None
        }
    }
}

/// Starts the debug `kestrel serve` on the CPU on a free loopback port with
/// `args`, and `env` over an environment without API keys or fault
/// injection. Returns the child (its stdout drained by a thread), its port
/// and its ready line ("kestrel: serving NAME on http://127.0.0.1:PORT ...").
/// Its stderr is the test's.
pub fn spawn_serve(args: &[&str], env: &[(&str, &str)]) -> (Child, u16, String) {
    let (child, port, line, _) = spawn(args, env, false);
    (child, port, line)
}

/// `spawn_serve`, with the server's stderr lines also sent to the returned
/// receiver (and still echoed to the test's stderr).
pub fn spawn_serve_capturing(args: &[&str], env: &[(&str, &str)]) -> (Child, u16, String, mpsc::Receiver<String>) {
    let (child, port, line, rx) = spawn(args, env, true);
    (child, port, line, rx.expect("captured stderr"))
}

fn spawn(args: &[&str], env: &[(&str, &str)], capture: bool) -> (Child, u16, String, Option<mpsc::Receiver<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["serve", "--device", "cpu", "--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env_remove("KESTREL_API_KEY")
        .env_remove("VLLM_API_KEY")
        .env_remove("KESTREL_FAULT")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(if capture { Stdio::piped() } else { Stdio::inherit() })
        .spawn()
        .expect("start kestrel serve");
    let stderr = child.stderr.take().map(|err| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                notice(&line);
                let _ = tx.send(line);
            }
        });
        rx
    });
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).expect("the server's ready line");
    let port = line.split("127.0.0.1:").nth(1).and_then(|r| r.split(' ').next()).and_then(|p| p.parse().ok());
    let port = port.unwrap_or_else(|| panic!("no port in {line:?}"));
    (child, port, line, stderr)
}

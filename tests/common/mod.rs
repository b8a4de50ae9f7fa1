//! Helpers shared by integration test files (`mod common;` in each).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::path::PathBuf;

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

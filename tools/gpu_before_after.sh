#!/usr/bin/env bash
# Qwen2-VL before and after a change, on the same card in the same call:
# the fidelity comparison with HF (tools/compare_hf_logits.py on one random
# checkpoint and one HF reference, both binaries teacher-forced on it) and
# the benchmark figures (`bench decode` at batch 1, 8, 64; `bench serve`:
# idle TTFT of a 512² image + 128 words, random-mm with 64 in flight),
# alternating binaries so drift in the card's clocks hits both alike.
#
#   tools/gpu_before_after.sh OUTDIR [2b|7b]
#
# Needs .device/kestrel (after) and .device/kestrel-base (before), both
# built with the kernels (tools/gpu_suite.sh build; the base from the old
# commit), and .cache/qwen-tokenizer; torch and transformers come with the
# GPU host. STEPS="compare decode serve" picks steps (`ttft` alone runs the
# idle-TTFT half of `serve`). Tables print last.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${1:?usage: tools/gpu_before_after.sh OUTDIR [2b|7b]}"
shape="${2:-2b}"
steps=" ${STEPS:-compare decode serve} "
mkdir -p "$out"
want() { [[ "$steps" == *" $1 "* ]]; }
bins=(base:.device/kestrel-base after:.device/kestrel)
for b in "${bins[@]}"; do [ -x "${b#*:}" ] || { echo "missing ${b#*:}" >&2; exit 1; }; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
m=/tmp/kestrel-random-$shape
if want compare; then
  tok=/tmp/kestrel-qwen-tokenizer
  rm -rf "$tok" && mkdir -p "$tok"
  cp .cache/qwen-tokenizer/tokenizer.json .cache/qwen-tokenizer/tokenizer_config.json "$tok"/
  cp src/model/builtin/tiny-qwen2-vl/chat_template.json "$tok"/
  rm -rf "$m"
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 python3 tools/make_tiny_qwen2vl.py "$m" --config "$shape" --tokenizer "$tok" \
    >"$out/hf-$shape.log" 2>&1 || { echo "HF side failed:"; tail -20 "$out/hf-$shape.log"; exit 1; }
  echo "HF reference: $(( $(date +%s) - t0 )) s"
  for b in "${bins[@]}"; do
    name=${b%%:*} bin=${b#*:}
    "$bin" compare-hf --model "$m" --golden "$m/golden" --out "$m/ours-$name" --device cuda \
      >"$out/kestrel-$name.log" 2>&1 || { echo "$name compare-hf failed"; tail -5 "$out/kestrel-$name.log"; rc=1; continue; }
    python3 tools/compare_hf_logits.py "$m/golden" "$m/ours-$name" --json "$out/compare-$name.json" \
      >"$out/compare-$name.txt" 2>&1 || rc=1
  done
else
  m=$(SHAPE=$shape bash tools/gpu_checkpoint.sh "$out") || exit 1
fi
for round in 1 2; do
  for b in "${bins[@]}"; do
    name=${b%%:*} bin=${b#*:}
    if want decode; then
      "$bin" bench decode --model "$m" --device cuda --batch 1,8,64 --input-len 128 --output-len 128 \
        >"$out/decode-$name-$round.txt" 2>&1 || rc=1
    fi
    if want serve || want ttft; then
      "$bin" bench serve --launch --model "$m" --image-size 512x512 --input-len 128 --output-len 16 \
        --num-prompts 20 --max-concurrency 1 --ignore-eos --result-json "$out/ttft-$name-$round.json" \
        -- --device cuda >"$out/ttft-$name-$round.txt" 2>&1 || rc=1
    fi
    if want serve; then
      "$bin" bench serve --launch --model "$m" --image-size 512x512 --input-len 128 --output-len 128 \
        --num-prompts 192 --max-concurrency 64 --ignore-eos --result-json "$out/mm-$name-$round.json" \
        -- --device cuda >"$out/mm-$name-$round.txt" 2>&1 || rc=1
    fi
  done
  [ "${ROUNDS:-1}" = 1 ] && break
done
echo "== $(cat "$out/gpu.txt")"
for name in base after; do
  if [ -f "$out/compare-$name.txt" ]; then echo "== compare ($name)"; tail -n 8 "$out/compare-$name.txt"; fi
done
for f in "$out"/decode-*.txt; do [ -f "$f" ] && { echo "== $(basename "$f")"; grep -E '^ *[0-9]+ ' "$f" | tail -n 3; }; done
python3 - "$out" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    name = os.path.basename(f)
    if not (name.startswith("ttft-") or name.startswith("mm-")):
        continue
    s = json.load(open(f))
    d = lambda k, q: (s.get(k) or {}).get(q, float("nan"))
    print(f"{name:<18} out tok/s {s['output_throughput']:9.1f}  TTFT mean {d('ttft_ms', 'mean'):8.2f} ms"
          f"  p99 {d('ttft_ms', 'p99'):8.2f}  TPOT mean {d('tpot_ms', 'mean'):6.2f} ms  ITL p99 {d('itl_ms', 'p99'):7.2f}")
PY
exit $rc

#!/usr/bin/env bash
# The whole benchmark harness on the GPU host, each figure beside its
# roofline and the HF transformers baseline of the same run on the same card:
#
#   kernels     `kestrel bench kernels`: the copy and GEMM ceilings, every kernel
#   decode      `kestrel bench decode`, 2B shape, batch 1, 8, 64
#   decode7b    the same on a random 7B-shaped checkpoint (made here, ~16 GB)
#   startup     `kestrel bench startup`: process start to /health and first token
#   serve       `kestrel bench serve --launch`: TTFT of one 512x512 image + 128
#               words on an idle server, then random-mm with 64 in flight
#               (128 in, 128 out, ignore_eos) against its roofline
#   hf          tools/hf_latency.py (TTFT, batch-1 decode; 2B, and 7B when made)
#               and tools/hf_throughput.py at concurrency 64
#
#   tools/gpu_bench.sh OUTDIR              every step
#   STEPS="kernels decode" tools/gpu_bench.sh OUTDIR
#
# Each step's output goes to the screen and OUTDIR/STEP.txt (JSON results
# beside it); a failed step is recorded and the others still run. The last
# lines are the summary: each step, ok or FAILED; the exit status is 1 if any
# failed. The roofline steps use the ceilings of `kernels` when it ran in
# the same call, else measure their own (decode) or leave the ratio out (serve).
#
# Needs .device/kestrel (tools/gpu_suite.sh build) and .cache/qwen-tokenizer,
# carried over; torch and transformers come with the GPU host.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${1:?usage: [STEPS=\"kernels decode decode7b startup serve hf\"] tools/gpu_bench.sh OUTDIR}"
steps=" ${STEPS:-kernels decode decode7b startup serve hf} "
k="$root/.device/kestrel"
mkdir -p "$out"
summary=()
failed=0

want() { [[ "$steps" == *" $1 "* ]]; }

# step NAME COMMAND...: runs COMMAND, output to the screen and OUTDIR/NAME.txt.
step() {
  local name="$1"
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt"
  local rc="${PIPESTATUS[0]}"
  if [ "$rc" = 0 ]; then
    summary+=("$name: ok")
  else
    summary+=("$name: FAILED (exit $rc; $out/$name.txt)")
    failed=1
  fi
}

# A step that could not start; recorded as failed.
skip() {
  summary+=("$1: FAILED ($2)")
  failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -x "$k" ] || { echo "no $k: run tools/gpu_suite.sh build first" >&2; exit 1; }

copy="" gemm=""
if want kernels; then
  step kernels "$k" bench kernels --json "$out/kernels.json"
  if [ -f "$out/kernels.json" ]; then
    read -r copy gemm < <(python3 -c 'import json, sys
c = json.load(open(sys.argv[1])).get("ceilings") or {}
print(c.get("copy_gbps", ""), c.get("gemm_tflops", ""))' "$out/kernels.json") || true
  fi
  # On the GPU host a skipped benchmark (no GPU seen) is a failure.
  [ -n "$copy" ] || skip ceilings "bench kernels measured no ceilings"
fi
copy_flag=() ceil_flags=()
if [ -n "$copy" ] && [ -n "$gemm" ]; then
  copy_flag=(--copy-gbps "$copy")
  ceil_flags=(--copy-gbps "$copy" --gemm-tflops "$gemm")
fi

m=""
if want decode || want startup || want serve || want hf; then
  m=$(bash tools/gpu_checkpoint.sh "$out") || m=""
fi
m7=""
if want decode7b; then
  m7=$(SHAPE=7b bash tools/gpu_checkpoint.sh "$out") || m7=""
fi
model_step() { # model_step NAME MODEL COMMAND...: a step that needs a checkpoint
  local name="$1" model="$2"
  shift 2
  if [ -z "$model" ]; then
    skip "$name" "no checkpoint; see $out/checkpoint-*.log"
  else
    step "$name" "$@"
  fi
}

if want decode; then
  model_step decode-2b "$m" "$k" bench decode --model "$m" --device cuda --batch 1,8,64 \
    --input-len 128 --output-len 128 "${copy_flag[@]}"
fi
if want decode7b; then
  model_step decode-7b "$m7" "$k" bench decode --model "$m7" --device cuda --batch 1,8,64 \
    --input-len 128 --output-len 128 "${copy_flag[@]}"
fi
if want startup; then
  model_step startup "$m" "$k" bench startup --model "$m" --repeat 3 --result-json "$out/startup.json" \
    -- --device cuda
fi
if want serve; then
  # Idle server: one request at a time, so TTFT is one image's prefill.
  model_step serve-ttft "$m" "$k" bench serve --launch --model "$m" --image-size 512x512 --input-len 128 \
    --output-len 16 --num-prompts 20 --max-concurrency 1 --ignore-eos --result-json "$out/serve-ttft.json" \
    -- --device cuda
  model_step serve-random-mm "$m" "$k" bench serve --launch --model "$m" --image-size 512x512 --input-len 128 \
    --output-len 128 --num-prompts 320 --max-concurrency 64 --ignore-eos "${ceil_flags[@]}" \
    --result-json "$out/serve-random-mm.json" -- --device cuda
fi
if want hf; then
  model_step hf-latency-2b "$m" python3 tools/hf_latency.py "$m" --batch 1
  model_step hf-throughput-2b "$m" python3 tools/hf_throughput.py "$m" --concurrency 64
  if want decode7b; then
    model_step hf-latency-7b "$m7" python3 tools/hf_latency.py "$m7" --batch 1
  fi
fi

echo "== summary ($out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$failed"

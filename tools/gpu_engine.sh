#!/usr/bin/env bash
# The serving engine on the GPU host, on a random checkpoint with the
# published Qwen2-VL-2B shape:
#   1. tests/engine_gpu.rs: 64 greedy requests alone, in batches of 16 and all
#      at once; divergences must be near-ties (the table says how many);
#   2. `kestrel bench throughput` at concurrency 1, 8 and 64, one 512x512
#      image and 128 text tokens in, 128 tokens out per request;
#   3. the HF transformers baseline on the same workload, checkpoint and card
#      (tools/hf_throughput.py; HF=0 skips it).
#
#   tools/gpu_engine.sh OUTDIR [CONCURRENCY]
#
# Needs .device/kestrel and .device/engine_gpu (tools/gpu_suite.sh build) and
# the real Qwen tokenizer in .cache/qwen-tokenizer, carried over; torch and
# transformers (for the random checkpoint) come with the GPU host.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:?usage: tools/gpu_engine.sh OUTDIR [CONCURRENCY]}"
conc="${2:-1,8,64}"
mkdir -p "$out"
m=$(bash tools/gpu_checkpoint.sh "$out") || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
KESTREL_REQUIRE_GPU=1 KESTREL_GPU_MODEL="$m" .device/engine_gpu --nocapture --test-threads 1 \
  >"$out/engine_gpu.txt" 2>&1 || rc=1
grep -E "^engine_gpu|^batch|^ +[0-9]+ |test result|panicked" "$out/engine_gpu.txt"
.device/kestrel bench throughput --model "$m" --device cuda --concurrency "$conc" \
  --image-size 512 --input-len 128 --output-len 128 2>&1 | tee "$out/throughput.txt" || rc=1
if [ "${HF:-1}" = 1 ]; then
  python3 tools/hf_throughput.py "$m" --concurrency "$conc" 2>"$out/hf_throughput.err" | tee "$out/hf_throughput.txt" ||
    { tail -5 "$out/hf_throughput.err"; rc=1; }
fi
exit $rc

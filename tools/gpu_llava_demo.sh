#!/usr/bin/env bash
# vLLM's LLaVA example with Kestrel, then its decode benchmark beside HF's,
# on the GPU host:
#
#   tools/gpu_llava_demo.sh OUTDIR [MODEL_DIR]
#
#   generate   kestrel generate --model DIR --image a.png --prompt "..."
#   serve      kestrel serve DIR (no --chat-template: the folder has none, so
#              Kestrel says it uses its built-in LLaVA template), then one chat
#              with the image as a data URL from the official `openai` package
#              when installed (else urllib; tools/chat_image_client.py), plain
#              and streamed; then SIGTERM, and the server must exit 0
#   decode     kestrel bench decode --batch 1,8,64 --input-len 128 --output-len 128
#   hf         tools/hf_latency.py --batch 1 (TTFT and batch-1 decode, HF bf16)
#
# MODEL_DIR defaults to the random llava-1.5-7b-shaped checkpoint
# /tmp/kestrel-random-llava7b (SHAPE=llava7b tools/gpu_checkpoint.sh: made
# unless `KEEP=1 tools/gpu_compare.sh OUTDIR llava7b` left it there). a.png is
# a synthetic 640x480 picture made here with PIL. Needs .device/kestrel
# (tools/gpu_suite.sh build); torch, transformers, pillow on the host.
#
# Environment: DEVICE (cuda; cpu to try the script on a CPU machine),
# KESTREL_BIN (.device/kestrel), STEPS (default "generate serve decode hf"),
# BATCH / INPUT_LEN / OUTPUT_LEN for the decode steps (1,8,64 / 128 / 128),
# KESTREL_WHEELS=DIR (default .device/wheels when there) installs openai from
# wheels there into /tmp/kestrel-openai-venv when the host's python3 lacks it.
# Each step's output goes to the screen and OUTDIR/STEP.txt; the summary
# (each step ok or FAILED) prints last; exit 1 if any failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${1:?usage: tools/gpu_llava_demo.sh OUTDIR [MODEL_DIR]}"
model="${2:-}"
k="${KESTREL_BIN:-$root/.device/kestrel}"
dev="${DEVICE:-cuda}"
steps=" ${STEPS:-generate serve decode hf} "
batch="${BATCH:-1,8,64}" in_len="${INPUT_LEN:-128}" out_len="${OUTPUT_LEN:-128}"
prompt="What is shown in this image?"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary=()
failed=0
want() { [[ "$steps" == *" $1 "* ]]; }
record() { # record NAME RC
  if [ "$2" = 0 ]; then summary+=("$1: ok"); else summary+=("$1: FAILED (exit $2; $out/$1.txt)"); failed=1; fi
}

[ "$dev" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -x "$k" ] || { echo "no $k: run tools/gpu_suite.sh build first (or set KESTREL_BIN)" >&2; exit 1; }
if [ -z "$model" ]; then
  model=$(SHAPE=llava7b DEVICE="$dev" bash tools/gpu_checkpoint.sh "$out") || exit 1
fi
echo "model: $model"

# The picture: sky, sun, hills, a house; PNG, 640x480.
img="$out/a.png"
python3 - "$img" <<'PY' || exit 1
import sys
from PIL import Image, ImageDraw
w, h = 640, 480
im = Image.new("RGB", (w, h))
d = ImageDraw.Draw(im)
for y in range(h):
    d.line([(0, y), (w, y)], fill=(90 + y // 8, 150 + y // 10, 235))
d.ellipse([470, 50, 570, 150], fill=(250, 210, 60))
d.polygon([(0, 330), (200, 250), (420, 320), (640, 260), (640, 480), (0, 480)], fill=(70, 150, 70))
d.rectangle([150, 300, 290, 400], fill=(200, 60, 50))
d.polygon([(140, 300), (220, 240), (300, 300)], fill=(110, 60, 40))
d.rectangle([205, 345, 235, 400], fill=(80, 50, 30))
im.save(sys.argv[1])
PY

if want generate; then
  echo "== generate: kestrel generate --model $model --image a.png --prompt \"$prompt\""
  "$k" generate --model "$model" --image "$img" --prompt "$prompt" --max-tokens 32 --device "$dev" \
    2>&1 | tee "$out/generate.txt"
  record generate "${PIPESTATUS[0]}"
fi

if want serve; then
  echo "== serve: kestrel serve $model --port 0 (no --chat-template)"
  (
    log="$out/serve-server.log"
    "$k" serve "$model" --host 127.0.0.1 --port 0 --device "$dev" >"$log" 2>&1 &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null' EXIT
    port=""
    for _ in $(seq 600); do
      port=$(sed -n 's|^kestrel: serving .* on http://[^:]*:\([0-9]*\) .*|\1|p' "$log")
      [ -n "$port" ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    grep -E "chat template|^kestrel: serving" "$log"
    [ -n "$port" ] || { echo "the server did not start:"; tail -20 "$log"; exit 1; }
    base="http://127.0.0.1:$port"
    python3 - "$base/health" <<'PY' || { echo "no /health"; exit 1; }
import sys, time, urllib.request
for _ in range(120):
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200:
            print("GET /health: 200")
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(1)
PY
    py=python3
    wheels="${KESTREL_WHEELS:-}"
    [ -z "$wheels" ] && [ -d .device/wheels ] && wheels=.device/wheels
    if ! python3 -c "import openai" 2>/dev/null && [ -n "$wheels" ]; then
      venv=/tmp/kestrel-openai-venv
      [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
        --find-links "$wheels" openai && py="$venv/bin/python"
    fi
    "$py" tools/chat_image_client.py "$base" "$img" --prompt "$prompt" --max-tokens 32
    crc=$?
    trap - EXIT
    kill -TERM "$pid"
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "SIGTERM: the server is still running after 60 s"
      kill -KILL "$pid"
      exit 1
    fi
    wait "$pid"
    src=$?
    echo "SIGTERM: server exited with status $src; its last lines:"
    tail -n 2 "$log" | sed 's/^/  /'
    [ "$crc" = 0 ] && [ "$src" = 0 ]
  ) 2>&1 | tee "$out/serve.txt"
  record serve "${PIPESTATUS[0]}"
fi

if want decode; then
  echo "== decode: kestrel bench decode --batch $batch --input-len $in_len --output-len $out_len"
  "$k" bench decode --model "$model" --device "$dev" --batch "$batch" --input-len "$in_len" \
    --output-len "$out_len" 2>&1 | tee "$out/decode.txt"
  record decode "${PIPESTATUS[0]}"
fi

if want hf; then
  echo "== hf: tools/hf_latency.py --batch 1 (HF transformers, bf16)"
  PYTHONUNBUFFERED=1 python3 tools/hf_latency.py "$model" --batch 1 --device "$dev" \
    --input-len "$in_len" --output-len "$out_len" 2>&1 | grep -v -E "^Loading weights|it/s\]$" | tee "$out/hf.txt"
  record hf "${PIPESTATUS[0]}"
fi

echo "== summary ($out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$failed"

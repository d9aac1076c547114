#!/usr/bin/env bash
# One-GPU check, under 5 minutes once set up: BLUR and penalty steps on a ~100M-parameter
# random Llama in bf16 with gradient checkpointing, a few `blurctl run` steps on it, and
# evaluation on the GPU. Prints step time, peak memory (torch.cuda.max_memory_allocated),
# tokens/s and the blur/penalty ratios; OUT_DIR/gpu_check.json keeps them.
#   ./scripts/gpu_check.sh [OUT_DIR]        (default runs/gpu_check)
# Without a GPU it stops at once; the CPU version of the same code:
#   .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [[ ! -x $python ]]; then
  ./scripts/setup.sh
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU is visible to $python (torch.cuda.is_available() is False);" \
       "run it on a GPU machine with a CUDA build of torch" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
timeout 300 "$python" benchmarks/gpu_check.py --device cuda --out "${1:-runs/gpu_check}" || status=$?
if [[ $status -eq 124 ]]; then
  echo "gpu_check: did not finish within 5 minutes" >&2
fi
exit "$status"

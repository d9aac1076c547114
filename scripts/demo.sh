#!/usr/bin/env bash
# Set up (idempotent) and run the embedded default recipe end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/blurctl run recipes/demo.yaml "$@"

#!/usr/bin/env bash
# The main job: 4 CPU ranks save a small Llama-shaped model in parallel and load it back.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-$(mktemp -d)/demo_checkpoint}"
exec .venv/bin/torchrun --standalone --nproc-per-node "${NPROC:-4}" scripts/demo.py "$out"

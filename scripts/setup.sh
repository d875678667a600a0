#!/usr/bin/env bash
# Create .venv (once) with dist_saver and its test extras; torch pinned to the CPU build (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import dist_saver, torch, safetensors, psutil, numpy, xxhash, pytest, xdist, transformers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -c constraints.txt -e '.[test,hf]'
fi

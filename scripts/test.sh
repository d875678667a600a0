#!/usr/bin/env bash
# The whole test suite (installs into .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --durations=10 tests "$@"

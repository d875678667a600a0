#!/usr/bin/env bash
# The demo's shape (save, load, FSDP2 save, destroy, exit) run N times in a row: prints how many runs
# exited cleanly. It aborted at exit about one run in ten before dist_saver destroyed its own gloo
# groups at exit (tests/test_exit.py has the deterministic check of the cause).
# Usage: scripts/stress_demo.sh [N (40)]; NPROC (4) ranks per run. Exit 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
n="${1:-40}"
work="$(mktemp -d)"
clean=0
for i in $(seq 1 "$n"); do
  if .venv/bin/torchrun --standalone --nproc-per-node "${NPROC:-4}" scripts/demo.py "$work/ck" > "$work/run$i.log" 2>&1; then
    clean=$((clean + 1))
  else
    echo "run $i failed:"; grep -v "^W1\|OMP_NUM\|\*\*\*" "$work/run$i.log" | tail -5
  fi
done
echo "clean exits: $clean of $n (NPROC=${NPROC:-4})"
rm -rf "$work"
[ "$clean" -eq "$n" ]

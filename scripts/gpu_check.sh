#!/usr/bin/env bash
# On a one-GPU machine (no registry needed): CUDA tests, the suite on that machine's torch, and the
# GPU save benchmark. Under 5 minutes. Usage: scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
$PY -c "import torch, safetensors; print('torch', torch.__version__, 'safetensors', safetensors.__version__, torch.cuda.get_device_name())"
echo "== CUDA tests"
timeout 120 $PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -5 || status=1
echo "== whole suite on this machine's torch"
timeout 240 $PY -m pytest -q -n 8 tests -p no:cacheprovider -x 2>&1 | tail -8 || status=1
echo "== GPU save benchmark, one process"
timeout 200 $PY benchmarks/bench_gpu_save.py --size-gb "${SIZE_GB:-8}" --dir "${BENCH_DIR:-/tmp/dist_saver_gpu_bench}" \
  --json "$out/gpu_bench.jsonl" 2>&1 | tail -13 || status=1
echo "== GPU save benchmark, ${NPROC:-4} processes sharing the GPU"
timeout 200 $PY -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-4}" benchmarks/bench_gpu_save.py \
  --size-gb "${SIZE_GB:-8}" --repeat 2 --dir "${BENCH_DIR:-/tmp/dist_saver_gpu_bench}" \
  --json "$out/gpu_bench.jsonl" 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*" | tail -13 || status=1
mkdir -p "${BENCH_DIR:-/tmp/dist_saver_gpu_bench}/fsdp"
echo "== FSDP2 save on this machine's CPUs and disk, 2 ranks (the exchange with more cores than CI has)"
timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_save.py \
  --size-gb "${FSDP_GB:-4}" --layout fsdp --repeat 2 --only "raw,dist_save" \
  --dir "${BENCH_DIR:-/tmp/dist_saver_gpu_bench}/fsdp" --json "$out/fsdp_cpu.json" 2>&1 \
  | grep -v "^W1\|OMP_NUM\|\*\*\*" | tail -12 || status=1
exit $status

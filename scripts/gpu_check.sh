#!/usr/bin/env bash
# On a one-GPU machine (no registry needed): the CUDA tests, then N processes sharing the GPU over
# gloo with the checkpoint on tmpfs (the stand-in for a node's fast storage): the sharded save
# benchmark (FSDP2 and TP against a replicated save of the same model and DCP) and the sharded load
# benchmark (TP against DCP loading its own TP checkpoint), then one process loading onto the GPU
# against safetensors' load_file(device="cuda") and fastsafetensors, cold and warm page cache.
# Every step has its own timeout; the whole script stays under 5 minutes.
# Usage: scripts/gpu_check.sh [OUT_DIR]
#   NPROC (8), SIZE_GB (4), BENCH_DIR (/dev/shm); FULL=1 adds the whole suite on that machine's torch,
#   the training-checkpoint, checkpoint-loop and tensor-count benchmarks and the one-process GPU save
#   benchmark (several more minutes). The sharded load rows include dist_load with verify=False: the
#   cost of checking checksums while reading, on that machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
NPROC="${NPROC:-8}" SIZE_GB="${SIZE_GB:-4}" BENCH_DIR="${BENCH_DIR:-/dev/shm}"
status=0
quiet() { grep -v "^W1\|OMP_NUM\|\*\*\*\|^\[W"; }
$PY -c "import torch, safetensors; print('torch', torch.__version__, 'safetensors', safetensors.__version__, torch.cuda.get_device_name())"
echo "== CUDA tests"
timeout 60 $PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -5 || status=1
for layout in fsdp tp; do
  echo "== sharded save: $layout, $NPROC processes sharing the GPU, ${SIZE_GB} GB, $BENCH_DIR"
  timeout 60 $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" benchmarks/bench_sharded_save.py \
    --layout "$layout" --size-gb "$SIZE_GB" --repeat 2 --dir "$BENCH_DIR" --json "$out/sharded_save.jsonl" 2>&1 \
    | quiet | tail -13 || status=1
done
echo "== sharded load: tp, $NPROC processes sharing the GPU, 2 GB, $BENCH_DIR, cold cache"
timeout 70 $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" benchmarks/bench_sharded_load.py \
  --layout tp --size-gb 2 --repeat 2 --dir "$BENCH_DIR" --json "$out/sharded_load.jsonl" 2>&1 | quiet | tail -6 || status=1
echo "== one process onto the GPU: dist_load vs load_file(device=cuda) and fastsafetensors, $BENCH_DIR"
timeout 50 $PY benchmarks/bench_gpu_load.py --size-gb 2 --repeat 2 --dir "$BENCH_DIR" \
  --json "$out/gpu_load.jsonl" 2>&1 | tail -8 || status=1
if [ "${FULL:-0}" = 1 ]; then
  echo "== whole suite on this machine's torch"
  timeout 150 $PY -m pytest -q -n 14 tests -p no:cacheprovider -x 2>&1 | tail -8 || status=1
  echo "== training checkpoint (model + AdamW) vs DCP: $NPROC processes sharing the GPU, $BENCH_DIR"
  timeout 120 $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" benchmarks/bench_train_ckpt.py \
    --size-gb 2 --repeat 2 --dir "$BENCH_DIR" --json "$out/train_ckpt.jsonl" 2>&1 | quiet | tail -8 || status=1
  echo "== checkpoints at intervals: fixed cost, async blocking, training loop with CheckpointManager, $BENCH_DIR"
  timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_checkpoint_loop.py \
    --size-gb 1 --dir "$BENCH_DIR" --json "$out/checkpoint_loop.jsonl" 2>&1 | quiet | tail -16 || status=1
  echo "== cost per tensor: 2 ranks, 10k and 50k tensors, $BENCH_DIR"
  timeout 200 $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_tensor_count.py \
    --counts 10000,50000 --repeat 2 --dir "$BENCH_DIR" --json "$out/tensor_count.jsonl" 2>&1 | quiet | tail -8 || status=1
  echo "== GPU save benchmark, one process (local disk)"
  timeout 200 $PY benchmarks/bench_gpu_save.py --size-gb "${SIZE_GB}" --dir /tmp/dist_saver_gpu_bench \
    --json "$out/gpu_bench.jsonl" 2>&1 | tail -13 || status=1
fi
exit $status

#!/usr/bin/env bash
# Device run of issue 15 on a host of 2 (or 8) GPUs: the service's worker pool and the NCCL
# all-reduce of the self-test's gpus stage (bench/serve_pool_device.py), then bench/bench_multigpu.py (1 GPU vs N: Ulysses, ring; the worker pool) at
# 480p and 720p, one torchrun per size and group of modes (each fits the 10-minute command
# limit; they append to one JSON per GPU count, and compare with the saved one-GPU clip).
# Usage (device tool, carry a wheel folder with diffusers, pydantic, starlette, imageio-ffmpeg,
# ftfy, fa3-fwd, cudnn-frontend, torchao, as WHEELS=.whl/<dir>): bash bench/bench_multigpu.sh [extra bench flags]
set -euo pipefail
OUT="${OUT:-/tmp/bench-multigpu-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl/dev}/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
N="${NGPU:-$(nvidia-smi -L | wc -l)}"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader; nvidia-smi topo -m
  python3 -c "import sys, torch, diffusers; print(sys.version.split()[0], 'torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'diffusers', diffusers.__version__)"
} | tee "$OUT/versions.txt"
# the service's worker pool (one worker per GPU, self-tested each; tiny model) and the
# self-test's NCCL all-reduce across every GPU: $OUT/serve-pool.json, serve-pool-report.json
timeout "${POOL_TIMEOUT:-300}" python3 bench/serve_pool_device.py --out "$OUT" 2>&1 | grep -v -e torchao -e 'Writing model' | tail -8
for size in ${SIZES:-480p 720p}; do
  for modes in ${MODE_GROUPS:-single,single-bf16-attention pool ulysses ring}; do
    timeout "${LAUNCH_TIMEOUT:-560}" python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
      bench/bench_multigpu.py --out "$OUT" --sizes "$size" --modes "$modes" "$@" 2>&1 \
      | grep -v -e torchao -e 'Writing model shards' | tee "$OUT/run-$size-${modes%%,*}.log" | grep '\[bench_multigpu\]' || true
  done
done

#!/usr/bin/env bash
# Device run (issue 14, "Measure"): LightX2V's 4-step Wan 2.2 T2V-A14B NVFP4 imported and
# served by gpubake on one Hopper GPU; bench/bench_lightx2v_clip.py says what is real and
# what is random. Usage (device tool, nvidia-h200, carry the wheels dir, e.g. .whl/p7):
#   WHEELS=.whl/p7 bash bench/bench_lightx2v_clip.sh                    # write, import, all cases (~8 min)
#   WHEELS=.whl/p7 bash bench/bench_lightx2v_clip.sh --reuse --cases 40step-480   # same machine, still warm
# Results in $OUT (bench_lightx2v_clip.json, run.log, versions.txt).
set -euo pipefail
OUT="${OUT:-/tmp/lightx2v-bench-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl/p7}/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench:$PWD/tests" PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  df -h /tmp /dev/shm | tail -2; nproc; free -g | sed -n 2p
} | tee "$OUT/versions.txt"
rc=0
timeout "${BENCH_TIMEOUT:-570}" python3 bench/bench_lightx2v_clip.py --out "$OUT" "$@" 2>"$OUT/run.log" \
  | tee "$OUT/summary.txt" || rc=$?
grep -v -e 'Writing model shards' -e torchao "$OUT/run.log" | tail -30
exit "$rc"

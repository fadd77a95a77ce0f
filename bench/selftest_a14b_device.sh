#!/usr/bin/env bash
# Device run (issue 5): `gpubake selftest` end to end on a full-size random-weight A14B
# NVFP4 checkpoint (bench/selftest_a14b_device.py says what is real and what is not).
# Usage (device tool, carry .whl/p5, or WHEELS=.whl/p7 with fa3-fwd): bash bench/selftest_a14b_device.sh   (results in $OUT)
set -euo pipefail
OUT="${OUT:-/tmp/selftest-a14b-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl/p5}/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  df -h /tmp | tail -1; nproc; free -g | sed -n 2p
} | tee "$OUT/versions.txt"
rm -rf /tmp/a14b
timeout "${A14B_TIMEOUT:-480}" python3 bench/selftest_a14b_device.py --root /tmp/a14b --out "$OUT" "$@" 2>&1 \
  | grep -v -e 'Writing model shards' -e torchao | tee "$OUT/run.log" | tail -60

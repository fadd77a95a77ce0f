#!/usr/bin/env bash
# Device run (issue 18, 2026-12-04): the sparse router against its former self, FlexAttention's
# 64-row tiles with 4 warps plus TMA / stages, and a 480p and 720p block profile with the new
# router (compare with bench/results/profile_qk_rope_*_h200.json). One call, ~6-8 min warm.
# Usage (device tool, carry .whl/dev): bash bench/router_device.sh   (results in $OUT)
set -uo pipefail
OUT="${OUT:-/tmp/router-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/dev/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
V=router-0.1,router-0.1-legacy,router-0.1-b128,router-0.1-b128-legacy,sparse-flex-0.1-b128
V=$V,sparse-flex-0.1-kw4tma,sparse-flex-0.1-kw4s2,sparse-flex-0.1-kw4s4
timeout 250 python3 bench/bench_sparse_attention.py --json-out "$OUT/router_h200.json" --tokens 32760,75600 \
  --variants $V 2>&1 | grep -v Warning | tee "$OUT/router_h200.log"
timeout 140 python3 bench/profile_forward.py --json-out "$OUT/prof_480p_router.json" --size 480p --layers 4 \
  --runtime attention=sparse-flex 2>&1 | grep '^\[' | tee -a "$OUT/profile.log"
timeout 150 python3 bench/profile_forward.py --json-out "$OUT/prof_720p_router.json" --size 720p --layers 4 \
  --runtime attention=sparse-flex,sparse_block_q=128 2>&1 | grep '^\[' | tee -a "$OUT/profile.log"

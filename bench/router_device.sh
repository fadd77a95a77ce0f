#!/usr/bin/env bash
# Device run (issue 18): the sparse router against its former self, FlexAttention's 64-row tiles
# with 4 warps plus TMA / stages, and the 480p block profile with the current router (compare with
# bench/results/profile_qk_rope_480p_h200.json). Each sparse variant compiles for 35-90 s a size
# on an H200 (2026-12-04), so the parts are separate calls on one warm machine:
#   bash bench/router_device.sh routers   # the four router rows at 480p and 720p (~4 min)
#   bash bench/router_device.sh tiles     # 64-token blocks: 4 warps alone, + TMA, 2 and 4 stages, 480p (~5 min)
#   bash bench/router_device.sh profile   # profile_forward at 480p, the LightX2V model's plan (~2 min)
# (device tool, carry .whl/dev; results in $OUT). The 2026-12-04 20:15 call ran all three in one
# (code 5e7d17c) and lost the tiles and the 480p profile to its time limits.
set -uo pipefail
case "${1:-}" in routers|tiles|profile) ;; *) echo "usage: bash bench/router_device.sh routers|tiles|profile" >&2; exit 2 ;; esac
OUT="${OUT:-/tmp/router-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/dev/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
case "${1:-}" in
  routers) timeout 500 python3 bench/bench_sparse_attention.py --json-out "$OUT/router_h200.json" --tokens 32760,75600 \
             --variants router-0.1,router-0.1-legacy,router-0.1-b128,router-0.1-b128-legacy 2>&1 | grep -v Warning \
             | tee "$OUT/router_h200.log" ;;
  tiles) timeout 540 python3 bench/bench_sparse_attention.py --json-out "$OUT/tiles_h200.json" --tokens 32760 \
           --variants sparse-flex-0.1-kw4tma,sparse-flex-0.1-kw4s2,sparse-flex-0.1-kw4s4 2>&1 | grep -v Warning \
           | tee "$OUT/tiles_h200.log" ;;
  profile) timeout 500 python3 bench/profile_forward.py --json-out "$OUT/prof_480p_router.json" --size 480p --layers 4 \
             --runtime attention=sparse-flex 2>&1 | grep '^\[' | tee -a "$OUT/profile.log" ;;
esac

#!/usr/bin/env bash
# Device runs for issue 18, one part a call on one warm H200. Still owed (2026-12-06), in this order:
#   bash bench/issue18_device.sh clip4      # the LightX2V model's 4-step 480p clip with the TMA tiles at its
#                                           # 64-token blocks, eager and compiled decoder (~5 min on a fresh machine)
#   bash bench/issue18_device.sh magcache40 # again, now with fa3-fwd carried: the 2026-12-06 run had no FA3
#                                           # (cuDNN FP8 attention, 4.00 s a guided step against 3.715)
#   bash bench/issue18_device.sh routers    # the router against its former self, 480p and 720p (~4 min)
# Run 2026-12-06 21:45-22:03 UTC (docs/benchmarks.md, "MagCache, the fused norm + quantization, ..."):
#   magcache    MagCache on the 40-step 480p recipe: 8 steps timed, three dials extrapolated (~4 min)
#   magcache40  the authors' defaults and mag:0.06 as whole 40-step clips beside the plain one (~7 min)
#   normquant   the fused norm + FP8 quantization: the kernel alone, then 4-block forwards (~4 min)
#   vae         the compiled decoder with and without the fused VAE norm, 480p (~2 min)
#   tiles       64-token sparse blocks: 4 warps + TMA, 2 and 4 stages, 480p (~1 min)
# (device tool, carry .whl/dev, made by `bash bench/device_wheels.sh`; results in $OUT, each part's unfiltered log beside its filtered
# one). Sparse variants compile for 35-90 s a size on an H200, so each part is its own call.
set -uo pipefail
PARTS="clip4|routers|magcache|magcache40|normquant|vae|tiles"
case "${1:-}" in clip4|routers|magcache|magcache40|normquant|vae|tiles) ;;
  *) echo "usage: bash bench/issue18_device.sh $PARTS" >&2; exit 2 ;; esac
OUT="${OUT:-/tmp/issue18-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/dev/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
case "$1" in
  clip4) timeout 560 python3 bench/bench_clip.py --out "$OUT" --root /tmp/bc --sizes 480p --cases gpubake \
           --recipe lightx2v-4step-t2v --runtime attention=sparse-flex --no-time-bf16 --variant vae_compile=1 \
           --budget-s 540 2>&1 | tee -a "$OUT/full.log" | grep -v -i warn | tee "$OUT/clip4.log" ;;
  normquant)
    timeout 150 python3 bench/bench_norm_quant.py --json-out "$OUT/norm_quant_h200.json" 2>&1 | tee "$OUT/norm_quant_full.log" | grep '^\[' \
      | tee "$OUT/norm_quant_h200.log"
    S=attention=sparse-flex,sparse_block_q=128
    for size in 720p 480p; do
      [ "$size" = 480p ] && S=attention=sparse-flex
      timeout 200 python3 bench/profile_forward.py --json-out "$OUT/prof_${size}_norm_quant.json" --size $size \
        --layers 4 --runtime $S --runtime $S,fuse_norm_quant=1 2>&1 | tee -a "$OUT/profile_full.log" | grep '^\[' | tee -a "$OUT/profile.log"
    done ;;
  vae) timeout 540 python3 bench/bench_vae_decode.py --json-out "$OUT/vae_decode_fused_compiled_h200.json" --sizes 480p \
         --variants eager+pad+fused,compiled+pad,compiled+pad+fused 2>&1 | tee -a "$OUT/full.log" | grep -v -i warn | tee "$OUT/vae.log" ;;
  tiles) timeout 540 python3 bench/bench_sparse_attention.py --json-out "$OUT/tiles_h200.json" --tokens 32760 \
           --variants sparse-flex-0.1-kw4tma,sparse-flex-0.1-kw4s2,sparse-flex-0.1-kw4s4 2>&1 | tee -a "$OUT/full.log" | grep -v Warning \
           | tee "$OUT/tiles_h200.log" ;;
  routers) timeout 500 python3 bench/bench_sparse_attention.py --json-out "$OUT/router_h200.json" --tokens 32760,75600 \
             --variants router-0.1,router-0.1-legacy,router-0.1-b128,router-0.1-b128-legacy 2>&1 | tee -a "$OUT/full.log" | grep -v Warning \
             | tee "$OUT/router_h200.log" ;;
  magcache) timeout 560 python3 bench/bench_clip.py --out "$OUT" --root /tmp/bc --cases gpubake --steps 8 \
              --warmup-steps 4 --no-time-bf16 --variant step_cache=mag:0.04 --variant step_cache=mag:0.06:2:0.4 \
              --variant step_cache=mag:0.06 --budget-s 540 2>&1 | tee -a "$OUT/full.log" | grep -v -i warn | tee "$OUT/magcache.log" ;;
  magcache40) timeout 580 python3 bench/bench_clip.py --out "$OUT" --root /tmp/bc --cases gpubake --steps 40 \
                --warmup-steps 4 --no-time-bf16 --variant step_cache=mag:0.04 --variant step_cache=mag:0.06 --budget-s 570 2>&1 | grep -v -i warn \
                | tee "$OUT/magcache40.log" ;;
esac

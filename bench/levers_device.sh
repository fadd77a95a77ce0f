#!/usr/bin/env bash
# Device run of issue 18's unmeasured per-forward levers, in one or two calls (~6-8 min on a warm H200):
# the one-pass FP8 activation quantizer (kernel sweep, then in the block) and the FFN's GELU
# inside the down-projection's quantization, each against the plan without it in the same
# process (`bench/profile_forward.py`: 4 full-size blocks, compiled, by kernel class).
# Usage (device tool, carry .whl/dev): bash bench/levers_device.sh [720p] [480p]   (results in $OUT)
# Sizes default to both; with sizes named, the kernel sweep runs only when 720p is among them, so
# the work splits into two calls under the device's 10-minute limit on one warm machine.
set -uo pipefail
OUT="${OUT:-/tmp/levers-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/dev/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/versions.txt"

SIZES="${*:-720p 480p}"
# 1. the quantizer alone: two-pass against one-pass at K = 5120 and 13824, bit-exactness checked
case " $SIZES " in *" 720p "*) timeout 150 python3 bench/bench_kernels.py --sweep-only --json "$OUT/kernels_sweep.json" 2>&1 | grep -E "sweep|check" \
  | tee "$OUT/kernels_sweep.log";; esac

# 2. in the block: the 720p 4-step plan (128-token sparse blocks) and the 480p LightX2V plan (64), each
#    plain, with the GELU moved, and (a second process) with the one-pass quantizer under both
S=attention=sparse-flex,sparse_block_q=128
for size in $SIZES; do
  [ "$size" = 480p ] && S=attention=sparse-flex
  timeout 170 python3 bench/profile_forward.py --json-out "$OUT/prof_${size}_gelu.json" --size $size --layers 4 \
    --runtime $S --runtime $S,fuse_ffn_gelu=1 2>&1 | grep '^\[' | tee -a "$OUT/profile.log"
  timeout 170 python3 bench/profile_forward.py --json-out "$OUT/prof_${size}_onepass.json" --size $size --layers 4 \
    --rowwise-one-pass-max-k 16384 --runtime $S --runtime $S,fuse_ffn_gelu=1 2>&1 | grep '^\[' | tee -a "$OUT/profile.log"
done

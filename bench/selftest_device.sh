#!/usr/bin/env bash
# Device run of the boot self-test (issue 5), as the image boots: the start script
# rendered for RunPod starts `gpubake serve`, which self-tests (GPU, kernels, model,
# render, throughput) and then serves; we poll /health from boot to verdict, run two
# jobs, then a --sustained 3 CLI self-test, then one full-size A14B expert step.
# Usage (device tool, carry .whl/p5): bash bench/selftest_device.sh   (results in $OUT)
set -euo pipefail
OUT="${OUT:-/tmp/selftest-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/p5/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -c "import sys; sys.argv[0] = \\"gpubake\\"; from gpubake.cli import main; main()" "$@"\n' > /tmp/bin/gpubake
chmod +x /tmp/bin/gpubake
export PATH="/tmp/bin:$PATH"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, diffusers, imageio_ffmpeg; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'imageio-ffmpeg', imageio_ffmpeg.__version__)"
} | tee "$OUT/versions.txt"

# The tiny checkpoint, quantized, as the demo image bakes it (CPU work, not timed here).
python3 - <<'PY'
from pathlib import Path
from gpubake.provisioning.tiny import make_tiny
from gpubake.provisioning.quantize import quantize_checkpoint
make_tiny(Path("/tmp/tiny-bf16"))
quantize_checkpoint(Path("/tmp/tiny-bf16"), Path("/tmp/tiny-nvfp4"), policy="default", progress=False)
PY

# A GPU image spec (the Hopper/Ada one: CUDA 13.0, sm_89/sm_90) carrying the tiny model.
mkdir -p /tmp/spec/locks
cp src/gpubake/images/catalog/locks/wan22-cu130.txt /tmp/spec/locks/
sed -e 's/^name = .*/name = "h100-tiny"/' -e 's/^id = "wan2.2-t2v-a14b"/id = "tiny-wan2.2"/' \
  src/gpubake/images/catalog/wan22-t2v-a14b-nvfp4-hopper.toml > /tmp/spec/h100-tiny.toml
python3 -c "
from gpubake.images.catalog import find; from gpubake.images.render import render_template
open('/tmp/start.sh', 'w').write(render_template('start.sh.j2', {'spec': find('/tmp/spec/h100-tiny.toml'), 'target': 'runpod'}))"

# Boot: start script -> serve (self-test first) ; poll /health until the verdict.
export GPUBAKE_IMAGE=/tmp/spec/h100-tiny.toml GPUBAKE_MODEL_DIR=/tmp/tiny-nvfp4 GPUBAKE_WORKSPACE=/tmp/ws GPUBAKE_ETC=/tmp/etc
boot=$(date +%s.%N)
GPUBAKE_BOOT_EPOCH=$boot bash /tmp/start.sh > "$OUT/boot.log" 2>&1 &
python3 bench/selftest_poll.py --boot "$boot" --out "$OUT" || true
kill %1 2>/dev/null || true; wait 2>/dev/null || true
cp /tmp/ws/gpubake/selftest.json "$OUT/selftest-boot.json" || true

# Sustained: three timed renders, spread reported.
gpubake selftest --spec /tmp/spec/h100-tiny.toml --model-dir /tmp/tiny-nvfp4 --quick --sustained 3 \
  --report "$OUT/selftest-sustained.json" > /dev/null 2> "$OUT/sustained.log" || true
tail -8 "$OUT/sustained.log"

# One full-size A14B expert: a denoising step at the self-test's clip size, BF16 vs NVFP4.
timeout 240 python3 bench/selftest_a14b_step.py --json-out "$OUT/a14b-step.json" 2>&1 | tail -40 || true

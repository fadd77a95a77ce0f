#!/usr/bin/env bash
# Device run (issue 17, item 9): boot to self-test verdict with the full-size A14B
# (random weights, bench/selftest_a14b_device.py) on local disk, `--quick` hashing, each
# boot after `sync; echo 3 > /proc/sys/vm/drop_caches` (the weights come from disk, as on a
# fresh boot), GPUBAKE_HOME on a "volume" folder as start.sh sets it:
#   first:       the volume's first boot: compile caches empty, the defaults (read-ahead off)
#   later:       a later boot of the same volume: compile caches there, the defaults
#   later-old:   the same with the three boot levers off (GPUBAKE_LOAD_OVERLAP=off GPUBAKE_LOAD_DIRECT=off
#                GPUBAKE_PREIMPORT=off): the loader before 2026-12-01 17:40, the peer of `later`
#   later-nopreimport: the same with only GPUBAKE_PREIMPORT=off (the one lever the run of
#                2026-12-01 17:22 measured only together with the others)
# (The run of 2026-12-01 17:22 at 274264e ran later-overlap, later-direct and later-all, the levers
# then off by default: 57.9, 55.1 and 53.4 s against 59.8; all three are on by default since.)
# (The run of 2026-12-01 14:55 at 419499a ran `later-threads8`, GPUBAKE_LOAD_THREADS=8 when 1 was
# the default: 68.3 s against 72.4; 8 is the default since.)
# (The run of 2026-12-01 12:11 at f030fcd ran a third boot `later-noread`, GPUBAKE_PREFETCH=off,
# when the read-ahead was on by default; it did not win and is off now.)
# (Before 2026-12-01 12:30 this script ran a page-cache-warm then a cold boot with torch's
# default /tmp caches; that run's numbers are in docs/benchmarks.md with its commit.)
# Usage (device tool, carry .whl/dev): bash bench/boot_a14b_device.sh   (results in $OUT)
# A CPU smoke test of this script (tiny model, no cache dropping): TINY=1 PY=.venv/bin/python bash bench/boot_a14b_device.sh
set -euo pipefail
OUT="${OUT:-/tmp/boot-a14b-out}"; mkdir -p "$OUT"
PY="${PY:-python3}"
ROOT="${ROOT:-/tmp/a14b}"      # the checkpoint (and, with TINY, its spec)
VOLUME="${VOLUME:-/tmp/volume}" # stands in for /workspace: GPUBAKE_HOME and the compile caches
if [ -n "${TINY:-}" ]; then
  write=(--tiny); where=(--spec "$ROOT/spec/wan22-t2v-a14b-nvfp4-hopper.toml")
  python3() { "$PY" "$@"; }
  nvidia-smi() { echo "no GPU (TINY)"; }
else
  write=(); where=(--image wan22-t2v-a14b-nvfp4-hopper)
  # the image's packages only: torchao (carried for bench_clip's peer stack) is not in the GPU
  # images' lock, and diffusers and transformers import it at startup when it is installed (the
  # boots of 2026-12-01 ran with it: their imports include it)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls ${WHEELS:-.whl/dev}/*.whl | grep -v '/torchao-')
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; git log -1 --format=%h 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  df -h /tmp | tail -1; nproc; free -g | sed -n 2p
} | tee "$OUT/versions.txt"
rm -rf "$ROOT" "$VOLUME"
timeout "${A14B_TIMEOUT:-300}" "$PY" bench/selftest_a14b_device.py --root "$ROOT" --out "$OUT/write" --write-only "${write[@]}" 2>&1 \
  | grep -v -e 'Writing model shards' -e torchao | tail -4
unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
export GPUBAKE_HOME="$VOLUME/gpubake"; mkdir -p "$GPUBAKE_HOME"

boot() {  # NAME [VAR=VALUE ...]
  local name=$1; shift
  sync
  if [ -n "${TINY:-}" ]; then cache="kept (TINY)"
  elif echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cache=dropped; else cache="not dropped (refused)"; fi
  mkdir -p "$OUT/$name"
  local start end rc
  start=$(date +%s.%N)
  set +e
  env "$@" "$PY" -m gpubake selftest "${where[@]}" --model-dir "$ROOT/model" \
    --report "$OUT/$name/selftest-a14b.json" --json --quick > "$OUT/$name/selftest.stdout" 2> "$OUT/$name/selftest.stderr"
  rc=$?
  set -e
  end=$(date +%s.%N)
  tail -3 "$OUT/$name/selftest.stderr"
  python3 - "$name" "$start" "$end" "$rc" "$cache" "$OUT" "$*" <<'PY'
import json, sys
from pathlib import Path
name, start, end, rc, cache, out, env = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
path = Path(out) / "boot.json"
summary = json.loads(path.read_text()) if path.exists() else {"write": json.load(open(f"{out}/write/phases.json"))}
report = json.load(open(f"{out}/{name}/selftest-a14b.json"))
render = next((s for s in report.get("stages", []) if s["name"] == "render"), {}).get("values", {})
summary[name] = {"wall_s": round(end - start, 2), "exit": rc, "page_cache": cache, "env": env,
                 "verdict": report.get("verdict"),
                 "stage_seconds": {s["name"]: s["seconds"] for s in report.get("stages", [])},
                 "load_seconds": render.get("load_seconds"), "warmup_seconds": render.get("warmup_seconds"),
                 "load_phases": (render.get("runtime") or {}).get("load_seconds"),
                 "clip_seconds": (render.get("runs") or [{}])[0].get("total_seconds"),
                 "prefetch": render.get("prefetch"), "preimport": render.get("preimport"), "compile_cache": render.get("compile_cache")}
path.write_text(json.dumps(summary, indent=2))
print(name, json.dumps(summary[name]))
PY
}
boot first
boot later
boot later-old GPUBAKE_LOAD_OVERLAP=off GPUBAKE_LOAD_DIRECT=off GPUBAKE_PREIMPORT=off
boot later-nopreimport GPUBAKE_PREIMPORT=off
du -sh "$VOLUME"/gpubake/compile-cache/* | tee -a "$OUT/versions.txt"

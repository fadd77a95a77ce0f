#!/usr/bin/env bash
# Device run (issue 17, item 9): boot to self-test verdict with the full-size A14B
# (random weights, bench/selftest_a14b_device.py) on local disk, `--quick` hashing.
#   warm: the self-test right after the checkpoint was written (its files in the page cache)
#   cold: the same self-test after `sync; echo 3 > /proc/sys/vm/drop_caches` (a fresh boot
#         reads the weights from disk), when the machine lets root drop the caches
# Usage (device tool, carry .whl/dev): bash bench/boot_a14b_device.sh   (results in $OUT)
set -euo pipefail
OUT="${OUT:-/tmp/boot-a14b-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl/dev}/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; git log -1 --format=%h 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  df -h /tmp | tail -1; nproc; free -g | sed -n 2p
} | tee "$OUT/versions.txt"
rm -rf /tmp/a14b
timeout "${A14B_TIMEOUT:-420}" python3 bench/selftest_a14b_device.py --root /tmp/a14b --out "$OUT/warm" --quick 2>&1 \
  | grep -v -e 'Writing model shards' -e torchao | tail -25
sync
if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cache=dropped; else cache="not dropped (refused)"; fi
mkdir -p "$OUT/cold"
start=$(date +%s.%N)
set +e
python3 -m gpubake selftest --image wan22-t2v-a14b-nvfp4-hopper --model-dir /tmp/a14b/model \
  --report "$OUT/cold/selftest-a14b.json" --json --quick > "$OUT/cold/selftest.stdout" 2> "$OUT/cold/selftest.stderr"
rc=$?
set -e
end=$(date +%s.%N)
tail -12 "$OUT/cold/selftest.stderr"
python3 - "$start" "$end" "$rc" "$cache" "$OUT" <<'EOF'
import json, sys
start, end, rc, cache, out = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
warm = json.load(open(f"{out}/warm/phases.json"))
report = json.load(open(f"{out}/cold/selftest-a14b.json"))
summary = {"warm_selftest_wall_s": warm["selftest_wall"], "warm_exit": warm["selftest_exit_code"],
           "cold_selftest_wall_s": round(end - start, 2), "cold_exit": rc, "page_cache": cache,
           "cold_verdict": report.get("verdict"),
           "cold_stage_seconds": {s["name"]: s["seconds"] for s in report.get("stages", [])}}
json.dump(summary, open(f"{out}/boot.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF

#!/usr/bin/env bash
# The wheels the device scripts carry (`.whl/dev`, ignored by git): what the lent GPU machine's
# Python 3.12 lacks for bench_clip.py and the issue 18 parts. Its torch, triton and CUDA are the
# machine's own. The device tool carries at most 64 MiB, so the two large wheels are repacked with
# LZMA. The installed files are the same bytes, since a wheel's RECORD hashes its files and not
# the zip; pip reads LZMA entries.
#   bash bench/device_wheels.sh [DEST]   (default .whl/dev; needs PyPI)
set -euo pipefail
DEST="${1:-.whl/dev}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
PINS=(diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
      typing-extensions==4.16.0 ftfy wcwidth nvidia-cudnn-frontend==1.16.0 starlette imageio-ffmpeg==0.5.1
      fa3-fwd==0.0.3)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform any \
  -d "$DEST" "${PINS[@]}"
"$PY" - "$DEST" <<'EOF'
import os, sys, tempfile, zipfile
dest = sys.argv[1]
for name in sorted(os.listdir(dest)):
    if not (name.startswith(("fa3_fwd-", "imageio_ffmpeg-")) and name.endswith(".whl")):
        continue
    path = os.path.join(dest, name)
    with zipfile.ZipFile(path) as zi:
        if all(i.compress_type == zipfile.ZIP_LZMA for i in zi.infolist()):
            continue
        fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zo:
            for info in zi.infolist():
                out = zipfile.ZipInfo(info.filename, info.date_time)
                out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_LZMA
                zo.writestr(out, zi.read(info))
    before = os.path.getsize(path)
    os.replace(tmp, path)
    print(f"{name}: {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB (LZMA)")
EOF
du -sh "$DEST"

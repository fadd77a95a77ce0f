#!/usr/bin/env bash
# Regenerate the demo image's lock (src/gpubake/images/catalog/locks/demo.txt) from demo.in:
# every requirement pinned with ==, every file with --hash, for Python 3.11 on x86_64 Linux.
#
# torch==2.13.0+cpu comes from a local wheel folder (default: /opt/wheels, this project's
# CI machines have it; elsewhere point TORCH_WHEELS at a folder holding the CPU wheel from
# https://download.pytorch.org/whl/cpu -- its hash is the same file's). Everything else
# resolves on PyPI. The lock names no index or folder: at build time the builder hands the
# host's pip index configuration to the build (docs/building.md), pip checks the hashes.
#
# Uses uv (installed into a throwaway venv when missing); pass extra uv flags after the
# script name, e.g. `scripts/lock-demo.sh --upgrade-package transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCKS=src/gpubake/images/catalog/locks
WHEELS="${TORCH_WHEELS:-/opt/wheels}"
UV="${UV:-$(command -v uv || true)}"
if [ -z "$UV" ]; then
  venv="${TMPDIR:-/tmp}/gpubake-uv"
  [ -x "$venv/bin/uv" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q "uv>=0.5"; }
  UV="$venv/bin/uv"
fi
cd "$LOCKS"
# --no-config / --no-emit-find-links: the lock must not depend on this machine's paths.
"$UV" pip compile demo.in --output-file demo.txt --generate-hashes --no-config \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --index-url https://pypi.org/simple --find-links "$WHEELS" --no-emit-find-links \
  --custom-compile-command "scripts/lock-demo.sh" "$@"

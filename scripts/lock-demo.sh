#!/usr/bin/env bash
# Regenerate the demo image's lock (src/gpubake/images/catalog/locks/demo.txt) from demo.in:
# every requirement pinned with ==, every file with --hash, for Python 3.11 on x86_64 Linux.
#
# Sources, named in the lock itself so that pip finds every file on a fresh machine:
#   --index-url https://pypi.org/simple                  everything but torch
#   --extra-index-url https://download.pytorch.org/whl/cpu  torch==2.13.0+cpu (PyTorch's CPU
#                                                         build: a local version, which PyPI never holds)
# The hashes pin the files, so it does not matter which index serves one. A machine with a
# local wheel folder (pip's find-links, as on this project's CI, which cannot reach
# download.pytorch.org) installs the same files: its copy of the CPU wheel is the same file,
# same hash (tests/images/test_lock_sources.py checks it where the folder exists).
#
# Resolution: with TORCH_WHEELS (default /opt/wheels) holding the CPU wheel, uv reads it
# there; otherwise from PyTorch's CPU index (uv then needs --index-strategy
# unsafe-best-match, because PyPI also has a torch 2.13.0, without +cpu).
#
# Uses uv (installed into a throwaway venv when missing); pass extra uv flags after the
# script name, e.g. `scripts/lock-demo.sh --upgrade-package transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCKS=src/gpubake/images/catalog/locks
PYPI=https://pypi.org/simple
TORCH_INDEX=https://download.pytorch.org/whl/cpu
WHEELS="${TORCH_WHEELS:-/opt/wheels}"
UV="${UV:-$(command -v uv || true)}"
if [ -z "$UV" ]; then
  venv="${TMPDIR:-/tmp}/gpubake-uv"
  [ -x "$venv/bin/uv" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q "uv>=0.5"; }
  UV="$venv/bin/uv"
fi
cd "$LOCKS"
if compgen -G "$WHEELS/torch-*+cpu-*.whl" >/dev/null; then
  sources=(--find-links "$WHEELS" --no-emit-find-links)
else
  sources=(--extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match)
fi
# --no-config: the lock must not depend on this machine's pip/uv configuration or paths.
"$UV" pip compile demo.in --output-file demo.txt --generate-hashes --no-config \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --index-url "$PYPI" "${sources[@]}" --no-emit-index-url \
  --custom-compile-command "scripts/lock-demo.sh" "$@"
# The sources every pinned file comes from, right after uv's header (pip reads these lines).
python3 - "$PYPI" "$TORCH_INDEX" <<'EOF'
import sys
from pathlib import Path

pypi, torch_index = sys.argv[1:]
path = Path("demo.txt")
lines = [l for l in path.read_text().splitlines() if not l.startswith(("--index-url", "--extra-index-url"))]
head = 0
while head < len(lines) and lines[head].startswith("#"):
    head += 1
lines[head:head] = [f"--index-url {pypi}", f"--extra-index-url {torch_index}", ""]
path.write_text("\n".join(lines) + "\n")
EOF

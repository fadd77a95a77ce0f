#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the suite builds real images under $TMPDIR: about 9 GiB there at its peak (measured 2026-12-01)
free_gib=$(df -Pk "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR==2 {print int($4 / 1048576)}' || true)
if [ -n "${free_gib:-}" ] && [ "$free_gib" -lt 10 ]; then
  echo "test: warning: ${free_gib} GiB free under ${TMPDIR:-/tmp}; the image-building tests need about 9 GiB" >&2
fi
export TRITON_INTERPRET=1   # Triton kernels run on the CPU through Triton's interpreter
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"

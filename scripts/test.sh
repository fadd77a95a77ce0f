#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1   # Triton kernels run on the CPU through Triton's interpreter
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"

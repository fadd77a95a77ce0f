#!/usr/bin/env bash
# Set up and build the default (offline demo) image for RunPod, printing its JSON result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/build-image --target "${1:-runpod}" --json

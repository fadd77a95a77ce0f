#!/bin/sh
# Step 20: the virtualenv $PREFIX/venv from the spec's lock. --require-hashes checks
# every file; --no-deps because the lock is complete (uv / pip-compile output), so
# nothing unpinned sneaks in; wheels only, so no compiler output varies between builds.
. "$(dirname "$0")/00-env.sh"

LOCK=requirements.lock.txt
[ -f "$LOCK" ] || die "$LOCK not found in $(pwd)"
"$PY" -m venv "$VENV"
# The buildah/docker builders download the locked wheels on the host (pip download,
# hash-checked) and mount them read-only at $WHEELS: the build then needs no network and
# no host path. Without that mount (Packer, a plain VM) pip uses its configured index.
WHEELS=/tmp/gpubake-wheels
if [ -d "$WHEELS" ] && [ -n "$(ls -A "$WHEELS" 2>/dev/null)" ]; then
  set -- --no-index --find-links "$WHEELS"
else
  set --
fi
"$VENV/bin/python" -m pip install "$@" --require-hashes --no-deps --only-binary=:all: -r "$LOCK"
scrub

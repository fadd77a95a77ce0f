#!/bin/sh
# Step 30: gpubake itself, from its wheel: the renderer builds it from the repository's
# tracked files, so nothing else of the source tree (a stray .env, .git/) reaches the
# image. Installed with --no-deps --no-index (its dependencies are all in the lock) into
# $PREFIX/venv; pip writes the `gpubake` command there and compiles hash-checked .pyc
# files (SOURCE_DATE_EPOCH). Then, for Packer, the image's facts (image.json at $PREFIX, which the boot self-test
# and the service read: gpubake/provisioning/facts.py) and the start script (the
# Containerfile COPYs those two itself).
#
# Arguments: WHEEL [SHA256]. The Containerfile passes the wheel, bind-mounted read-only
# (so no copy of it stays in a layer), and its sha256, checked here; without arguments
# (Packer) the one app/gpubake-*.whl of the uploaded context.
. "$(dirname "$0")/00-env.sh"

[ -x "$VENV/bin/python" ] || die "$VENV is missing (step 20 did not run)"
if [ "$#" -ge 1 ]; then
  WHEEL="$1"
  SHA256="${2:-}"
else
  SHA256=""
  set -- app/gpubake-*.whl
  [ "$#" -eq 1 ] || die "expected exactly one app/gpubake-*.whl in $(pwd), found: $*"
  WHEEL="$1"
fi
[ -f "$WHEEL" ] || die "$WHEEL not found in $(pwd)"
if [ -n "$SHA256" ]; then
  echo "$SHA256  $WHEEL" | sha256sum -c --status - || die "$WHEEL does not match its sha256 $SHA256"
fi
"$VENV/bin/python" -m pip install --no-deps --no-index --no-cache-dir "$WHEEL"
link_launcher
for f in image.json start.sh; do
  if [ -f "$f" ] && [ "$(cd "$(dirname "$f")" && pwd)/$f" != "$PREFIX/$f" ]; then
    cp "$f" "$PREFIX/$f"
  fi
done
[ ! -f "$PREFIX/start.sh" ] || chmod 0755 "$PREFIX/start.sh"
"$VENV/bin/python" -c 'import gpubake, gpubake.cli' || die "gpubake does not import in $VENV"
scrub

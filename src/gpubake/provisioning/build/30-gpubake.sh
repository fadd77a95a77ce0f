#!/bin/sh
# Step 30 (Packer; the Containerfile COPYs these files instead, then needs no RUN):
# gpubake itself, the image's facts (image.json at $PREFIX, which the boot self-test and the
# service read: gpubake/provisioning/facts.py) and the start script. gpubake is pure Python and
# its dependencies are in the lock: the package tree (app/gpubake in the context) goes to
# $PREFIX/app, which step 20's .pth file puts on the venv's path.
. "$(dirname "$0")/00-env.sh"

[ -d app/gpubake ] || die "app/gpubake not found in $(pwd)"
[ -x "$VENV/bin/python" ] || die "$VENV is missing (step 20 did not run)"
if [ "$(cd app && pwd)" != "$PREFIX/app" ]; then
  rm -rf "$PREFIX/app" && mkdir -p "$PREFIX" && cp -R app "$PREFIX/app"
fi
install_launcher
# Compile gpubake's own modules like pip compiled the lock's (hash-checked .pyc).
"$VENV/bin/python" -m compileall -q --invalidation-mode checked-hash "$PREFIX/app" >/dev/null
for f in image.json start.sh; do
  if [ -f "$f" ] && [ "$(cd "$(dirname "$f")" && pwd)/$f" != "$PREFIX/$f" ]; then
    cp "$f" "$PREFIX/$f"
  fi
done
[ ! -f "$PREFIX/start.sh" ] || chmod 0755 "$PREFIX/start.sh"
"$VENV/bin/python" -c 'import gpubake, gpubake.cli' || die "gpubake does not import in $VENV"
scrub

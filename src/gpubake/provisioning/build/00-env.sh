#!/bin/sh
# Step 00: the settings every later step sources; run alone it prints them (a build log
# then shows which prefix, Python and epoch the image was built with).
#
# The steps install gpubake into an image and have exactly two callers:
#   - the Containerfile (buildah / docker): one RUN per step, so each step is one layer,
#     run from /opt/gpubake/build where the step's inputs were COPY'd (same relative names
#     as in the build context, so COPY content hashes drive the layer cache);
#   - the Packer template: one shell provisioner runs every step in name order from the
#     uploaded build context.
# Inputs: the build context (relative paths), GPUBAKE_PYTHON (e.g. 3.11), GPUBAKE_PREFIX,
# SOURCE_DATE_EPOCH. Nothing secret: pip's index configuration comes from the builder
# (a read-only /etc/pip.conf mount), never from a layer.
set -eu

PREFIX="${GPUBAKE_PREFIX:-/opt/gpubake}"
VENV="$PREFIX/venv"
PY="python${GPUBAKE_PYTHON:-3}"
: "${SOURCE_DATE_EPOCH:=0}"
# With SOURCE_DATE_EPOCH set, py_compile writes hash-checked .pyc files (no mtimes): pip's
# compiled output is then reproducible.
export SOURCE_DATE_EPOCH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1
unset PYTHONDONTWRITEBYTECODE

die() { echo "gpubake-build: $*" >&2; exit 2; }

# Remove what a step leaves behind that is not image content (and differs per build).
scrub() {
  rm -rf /root/.cache 2>/dev/null || true
  find /tmp /var/tmp -mindepth 1 -maxdepth 1 ! -name 'gpubake-*' -exec rm -rf {} + 2>/dev/null || true
  find /var/log -type f -exec truncate -s 0 {} + 2>/dev/null || true
  rm -f /var/cache/ldconfig/aux-cache /var/lib/dpkg/*-old /var/cache/debconf/*-old
  # SSH host keys are per instance: the start script makes them at boot (ssh-keygen -A).
  rm -f /etc/ssh/ssh_host_*
}

# The `gpubake` command on every PATH (SSH sessions included): pip wrote it into the venv
# when step 30 installed gpubake's wheel.
link_launcher() {
  [ -x "$VENV/bin/gpubake" ] || die "$VENV/bin/gpubake is missing (gpubake's wheel not installed)"
  ln -sf "$VENV/bin/gpubake" /usr/local/bin/gpubake
}

if [ "$(basename "$0")" = "00-env.sh" ]; then
  echo "gpubake-build: prefix=$PREFIX python=$PY SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"
fi

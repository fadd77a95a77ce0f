#!/bin/sh
# Step 10: python$GPUBAKE_PYTHON with venv and CA certificates, from apt when the base
# lacks them (a bootstrap base already has them: then this step changes nothing), and
# openssh-server whenever the base has no sshd, Python or not, because RunPod's PUBLIC_KEY
# and Vast.ai's SSH launch mode expect an sshd in the image (its host keys are removed
# here and made at boot).
. "$(dirname "$0")/00-env.sh"

need=""
if ! { command -v "$PY" >/dev/null 2>&1 && "$PY" -c 'import ensurepip, venv, ssl' 2>/dev/null \
   && [ -s /etc/ssl/certs/ca-certificates.crt ]; }; then
  need="$PY $PY-venv ca-certificates"
fi
# sshd also when the base already has Python (CUDA bases with Python do): without it such
# an image could never be reached over SSH
command -v sshd >/dev/null 2>&1 || need="${need:+$need }openssh-server"
if [ -z "$need" ]; then
  echo "gpubake-build: $PY with venv and CA certificates, and sshd, present; no system packages to add"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "this base lacks $need and has no apt-get to install them"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # $need: package names, split on purpose
apt-get install -y -qq --no-install-recommends $need
apt-get clean
rm -rf /var/lib/apt/lists/*
scrub

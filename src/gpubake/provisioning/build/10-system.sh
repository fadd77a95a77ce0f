#!/bin/sh
# Step 10: python$GPUBAKE_PYTHON with venv and CA certificates, from apt when the base
# lacks them (a bootstrap base already has them: then this step changes nothing), and
# openssh-server with them, because RunPod's PUBLIC_KEY and Vast.ai's SSH launch mode
# expect an sshd in the image (its host keys are removed here and made at boot).
. "$(dirname "$0")/00-env.sh"

if command -v "$PY" >/dev/null 2>&1 && "$PY" -c 'import ensurepip, venv, ssl' 2>/dev/null \
   && [ -s /etc/ssl/certs/ca-certificates.crt ]; then
  echo "gpubake-build: $PY with venv and CA certificates present; no system packages to add"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "$PY is missing and this base has no apt-get to install it"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$PY" "$PY-venv" ca-certificates openssh-server
apt-get clean
rm -rf /var/lib/apt/lists/*
scrub

#!/usr/bin/env bash
# Set up a fresh machine for gpubake: system packages (image builders, a registry,
# sshd for remote tests) and a virtualenv in .venv with gpubake and its extras.
# Idempotent: a second run only checks. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  buildah skopeo            # daemonless OCI builds (chroot isolation, vfs storage)
  packer                    # Packer 1.6.6 (Debian): `packer validate` of our HCL2 template
  docker-registry           # a real OCI registry on loopback for push tests
  apache2-utils             # htpasswd, for the registry's auth file
  debootstrap               # the offline `bootstrap` base image
  zstd                      # tests read the zstd-compressed layers of built images
  openssh-server openssh-client  # a real SSH peer for fabric tests
  git ca-certificates
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian registry package starts a service on :5000 where systemd runs; tests start
# their own on a free port, so nothing here depends on it.

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.gpubake-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first, pinned to the CPU build (+cpu): an unpinned torch from PyPI is the CUDA
  # build, gigabytes more. PyTorch publishes it on its CPU index, not on PyPI; a machine with
  # the wheel in a local folder (pip's find-links, as on this project's CI, which cannot
  # reach download.pytorch.org) installs that copy without asking any index.
  torch_pin="torch==${GPUBAKE_TORCH:-2.13.0}+cpu"
  echo "setup: installing $torch_pin and gpubake[all]" >&2
  if ! "${PIP[@]}" install --no-deps --no-index "$torch_pin" >/dev/null 2>&1; then
    "${PIP[@]}" install --no-deps --index-url https://download.pytorch.org/whl/cpu "$torch_pin"
  fi
  "${PIP[@]}" install -e ".[model,triton,cloud,serve,gpu,test]" 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import gpubake, torch, triton, diffusers" || { echo "setup: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv/bin/gpubake, .venv/bin/build-image)" >&2

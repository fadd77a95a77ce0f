#!/bin/sh
# Step 10: python$GPUBAKE_PYTHON with venv and CA certificates, from apt when the base
# lacks them (a bootstrap base already has them: then this step changes nothing), and
# openssh-server whenever the base has no sshd, Python or not, because RunPod's PUBLIC_KEY
# and Vast.ai's SSH launch mode expect an sshd in the image (its host keys are removed
# here and made at boot).
#
# GPUBAKE_APT_MIRROR (the spec's base.apt_mirror, a dated snapshot such as
# https://snapshot.ubuntu.com/ubuntu/20261115T000000Z): apt reads only that mirror, through
# a list of its own for this step (the image's sources are left as the base has them), so
# a rebuild installs the same package versions. Snapshot Release files are past their
# Valid-Until date by design: that check is off for this list only.
. "$(dirname "$0")/00-env.sh"

need=""
if ! { command -v "$PY" >/dev/null 2>&1 && "$PY" -c 'import ensurepip, venv, ssl' 2>/dev/null \
   && [ -s /etc/ssl/certs/ca-certificates.crt ]; }; then
  need="$PY $PY-venv $PY-dev ca-certificates gcc libc6-dev"  # headers and a compiler: Triton builds its launcher at run time
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
set --
if [ -n "${GPUBAKE_APT_MIRROR:-}" ]; then
  # shellcheck disable=SC1091
  . /etc/os-release
  [ -n "${VERSION_CODENAME:-}" ] || die "GPUBAKE_APT_MIRROR is set but /etc/os-release names no VERSION_CODENAME"
  list=/tmp/gpubake-apt-snapshot.list
  m="$GPUBAKE_APT_MIRROR"
  c="$VERSION_CODENAME"
  case "${ID:-}" in
    ubuntu) printf 'deb %s %s main universe\ndeb %s %s-updates main universe\ndeb %s %s-security main universe\n' \
              "$m" "$c" "$m" "$c" "$m" "$c" > "$list" ;;
    *) printf 'deb %s %s main\ndeb %s %s-updates main\n' "$m" "$c" "$m" "$c" > "$list" ;;
  esac
  echo "gpubake-build: apt from $m ($c)"
  set -- -o "Dir::Etc::SourceList=$list" -o "Dir::Etc::SourceParts=-" -o "Acquire::Check-Valid-Until=false"
fi
apt-get "$@" update -qq
# shellcheck disable=SC2086  # $need: package names, split on purpose
apt-get "$@" install -y -qq --no-install-recommends $need
apt-get clean
rm -rf /var/lib/apt/lists/* /tmp/gpubake-apt-snapshot.list
scrub

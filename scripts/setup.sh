#!/usr/bin/env bash
# Set up hvm on a fresh Debian 12 machine: system packages, then a virtualenv in .venv.
#   scripts/setup.sh         what `hvm run` needs (binutils builds the bundled guests)
#   scripts/setup.sh test    also what the tests need (gcc + kernel headers, QEMU as the reference peer)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(binutils python3-venv)
if [[ "${1:-}" == "test" ]]; then
    packages+=(gcc linux-libc-dev qemu-system-x86)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
extra=""; [[ "${1:-}" == "test" ]] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"

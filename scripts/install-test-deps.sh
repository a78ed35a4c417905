#!/usr/bin/env bash
# Installs every system part the test suite uses, on Debian 12 (run as root; scripts/test-all.sh
# runs it by itself when run as root). CI runs this first.
#
# Debian packages come from apt. Python packages go into a virtual environment, never into the
# system's Python (a stock Debian refuses `pip install` there, PEP 668): $KEYPORT_VENV, default
# .venv in the repository; scripts/test-all.sh puts its bin/ first on PATH. A stamp in the venv
# records which version of this script set it up, so test-all.sh knows when to run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "$0: run it as root (sudo $0): it installs Debian packages" >&2
    exit 77
fi
venv=${KEYPORT_VENV:-$PWD/.venv}
export DEBIAN_FRONTEND=noninteractive

echo "==> apt packages"
apt-get update -q
apt-get install -y -q --no-install-recommends \
  build-essential pkg-config ca-certificates \
  softhsm2 opensc opensc-pkcs11 openssl p11-kit \
  pcscd libpcsclite-dev pcsc-tools vsmartcard-vpcd iproute2 util-linux procps \
  dbus gnome-keyring libsecret-tools \
  pinentry-tty tmux systemd \
  chromium fonts-dejavu-core fonts-wqy-microhei python3 python3-venv python3-cryptography \
  dpkg-dev binutils gzip man-db
# The JS client's and the browser test's runner: Node 20 or newer.
if ! command -v node >/dev/null; then
    apt-get install -y -q --no-install-recommends nodejs npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "$0: Node $node_major is installed; the browser test needs Node 20 or newer" \
         "(Debian 12 ships 18: see https://github.com/nodesource/distributions)" >&2
    exit 1
fi

echo "==> Python packages in $venv"
# The virtual PIV card (tests/vcard) and the certificate tooling (softhsm-config) run on it;
# gmssl (pure-Python SM2/SM3) is the second verifier of SM2 signatures (skf-shim tests).
python3 -m venv "$venv"
"$venv/bin/python3" -m pip install --quiet --disable-pip-version-check \
  jcecard==0.1.0 cryptography gmssl==3.2.2
sha256sum scripts/install-test-deps.sh | cut -d' ' -f1 > "$venv/.keyport-test-deps"
echo "==> test dependencies installed"

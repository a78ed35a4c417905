#!/usr/bin/env bash
# Installs every system part the test suite uses, on Debian 12 (run as root). CI runs this first.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  softhsm2 opensc opensc-pkcs11 openssl p11-kit \
  pcscd libpcsclite-dev pcsc-tools vsmartcard-vpcd iproute2 util-linux procps \
  dbus gnome-keyring libsecret-tools \
  pinentry-tty tmux systemd \
  chromium fonts-dejavu-core ca-certificates pkg-config python3-cryptography
# The virtual PIV card (tests/vcard) and the certificate tooling (softhsm-config) run on python3;
# gmssl (pure-Python SM2/SM3) is the second verifier of SM2 signatures (skf-shim tests).
python3 -m pip install --quiet --disable-pip-version-check jcecard==0.1.0 cryptography gmssl==3.2.2

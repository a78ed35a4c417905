#!/usr/bin/env bash
# The README's demo command: builds keyport and runs `keyport demo` (a SoftHSM demo token, the
# agent and the demo portal on http://127.0.0.1:47334/). On a fresh Debian 12 it first installs
# the Debian packages the build and the demo need, as root or through sudo. Arguments go to
# `keyport demo` (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential pkg-config libpcsclite-dev softhsm2 opensc openssl python3-cryptography)
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    packages+=(pinentry-gnome3)
else
    packages+=(pinentry-curses)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -ne 0 ]; then
    echo "==> installing ${missing[*]}"
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || {
            echo "$0: run as root, or install: apt-get install ${missing[*]}" >&2
            exit 2
        }
        as_root=(sudo)
    fi
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
    # Debian 12's own rustc (1.63) is too old for KeyPort (1.89 or newer).
    echo "$0: Rust is needed. Install it with rustup, then open a new shell and run this again:" >&2
    echo "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    exit 2
fi
# The soft SKF library (a test double of a Chinese USB key's vendor library) gives the demo an SM2
# key; keyport demo loads it from next to the binary.
cargo build --release -q -p keyport-soft-skf
exec cargo run --release -p agent --bin keyport -- demo "$@"

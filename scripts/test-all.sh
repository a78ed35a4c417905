#!/usr/bin/env bash
# The whole test suite: Rust unit, integration and end-to-end tests (SoftHSM, the virtual PIV
# card, the scripted pinentry, a real Secret Service), the JS client's tests and the Chromium test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Test-only parts the suite drives: the scripted pinentry, the fault-injection module.
cargo build --workspace --all-targets --quiet

# The keyring tests need a real Secret Service: run the Rust suite inside a D-Bus session with an
# unlocked gnome-keyring.
scripts/with-keyring.sh cargo test --workspace --no-fail-fast

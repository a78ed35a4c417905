#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. the Rust workspace: unit, integration and end-to-end tests against SoftHSM, the fault-injection
#      module, the scripted pinentry, a real Secret Service and the virtual PIV card (pcscd + vpcd),
#   2. the JS client's unit tests (Node's own runner),
#   3. the demo portal in headless Chromium against the real agent.
# Each part runs even if an earlier one failed; the script fails if any did.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=()
step() {
    local name=$1
    shift
    echo "==> $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

# Test-only binaries the suite drives (scripted pinentry, fault module, keyport itself).
step "build" cargo build --workspace --all-targets --quiet
# The keyring tests need a real Secret Service: a private D-Bus session with gnome-keyring.
step "rust tests" scripts/with-keyring.sh cargo test --workspace --no-fail-fast
step "js client tests" sh -c 'cd browser-bridge/js && node --test test/'
step "browser test" tests/browser/run.sh

if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all test parts passed"

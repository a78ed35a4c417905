#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. the Rust workspace: unit, integration and end-to-end tests against SoftHSM, the fault-injection
#      module, the scripted pinentry, a real Secret Service and the virtual PIV card (pcscd + vpcd),
#   2. the JS client's unit tests (Node's own runner),
#   3. the demo portal in headless Chromium against the real agent,
#   4. the benchmark's short mode (keyport-bench --short).
# Each part runs even if an earlier one failed; the script fails if any did.
#
# Run as root on a fresh Debian 12 it first installs what the tests need
# (scripts/install-test-deps.sh), and again whenever that script changed.
set -uo pipefail
cd "$(dirname "$0")/.."

venv=${KEYPORT_VENV:-$PWD/.venv}
stamp=$venv/.keyport-test-deps
wanted=$(sha256sum scripts/install-test-deps.sh | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        scripts/install-test-deps.sh || { echo "FAILED: installing the test dependencies"; exit 1; }
    else
        echo "test-all.sh: the test dependencies are not installed (or changed): run" \
             "sudo scripts/install-test-deps.sh first" >&2
        exit 1
    fi
fi
# The venv's python3 (jcecard, cryptography) before the system's.
export PATH="$venv/bin:$PATH"

failed=()
step() {
    local name=$1
    shift
    local started=$SECONDS
    echo "==> $name"
    if ! "$@"; then
        failed+=("$name")
    fi
    echo "<== $name: $((SECONDS - started)) s"
}

# Test-only binaries the suite drives (scripted pinentry, fault module, keyport itself). Cargo
# prints each crate it compiles: a first build takes minutes.
step "build" cargo build --workspace --all-targets
# The keyring tests need a real Secret Service: a private D-Bus session with gnome-keyring.
step "rust tests" scripts/with-keyring.sh cargo test --workspace --no-fail-fast
step "js client tests" sh -c 'cd browser-bridge/js && node --test test/'
step "browser test" tests/browser/run.sh
# The benchmark in its short mode: every row of BENCHMARKS.md measured and every signature it
# times verified (Python cryptography, OpenSSL); its timings mean nothing here.
step "benchmark (short)" cargo run --quiet -p keyport-e2e --bin keyport-bench -- --short

if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all test parts passed"

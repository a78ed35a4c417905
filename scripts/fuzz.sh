#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS (default 30) on its checked-in seeds
# (fuzz/seeds/TARGET; what a run finds goes to fuzz/corpus/TARGET, not checked in), and prints
# one line per target with its executions per second. Fails if any target finds a crash.
#   scripts/fuzz.sh [SECONDS] [TARGET…]
# libFuzzer with the address sanitizer on the stable toolchain: RUSTC_BOOTSTRAP lets it take
# cargo-fuzz's nightly flags (TEST-RIG-FACTS "Fuzzing").
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/corpus/$t.log"
    echo "==> fuzz $t for ${seconds}s"
    if cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        summary+=("$t: $execs runs, $rate exec/s")
    else
        tail -40 "$log"
        failed+=("$t")
        summary+=("$t: FAILED (see $log and fuzz/artifacts/$t)")
    fi
done
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz targets failed: ${failed[*]}"
    exit 1
fi

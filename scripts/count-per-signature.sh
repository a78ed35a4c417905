#!/usr/bin/env bash
# Counts what the agent and its module host do per signature while keyport-bench signs on one
# row: context switches, system calls and CPU time (`perf stat`, 3 s), or with --syscalls each
# system call by name (`strace -c`, which slows both processes: counts only, never times).
# Counts move far less than timings on a shared machine, so a change that removes a system
# call or a wake-up shows here when the timed rows cannot tell it from the noise.
#
#   scripts/count-per-signature.sh [--syscalls] [ROW]     # ROW as KEYPORT_BENCH_ROWS: 1x1 (default), 8x8, …
#
# Needs a release build (cargo build --release -p agent -p keyport-e2e) and perf or strace.
# The signatures of the window are the host's answers: one `sendto` each.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=perf
if [ "${1:-}" = "--syscalls" ]; then
    mode=strace
    shift
fi
row=${1:-1x1}
bench=target/release/keyport-bench
[ -x "$bench" ] || { echo "build first: cargo build --release -p agent -p keyport-e2e" >&2; exit 1; }
out=$(mktemp -d)
bench_pid="" agent="" host=""
cleanup() {
    # The bench stops its agents itself only when it ends normally: stop all three.
    for pid in $host $agent $bench_pid; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$out"
}
trap cleanup EXIT

KEYPORT_BENCH_ROWS=$row KEYPORT_BENCH_SIGNATURES=200000 "$bench" --load-only >"$out/bench.log" 2>&1 &
bench_pid=$!
# The bench's own agent (`keyport --config FILE run`, its child) and that agent's module host.
for _ in $(seq 300); do
    if grep -q 'agent under load' "$out/bench.log"; then
        agent=$(pgrep -n -P "$bench_pid" -x keyport || true)
        [ -n "$agent" ] && host=$(pgrep -n -P "$agent" -x keyport || true)
        [ -n "$host" ] && break
    fi
    sleep 0.1
done
if [ -z "$host" ]; then
    echo "the bench's load agent and its host did not start:" >&2
    cat "$out/bench.log" >&2
    exit 1
fi
sleep 2 # past the rows' start-up

no_count() {
    echo "no signature counted (perf tracepoints or ptrace not permitted?):" >&2
    cat "$out/$1" >&2
    exit 1
}

if [ "$mode" = perf ]; then
    perf stat -x, -e context-switches,raw_syscalls:sys_enter,task-clock -p "$agent" -o "$out/agent" -- sleep 3 &
    counting=$!
    perf stat -x, -e context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_sendto,task-clock \
        -p "$host" -o "$out/host" -- sleep 3 || true
    wait "$counting" || true
    n=$(awk -F, '$3 == "syscalls:sys_enter_sendto" {print $1}' "$out/host")
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt 0 ] || no_count host
    echo "row $row: $n signatures in 3 s"
    for who in agent host; do
        grep -v -e '^#' -e '^$' -e sys_enter_sendto "$out/$who" |
            awk -F, -v n="$n" -v who="$who" '{
                v = $1 / n; unit = "";
                if ($3 == "task-clock") { v = v * 1000; unit = " µs of CPU" }
                printf "  %-5s %-22s %8.2f%s per signature\n", who, $3, v, unit }'
    done
else
    timeout 3 strace -c -f -p "$agent" -o "$out/agent" &
    counting=$!
    timeout 3 strace -c -f -p "$host" -o "$out/host" || true
    wait "$counting" || true
    n=$(awk '$NF == "sendto" {print $4}' "$out/host")
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt 0 ] || no_count host
    echo "row $row: $n signatures (strace slows both processes: read the counts only)"
    for who in agent host; do
        awk -v n="$n" -v who="$who" 'NR > 2 && $1 !~ /^-/ && $NF != "total" && NF >= 5 {
                printf "  %-5s %-16s %6.2f per signature\n", who, $NF, $4 / n; t += $4 }
            END { printf "  %-5s %-16s %6.2f per signature\n", who, "(all)", t / n }' "$out/$who"
    done
fi

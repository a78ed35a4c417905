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
trap 'pkill -f "keyport-bench --load-only" 2>/dev/null || true; rm -rf "$out"' EXIT

KEYPORT_BENCH_ROWS=$row KEYPORT_BENCH_SIGNATURES=200000 "$bench" --load-only >"$out/bench.log" 2>&1 &
agent="" host=""
for _ in $(seq 100); do
    agent=$(pgrep -n -f 'keyport run .*--config' || pgrep -n -f 'keyport.*--config' || true)
    host=$(pgrep -n -f 'keyport host' || true)
    [ -n "$agent" ] && [ -n "$host" ] && grep -q 'agent under load' "$out/bench.log" && break
    sleep 0.1
done
[ -n "$agent" ] && [ -n "$host" ] || { echo "the bench's agent did not start" >&2; cat "$out/bench.log" >&2; exit 1; }
sleep 2 # past the rows' start-up

if [ "$mode" = perf ]; then
    perf stat -x, -e context-switches,raw_syscalls:sys_enter,task-clock -p "$agent" -o "$out/agent" -- sleep 3 &
    perf stat -x, -e context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_sendto,task-clock \
        -p "$host" -o "$out/host" -- sleep 3
    wait
    n=$(grep sys_enter_sendto "$out/host" | cut -d, -f1)
    echo "row $row: $n signatures in 3 s"
    for who in agent host; do
        grep -v -e '^#' -e '^$' -e sys_enter_sendto "$out/$who" |
            awk -F, -v n="$n" -v who="$who" '{
                v = $1 / n; unit = "";
                if ($3 == "task-clock") { v = v * 1000; unit = " µs of CPU" }
                printf "  %-5s %-22s %8.2f%s per signature\n", who, $3, v, unit }'
    done
else
    timeout 3 strace -c -f -p "$agent" -o "$out/agent" 2>/dev/null &
    timeout 3 strace -c -f -p "$host" -o "$out/host" 2>/dev/null || true
    wait || true
    n=$(awk '$NF == "sendto" {print $4}' "$out/host")
    echo "row $row: $n signatures (strace slows both processes: read the counts only)"
    for who in agent host; do
        awk -v n="$n" -v who="$who" 'NR > 2 && $1 !~ /^-/ && $NF != "total" && NF >= 5 {
                printf "  %-5s %-16s %6.2f per signature\n", who, $NF, $4 / n; t += $4 }
            END { printf "  %-5s %-16s %6.2f per signature\n", who, "(all)", t / n }' "$out/$who"
    done
fi

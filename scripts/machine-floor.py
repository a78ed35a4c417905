#!/usr/bin/env python3
"""What this machine charges for the two things every answered signature needs whatever the
agent's own code does (BENCHMARKS.md, issue 12, "What the machine sets"):

1. making an audit record durable: append one line of the agent's size to a file, then
   `fdatasync` it, alone (as a lone signature must): wall time p50 / p99, and the CPU it costs
   the calling process (user + system time per record). For comparison, the same line written
   over space the file already has (its size unchanged, so the sync writes no inode): what
   preallocating the log would buy, and why the agent does not (see BENCHMARKS.md).
2. a hand-off between two threads or processes: `perf bench sched pipe` (two processes
   passing a byte back and forth), on any CPUs and on one CPU, if `perf` is installed.

    scripts/machine-floor.py [DIRECTORY]   # the directory of the audit log; default: ~/.local/state

Nothing here touches the agent or its files: a scratch file in DIRECTORY, removed after.
"""

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

RECORDS = 3000
LINE = b"x" * 422 + b"\n"  # a `sign` record of one digest is 420-430 bytes


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sync_loop(path, preallocated):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if not preallocated:
        flags |= os.O_APPEND
    fd = os.open(path, flags, 0o600)
    try:
        if preallocated:
            os.write(fd, b"\0" * (RECORDS * len(LINE)))
            os.fsync(fd)
        walls = []
        cpu0 = cpu_seconds()
        for i in range(RECORDS):
            t = time.perf_counter_ns()
            if preallocated:
                os.pwrite(fd, LINE, i * len(LINE))
            else:
                os.write(fd, LINE)
            os.fdatasync(fd)
            walls.append(time.perf_counter_ns() - t)
        cpu = (cpu_seconds() - cpu0) / RECORDS
    finally:
        os.close(fd)
        os.unlink(path)
    walls.sort()
    return walls[len(walls) // 2] / 1000, walls[len(walls) * 99 // 100] / 1000, cpu * 1e6


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.local/state")
    os.makedirs(where, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where) as scratch:
        path = os.path.join(scratch, "floor.log")
        print(f"| durability: {RECORDS} records of {len(LINE)} bytes in {where}, two runs | wall p50 | wall p99 | CPU per record |")
        print("| --- | ---: | ---: | ---: |")
        for name, pre in [("append + fdatasync (what the audit log does)", False),
                          ("overwrite + fdatasync, size unchanged", True)]:
            rows = [sync_loop(path, pre) for _ in range(2)]
            p50, p99, cpu = (", ".join(f"{r[k]:.0f}" for r in rows) for k in range(3))
            print(f"| {name} | {p50} µs | {p99} µs | {cpu} µs |")
    perf = shutil.which("perf")
    if perf is None:
        print("\n(perf not installed: no hand-off figure)")
        return
    print("\n| a hand-off: `perf bench sched pipe`, three runs; a round trip is two hand-offs | µs per round trip |")
    print("| --- | ---: |")
    for name, prefix in [("any CPUs (the scheduler's choice)", []),
                         ("one CPU (`taskset -c 0`)", ["taskset", "-c", "0"])]:
        runs = []
        for _ in range(3):
            out = subprocess.run(prefix + [perf, "bench", "sched", "pipe", "-l", "20000"],
                                 capture_output=True, text=True, check=True).stdout
            runs.append(float(next(l for l in out.splitlines() if "usecs/op" in l).split()[0]))
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in runs)} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""CPU and wake-ups of a process by thread group, read from /proc over a span.

    python3 bench/idle_threads.py PID [SECONDS]

Threads are grouped by name with trailing digits and a `-poll` style suffix kept
(`ingest-poll`, `rdk:broker1` -> `rdk:broker`), so librdkafka's broker threads, the
sources' polling threads and Tokio's workers each show as one line. CPU is user +
system time as a percent of one core; wake-ups are voluntary context switches per
second (each is a sleep the thread woke from).
"""

import os
import re
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def sample(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        switches = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status).group(1))
        out[tid] = (name, ticks, switches)
    return out


def group(name):
    return re.sub(r"\d+$", "", name)


def main():
    pid = int(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    before = sample(pid)
    time.sleep(seconds)
    after = sample(pid)
    rows = {}
    for tid, (name, ticks, switches) in after.items():
        t0, s0 = before.get(tid, (name, 0, 0))[1:]
        cpu, wakes, n = rows.get(group(name), (0, 0, 0))
        rows[group(name)] = (cpu + ticks - t0, wakes + switches - s0, n + 1)
    total_cpu = sum(r[0] for r in rows.values())
    total_wakes = sum(r[1] for r in rows.values())
    print(f"{'threads':<20} {'n':>3} {'CPU %':>7} {'wake-ups/s':>11}")
    for name, (cpu, wakes, n) in sorted(rows.items(), key=lambda r: -r[1][0]):
        print(f"{name:<20} {n:>3} {100 * cpu / TICKS / seconds:>7.2f} {wakes / seconds:>11.1f}")
    print(f"{'all':<20} {len(after):>3} {100 * total_cpu / TICKS / seconds:>7.2f} {total_wakes / seconds:>11.1f}")


if __name__ == "__main__":
    main()

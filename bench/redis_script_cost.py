"""Instructions Redis runs per event for the cache-writer's two scripts, counted by
callgrind: a figure that shared, noisy machines cannot blur, to compare script changes
(`lanes bench-cpu` reports Redis's CPU time per event on the real pipeline).

For each git revision given (default: the working tree), it starts a redis-server of
its own under `valgrind --tool=callgrind`, writes `--events` features and predictions
per round through `FEATURES_IF_NEWER` and `WRITE_IF_NEWER` as read from that
revision's `crates/common/src/cache.rs`, in calls of `--per-call` entities, and prints
(instructions of the run - instructions of an idle server) / events written.

    redis_script_cost.py [--events N] [--rounds R] [--per-call B] [REV ...]

Needs valgrind and redis-server on PATH, and redis-py (setup's .venv has it).
"""

import argparse
import json
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
CACHE_RS = "crates/common/src/cache.rs"
FEATURES = json.dumps({"amount": 123.45, "merchant_risk": 0.5, "hour": 13.0, "velocity_1h": 3.0})


def scripts(rev):
    if rev is None:
        src = (ROOT / CACHE_RS).read_text()
    else:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{CACHE_RS}"],
            check=True, capture_output=True, text=True,
        ).stdout

    def const(name):
        return re.search(r'pub const %s: &str = r"(.*?)";' % name, src, re.S).group(1)

    return const("FEATURES_IF_NEWER"), const("WRITE_IF_NEWER")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instructions(args, pair, out_dir):
    """Instructions of one callgrind redis-server run; no writes when `pair` is None."""
    port = free_port()
    out = Path(out_dir) / f"callgrind.{port}"
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    r = redis.Redis(port=port)
    for _ in range(600):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    else:
        server.kill()
        raise SystemExit(f"redis-server under callgrind did not answer on port {port} within 60 s")
    if pair is not None:
        features, predictions = (r.script_load(s) for s in pair)
        # A fifth as many entities as events: most writes replace an entry, as in a drain.
        entities = max(1, args.events // 5)
        for rnd in range(args.rounds):
            for start in range(0, args.events, args.per_call):
                n = min(args.per_call, args.events - start)
                keys = [f"lanes:prediction:e{(start + j) % entities}" for j in range(n)]
                t = 1_800_000_000_000 + rnd * 100_000 + start
                f_args, p_args = [0], [0]
                for j in range(n):
                    f_args += [t + j, FEATURES]
                    p_args += [t + j, t + j + 5, f"ev-{start + j}-{rnd}", "v1", "0",
                               0.123456789, "", "fraud", "stream", t + j - 3]
                r.evalsha(features, n, *keys, *f_args)
                r.evalsha(predictions, n, *keys, *p_args)
    try:
        r.shutdown(nosave=True)
    except redis.ConnectionError:
        pass
    server.wait()
    return int(re.search(r"^summary: (\d+)", out.read_text(), re.M).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-call", type=int, default=250)
    p.add_argument("revs", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        idle = instructions(args, None, out_dir)
        for rev in args.revs or [None]:
            total = instructions(args, scripts(rev), out_dir)
            per_event = (total - idle) / (args.events * args.rounds)
            print(f"{rev or 'working tree'}: {per_event:,.0f} instructions per event "
                  f"(features + prediction script)")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Stops what dev-up.sh started (and nothing it merely reused): each process recorded in
# .lanes/run/*.pid gets SIGTERM, then SIGKILL if it is still there after 10 s.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

shopt -s nullglob
for pidfile in "$LANES_RUN_DIR"/*.pid; do
  name=$(basename "$pidfile" .pid)
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) ignored SIGTERM, killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done

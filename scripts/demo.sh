#!/usr/bin/env bash
# The main job on the embedded defaults, from nothing to predictions:
# setup (installs what is missing), the local stack, every service (`lanes up`), sample
# traffic with some invalid events, a summary once every event is accounted for, then
# stops what it started. Extra arguments go to `lanes demo` (e.g. --events 20000).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$LANES_ROOT"

scripts/setup.sh
load_env
BIN_DIR="${LANES_BIN_DIR:-${CARGO_TARGET_DIR:-$LANES_ROOT/target}/debug}"
LANES="$BIN_DIR/lanes"

UP_PID=
cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    say "stopping lanes up"
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  scripts/dev-down.sh
}
trap cleanup EXIT

scripts/dev-up.sh
"$LANES" topics create >/dev/null
mkdir -p "$LANES_RUN_DIR"
"$LANES" up >"$LANES_RUN_DIR/lanes-up.log" 2>&1 &
UP_PID=$!
say "lanes up started (pid $UP_PID, log .lanes/run/lanes-up.log); admin on http://127.0.0.1:9400"
ready() { curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:9400/readyz 2>/dev/null; }
wait_for "lanes up" 60 ready || { tail -30 "$LANES_RUN_DIR/lanes-up.log" >&2; exit 1; }

"$LANES" demo "$@"

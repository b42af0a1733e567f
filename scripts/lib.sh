# Shared by the Lanes scripts: paths, the env file that setup.sh writes, and waits.
# shellcheck shell=bash

LANES_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LANES_STATE="$LANES_ROOT/.lanes"
LANES_ENV_FILE="$LANES_STATE/env"
LANES_RUN_DIR="$LANES_STATE/run"
LANES_VENV="$LANES_ROOT/.venv"
TANSU_VERSION="0.6.0"

export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m[lanes]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Loads what setup.sh found (ORT_DYLIB_PATH, LANES_PYTHON, ...), if it ran.
load_env() {
  # shellcheck disable=SC1090
  [ -f "$LANES_ENV_FILE" ] && . "$LANES_ENV_FILE"
  return 0
}

# port_open HOST PORT: something accepts TCP connections there.
port_open() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_for NAME SECONDS CMD...: retries CMD until it succeeds or time runs out.
wait_for() {
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      say "$name did not answer within ${seconds}s"
      return 1
    fi
    sleep 0.2
  done
}

redis_ping() {
  if command -v redis-cli >/dev/null; then
    [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]
  else
    port_open 127.0.0.1 6379
  fi
}

registry_ok() {
  curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:8081/subjects 2>/dev/null
}

# test_watchdog LIMIT DEPS_DIR: every 10 s, a test binary from DEPS_DIR that has run for
# more than LIMIT seconds has every thread's stack printed (libtest names each thread
# after its test) and is killed. A hung test then fails the suite with the place it
# hangs instead of stalling CI until its own timeout.
test_watchdog() {
  local limit=$1 deps=$2 pid age
  while sleep 10; do
    for pid in $(pgrep -f "^$deps/" || true); do
      age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ') || continue
      [ -n "$age" ] && [ "$age" -gt "$limit" ] || continue
      say "watchdog: $(ps -o args= -p "$pid" | cut -c1-200) has run ${age}s (limit ${limit}s, LANES_TEST_LIMIT_S); its threads:"
      if command -v gdb >/dev/null; then
        timeout 120 gdb -p "$pid" -batch -ex "thread apply all bt 30" 2>/dev/null \
          | grep -E '^(Thread |#)' >&2 || true
      fi
      # Its service processes too: killed, it cannot stop them itself.
      pkill -KILL -P "$pid" 2>/dev/null || true
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
}

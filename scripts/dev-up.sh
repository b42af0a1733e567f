#!/usr/bin/env bash
# Starts the local stack: the tansu broker on 127.0.0.1:9092, the schema registry on
# 127.0.0.1:8081 and Redis on 127.0.0.1:6379. Anything already answering on its port is
# reused, not started; what this script starts is recorded in .lanes/run/*.pid, with
# logs beside, so dev-down.sh stops exactly that.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
load_env
mkdir -p "$LANES_RUN_DIR"
BIN_DIR="${LANES_BIN_DIR:-${CARGO_TARGET_DIR:-$LANES_ROOT/target}/debug}"

# start NAME CMD...: runs CMD detached, logging to .lanes/run/NAME.log.
start() {
  local name=$1; shift
  local pidfile="$LANES_RUN_DIR/$name.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    say "$name already started by dev-up (pid $(cat "$pidfile"))"
    return 0
  fi
  setsid nohup "$@" >"$LANES_RUN_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  say "started $name (pid $!, log .lanes/run/$name.log)"
}

if port_open 127.0.0.1 9092; then
  say "a broker answers on 127.0.0.1:9092, reusing it"
else
  command -v tansu >/dev/null || die "tansu not found: run scripts/setup.sh"
  start broker tansu broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/
  wait_for broker 30 port_open 127.0.0.1 9092 || { tail -20 "$LANES_RUN_DIR/broker.log" >&2; exit 1; }
fi

if registry_ok; then
  say "a schema registry answers on 127.0.0.1:8081, reusing it"
else
  if [ ! -x "$BIN_DIR/lanes-schema-registry" ]; then
    say "building lanes-schema-registry"
    (cd "$LANES_ROOT" && cargo build --quiet -p lanes-schema-registry)
  fi
  start registry "$BIN_DIR/lanes-schema-registry" \
    --listen 127.0.0.1:8081 --data-dir "$LANES_STATE/registry"
  wait_for registry 30 registry_ok || { tail -20 "$LANES_RUN_DIR/registry.log" >&2; exit 1; }
fi

if redis_ping; then
  say "Redis answers on 127.0.0.1:6379, reusing it"
  # Entries outgrow Redis's default 64-byte listpack values and take twice the memory.
  listpack=$(redis-cli -h 127.0.0.1 -p 6379 config get hash-max-listpack-value 2>/dev/null | sed -n 2p || true)
  if [ -n "$listpack" ] && [ "$listpack" -lt 1024 ]; then
    say "its hash-max-listpack-value is $listpack: cache entries will be hashtables, about twice the memory (redis-cli config set hash-max-listpack-value 1024)"
  fi
else
  command -v redis-server >/dev/null || die "redis-server not found: run scripts/setup.sh"
  start redis redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize no \
    --hash-max-listpack-value 1024
  wait_for redis 30 redis_ping || { tail -20 "$LANES_RUN_DIR/redis.log" >&2; exit 1; }
fi
say "stack up: kafka 127.0.0.1:9092, registry http://127.0.0.1:8081, redis 127.0.0.1:6379"

#!/usr/bin/env bash
# Installs what Lanes needs on a Debian machine with a Rust toolchain, and builds it.
# Idempotent: each step checks first and does nothing when its tool is already there.
#   - tansu (Kafka-protocol broker) via `cargo install`, when missing
#   - Redis via apt, when nothing answers on 127.0.0.1:6379 and redis-server is absent
#   - Debian packages the build and the scripts use (gcc, make, curl, python3-venv, ...),
#     and promtool and docker-compose for checking deploy/
#   - a project-local Python venv (.venv) with onnxruntime and Confluent's client
#   - ORT_DYLIB_PATH and LANES_PYTHON, written to .lanes/env for the other scripts
#   - the workspace binaries (debug)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$LANES_STATE"

APT_UPDATED=
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "need these packages and apt-get is missing: ${missing[*]}"
  local sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  if [ -z "$APT_UPDATED" ]; then $sudo apt-get update -qq; APT_UPDATED=1; fi
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Build tools for rdkafka's bundled librdkafka (C, with TLS), and script tools.
apt_install ca-certificates curl gcc g++ make pkg-config perl libssl-dev zlib1g-dev
# promtool (Prometheus config and rule checks) and docker-compose (Compose schema
# validation, no engine needed) for the deploy/ tests.
apt_install prometheus docker-compose

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain first (rustup)"

# tansu's in-memory storage (memory://) needs its `dynostore` feature; the fault
# suite's broker restart needs durable storage: its `libsql` feature
# (sqlite:// files, schema created by tansu itself).
tansu_ok() {
  local installed
  command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION" || return 1
  installed=$(grep -o "\"tansu $TANSU_VERSION [^}]*" "${CARGO_HOME:-$HOME/.cargo}/.crates2.json" 2>/dev/null)
  grep -q dynostore <<<"$installed" && grep -q libsql <<<"$installed"
}
if ! tansu_ok; then
  say "installing the tansu broker $TANSU_VERSION (cargo install, ~10 min on 2 cores)"
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql
fi

if ! redis_ping && ! command -v redis-server >/dev/null; then
  apt_install redis-server redis-tools
fi
command -v redis-cli >/dev/null || apt_install redis-tools

PY=$(command -v python3 || true)
if [ -z "$PY" ]; then apt_install python3 python3-venv; PY=$(command -v python3); fi
if [ ! -x "$LANES_VENV/bin/python" ]; then
  say "creating the Python venv in .venv"
  "$PY" -m venv "$LANES_VENV" 2>/dev/null || { apt_install python3-venv; rm -rf "$LANES_VENV"; "$PY" -m venv "$LANES_VENV"; }
fi
if ! "$LANES_VENV/bin/python" -c "import onnxruntime, fastavro, redis, sklearn, skl2onnx; from confluent_kafka.schema_registry.avro import AvroSerializer" 2>/dev/null; then
  say "installing Python packages into .venv"
  "$LANES_VENV/bin/pip" install -q --disable-pip-version-check -r "$LANES_ROOT/scripts/requirements.txt"
fi

ORT_LIB=$("$LANES_VENV/bin/python" - <<'PY'
import glob, os, onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libs = sorted(glob.glob(os.path.join(capi, "libonnxruntime.so*")))
print(libs[-1] if libs else "")
PY
)
[ -n "$ORT_LIB" ] || die "onnxruntime is installed but libonnxruntime.so was not found"

cat > "$LANES_ENV_FILE" <<ENV
# Written by scripts/setup.sh; sourced by the other scripts.
export PATH="\$HOME/.cargo/bin:\$PATH"
export ORT_DYLIB_PATH="$ORT_LIB"
export LANES_PYTHON="$LANES_VENV/bin/python"
ENV
say "environment written to ${LANES_ENV_FILE#$LANES_ROOT/}"

say "building the workspace"
(cd "$LANES_ROOT" && cargo build --workspace --bins --quiet)
say "setup done"

#!/usr/bin/env bash
# The whole test suite against the real local stack: setup, dev-up, format and lint
# checks, every test of the workspace, dev-down. Exits non-zero on any failure.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$LANES_ROOT"

scripts/setup.sh
load_env
scripts/dev-up.sh
trap 'scripts/dev-down.sh' EXIT

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
say "cargo test"
# A test binary still running after LANES_TEST_LIMIT_S is hung: its stacks are printed
# and it is killed (the longest, the fault suite, takes about 6 minutes).
test_watchdog "${LANES_TEST_LIMIT_S:-1200}" "${CARGO_TARGET_DIR:-$LANES_ROOT/target}/debug/deps" &
watchdog=$!
trap 'kill $watchdog 2>/dev/null; scripts/dev-down.sh' EXIT
cargo test --workspace --no-fail-fast

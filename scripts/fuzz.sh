#!/usr/bin/env bash
# Runs Lanes' fuzz targets under libFuzzer with cargo-fuzz on the stable toolchain.
#   scripts/fuzz.sh                    every target for 60 s each
#   scripts/fuzz.sh <target> [seconds] one target
# New corpus inputs land in fuzz/corpus/<target>/; a crash input lands in
# fuzz/artifacts/<target>/ and the run fails. Keep a fixed crash as a regression in
# fuzz/regressions/<target>/: `cargo test -p lanes-fuzz-targets` replays both folders.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$LANES_ROOT/fuzz"

command -v cargo-fuzz >/dev/null || {
  say "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
}

targets=(confluent_framing avro_records raw_event registry_schema)
seconds=${2:-60}
[ $# -ge 1 ] && targets=("$1")
for t in "${targets[@]}"; do
  say "fuzzing $t for ${seconds}s"
  mkdir -p "corpus/$t"
  # cargo-fuzz asks rustc for nightly-only flags; RUSTC_BOOTSTRAP lets stable accept
  # them. No sanitizer: Lanes forbids unsafe code, so ASan would add cost, not findings.
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536
done

#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS each (default 60), starting from the corpora in
# fuzz/corpus/. Any panic fails the run; the crashing input lands in fuzz/artifacts/.
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
secs=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
log=$(mktemp)
for t in $(cargo fuzz list); do
  echo "fuzz: $t for ${secs}s"
  if ! cargo fuzz run -O "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $t FAILED (crashing input in fuzz/artifacts/$t/)"
    exit 1
  fi
  grep -E "^Done" "$log" || true
done
rm -f "$log"
echo "fuzz: all targets ran ${secs}s without a panic"

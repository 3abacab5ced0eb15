#!/usr/bin/env bash
# Long crash-consistency soak: explores EXTBLK_CRASH_STATES crash states (default 1,000,000)
# of seeded workloads through the real image engine and prints states/s. A failure prints the
# seed and the shortest failing workload: EXTBLK_CRASH_SEED=<seed> replays it. Then
# EXTBLK_CONCURRENT_STATES (default 200,000) states of the concurrent engine, over new seeds
# (their timing varies: a failing seed shows the class of bug, not an exact replay).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export EXTBLK_CRASH_STATES=${EXTBLK_CRASH_STATES:-1000000}
export EXTBLK_CONCURRENT_STATES=${EXTBLK_CONCURRENT_STATES:-200000}
cargo test --features testing --test crash crash_states_keep_the_contract -- --exact --nocapture --test-threads 1
cargo test --features testing --test crash concurrent_crash_states_keep_the_contract -- --exact --nocapture --test-threads 1

#!/usr/bin/env bash
# Long crash-consistency soak: explores EXTBLK_CRASH_STATES crash states (default 1,000,000)
# of seeded workloads through the real image engine and prints states/s. A failure prints the
# seed and the shortest failing workload: EXTBLK_CRASH_SEED=<seed> replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export EXTBLK_CRASH_STATES=${EXTBLK_CRASH_STATES:-1000000}
cargo test --features testing --test crash crash_states_keep_the_contract -- --nocapture --test-threads 1

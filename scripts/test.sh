#!/usr/bin/env bash
# Runs every test: unit tests (request parsing on mock virtqueues, config, units) and the
# integration tests that drive the real daemon with libblkio's vhost-user client.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo test --all-targets "$@"

#!/usr/bin/env bash
# Generates the man pages (extblk.1, extblk-serve.1, ...) from the CLI definition with
# clap_mangen, into DIR (default target/man). View one with `man -l target/man/extblk-ctl.1`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
dir=${1:-target/man}
cargo run --quiet --release --example mangen -- "$dir"

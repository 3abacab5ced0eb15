#!/usr/bin/env bash
# The shipped binary has no test switches. Built without the `testing` feature (as
# `cargo build --release`, the README's install command), it must not contain the EXTBLK_RECORD /
# EXTBLK_FAULT / EXTBLK_REAPPLY_EXIT_AFTER handling, and `serve --hot-path` must be refused as an unknown argument. Part of
# .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
bin=target/release/extblk
fail() { echo "check-release: $*" >&2; exit 1; }
# test-open and test-socket: the control requests that probe the sandbox from inside.
for s in EXTBLK_RECORD EXTBLK_FAULT EXTBLK_REAPPLY_EXIT_AFTER test-open test-socket; do
  n=$(strings "$bin" | grep -c "$s" || true)
  [ "$n" -eq 0 ] || fail "$bin contains $s ($n times): the testing feature is in the release build"
done
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$bin" create --size 64M "$dir/i.img" >/dev/null
# Bounded: were the flag accepted, serve would run until stopped.
rc=0
out=$(timeout 10 "$bin" serve --hot-path fast --socket "$dir/s" "$dir/i.img" 2>&1) || rc=$?
if [ "$rc" -ne 2 ] || ! grep -q "unexpected argument '--hot-path'" <<<"$out"; then
  fail "serve --hot-path was not refused as an unknown argument (exit $rc): $out"
fi
echo "check-release: ok, no test switches in $bin"

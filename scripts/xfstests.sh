#!/usr/bin/env bash
# Runs a built xfstests (fstests) tree inside the test guest against two extblk disks.
#
# usage: XFSTESTS_DIR=/path/to/xfstests-dev [FSTYP=ext4|xfs] scripts/xfstests.sh [CHECK ARGS...]
#   CHECK ARGS go to xfstests' ./check unchanged (default: -g quick), e.g. generic/001 generic/013,
#   -g auto, -x dangerous, -g quick -E exclude.txt.
#
#   TEST_DEV=/dev/vda     extblk image test.img, made with mkfs.$FSTYP before ./check
#   SCRATCH_DEV=/dev/vdb  extblk image scratch.img (the tests make their own filesystems)
#
# Environment:
#   XFSTESTS_DIR       (required) a built xfstests tree on this host (git clone
#                      https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git && make); the guest
#                      sees the host's / read-only with a RAM overlay, so the tree is not modified
#   FSTYP              ext4 (default) or xfs
#   XFSTESTS_SIZE      size of each extblk disk (default 10G; thin, only written data takes space)
#   XFSTESTS_MEM       guest memory (default 2G)
#   XFSTESTS_TIMEOUT   seconds before the guest is killed (default 14400)
#   XFSTESTS_RESULTS   where results go (default ./xfstests-results: check.log, results/, console.log)
#   XFSTESTS_QUEUES    virtqueues per disk (default 2)
#   MKFS_OPTIONS, MOUNT_OPTIONS  passed to xfstests
# Exit status: ./check's (0: all ran tests passed), 124 on timeout, 2 on bad usage.
# The extblk daemons' logs are kept in the results directory; after the run both images are checked
# with `extblk check`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "xfstests.sh: error: $*" >&2; exit 2; }
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
[ "${1:-}" != "--" ] || shift

# ---------------------------------------------------------------- arguments and environment
[ -n "${XFSTESTS_DIR:-}" ] || die "XFSTESTS_DIR is not set. Point it at a built xfstests tree:
    git clone https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git && make -C xfstests-dev
    XFSTESTS_DIR=\$PWD/xfstests-dev $0 -g quick
  (build dependencies: docs/guests.md)"
[ -d "$XFSTESTS_DIR" ] || die "XFSTESTS_DIR=$XFSTESTS_DIR is not a directory"
XFSTESTS_DIR=$(cd "$XFSTESTS_DIR" && pwd)
[ -x "$XFSTESTS_DIR/check" ] && [ -d "$XFSTESTS_DIR/tests" ] && [ -f "$XFSTESTS_DIR/common/config" ] \
  || die "$XFSTESTS_DIR does not look like an xfstests tree (no ./check, tests/ or common/config)"
[ -x "$XFSTESTS_DIR/ltp/fsstress" ] || die "$XFSTESTS_DIR is not built (no ltp/fsstress): run make in it"
FSTYP=${FSTYP:-ext4}
case "$FSTYP" in ext4|xfs) ;; *) die "FSTYP=$FSTYP: only ext4 and xfs are supported" ;; esac
command -v "mkfs.$FSTYP" > /dev/null || die "mkfs.$FSTYP not found on this host (the guest uses the host's tools)"
size=${XFSTESTS_SIZE:-10G}
mem=${XFSTESTS_MEM:-2G}
timeout_s=${XFSTESTS_TIMEOUT:-14400}
queues=${XFSTESTS_QUEUES:-2}
out=${XFSTESTS_RESULTS:-$PWD/xfstests-results}
[ $# -gt 0 ] || set -- -g quick
case "$out" in /*) ;; *) out=$PWD/$out ;; esac

# ---------------------------------------------------------------- daemon and disks
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
(cd "$ROOT" && cargo build --release --quiet)
BIN=$ROOT/target/release/extblk
"$ROOT/vm-images/build.sh" >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/extblk-xfstests.XXXXXX")
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$out"
mkdir -p "$out" "$work/xfer"
for d in test scratch; do
  "$BIN" create --size "$size" "$work/$d.img" > /dev/null
  RUST_LOG=${RUST_LOG:-info} "$BIN" serve --socket "$work/$d.sock" --queues "$queues" "$work/$d.img" \
    2> "$out/daemon-$d.log" &
  pids+=($!)
done
for d in test scratch; do
  for _ in $(seq 100); do [ -S "$work/$d.sock" ] && break; sleep 0.1; done
  [ -S "$work/$d.sock" ] || { cat "$out/daemon-$d.log" >&2; die "extblk serve did not start for $d.img"; }
done

# ---------------------------------------------------------------- the guest side
cat > "$work/xfer/local.config" <<EOF
# written by scripts/xfstests.sh
export FSTYP=$FSTYP
export TEST_DEV=/dev/vda
export TEST_DIR=/mnt/test
export SCRATCH_DEV=/dev/vdb
export SCRATCH_MNT=/mnt/scratch
export RESULT_BASE=/xfer/results
export LOGGER_PROG=true
${MKFS_OPTIONS:+export MKFS_OPTIONS="$MKFS_OPTIONS"}
${MOUNT_OPTIONS:+export MOUNT_OPTIONS="$MOUNT_OPTIONS"}
EOF

cat > "$work/guest.sh" <<'EOF'
# runs in the guest: $1 = xfstests tree, the rest = ./check arguments
set -u
dir=$1; shift
. /xfer/local.config
export HOST_OPTIONS=/xfer/local.config
echo "xfstests: $dir, FSTYP=$FSTYP, TEST_DEV=$TEST_DEV ($(cat /sys/block/vda/size) sectors)," \
     "SCRATCH_DEV=$SCRATCH_DEV ($(cat /sys/block/vdb/size) sectors), kernel $(uname -r), args: $*"
# users some tests need (the overlay's /etc is in RAM: the host's is not touched)
for u in fsgqa fsgqa2; do id "$u" >/dev/null 2>&1 || useradd -m "$u" 2>/dev/null; done
id 123456-fsgqa >/dev/null 2>&1 || useradd --badname 123456-fsgqa 2>/dev/null || useradd 123456-fsgqa 2>/dev/null
mkdir -p "$TEST_DIR" "$SCRATCH_MNT" "$RESULT_BASE"
case $FSTYP in
  ext4) mkfs.ext4 -F -q ${MKFS_OPTIONS:-} "$TEST_DEV" ;;
  xfs)  mkfs.xfs -f -q ${MKFS_OPTIONS:-} "$TEST_DEV" ;;
esac || { echo "xfstests: mkfs.$FSTYP $TEST_DEV failed"; exit 2; }
mount -t "$FSTYP" ${MOUNT_OPTIONS:-} "$TEST_DEV" "$TEST_DIR" || { echo "xfstests: cannot mount $TEST_DEV"; exit 2; }
echo "xfstests: $TEST_DEV mounted on $TEST_DIR: $(df -h "$TEST_DIR" | tail -1)"
umount "$TEST_DIR"
cd "$dir" || exit 2
./check "$@"
rc=$?
sync
exit $rc
EOF

echo "xfstests.sh: FSTYP=$FSTYP, disks $size each, ./check $*" >&2
set +e
"$ROOT/scripts/run-guest.sh" --timeout "$timeout_s" --mem "$mem" --queues "$queues" \
  --xfer "$work/xfer" --log "$out/console.log" \
  --disk "$work/test.sock" --disk "$work/scratch.sock" \
  --script "$work/guest.sh" "$XFSTESTS_DIR" "$@"
rc=$?
set -e

# ---------------------------------------------------------------- results back to the host
if [ -d "$work/xfer/results" ]; then
  cp -a "$work/xfer/results" "$out/results"
  [ ! -f "$out/results/check.log" ] || cp "$out/results/check.log" "$out/check.log"
fi
for i in "${!pids[@]}"; do kill -TERM "${pids[$i]}" 2>/dev/null; wait "${pids[$i]}" 2>/dev/null; done
pids=()
for d in test scratch; do
  "$BIN" check "$work/$d.img" > "$out/extblk-check-$d.txt" 2>&1 \
    || { echo "xfstests.sh: extblk check of $d.img found problems:" >&2; cat "$out/extblk-check-$d.txt" >&2; }
done
echo "xfstests.sh: ./check exit status $rc; results in $out" >&2
[ ! -f "$out/check.log" ] || tail -5 "$out/check.log" >&2
exit $rc

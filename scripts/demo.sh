#!/usr/bin/env bash
# The whole story in one command: build extblk, create a thin image, serve it, boot a Linux guest
# (QEMU, vm-images/build.sh) that makes ext4 on the disk, writes files and verifies them, then
# show what the image looks like: size on disk, `extblk info`, a summary of `extblk map`, the
# daemon's counters, and `extblk check` + `e2fsck -fn` of the image.
# Usage: scripts/demo.sh [SIZE]      (virtual disk size, default 4G)
# Environment: DEMO_KEEP=1 keeps the temporary directory (image, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
size=${1:-4G}

step() { printf '\n== %s\n' "$*"; }

step "dependencies and build"
[ ! -x scripts/install-deps.sh ] || scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
BIN=$ROOT/target/release/extblk
vm-images/build.sh

dir=$(mktemp -d "${TMPDIR:-/tmp}/extblk-demo.XXXXXX")
dpid=""
cleanup() {
  [ -z "$dpid" ] || { kill -TERM "$dpid" 2>/dev/null; wait "$dpid" 2>/dev/null; }
  if [ "${DEMO_KEEP:-0}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
img=$dir/disk.img sock=$dir/extblk.sock log=$dir/daemon.log
mkdir -p "$dir/xfer"

sizes() { echo "apparent $(du -h --apparent-size "$img" | cut -f1), allocated on the host $(du -h "$img" | cut -f1)"; }

step "create a $size image"
"$BIN" create --size "$size" "$img"
echo "image size: $(sizes)"

step "serve it: extblk serve --socket $sock --queues 2 $img"
RUST_LOG=info "$BIN" serve --socket "$sock" --queues 2 "$img" 2> "$log" &
dpid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$log"; exit 1; }
head -1 "$log"

step "guest: mkfs.ext4 /dev/vda, write files, verify md5s, fsync, unmount"
# the files are made on the host (urandom is slow in an emulated guest) and copied in over 9p
for i in 1 2 3 4 5 6 7 8; do head -c $((i * 3 * 1024 * 1024 + i * 4321)) /dev/urandom > "$dir/xfer/file$i"; done
(cd "$dir/xfer" && md5sum file* > md5s)
cat > "$dir/guest.sh" <<'EOF'
set -euo pipefail
echo "guest: $(uname -r), disk $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues"
mkfs.ext4 -q -L demo /dev/vda
mount /dev/vda /mnt
mkdir /mnt/files
cp /xfer/file* /mnt/files/
sync -f /mnt                                   # syncfs: data, metadata, journal, FLUSH
echo 3 > /proc/sys/vm/drop_caches              # read back from the device, not the page cache
(cd /mnt/files && md5sum -c /xfer/md5s)
fsync_file=/mnt/files/fsynced
head -c 1048576 /xfer/file1 > "$fsync_file"
sync "$fsync_file"                             # fsync(2) of one file
df -h /mnt | tail -1
umount /mnt
echo "guest: unmounted"
EOF
scripts/run-guest.sh --timeout 300 --queues 2 --xfer "$dir/xfer" --disk "$sock" --script "$dir/guest.sh" \
  | sed 's/^/  | /'

step "stop the daemon (SIGTERM) and read its counters"
kill -TERM "$dpid"; wait "$dpid"; rc=$?; dpid=""
echo "daemon exit status: $rc"
grep -o 'exiting:.*' "$log" | tr ' ' '\n' | sed -n '2,$p' | paste -sd' ' | fold -s -w 100 | sed 's/^/  /'

step "the image afterwards"
echo "image size: $(sizes)"
"$BIN" info "$img" | sed 's/^/  /'
echo "map: $("$BIN" map "$img" | awk 'NR > 1 { n[$3]++ } END { printf "%d data, %d unwritten, %d hole runs", n["data"], n["unwritten"], n["hole"] }')"

step "offline checks"
"$BIN" check "$img"
e2fsck -fn "$img" | tail -1
echo
echo "demo: ok"

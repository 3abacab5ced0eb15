#!/usr/bin/env bash
# The main job in one command: install what is needed, build extblk, create a sparse 1 GiB
# disk under ./extblk-demo/ (kept between runs), and serve it until Ctrl-C.
# Usage: scripts/serve-demo.sh [SIZE_IN_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release
dir=$PWD/extblk-demo
mkdir -p "$dir"
img=$dir/disk.raw
if [ ! -e "$img" ]; then
  truncate -s "${1:-1024}M" "$img"
  echo "created sparse disk $img ($(du -h --apparent-size "$img" | cut -f1))"
fi
sock=$dir/extblk.sock
cat <<MSG

Serving $img on $sock. Attach a QEMU guest with:

  qemu-system-x86_64 -machine q35,memory-backend=mem \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G \\
    -chardev socket,id=blk0,path=$sock \\
    -device vhost-user-blk-pci,chardev=blk0,num-queues=2 ...

Ctrl-C stops the daemon (in-flight requests drain, data is flushed).
MSG
exec target/release/extblk serve --format raw --queues 2 --socket "$sock" "$img"

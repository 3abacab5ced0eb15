#!/usr/bin/env bash
# The main job in one command: install what is needed, build extblk, create a 1 GiB extblk
# image under ./extblk-demo/ (kept between runs), and serve it until Ctrl-C.
# Usage: scripts/serve-demo.sh [SIZE_IN_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release
dir=$PWD/extblk-demo
mkdir -p "$dir"
img=$dir/disk.img
if [ ! -e "$img" ]; then
  target/release/extblk create --size "${1:-1024}M" "$img"
fi
target/release/extblk info "$img"
sock=$dir/extblk.sock
cat <<MSG

Serving $img on $sock. Attach a QEMU guest with:

  qemu-system-x86_64 -machine q35,memory-backend=mem \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G \\
    -chardev socket,id=blk0,path=$sock \\
    -device vhost-user-blk-pci,chardev=blk0,num-queues=2 ...

Ctrl-C stops the daemon (in-flight requests drain, the journal is committed and the image
marked clean). Then: target/release/extblk check $img   (or e2fsck -fn $img)
MSG
exec target/release/extblk serve --queues 2 --socket "$sock" "$img"

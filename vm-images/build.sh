#!/usr/bin/env bash
# Builds the end-to-end test guest for extblk and finds (or unpacks) a QEMU to run it.
#
#   vm-images/build.sh            build if needed, print where things are
#   vm-images/build.sh --env      build if needed, print shell assignments (used by scripts/run-guest.sh)
#   vm-images/build.sh --force    rebuild the guest even if the cache is current
#
# Output goes to a cache directory outside git: $EXTBLK_VM_CACHE, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/extblk-vm.  The guest is rebuilt only when its inputs change:
# the kernel version (and its vmlinuz), this script, vm-images/init.sh and the busybox binary.
#
#   guest-<hash>/vmlinux            uncompressed kernel from Debian's linux-image-amd64 (PVH boot)
#   guest-<hash>/initramfs.cpio.gz  busybox + virtio-pci/-blk, 9p, overlay, ext4, xfs modules and
#                                   their dependencies (from modules.dep), /init = vm-images/init.sh
#   qemu/root/                      qemu-system-x86 unpacked from Debian's .debs, only when no
#                                   qemu-system-x86_64 is installed and installing one would remove
#                                   packages (e.g. a backports qemu-utils)
#
# The guest mounts the host's / read-only over virtio-9p, puts a tmpfs overlay on top and runs
# the test command chrooted there, so it uses the host's mkfs.ext4, mkfs.xfs, fio, e2fsck...
# Installs (apt-get, as root) what it needs and is missing: linux-image-amd64 busybox-static
# e2fsprogs xfsprogs fio cpio xz-utils zstd.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${EXTBLK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/extblk-vm}
MODE=show
case "${1:-}" in
  --env) MODE=env ;;
  --force) MODE=force ;;
  ""|--show) ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "usage: $0 [--env|--force]" >&2; exit 2 ;;
esac

say() { echo "vm-images: $*" >&2; }
die() { echo "vm-images: error: $*" >&2; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9          # one builder at a time; others wait and then find the cache current

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_install() {   # packages not yet installed
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get"
  say "installing: ${missing[*]}"
  [ -n "$apt_updated" ] || { $sudo apt-get update -qq >&2 || true; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

apt_install linux-image-amd64 busybox-static e2fsprogs xfsprogs fio cpio xz-utils zstd kmod

# ---------------------------------------------------------------- kernel
if [ -n "${EXTBLK_VM_KVER:-}" ]; then
  KVER=$EXTBLK_VM_KVER
else
  KVER=""
  for d in $(ls /lib/modules | sort -V); do
    [ -f "/boot/vmlinuz-$d" ] && [ -f "/lib/modules/$d/modules.dep" ] && KVER=$d
  done
fi
[ -n "$KVER" ] || die "no kernel with both /boot/vmlinuz-* and /lib/modules/*/modules.dep (apt-get install linux-image-amd64)"
KIMG=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$KIMG" ] || die "$KIMG is not readable"
BUSYBOX=/bin/busybox   # from busybox-static: the initramfs has no libc
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked (apt-get install busybox-static)"; fi

hash=$( { echo "$KVER"; stat -L -c '%s %Y' "$KIMG"; cat "$0" "$HERE/init.sh"; { "$BUSYBOX" 2>&1 || true; } | head -1; } \
        | sha256sum | cut -c1-16)
OUT=$CACHE/guest-$hash

extract_vmlinux() {  # like linux/scripts/extract-vmlinux: find the payload, keep the first ELF
  local img=$1 dst=$2 name magic cmd off
  for spec in 'xz|\xFD7zXZ\x00|xz -dc' 'zstd|\x28\xB5\x2F\xFD|zstd -dcq' 'gzip|\x1F\x8B\x08|gzip -dc' \
              'lz4|\x02\x21\x4C\x18|lz4 -dc' 'bzip2|BZh|bzip2 -dc'; do
    IFS='|' read -r name magic cmd <<<"$spec"
    command -v "${cmd%% *}" >/dev/null || continue
    for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
      tail -c +$((off + 1)) "$img" | $cmd 2>/dev/null > "$dst.tmp" || true
      if [ "$(head -c4 "$dst.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
        mv "$dst.tmp" "$dst"; say "vmlinux: $name payload at offset $off, $(stat -c %s "$dst") bytes"; return 0
      fi
    done
  done
  rm -f "$dst.tmp"; die "no compressed ELF payload found in $img"
}

# Modules the initramfs loads, in this order; dependencies come from modules.dep.
# crc32c_generic/crc32c-intel are soft dependencies (crypto API, not in modules.dep) of ext4, jbd2
# and libcrc32c, so they are listed explicitly.
WANT="virtio_pci virtio_blk 9pnet_virtio 9p overlay crc32c_generic crc32c-intel libcrc32c crc16 ext4 xfs"

resolve_modules() {  # prints module paths (relative to $MODDIR) in load order
  awk -v want="$WANT" '
    function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b); gsub(/-/, "_", b); return b }
    function visit(m,   n, i, d) {
      if (m in done) return
      if (!(m in path)) { print "missing module " m > "/dev/stderr"; missing++; return }
      done[m] = 1
      n = split(deps[m], d, " ")
      for (i = n; i >= 1; i--) visit(base(d[i]))   # modules.dep lists deepest last
      print path[m]
    }
    { p = $1; sub(/:$/, "", p); m = base(p); path[m] = p; $1 = ""; deps[m] = $0 }
    END { n = split(want, w, " "); for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x) }
          exit missing > 0 }' "$MODDIR/modules.dep"
}

build_guest() {
  local tmp R
  tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
  R=$tmp/root
  mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,run,host,ovl,newroot,modules,etc}
  extract_vmlinux "$KIMG" "$tmp/vmlinux"
  cp "$BUSYBOX" "$R/bin/busybox"
  for a in $("$R/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
  local order=() p b
  while read -r p; do
    b=$(basename "$p"); b=${b%%.ko*}
    case "$p" in
      *.ko.xz)  xz -dc "$MODDIR/$p"    > "$R/modules/$b.ko" ;;
      *.ko.zst) zstd -dcq "$MODDIR/$p" > "$R/modules/$b.ko" ;;
      *.ko.gz)  gzip -dc "$MODDIR/$p"  > "$R/modules/$b.ko" ;;
      *)        cp "$MODDIR/$p" "$R/modules/$b.ko" ;;
    esac
    order+=("$b")
  done < <(resolve_modules || die "modules missing from $MODDIR/modules.dep")
  printf '%s\n' "${order[@]}" > "$R/modules/order"
  echo "$KVER" > "$R/etc/kver"
  install -m 0755 "$HERE/init.sh" "$R/init"
  (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) > "$tmp/initramfs.cpio.gz"
  say "initramfs: $(stat -c %s "$tmp/initramfs.cpio.gz") bytes, modules: ${order[*]}"
  rm -rf "$R" "$OUT"
  mv "$tmp" "$OUT"
  ln -sfn "$(basename "$OUT")" "$CACHE/current"
  # drop guests built from older inputs
  for old in "$CACHE"/guest-*; do [ "$old" = "$OUT" ] || rm -rf "$old"; done
}

if [ "$MODE" = force ] || [ ! -s "$OUT/vmlinux" ] || [ ! -s "$OUT/initramfs.cpio.gz" ]; then
  say "building guest for kernel $KVER into $OUT"
  build_guest
fi

# ---------------------------------------------------------------- QEMU
QEMU="" QEMU_L="" QEMU_MODDIR=""
qemu_works() { "$1" --version >/dev/null 2>&1; }
if [ -n "${EXTBLK_QEMU:-}" ]; then
  QEMU=$EXTBLK_QEMU
elif command -v qemu-system-x86_64 >/dev/null && qemu_works qemu-system-x86_64; then
  QEMU=$(command -v qemu-system-x86_64)
else
  QR=$CACHE/qemu/root
  if [ ! -x "$QR/usr/bin/qemu-system-x86_64" ] && command -v apt-get >/dev/null; then
    # Prefer the distribution's package, unless installing it would remove something
    # (Debian 12 with qemu-utils from backports: qemu-system-x86 7.2 conflicts with it).
    sim=$($sudo apt-get install -s --no-install-recommends qemu-system-x86 2>&1 || echo "E: failed")
    if ! grep -qE '^(Remv|E:)' <<<"$sim"; then
      apt_install qemu-system-x86 || true
    fi
    if command -v qemu-system-x86_64 >/dev/null && qemu_works qemu-system-x86_64; then
      QEMU=$(command -v qemu-system-x86_64)
    else
      say "qemu-system-x86 cannot be installed without removing packages; unpacking it into $QR"
      apt_install libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30 \
        libibverbs1 libjpeg62-turbo libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1 libsasl2-2 \
        libseccomp2 libslirp0 liburing2 libvdeplug2 libzstd1 zlib1g || true
      rm -rf "$CACHE/qemu"; mkdir -p "$CACHE/qemu/debs" "$QR"
      chmod 0777 "$CACHE/qemu/debs"   # apt-get download fetches as user _apt
      ( cd "$CACHE/qemu/debs" && apt-get download qemu-system-x86 qemu-system-common qemu-system-data \
          seabios ipxe-qemu >&2 ) || die "apt-get download qemu-system-x86 failed"
      for d in "$CACHE"/qemu/debs/*.deb; do dpkg -x "$d" "$QR"; done
    fi
  fi
  if [ -z "$QEMU" ] && [ -x "$QR/usr/bin/qemu-system-x86_64" ]; then
    QEMU=$QR/usr/bin/qemu-system-x86_64
    QEMU_L="-L $QR/usr/share/qemu -L $QR/usr/share/seabios -L $QR/usr/lib/ipxe/qemu"
    QEMU_MODDIR=$QR/usr/lib/x86_64-linux-gnu/qemu
    if ! QEMU_MODULE_DIR=$QEMU_MODDIR "$QEMU" --version >/dev/null 2>&1; then
      ldd "$QEMU" | grep 'not found' >&2 || true
      die "unpacked QEMU does not run ($QEMU)"
    fi
  fi
fi
[ -n "$QEMU" ] || die "no usable qemu-system-x86_64"

case "$MODE" in
  env)
    printf 'VM_KERNEL=%q\nVM_INITRD=%q\nVM_KVER=%q\nQEMU=%q\nQEMU_L=%q\nQEMU_MODDIR=%q\n' \
      "$OUT/vmlinux" "$OUT/initramfs.cpio.gz" "$KVER" "$QEMU" "$QEMU_L" "$QEMU_MODDIR" ;;
  *)
    echo "kernel:    $OUT/vmlinux ($KVER)"
    echo "initramfs: $OUT/initramfs.cpio.gz"
    echo "qemu:      $QEMU ($(QEMU_MODULE_DIR=$QEMU_MODDIR "$QEMU" --version | head -1))" ;;
esac

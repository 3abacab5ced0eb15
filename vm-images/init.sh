#!/bin/sh
# /init of the extblk test guest (busybox). Loads the modules, mounts the host's / read-only over
# virtio-9p (tag hostroot) with a tmpfs overlay on top at /newroot, mounts the per-run exchange
# share (tag xfer, read-write) at /newroot/xfer, waits for the expected /dev/vd* disks, runs
# /xfer/cmd with bash chrooted into /newroot, prints EXTBLK-GUEST-EXIT=<status> and powers off.
# Kernel command line: extblk.disks=N (disks to wait for), extblk.debug=1 (shell trace).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1

log() { echo "extblk-init: $*"; }
finish() {  # $1 = exit status
  echo "EXTBLK-GUEST-EXIT=$1"
  sync
  poweroff -f
  sleep 5; echo o > /proc/sysrq-trigger
}
fail() { log "$*"; finish 125; }

disks=0; debug=0
for w in $(cat /proc/cmdline); do
  case "$w" in
    extblk.disks=*) disks=${w#extblk.disks=} ;;
    extblk.debug=*) debug=${w#extblk.debug=} ;;
  esac
done
[ "$debug" = 1 ] && set -x

for m in $(cat /modules/order); do
  insmod "/modules/$m.ko" 2>/dev/null || [ -d "/sys/module/$(echo "$m" | tr - _)" ] || log "insmod $m failed"
done

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
  || fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 ovl /ovl && mkdir -p /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot \
  || fail "cannot mount the overlay on /newroot"
N=/newroot
mount -t proc proc $N/proc
mount -t sysfs sysfs $N/sys
mount -t devtmpfs devtmpfs $N/dev
mkdir -p $N/dev/pts $N/dev/shm $N/xfer
mount -t devpts devpts $N/dev/pts
mount -t tmpfs tmpfs $N/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $N/run
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xfer $N/xfer || fail "cannot mount the xfer share"
[ -d /sys/kernel/debug ] && mount -t debugfs debugfs $N/sys/kernel/debug 2>/dev/null
hostname extblk-guest
# request_module() runs the helper in init's root (this initramfs): hand it to the host's kmod
printf '#!/bin/sh\nexec chroot /newroot /sbin/modprobe "$@"\n' > /sbin/modprobe-newroot
chmod +x /sbin/modprobe-newroot
echo /sbin/modprobe-newroot > /proc/sys/kernel/modprobe

i=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "$disks" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ "$(ls /sys/block | grep -c '^vd')" -ge "$disks" ] || fail "expected $disks disks, have: $(ls /sys/block | tr '\n' ' ')"
[ -f $N/xfer/cmd ] || fail "no /xfer/cmd"

echo "EXTBLK-GUEST-START uptime=$(cut -d' ' -f1 /proc/uptime)s"
chroot $N /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /bin/bash -c 'cd / && exec /bin/bash /xfer/cmd' </dev/null
rc=$?
echo "$rc" > $N/xfer/exit-status
# unmount what the command left mounted on the test disks, so their data reaches the daemon
for mp in $(awk '$1 ~ /^\/dev\/vd/ { print $2 }' /proc/mounts | sort -r); do
  umount "$mp" 2>/dev/null || log "could not unmount $mp"
done
finish $rc

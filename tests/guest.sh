#!/usr/bin/env bash
# End-to-end tests: real Linux guests (QEMU, vm-images/build.sh) on disks served by `extblk serve`
# over vhost-user-blk with 2 queues, judged by the guest's own tools (fio --verify, md5sum,
# e2fsck, xfs_repair) and on the host by `extblk check` and `e2fsck -fn` of the image.
#
#   ext4    mkfs.ext4, fio randwrite 4k-64k with crc32c verify, file create/delete/truncate churn;
#           daemon restarted; the fio data re-verified and the churn files' md5s checked; fio files
#           deleted; fstrim -v must lower the image's allocated_bytes (extblk info --output json);
#           e2fsck -fn /dev/vda in the guest; extblk check and e2fsck -fn of the image on the host
#   xfs     the same with mkfs.xfs and xfs_repair -n
#   crash   a guest writes files one by one (write, fsync the file, fsync the directory) and prints
#           each file's md5 once durable; the daemon is SIGKILLed mid-workload; restarted on the
#           same image; a new guest mounts (journal recovery) and every reported file must be intact
#   reconnect  a guest writes files (fsync each) while the daemon is stopped (SIGTERM) and started
#           again; QEMU (chardev reconnect=1) reconnects and the guest verifies every file
#   raw     a raw file (--format raw): fio writes 64M with crc32c headers straight to /dev/vda, the
#           guest pauses, then verifies everything again
#   resize  ext4 on a 64M disk, mounted; the host runs `extblk ctl resize +128M`; the guest must see
#           /sys/block/vda/size change to 192M (CONFIG_CHANGE_MSG), grow ext4 with resize2fs,
#           write past the old end and verify; e2fsck in the guest, the image checked on the host
#   killed  fio randwrite 4k QD32 direct with crc32c verify straight to /dev/vda (2 queues) while the
#           host SIGKILLs the daemon three times, 6 s apart, restarting it 1 s after each kill (more
#           kills, up to 10, until one finds requests in flight); QEMU
#           reconnects (reconnect=1) and the guest carries on: fio must end with err=0 and its
#           verify pass, the guest log show no I/O error, the daemon log show requests resubmitted
#           from the inflight region (the race happened)
#   killed-held  the same with the test build (the debug binary scripts/test.sh built with the
#           testing feature): its first instance holds the completions of some writes
#           (EXTBLK_HOLD_FROM), so requests are in flight at the one kill for certain; the
#           restarted daemon must resubmit exactly as many as were held, and fio pass
#   killed-control  killed-held without inflight tracking (EXTBLK_NO_INFLIGHT=1): QEMU restarts
#           the rings from their used index, the held requests are lost, and the guest must fail
#           (its watchdog reports requests stuck in flight, or the kernel a broken ring)
#   xfstests  scripts/xfstests.sh --smoke: the few fast xfstests of tests/xfstests/smoke on ext4,
#           on two fresh extblk disks; every test must pass or be not run, one at least pass, and
#           both images check clean (XFSTESTS_TARBALL / XFSTESTS_DIR as for the script)
#
# EXTBLK_E2E_CORRUPT=1 proves the checks can fail: while the `raw` guest is paused between its
# write and verify passes, the host overwrites a few bytes of the raw file behind its back (the
# daemon serves the file as is). fio's verify must detect it, so the suite must FAIL.
#
# If no QEMU can be had (vm-images/build.sh fails) or the guest does not boot, prints
# "SKIP: guest tests: <reason>" and exits 0 (with CI=true: "FAIL: ..." and exit 1). Ends with "N passed, M failed"; exit 1 if any failed.
# Environment: EXTBLK_BIN (daemon binary; default: cargo build --release), EXTBLK_E2E_KEEP=1 (keep
# the work directory), EXTBLK_E2E_TESTS="ext4 xfs crash crash-wb reconnect raw resize killed killed-held killed-control xfstests"
# (subset), EXTBLK_TEST_BIN (the test build for killed-held/-control; default target/debug/extblk),
# EXTBLK_E2E_KILL_SIZE (fio --size of `killed`, default 1G), RUST_LOG.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
T0=$(date +%s)
RUN_GUEST=$ROOT/scripts/run-guest.sh
CORRUPT=${EXTBLK_E2E_CORRUPT:-0}

say() { echo "guest.sh: $*"; }
# Outside CI a missing QEMU is a skip; CI (CI=true) is set up to run the guests, so there a skip
# is a failure with its reason.
skip() {
  if [ "${CI:-}" = true ]; then echo "FAIL: guest tests cannot run under CI=true (a skip is not a pass): $*"; exit 1; fi
  echo "SKIP: guest tests: $*"; exit 0
}

# ---------------------------------------------------------------- daemon binary
if [ -n "${EXTBLK_BIN:-}" ]; then
  BIN=$EXTBLK_BIN
else
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release --quiet || { echo "guest.sh: error: cargo build --release failed"; exit 1; }
  BIN=$ROOT/target/release/extblk
fi
[ -x "$BIN" ] || { echo "guest.sh: error: $BIN is not executable"; exit 1; }

T=$(mktemp -d "${TMPDIR:-/tmp}/extblk-e2e.XXXXXX")
DAEMONS=() BGPIDS=()
cleanup() {
  local p
  for p in "${BGPIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${DAEMONS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ "${EXTBLK_E2E_KEEP:-0}" = 1 ] || [ "${FAILED:-0}" -gt 0 ]; then
    echo "guest.sh: logs kept in $T"
  else
    rm -rf "$T"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- can we run guests at all?
if ! "$ROOT/vm-images/build.sh" > "$T/vm-build.log" 2>&1; then
  skip "no usable QEMU or guest image: $(grep -v '^\s*$' "$T/vm-build.log" | tail -1)"
fi
sed 's/^/guest.sh: /' "$T/vm-build.log" | grep -E 'kernel:|qemu:'
if ! out=$("$RUN_GUEST" --timeout 180 -- 'echo EXTBLK-BOOT-OK' 2>&1) || ! grep -q EXTBLK-BOOT-OK <<<"$out"; then
  skip "the guest does not boot: $(grep -v '^\s*$' <<<"$out" | head -3 | tr '\n' ' ')"
fi
say "guest boots ($(( $(date +%s) - T0 ))s so far); work directory $T"

# ---------------------------------------------------------------- helpers
PASSED=0 FAILED=0
DPID=""
# start_daemon NAME IMAGE [serve options...]: socket $T/NAME.sock, log $T/NAME.log; the binary is
# $DAEMON_BIN if set (else $BIN), started with the VAR=value words of $DAEMON_ENV in its environment.
start_daemon() {
  local name=$1 img=$2 i
  shift 2
  rm -f "$T/$name.sock"
  echo "=== start $(date +%T): extblk serve --socket $T/$name.sock --queues 2 $* $img" >> "$T/$name.log"
  env RUST_LOG="${RUST_LOG:-info}" ${DAEMON_ENV:-} "${DAEMON_BIN:-$BIN}" serve --socket "$T/$name.sock" \
    --queues 2 "$@" "$img" >> "$T/$name.log" 2>&1 &
  DPID=$!
  DAEMONS+=("$DPID")
  for i in $(seq 100); do
    [ -S "$T/$name.sock" ] && return 0
    kill -0 "$DPID" 2>/dev/null || break
    sleep 0.1
  done
  echo "  daemon did not come up:"; tail -5 "$T/$name.log" | sed 's/^/    /'
  return 1
}
stop_daemon() {  # SIGTERM the current daemon; must exit 0
  local rc
  kill -TERM "$DPID" 2>/dev/null
  wait "$DPID"; rc=$?
  DPID=""
  [ $rc -eq 0 ] || { echo "  daemon exited $rc after SIGTERM"; return 1; }
}
guest() {  # NAME SOCK SCRIPT [ARGS...]: run a guest script, output to $T/NAME.out (shown indented)
  local name=$1 sock=$2 script=$3 rc
  shift 3
  "$RUN_GUEST" --timeout 240 --queues 2 --xfer "$T/xfer" --log "$T/$name.serial" \
    --disk "$sock" --script "$T/$script" "$@" > "$T/$name.out" 2>&1
  rc=$?
  sed 's/^/    | /' "$T/$name.out"
  [ $rc -eq 0 ] || echo "  guest $name exited $rc"
  return $rc
}
wait_marker() {  # FILE MARKER PID: until a line of FILE starts with MARKER (3 min), or PID ends
  local i
  for i in $(seq 1800); do
    grep -q "^$2" "$1" && return 0
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  grep -q "^$2" "$1"
}
allocated() { "$BIN" info --output json "$1" | sed -n 's/.*"allocated_bytes": *\([0-9]*\).*/\1/p'; }
host_checks() {  # IMAGE: extblk check and e2fsck -fn of the image, both must be clean
  local out
  out=$("$BIN" check "$1" 2>&1) || { echo "  extblk check failed: $out"; return 1; }
  echo "  host: $out"
  out=$(e2fsck -fn "$1" 2>&1) || { echo "  e2fsck -fn of the image failed:"; sed 's/^/    /' <<<"$out"; return 1; }
  echo "  host: e2fsck -fn: $(tail -1 <<<"$out")"
}
run_test() {  # NAME FUNCTION
  local name=$1 t=$(date +%s)
  echo "--- $name"
  if "$2"; then
    PASSED=$((PASSED + 1)); echo "PASS: $name ($(( $(date +%s) - t ))s)"
  else
    FAILED=$((FAILED + 1)); echo "FAIL: $name ($(( $(date +%s) - t ))s)"
    [ -z "$DPID" ] || { kill -TERM "$DPID" 2>/dev/null; wait "$DPID" 2>/dev/null; DPID=""; }
  fi
}
mkdir -p "$T/xfer"

# ---------------------------------------------------------------- guest scripts
# fio options shared by the write and the verify-only passes (same seed: same offsets and sizes)
cat > "$T/xfer/fio.opts" <<'EOF'
--name=v --size=32M --numjobs=2 --rw=randwrite --bsrange=4k-64k --ioengine=libaio --iodepth=16
--direct=1 --verify=crc32c --verify_fatal=1 --randseed=4242 --group_reporting
EOF

# Random file contents are slices of a pool made on the host: /dev/urandom is very slow under TCG,
# and busybox (static) starts much faster than dynamically linked tools read over 9p.
head -c 8M /dev/urandom > "$T/xfer/pool"
cat > "$T/xfer/rnd.sh" <<'EOF'
B=busybox
[ -e /run/extblk-pool ] || $B cp /xfer/pool /run/extblk-pool
POOLSZ=$($B stat -c %s /run/extblk-pool)
rnd() {  # FILE SIZE [dd options]: SIZE bytes from a random offset of the pool
  local f=$1 n=$2; shift 2
  $B dd if=/run/extblk-pool of="$f" bs=64k iflag=skip_bytes,count_bytes \
    skip=$(( (RANDOM * 32768 + RANDOM) % (POOLSZ - n) )) count=$n "$@" 2>/dev/null
}
EOF

cat > "$T/fs1.sh" <<'EOF'
# $1 = ext4|xfs: mkfs, fio write+verify, churn, sync, unmount
set -euo pipefail
fs=$1
case $fs in
  ext4) mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda ;;
  xfs)  mkfs.xfs -f -q /dev/vda ;;
esac
mount /dev/vda /mnt
echo "mkfs.$fs + mount ok"
fio --directory=/mnt $(cat /xfer/fio.opts) --do_verify=1 | grep -E 'err=|WRITE:|READ:'
mkdir /mnt/churn
cd /mnt/churn
. /xfer/rnd.sh
RANDOM=7
for i in $(seq 1 300); do
  rnd f$i $(( (RANDOM % 64) * 4096 + RANDOM % 4096 ))
  case $((i % 7)) in
    0) $B rm -f f$((i - 3)) ;;                                                  # delete
    1) [ ! -e f$((i - 5)) ] || $B truncate -s $((RANDOM * 3)) f$((i - 5)) ;;    # shrink or extend
    2) [ ! -e f$((i - 2)) ] || rnd f$((i - 2)) $((RANDOM * 2)) conv=notrunc oflag=append ;;  # append
    3) [ ! -e f$((i - 1)) ] || $B mv f$((i - 1)) g$i ;;                        # rename
  esac
  [ $((i % 50)) -ne 0 ] || sync
done
md5sum * > /xfer/churn.md5
echo "churn: $(ls | wc -l) files, $(du -sk . | cut -f1) KiB"
cd /
sync
umount /mnt
echo "run1 ok"
EOF

cat > "$T/fs2.sh" <<'EOF'
# after a daemon restart: verify fio data and churn files, delete the fio files and half the churn
set -euo pipefail
fs=$1
mount /dev/vda /mnt
fio --directory=/mnt $(cat /xfer/fio.opts) --verify_only | grep -E 'err=|READ:'
(cd /mnt/churn && md5sum -c --quiet /xfer/churn.md5) && echo "churn: $(wc -l < /xfer/churn.md5) files verified"
rm -f /mnt/v.*
cd /mnt/churn && ls | awk 'NR % 2 == 0' | xargs rm -f && md5sum * > /xfer/churn.md5 && cd /
df -k /mnt | tail -1
sync
umount /mnt
echo "run2 ok"
EOF

cat > "$T/fs3.sh" <<'EOF'
# fstrim, churn files still intact, unmount, the guest's fsck
set -euo pipefail
fs=$1
mount /dev/vda /mnt
fstrim -v /mnt
(cd /mnt/churn && md5sum -c --quiet /xfer/churn.md5) && echo "churn: $(wc -l < /xfer/churn.md5) files verified"
umount /mnt
case $fs in
  ext4) e2fsck -fn /dev/vda ;;
  xfs)  xfs_repair -n /dev/vda 2>&1 | tail -3 ;;
esac
echo "run3 ok"
EOF

cat > "$T/crash1.sh" <<'EOF'
# write files one by one; report each one's md5 once the file and its directory are fsynced;
# fio keeps random writes to another file in flight meanwhile
set -euo pipefail
mkfs.ext4 -F -q /dev/vda
mount /dev/vda /mnt
mkdir /mnt/c
sync
# background load, so the kill lands among in-flight writes, flushes and journal commits
fio --name=bg --filename=/mnt/bg.dat --size=256M --rw=randwrite --bsrange=4k-128k --ioengine=libaio \
  --iodepth=4 --direct=1 --fsync=8 --time_based --runtime=3600 > /dev/null 2>&1 &
. /xfer/rnd.sh
for i in $(seq 1 100000); do
  rnd /run/src $(( (RANDOM % 32 + 1) * 8192 + RANDOM % 8192 ))
  m=$($B md5sum /run/src); m=${m%% *}
  $B dd if=/run/src of=/mnt/c/f$i bs=64k conv=fsync 2>/dev/null   # data + inode
  $B sync /mnt/c                                                  # the directory entry
  echo "FSYNCED f$i $m"
done
EOF

cat > "$T/crash2.sh" <<'EOF'
# after the crash: mount (journal recovery), every file in /xfer/expected must be intact
set -uo pipefail
mount /dev/vda /mnt || exit 1
ok=0 bad=0
while read -r f m; do
  got=$(md5sum < /mnt/c/$f 2>/dev/null | cut -c1-32)
  if [ "$got" = "$m" ]; then ok=$((ok + 1)); else bad=$((bad + 1)); echo "LOST: $f expected $m got ${got:-missing}"; fi
done < /xfer/expected
echo "files intact: $ok, damaged or missing: $bad, present on disk: $(ls /mnt/c | wc -l)"
umount /mnt || exit 1
e2fsck -fn /dev/vda || exit 1
[ $bad -eq 0 ] && [ $ok -gt 0 ]
EOF

cat > "$T/reconnect.sh" <<'EOF'
# write 40 files (fsync each) while the host restarts the daemon; QEMU reconnects; verify all
set -euo pipefail
B=busybox
mkfs.ext4 -F -q /dev/vda
mount /dev/vda /mnt
slice() { $B dd if=/xfer/pool bs=64k iflag=skip_bytes,count_bytes skip=$(($1 * 100003)) count=262144 "${@:2}" 2>/dev/null; }
for i in $(seq 1 40); do
  slice $i of=/mnt/f$i conv=fsync
  echo "WROTE f$i"
done
sync
echo 3 > /proc/sys/vm/drop_caches
for i in $(seq 1 40); do
  [ "$(slice $i | md5sum)" = "$(md5sum < /mnt/f$i)" ] || { echo "MISMATCH f$i"; exit 1; }
done
echo "40 files verified after the daemon restart"
umount /mnt
e2fsck -fn /dev/vda > /dev/null 2>&1 && echo "e2fsck -fn /dev/vda: clean"
EOF

cat > "$T/raw.sh" <<'EOF'
# fio writes with crc32c headers to the raw disk, waits for the host, verifies
set -euo pipefail
opts="--filename=/dev/vda --name=raw --size=64M --rw=randwrite --bsrange=4k-64k --ioengine=libaio
      --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --randseed=99"
fio $opts --do_verify=0 | grep -E 'err=|WRITE:'
echo "RAW-WRITTEN"
i=0
while [ ! -e /xfer/raw-go ]; do sleep 0.2; i=$((i + 1)); [ $i -lt 600 ] || { echo "host never said go"; exit 1; }; done
fio $opts --verify_only | grep -E 'err=|READ:|verify|crc'
echo "raw verify ok"
EOF

cat > "$T/killed.sh" <<'EOF'
# fio random writes with crc32c verify straight to the disk; the host kills the daemon meanwhile
set -uo pipefail
size=$1
dmesg -C 2>/dev/null || true
# Half the range written first: fio's writes are then a mix of overwrites (completed on the
# queue thread) and allocating writes (completed by the worker), so requests complete out of
# order, as in real use, and a restart that replays the ring from its used index goes wrong.
dd if=/dev/zero of=/dev/vda bs=1M count=$(( $(numfmt --from=iec "$size") / 2097152 )) oflag=direct status=none
echo FIO-START
fio --name=killed --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=32 --direct=1 \
    --ioengine=libaio --size="$size" --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --randseed=7 > /tmp/fio.out 2>&1 &
fpid=$!
# A request the device never completes leaves fio waiting for ever: reported as soon as the disk
# has requests in flight and completes none for 60 s (a restart takes a few seconds).
last="" still=0
while kill -0 $fpid 2>/dev/null; do
  sleep 5
  read -r rd _ _ _ wr _ _ _ busy _ < /sys/block/vda/stat
  if [ "$((rd + wr))" = "$last" ] && [ "$busy" -gt 0 ]; then still=$((still + 5)); else still=0; fi
  last=$((rd + wr))
  if [ "$still" -ge 60 ]; then
    echo "STUCK: $busy request(s) in flight on vda, none completed for ${still}s"
    dmesg | tail -5
    exit 1
  fi
done
wait $fpid
rc=$?
grep -E 'err=|WRITE:|READ:|verify|crc' /tmp/fio.out | head -20
echo "fio exit $rc"
if dmesg | grep -iE 'I/O error|blk_update_request|not a head|virtqueue.*broken'; then
  echo "the guest kernel logged I/O errors"; rc=1
fi
[ "$rc" -eq 0 ] && grep -q 'err= 0' /tmp/fio.out
EOF

cat > "$T/resize.sh" <<'EOF'
# ext4 on the disk; the host grows the disk online (extblk ctl resize); the guest sees the new
# size in /sys/block/vda/size (CONFIG_CHANGE_MSG -> config interrupt), grows ext4 online with
# resize2fs, writes past the old end, verifies, checks
set -euo pipefail
B=busybox
s0=$(cat /sys/block/vda/size)
echo "SIZE0 $s0"
mkfs.ext4 -F -q /dev/vda
mount /dev/vda /mnt
$B dd if=/xfer/pool of=/mnt/before bs=1M conv=fsync 2>/dev/null
echo "RESIZE-READY"
i=0
while [ ! -e /xfer/resize-go ]; do sleep 0.2; i=$((i + 1)); [ $i -lt 600 ] || { echo "host never said go"; exit 1; }; done
i=0
while [ "$(cat /sys/block/vda/size)" = "$s0" ]; do
  sleep 0.2; i=$((i + 1)); [ $i -lt 300 ] || { echo "the disk never changed size"; exit 1; }
done
s1=$(cat /sys/block/vda/size)
echo "SIZE1 $s1"
resize2fs /dev/vda 2>&1 | grep -i 'is now'
total=$(df -k /mnt | tail -1 | $B awk '{print $2}')
[ "$total" -gt 150000 ] || { echo "ext4 did not grow: $total KiB"; exit 1; }
echo "ext4 grown online to $total KiB"
for k in 1 2 3 4 5 6; do $B dd if=/xfer/pool of=/mnt/after$k bs=1M conv=fsync 2>/dev/null; done
sync
echo 3 > /proc/sys/vm/drop_caches
cmp /xfer/pool /mnt/before && cmp /xfer/pool /mnt/after6 && echo "files verified after the resize"
umount /mnt
e2fsck -fn /dev/vda > /dev/null 2>&1 && echo "e2fsck -fn /dev/vda: clean"
EOF

# ---------------------------------------------------------------- tests
fs_test() {  # ext4|xfs
  local fs=$1 img=$T/$1.img before after sock=$T/$1.sock
  "$BIN" create --size 2G "$img" > /dev/null || return 1
  start_daemon "$fs" "$img" || return 1
  echo "  guest 1: mkfs.$fs, fio write+verify, churn"
  guest "$fs-1" "$sock" fs1.sh "$fs" || return 1
  stop_daemon || return 1                    # restart between guests: data must survive it
  echo "  host: after guest 1: allocated $(allocated "$img") bytes"
  start_daemon "$fs" "$img" || return 1
  echo "  guest 2: re-verify fio data and churn files, delete fio files"
  guest "$fs-2" "$sock" fs2.sh "$fs" || return 1
  stop_daemon || return 1
  before=$(allocated "$img")
  echo "  host: before fstrim: allocated $before bytes"
  start_daemon "$fs" "$img" || return 1
  echo "  guest 3: fstrim, verify churn files, fsck"
  guest "$fs-3" "$sock" fs3.sh "$fs" || return 1
  stop_daemon || return 1
  after=$(allocated "$img")
  echo "  host: after fstrim:  allocated $after bytes (freed $(( (before - after) / 1048576 )) MiB)"
  # the deleted fio files alone were 64 MiB
  [ "$after" -lt $((before - 32 * 1048576)) ] || { echo "  fstrim did not lower allocated_bytes enough"; return 1; }
  echo "  host: daemon $(grep -o 'exiting:.*' "$T/$fs.log" | tail -1)"
  host_checks "$img"
}
test_ext4() { fs_test ext4; }
test_xfs() { fs_test xfs; }

test_crash() {
  local img=$T/crash.img sock=$T/crash.sock gpid n=0 i rc out
  "$BIN" create --size 2G "$img" > /dev/null || return 1
  start_daemon crash "$img" "${CRASH_ARGS[@]}" || return 1
  echo "  guest 1: writing files with fsync; the daemon gets SIGKILL after 25 are reported"
  "$RUN_GUEST" --timeout 300 --queues 2 --xfer "$T/xfer" --log "$T/crash-1.serial" \
    --disk "$sock" --script "$T/crash1.sh" > "$T/crash-1.out" 2>&1 &
  gpid=$!
  BGPIDS+=("$gpid")
  for i in $(seq 1200); do
    n=$(grep -c '^FSYNCED ' "$T/crash-1.out")
    [ "$n" -lt 25 ] || break
    kill -0 "$gpid" 2>/dev/null || break
    sleep 0.1
  done
  if [ "$n" -lt 25 ]; then
    echo "  only $n files reported"; sed 's/^/    | /' "$T/crash-1.out" | tail -20
    kill -TERM "$gpid"; wait "$gpid"; return 1
  fi
  kill -KILL "$DPID"; wait "$DPID" 2>/dev/null; DPID=""
  echo "  host: SIGKILLed the daemon after $n files were reported"
  sleep 2
  kill -TERM "$gpid"; wait "$gpid" 2>/dev/null
  grep '^FSYNCED ' "$T/crash-1.out" | cut -d' ' -f2,3 > "$T/xfer/expected"
  echo "  host: $(wc -l < "$T/xfer/expected") files reported fsynced in total (last: $(tail -1 "$T/xfer/expected"))"
  out=$("$BIN" check "$img" 2>&1); rc=$?
  echo "  host: extblk check of the crashed image (exit $rc):"; sed 's/^/    /' <<<"$out"
  [ $rc -eq 0 ] || return 1
  start_daemon crash "$img" "${CRASH_ARGS[@]}" || return 1
  echo "  guest 2: mount, verify every reported file, e2fsck"
  guest crash-2 "$sock" crash2.sh || return 1
  stop_daemon || return 1
  host_checks "$img"
}
CRASH_ARGS=()
# The same through the write-back cache (a small one, so writebacks and throttling run while
# the guest writes): the kill leaves dirty pages in the cache file, which the restart writes
# back before the guest mounts.
test_crash-wb() {
  CRASH_ARGS=(--cache writeback --cache-size 16M --dirty-expire 200)
  # test_crash's image, socket and log names, afresh.
  rm -f "$T/crash.img" "$T/crash.log"
  test_crash; local rc=$?
  grep -o 'write-back cache .*page(s) a killed daemon left.*' "$T/crash.log" | sed 's/^/  host: /'
  CRASH_ARGS=()
  return $rc
}

test_reconnect() {
  local img=$T/reconnect.img sock=$T/reconnect.sock gpid i n=0 rc
  "$BIN" create --size 2G "$img" > /dev/null || return 1
  start_daemon reconnect "$img" || return 1
  echo "  guest: writes 40 files with fsync; the daemon is restarted (SIGTERM) after 10; QEMU reconnects"
  "$RUN_GUEST" --timeout 240 --queues 2 --reconnect 1 --xfer "$T/xfer" --log "$T/reconnect.serial" \
    --disk "$sock" --script "$T/reconnect.sh" > "$T/reconnect.out" 2>&1 &
  gpid=$!
  BGPIDS+=("$gpid")
  for i in $(seq 1200); do
    n=$(grep -c '^WROTE ' "$T/reconnect.out")
    [ "$n" -lt 10 ] || break
    kill -0 "$gpid" 2>/dev/null || break
    sleep 0.1
  done
  [ "$n" -ge 10 ] || { echo "  only $n files written"; kill -TERM "$gpid"; wait "$gpid"; return 1; }
  stop_daemon || { kill -TERM "$gpid"; wait "$gpid"; return 1; }
  echo "  host: daemon stopped after $n files; restarting it in 2 s"
  sleep 2
  start_daemon reconnect "$img" || { kill -TERM "$gpid"; wait "$gpid"; return 1; }
  wait "$gpid"; rc=$?
  sed 's/^/    | /' "$T/reconnect.out" | grep -v '| WROTE'
  [ $rc -eq 0 ] || { echo "  guest exited $rc"; return 1; }
  stop_daemon || return 1
  host_checks "$img"
}

test_raw() {
  local img=$T/raw.img sock=$T/raw.sock gpid i rc
  truncate -s 1G "$img"
  start_daemon raw "$img" --format raw || return 1
  rm -f "$T/xfer/raw-go"
  echo "  guest: fio writes 64M to /dev/vda, pauses, verifies"
  "$RUN_GUEST" --timeout 240 --queues 2 --xfer "$T/xfer" --log "$T/raw.serial" \
    --disk "$sock" --script "$T/raw.sh" > "$T/raw.out" 2>&1 &
  gpid=$!
  BGPIDS+=("$gpid")
  if ! wait_marker "$T/raw.out" RAW-WRITTEN "$gpid"; then
    echo "  the guest never reported RAW-WRITTEN"; sed 's/^/    | /' "$T/raw.out" | tail -20
    kill -TERM "$gpid"; wait "$gpid"; stop_daemon; return 1
  fi
  if [ "$CORRUPT" = 1 ]; then
    # EXTBLK_E2E_CORRUPT=1: overwrite 16 bytes at three offsets inside the 64 MiB fio wrote, in the
    # file the daemon serves, while the guest waits. fio's crc32c verify must report it.
    for off in $((1048576 + 100)) $((20971520 + 5000)) $((50331648 + 77)); do
      head -c 16 /dev/urandom | dd of="$img" bs=1 seek="$off" conv=notrunc,fsync status=none
    done
    echo "  host: EXTBLK_E2E_CORRUPT=1: overwrote 3x16 bytes of $img behind the guest's back (this test must FAIL)"
  fi
  touch "$T/xfer/raw-go"
  wait "$gpid"; rc=$?
  sed 's/^/    | /' "$T/raw.out"
  [ $rc -eq 0 ] || { echo "  guest exited $rc"; stop_daemon; return 1; }
  stop_daemon
}

test_resize() {
  local img=$T/resize.img sock=$T/resize.sock gpid i rc out
  "$BIN" create --size 64M "$img" > /dev/null || return 1
  start_daemon resize "$img" --control "$T/resize.ctl" || return 1
  rm -f "$T/xfer/resize-go"
  echo "  guest: ext4 on a 64M disk; the host grows it to 192M online; resize2fs in the guest"
  "$RUN_GUEST" --timeout 240 --queues 2 --xfer "$T/xfer" --log "$T/resize.serial" \
    --disk "$sock" --script "$T/resize.sh" > "$T/resize.out" 2>&1 &
  gpid=$!
  BGPIDS+=("$gpid")
  wait_marker "$T/resize.out" RESIZE-READY "$gpid" || { echo "  the guest never got ready"; sed 's/^/    | /' "$T/resize.out" | tail; kill -TERM "$gpid"; wait "$gpid"; stop_daemon; return 1; }
  out=$("$BIN" ctl "$T/resize.ctl" resize +128M 2>&1) || { echo "  ctl resize failed: $out"; kill -TERM "$gpid"; wait "$gpid"; stop_daemon; return 1; }
  echo "  host: $out"
  touch "$T/xfer/resize-go"
  wait "$gpid"; rc=$?
  sed 's/^/    | /' "$T/resize.out"
  [ $rc -eq 0 ] || { echo "  guest exited $rc"; stop_daemon; return 1; }
  grep -q "^SIZE0 131072" "$T/resize.out" || { echo "  the guest did not start at 64M"; stop_daemon; return 1; }
  grep -q "^SIZE1 393216" "$T/resize.out" || { echo "  the guest did not see 192M"; stop_daemon; return 1; }
  grep -q "files verified after the resize" "$T/resize.out" || { stop_daemon; return 1; }
  grep -q "e2fsck -fn /dev/vda: clean" "$T/resize.out" || { stop_daemon; return 1; }
  stop_daemon || return 1
  host_checks "$img"
}

resubmitted() {  # NAME: requests the daemon resubmitted from the inflight region, over its restarts
  grep -o 'resubmitting [0-9]* request' "$T/$1.log" | awk '{s+=$2} END {print s+0}'
}
held() {  # NAME: requests the test build held (EXTBLK_HOLD_FROM)
  grep -c 'holding request' "$T/$1.log"
}
# The test build for the held and control runs: the debug binary scripts/test.sh's cargo test
# built with the testing feature (EXTBLK_TEST_BIN to give another).
TEST_BIN=${EXTBLK_TEST_BIN:-$ROOT/target/debug/extblk}

# killed_run NAME TIMEOUT MODE: the `killed` workload; the guest's exit status in KILLED_RC.
#   real     the shipped binary; three kills 6 s apart, more (up to 10) until one found requests
#            in flight: whether one is in flight at a kill is luck
#   held     the test build; its first instance holds the completions of the writes in the top
#            quarter of fio's range (EXTBLK_HOLD_FROM: carried out, never completed), so that at
#            the one kill, once it holds some, requests are in flight for certain, out of order
#   control  as held, with inflight tracking not offered (EXTBLK_NO_INFLIGHT=1, every instance)
killed_run() {
  local name=$1 tmo=$2 mode=$3 img=$T/$1.img sock=$T/$1.sock gpid i k size
  size=${EXTBLK_E2E_KILL_SIZE:-1G}
  "$BIN" create --size 2G "$img" > /dev/null || return 1
  local env_all="" env_first=""
  if [ "$mode" != real ]; then
    [ -x "$TEST_BIN" ] || { echo "  no test build at $TEST_BIN (cargo build --features testing)"; return 1; }
    DAEMON_BIN=$TEST_BIN
    env_first="EXTBLK_HOLD_FROM=$(( $(numfmt --from=iec "$size") * 3 / 4 ))"
    [ "$mode" = held ] || env_all="EXTBLK_NO_INFLIGHT=1"
  fi
  DAEMON_ENV="$env_all $env_first" start_daemon "$name" "$img" || { DAEMON_BIN=""; return 1; }
  "$RUN_GUEST" --timeout "$tmo" --queues 2 --reconnect 1 --xfer "$T/xfer" --log "$T/$name.serial" \
    --disk "$sock" --script "$T/killed.sh" "$size" > "$T/$name.out" 2>&1 &
  gpid=$!
  BGPIDS+=("$gpid")
  for i in $(seq 3000); do
    grep -q '^FIO-START' "$T/$name.out" 2>/dev/null && break
    kill -0 "$gpid" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q '^FIO-START' "$T/$name.out"; then
    echo "  fio never started"; sed 's/^/    | /' "$T/$name.out" | tail
    kill -TERM "$gpid"; wait "$gpid"; DAEMON_BIN=""; return 1
  fi
  k=0
  if [ "$mode" = real ]; then
    while kill -0 "$gpid" 2>/dev/null; do
      sleep 6
      kill -0 "$gpid" 2>/dev/null || break
      k=$((k + 1))
      kill -KILL "$DPID"; wait "$DPID" 2>/dev/null; DPID=""
      echo "  host: SIGKILLed the daemon ($k); restarting it in 1 s"
      sleep 1
      start_daemon "$name" "$img" || { kill -TERM "$gpid"; wait "$gpid"; return 1; }
      [ "$k" -ge 3 ] || continue
      [ "$k" -lt 10 ] || break
      [ "$(resubmitted "$name")" -gt 0 ] && break
    done
  else
    # Killed once the held requests stop growing (fio's whole queue depth is held): then
    # exactly those are in flight.
    local h last=-1 same=0
    for i in $(seq 240); do
      h=$(held "$name")
      if [ "$h" -gt 0 ] && [ "$h" -eq "$last" ]; then same=$((same + 1)); else same=0; fi
      last=$h
      [ "$same" -lt 6 ] || break
      kill -0 "$gpid" 2>/dev/null || break
      sleep 0.5
    done
    HELD=$(held "$name")
    k=1
    kill -KILL "$DPID"; wait "$DPID" 2>/dev/null; DPID=""
    echo "  host: SIGKILLed the daemon holding $HELD request(s); restarting it in 1 s"
    sleep 1
    DAEMON_ENV="$env_all" start_daemon "$name" "$img" || { kill -TERM "$gpid"; wait "$gpid"; DAEMON_BIN=""; return 1; }
    if [ "$mode" = control ] && ! grep -q 'EXTBLK_NO_INFLIGHT=1: inflight tracking is not offered' "$T/$name.log"; then
      echo "  $TEST_BIN did not switch inflight tracking off: not a testing build?"
      kill -TERM "$gpid"; wait "$gpid"; DAEMON_BIN=""; return 1
    fi
  fi
  KILLS=$k
  wait "$gpid"; KILLED_RC=$?
  DAEMON_BIN=""
  sed 's/^/    | /' "$T/$name.out"
  return 0
}

test_killed() {
  local n
  killed_run killed 1200 real || return 1
  [ "$KILLED_RC" -eq 0 ] || { echo "  guest exited $KILLED_RC"; return 1; }
  [ "$KILLS" -ge 3 ] || { echo "  fio ended after $KILLS kill(s), before three"; return 1; }
  n=$(resubmitted killed)
  echo "  host: $n request(s) resubmitted from the inflight region over $KILLS restarts"
  # The race this test is about: requests were in flight at a kill.
  [ "$n" -gt 0 ] || { echo "  no request was in flight at any kill: the test proved nothing"; return 1; }
  stop_daemon || return 1
  host_checks "$T/killed.img"
}

# The held run and its control differ only in inflight tracking: the first passes, the second
# must fail (and fails the same way every time: a request in flight at the kill is lost).
test_killed-held() {
  local n
  killed_run killed-held 900 held || return 1
  [ "$KILLED_RC" -eq 0 ] || { echo "  guest exited $KILLED_RC"; return 1; }
  n=$(resubmitted killed-held)
  echo "  host: the killed daemon held $HELD request(s); the restarted one resubmitted $n"
  [ "$HELD" -gt 0 ] && [ "$n" -eq "$HELD" ] || { echo "  resubmitted $n, not the $HELD held"; return 1; }
  stop_daemon || return 1
  host_checks "$T/killed-held.img"
}

test_killed-control() {
  killed_run killed-control 900 control || return 1
  stop_daemon
  echo "  the killed daemon held $HELD request(s); $(resubmitted killed-control) resubmitted"
  if [ "$KILLED_RC" -eq 0 ]; then
    echo "  fio passed without inflight tracking: the killed tests cannot tell it apart"
    return 1
  fi
  grep -qE 'STUCK|is not a head|I/O error|verify|err= *[1-9]' "$T/killed-control.out" \
    || { echo "  the guest failed, but not the way a lost request fails"; return 1; }
  echo "  without inflight tracking the run fails (guest exit $KILLED_RC), as it must"
}

# The xfstests runner's smoke subset (tests/xfstests/smoke, ext4) through scripts/xfstests.sh
# itself, so the runner cannot rot: the tree built from the tarball, fresh images, one ./check per
# test, both images checked clean after.
test_xfstests() {
  if [ -z "${XFSTESTS_DIR:-}${XFSTESTS_TARBALL:-}" ] && [ ! -f "$ROOT/../shared/xfstests/xfstests-dev.tar.xz" ] \
     && [ ! -f /work/shared/xfstests/xfstests-dev.tar.xz ]; then
    echo "  no xfstests source (XFSTESTS_TARBALL or XFSTESTS_DIR)"
    [ "${CI:-}" = true ] && return 1
    echo "  SKIP: guest test xfstests"; return 0
  fi
  EXTBLK_BIN=$BIN "$ROOT/scripts/xfstests.sh" --smoke --results "$T/xfstests" --test-timeout 600 \
    > "$T/xfstests.out" 2>&1
  local rc=$?
  grep -E '^xfstests: [a-z0-9]+/[0-9]+ |xfstests.sh: .*(passed|clean)' "$T/xfstests.out" | sed 's/^/  /'
  [ $rc -eq 0 ] || { echo "  scripts/xfstests.sh exited $rc"; tail -5 "$T/xfstests.out" | sed 's/^/    /'; return 1; }
  # A smoke run that ran nothing proves nothing.
  local passed
  passed=$(awk -F'\t' '$2 == "pass"' "$T/xfstests/summary.tsv" | wc -l)
  [ "$passed" -gt 0 ] || { echo "  no test passed"; return 1; }
}

TESTS=${EXTBLK_E2E_TESTS:-ext4 xfs crash crash-wb reconnect raw resize killed killed-held killed-control xfstests}
for t in $TESTS; do
  run_test "$t" "test_$t"
done

echo "guest.sh: total $(( $(date +%s) - T0 ))s"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

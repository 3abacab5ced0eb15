#!/usr/bin/env bash
# Runs xfstests (fstests) inside the test guest on two disks served by extblk, or, as the
# baseline, by qemu-storage-daemon on raw files; one ./check per test, each with a timeout.
#
# usage: scripts/xfstests.sh [options] [TEST | -g GROUP | -x GROUP ...]
#        scripts/xfstests.sh --report DIR [DIR ...]
#   TEST        generic/001, xfs/007, ...; -g GROUP adds a group's tests (from the built tree's
#               tests/*/group.list), -x GROUP removes them. No tests named: --list
#               tests/xfstests/curated.
# options:
#   --list FILE       run the tests FILE names (one per line; `#` starts a comment)
#   --smoke           run tests/xfstests/smoke, the fast subset CI runs
#   --fstyp ext4|xfs  the filesystem the tests make (default ext4; or FSTYP=)
#   --baseline qsd    serve both disks with qemu-storage-daemon (raw files, cache.direct=on,
#                     aio=io_uring, discard=unmap) instead of extblk: what a failure is compared with
#   --results DIR     where the results go (default ./xfstests-results/<extblk|qsd>-<fstyp>)
#   --test-timeout S  a test still running after S seconds is killed and counts as failed (1200)
#   --report DIR...   print the markdown results table of earlier runs (as in docs/guests.md);
#                     runs with the same label (backend and fstyp) are merged into one column
#
#   TEST_DEV=/dev/vda     test.img (extblk image, or a raw file for qsd), mkfs.$FSTYP'd first
#   SCRATCH_DEV=/dev/vdb  scratch.img (the tests make their own filesystems on it)
#   Both are fresh for every run. The guest boots with `nowatchdog` (under TCG a busy vCPU trips
#   the soft-lockup detector, and a test that sees that in dmesg fails) and has the users fsgqa,
#   fsgqa2 and 123456-fsgqa; dm-flakey, dm-log-writes and the like load on demand from the
#   guest kernel's own modules (the guest's modprobe is the host's, in the overlay).
#
# Environment:
#   XFSTESTS_DIR      a built xfstests tree, used as is (else built from XFSTESTS_TARBALL)
#   XFSTESTS_TARBALL  the xfstests-dev source tarball; default ../shared/xfstests/xfstests-dev.tar.xz
#                     beside this checkout, then /work/shared/xfstests/xfstests-dev.tar.xz. It is
#                     built once (with the Debian packages it needs, installed by apt-get) into
#                     ${XDG_CACHE_HOME:-~/.cache}/extblk-xfstests/<tarball hash>/xfstests-dev
#   XFSTESTS_SIZE     size of each disk (default 10G; thin: only written data takes space)
#   XFSTESTS_MEM      guest memory (default 2G); XFSTESTS_QUEUES virtqueues per disk (default 2)
#   EXTBLK_BIN        the daemon (default: cargo build --release); MKFS_OPTIONS, MOUNT_OPTIONS
#
# Output in DIR: summary.tsv (test, pass|fail|notrun, seconds, reason), run.txt (what ran, where,
# when, how long), logs/<test>.log (./check's output), results/ (xfstests' own: .out.bad, .full,
# .dmesg), console.log, the daemons' logs, and for extblk `extblk check` and `e2fsck -fn` of
# both images. Exit status: 0 if no test failed and (extblk) both images check clean, 1 if not,
# 2 on bad usage.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "xfstests.sh: error: $*" >&2; exit 2; }
say() { echo "xfstests.sh: $*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

# ---------------------------------------------------------------- --report: the table
# One row per test, one column per run label ("extblk ext4", "qsd raw xfs", ...); directories with
# the same label are merged (a list run in parts, in several sessions: the later directory wins
# for a test both ran). A cell is "pass 12 s", "fail 40 s (reason)" or "notrun (reason)". Below
# the table, each label's commands, dates and total time.
report() {
  local d
  [ $# -gt 0 ] || die "--report needs result directories"
  for d in "$@"; do [ -f "$d/summary.tsv" ] && [ -f "$d/run.txt" ] || die "$d has no summary.tsv/run.txt"; done
  awk -F'\t' '
    FNR == 1 { file++ }
    FILENAME ~ /run\.txt$/ {
      k = $0; sub(/=.*/, "", k); v = $0; sub(/^[^=]*=/, "", v); m[k] = v
      if (k == "guest_status") {   # the last line: the run is read
        l = m["label"]
        if (!(l in col)) { col[l] = ++ncol; name[ncol] = l }
        c = col[l]; cur = c
        runs[c] = runs[c] "- " l ": `" m["command"] "`, " m["date"] ", " m["seconds"] " s, guest kernel " m["kernel"] \
                  (m["images"] == "" ? "" : ", " m["images"]) "\n"
      }
      next
    }
    {
      if (!(($1) in seen)) { seen[$1] = 1; order[++n] = $1 }
      v = $2
      if ($2 != "notrun") v = v " " $3 " s"
      if ($4 != "") { r = $4; gsub(/\|/, "\\|", r); if (length(r) > 70) r = substr(r, 1, 67) "..."; v = v " (" r ")" }
      cell[cur, $1] = v; st[cur, $1] = $2
    }
    END {
      h = "| test |"; s = "| --- |"
      for (c = 1; c <= ncol; c++) { h = h " " name[c] " |"; s = s " --- |" }
      print h; print s
      for (i = 1; i <= n; i++) {
        l = "| " order[i] " |"
        for (c = 1; c <= ncol; c++) {
          v = cell[c, order[i]]; l = l " " (v == "" ? "-" : v) " |"
          if (st[c, order[i]] != "") cnt[c, st[c, order[i]]]++
        }
        print l
      }
      l = "| **total** |"
      for (c = 1; c <= ncol; c++) l = l " " cnt[c, "pass"] + 0 " pass, " cnt[c, "fail"] + 0 " fail, " cnt[c, "notrun"] + 0 " notrun |"
      print l
      print ""
      for (c = 1; c <= ncol; c++) printf("%s", runs[c])
    }' $(for d in "$@"; do printf '%s %s ' "$d/run.txt" "$d/summary.tsv"; done)
}

# ---------------------------------------------------------------- arguments
fstyp=${FSTYP:-ext4} baseline="" out="" test_timeout=1200 lists=() selectors=()
cmdline="scripts/xfstests.sh $*"
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage 0 ;;
    --report) shift; report "$@"; exit 0 ;;
    --list) [ $# -ge 2 ] || die "--list needs a file"; lists+=("$2"); shift 2 ;;
    --smoke) lists+=("$ROOT/tests/xfstests/smoke"); shift ;;
    --fstyp) [ $# -ge 2 ] || die "--fstyp needs ext4 or xfs"; fstyp=$2; shift 2 ;;
    --baseline) [ "${2:-}" = qsd ] || die "--baseline: only qsd is known"; baseline=qsd; shift 2 ;;
    --results) [ $# -ge 2 ] || die "--results needs a directory"; out=$2; shift 2 ;;
    --test-timeout) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--test-timeout needs seconds"; test_timeout=$2; shift 2 ;;
    -g|-x) [ $# -ge 2 ] || die "$1 needs a group"; selectors+=("$1" "$2"); shift 2 ;;
    -*) die "unknown option $1 (see --help)" ;;
    */*) selectors+=(t "$1"); shift ;;
    *) die "$1: name tests as DIR/NUMBER (generic/001), or use -g GROUP" ;;
  esac
done
case "$fstyp" in ext4|xfs) ;; *) die "--fstyp $fstyp: only ext4 and xfs are supported" ;; esac
[ ${#lists[@]} -gt 0 ] || [ ${#selectors[@]} -gt 0 ] || lists=("$ROOT/tests/xfstests/curated")
for l in "${lists[@]}"; do [ -r "$l" ] || die "cannot read the test list $l"; done
backend=${baseline:-extblk}
out=${out:-$PWD/xfstests-results/$backend-$fstyp}
case "$out" in /*) ;; *) out=$PWD/$out ;; esac
size=${XFSTESTS_SIZE:-10G} mem=${XFSTESTS_MEM:-2G} queues=${XFSTESTS_QUEUES:-2}
command -v "mkfs.$fstyp" > /dev/null || die "mkfs.$fstyp not found on this host (the guest uses the host's tools)"

# ---------------------------------------------------------------- the xfstests tree
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_install() {  # the packages not yet installed
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get > /dev/null || die "missing packages ${missing[*]} and no apt-get"
  say "installing: ${missing[*]}"
  $sudo apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
# What xfstests' README lists for Debian, less what only other filesystems use; the run-time
# tools (xfs_io, dmsetup, quota, fio, ...) are used by the guest from this host's /.
apt_install acl attr autoconf automake bc dbench dump e2fsprogs fio gawk gcc indent libacl1-dev \
  libaio-dev libattr1-dev libcap-dev libgdbm-compat-dev libgdbm-dev libtool libtool-bin liburing-dev \
  lvm2 make pkg-config psmisc python3 quota sed sqlite3 uuid-dev uuid-runtime xfsdump xfslibs-dev \
  xfsprogs xz-utils
if [ -n "${XFSTESTS_DIR:-}" ]; then
  [ -d "$XFSTESTS_DIR" ] || die "XFSTESTS_DIR=$XFSTESTS_DIR is not a directory"
  tree=$(cd "$XFSTESTS_DIR" && pwd)
else
  tarball=${XFSTESTS_TARBALL:-}
  if [ -z "$tarball" ]; then
    for c in "$ROOT/../shared/xfstests/xfstests-dev.tar.xz" /work/shared/xfstests/xfstests-dev.tar.xz; do
      [ -f "$c" ] && { tarball=$c; break; }
    done
  fi
  [ -n "$tarball" ] && [ -f "$tarball" ] || die "no xfstests source: set XFSTESTS_TARBALL to xfstests-dev.tar.xz
  (a git archive of https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git) or XFSTESTS_DIR to a built tree"
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/extblk-xfstests/$(sha256sum < "$tarball" | cut -c1-16)
  tree=$cache/xfstests-dev
  mkdir -p "$cache"
  exec 9> "$cache/.lock"
  flock 9  # one builder at a time; the others find it built
  if [ ! -f "$cache/built" ]; then
    say "building xfstests from $tarball in $cache (a few minutes, once)"
    rm -rf "$tree"
    tar -xJf "$tarball" -C "$cache" || die "cannot unpack $tarball"
    [ -f "$tree/configure.ac" ] || die "$tarball does not unpack to xfstests-dev/"
    make -C "$tree" -j"$(nproc)" > "$cache/build.log" 2>&1 \
      || { tail -20 "$cache/build.log" >&2; die "building xfstests failed (log: $cache/build.log)"; }
    touch "$cache/built"
  fi
  exec 9>&-
fi
[ -x "$tree/check" ] && [ -f "$tree/common/config" ] || die "$tree does not look like an xfstests tree"
[ -x "$tree/ltp/fsstress" ] || die "$tree is not built (no ltp/fsstress): run make in it"

# ---------------------------------------------------------------- which tests
group_tests() {  # $1 = group: every test of the tree in it
  awk -v g="$1" '!/^#/ { for (i = 2; i <= NF; i++) if ($i == g) { print FILENAME "/" $1; next } }' \
    "$tree"/tests/*/group.list | sed -E "s|^$tree/tests/||; s|/group.list/|/|"
}
declare -A excluded=()
tests=()
add() { local t; for t in "$@"; do [ -n "${excluded[$t]:-}" ] || tests+=("$t"); done; }
for ((i = 0; i < ${#selectors[@]}; i += 2)); do
  [ "${selectors[i]}" = -x ] || continue
  for t in $(group_tests "${selectors[i+1]}"); do excluded[$t]=1; done
done
for l in "${lists[@]}"; do add $(sed 's/#.*//' "$l"); done
for ((i = 0; i < ${#selectors[@]}; i += 2)); do
  case "${selectors[i]}" in
    t) add "${selectors[i+1]}" ;;
    -g) g=$(group_tests "${selectors[i+1]}"); [ -n "$g" ] || die "no test is in group ${selectors[i+1]}"; add $g ;;
  esac
done
[ ${#tests[@]} -gt 0 ] || die "no tests selected"
for t in "${tests[@]}"; do
  [ -f "$tree/tests/$t" ] || die "$t: no such test in $tree/tests"
done

# ---------------------------------------------------------------- daemons and disks
if [ -z "$baseline" ]; then
  if [ -n "${EXTBLK_BIN:-}" ]; then
    BIN=$EXTBLK_BIN
  else
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    (cd "$ROOT" && cargo build --release --quiet)
    BIN=$ROOT/target/release/extblk
  fi
  [ -x "$BIN" ] || die "$BIN is not executable"
else
  command -v qemu-storage-daemon > /dev/null || die "--baseline qsd: qemu-storage-daemon not found (apt-get install qemu-system-x86 or qemu-utils)"
fi
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

# The guest's exchange directory is the results directory itself: what the guest writes there
# (summary.tsv, logs/, results/) is on the host as it happens, so an interrupted run keeps
# what it finished.
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/run.txt" ]; then
  die "--results $out is a non-empty directory that holds no earlier results: not replacing it"
fi
rm -rf "$out"
mkdir -p "$out"
xfer=$out
for d in test scratch; do
  if [ -z "$baseline" ]; then
    "$BIN" create --size "$size" "$work/$d.img" > /dev/null
    RUST_LOG=${RUST_LOG:-info} "$BIN" serve --socket "$work/$d.sock" --queues "$queues" "$work/$d.img" \
      2> "$out/daemon-$d.log" &
  else
    truncate -s "$size" "$work/$d.img"
    qemu-storage-daemon \
      --blockdev "driver=file,node-name=f,filename=$work/$d.img,cache.direct=on,aio=io_uring,discard=unmap" \
      --blockdev driver=raw,node-name=fmt,file=f,discard=unmap \
      --export "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path=$work/$d.sock,writable=on,num-queues=$queues" \
      2> "$out/daemon-$d.log" &
  fi
  pids+=($!)
done
for d in test scratch; do
  for _ in $(seq 100); do [ -S "$work/$d.sock" ] && break; sleep 0.1; done
  [ -S "$work/$d.sock" ] || { cat "$out/daemon-$d.log" >&2; die "the $backend daemon did not start for $d.img"; }
done

# ---------------------------------------------------------------- the guest side
cat > "$xfer/local.config" <<EOF
# written by scripts/xfstests.sh
export FSTYP=$fstyp
export TEST_DEV=/dev/vda
export TEST_DIR=/mnt/test
export SCRATCH_DEV=/dev/vdb
export SCRATCH_MNT=/mnt/scratch
export RESULT_BASE=/xfer/results
export LOGGER_PROG=true
# No udev runs in the guest: libdevmapper (dmsetup, for the dm-flakey and dm-log-writes tests)
# must make the device nodes itself rather than wait for udev to, and xfstests must not wait for
# udev either: with the host's udevadm in the overlay it picks "udevadm wait /dev/mapper/NAME",
# which waits for ever for a udev database entry no udevd will write (generic/322 stopped right
# after its mkfs, in _dmsetup_create). xfstests' own fallback for a system without udev:
export DM_DISABLE_UDEV=1
export UDEV_SETTLE_PROG="sleep 1"
unset UDEV_WAIT_PROG
${MKFS_OPTIONS:+export MKFS_OPTIONS="$MKFS_OPTIONS"}
${MOUNT_OPTIONS:+export MOUNT_OPTIONS="$MOUNT_OPTIONS"}
EOF

cat > "$work/guest.sh" <<'EOF'
# runs in the guest: $1 = xfstests tree, $2 = seconds per test, the rest = the tests
set -u
dir=$1 per=$2; shift 2
. /xfer/local.config
export HOST_OPTIONS=/xfer/local.config
echo "xfstests: $dir, FSTYP=$FSTYP, TEST_DEV=$TEST_DEV ($(cat /sys/block/vda/size) sectors)," \
     "SCRATCH_DEV=$SCRATCH_DEV ($(cat /sys/block/vdb/size) sectors), kernel $(uname -r), $# tests"
uname -r > /xfer/kernel
# No udev, so no /dev/fd and friends: bash's process substitution (<(...), used by generic/251
# and 260 among others) needs /dev/fd.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do [ -e /dev/${i#*:} ] || ln -s /proc/self/fd/${i%%:*} /dev/${i#*:}; done
# No udev, so /dev/mapper/NAME is the device node libdevmapper makes, where udev makes it a
# symlink to /dev/dm-N: xfstests follows that link to find a dm device's /sys/fs/$FSTYP/dm-N
# (_short_dev; generic/456 on xfs wrote error/fail_at_unmount into a directory that did not
# exist). A dmsetup first in PATH puts the links udev would, before it returns.
real_dmsetup=$(command -v dmsetup)
if [ -n "$real_dmsetup" ]; then
  mkdir -p /run/xfstests-bin
  cat > /run/xfstests-bin/dmsetup <<W
#!/bin/bash
$real_dmsetup "\$@"; rc=\$?
for n in /dev/mapper/*; do
  [ -b "\$n" ] && [ ! -L "\$n" ] || continue
  mm=\$(stat -c %t:%T "\$n"); major=\$((16#\${mm%:*})); minor=\$((16#\${mm#*:}))
  dm=\$(basename "\$(readlink -f /sys/dev/block/\$major:\$minor)")
  [ -b /dev/\$dm ] || mknod /dev/\$dm b \$major \$minor
  ln -sfn ../\$dm "\$n.link" && mv -Tf "\$n.link" "\$n"
done
exit \$rc
W
  chmod +x /run/xfstests-bin/dmsetup
  export PATH=/run/xfstests-bin:$PATH
fi
# users some tests need (the overlay's /etc is in RAM: the host's is not touched)
for u in fsgqa fsgqa2; do id "$u" > /dev/null 2>&1 || useradd -m "$u" 2> /dev/null; done
id 123456-fsgqa > /dev/null 2>&1 || useradd --badname 123456-fsgqa 2> /dev/null || useradd 123456-fsgqa 2> /dev/null
mkdir -p "$TEST_DIR" "$SCRATCH_MNT" "$RESULT_BASE" /xfer/logs
case $FSTYP in
  ext4) mkfs.ext4 -F -q ${MKFS_OPTIONS:-} "$TEST_DEV" ;;
  xfs)  mkfs.xfs -f -q ${MKFS_OPTIONS:-} "$TEST_DEV" ;;
esac || { echo "xfstests: mkfs.$FSTYP $TEST_DEV failed"; exit 2; }
cd "$dir" || exit 2
: > /xfer/summary.tsv
for t in "$@"; do
  log=/xfer/logs/${t//\//_}.log
  start=$(date +%s)
  # timeout puts ./check in a process group of its own and signals all of it
  timeout -k 60 "$per" ./check "$t" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  res=$RESULT_BASE/$t
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=fail reason="timed out after ${per} s"
    # what the killed test left behind, so the next one starts clean
    umount -l "$SCRATCH_MNT" 2> /dev/null; umount -l "$TEST_DIR" 2> /dev/null
    dmsetup remove_all > /dev/null 2>&1
  elif grep -q '^Not run:' "$log"; then
    status=notrun reason=$(head -1 "$res.notrun" 2> /dev/null)
  elif [ $rc -eq 0 ] && grep -q '^Passed all 1 tests' "$log"; then
    status=pass reason=""
  else
    status=fail
    reason=$(grep -m1 -oE 'output mismatch|\[failed, exit status [0-9]+\]|_check_[a-z_]+: [^(]*|dmesg' "$log")
    [ -n "$reason" ] || reason="exit status $rc"
  fi
  reason=$(printf '%s' "$reason" | tr '\t\n' '  ')
  printf '%s\t%s\t%s\t%s\n' "$t" "$status" "$secs" "$reason" >> /xfer/summary.tsv
  echo "xfstests: $t $status ${secs}s${reason:+ ($reason)}"
done
sync
awk -F'\t' '$2 == "fail" { f++ } END { exit f > 0 }' /xfer/summary.tsv
EOF

label="$backend $fstyp"
[ -z "$baseline" ] || label="qsd raw $fstyp"
write_run() {  # $1 = seconds (or "unfinished"), $2 = images' check, $3 = the guest's exit status
  {
    echo "label=$label"
    echo "command=$cmdline"
    echo "date=$(date -u +%Y-%m-%d)"
    echo "seconds=$1"
    echo "kernel=$(cat "$out/kernel" 2>/dev/null || echo '?')"
    echo "images=$2"
    echo "guest_status=$3"
  } > "$out/run.txt"
}
write_run unfinished "" ""
start=$(date +%s)
say "$backend, FSTYP=$fstyp, ${#tests[@]} tests, disks $size each, results in $out"
# In the background with a wait, so that SIGINT/SIGTERM interrupt the wait: the guest is then
# stopped, and the tests it finished are still reported and the images still checked.
interrupted=0
"$ROOT/scripts/run-guest.sh" --timeout $(( ${#tests[@]} * (test_timeout + 90) + 300 )) --mem "$mem" \
  --queues "$queues" --append nowatchdog --xfer "$xfer" --log "$out/console.log" \
  --disk "$work/test.sock" --disk "$work/scratch.sock" \
  --script "$work/guest.sh" "$tree" "$test_timeout" "${tests[@]}" &
guest=$!
trap 'interrupted=1; kill -TERM "$guest" 2>/dev/null' INT TERM
set +e
wait "$guest"; rc=$?
while kill -0 "$guest" 2>/dev/null; do wait "$guest"; rc=$?; done
set -e
trap 'exit 130' INT
trap 'exit 143' TERM
[ $interrupted -eq 0 ] || say "interrupted: the guest was stopped"
seconds=$(( $(date +%s) - start ))

# ---------------------------------------------------------------- after the run
touch "$out/summary.tsv"
for i in "${!pids[@]}"; do kill -TERM "${pids[$i]}" 2>/dev/null; wait "${pids[$i]}" 2>/dev/null; done
pids=()
images_clean=1 images=""
if [ -z "$baseline" ]; then
  for d in test scratch; do
    if "$BIN" check "$work/$d.img" > "$out/extblk-check-$d.txt" 2>&1 \
       && e2fsck -fn "$work/$d.img" > "$out/e2fsck-$d.txt" 2>&1; then
      images="$images $d.img clean;"
    else
      images_clean=0 images="$images $d.img NOT CLEAN;"
      say "$d.img does not check clean:"; cat "$out/extblk-check-$d.txt" "$out/e2fsck-$d.txt" >&2
    fi
  done
  images="extblk check + e2fsck -fn:${images%;}"
fi
write_run "$seconds" "$images" "$rc"
read -r pass fail notrun < <(awk -F'\t' '{ n[$2]++ } END { print n["pass"] + 0, n["fail"] + 0, n["notrun"] + 0 }' "$out/summary.tsv")
ran=$(wc -l < "$out/summary.tsv")
say "$label: $pass passed, $fail failed, $notrun not run, of ${#tests[@]} (${seconds} s); results in $out"
[ "$ran" -eq ${#tests[@]} ] || { say "the guest stopped after $ran of ${#tests[@]} tests (status $rc; see $out/console.log)"; exit 1; }
[ "$fail" -eq 0 ] && [ $images_clean -eq 1 ]

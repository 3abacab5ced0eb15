#!/usr/bin/env bash
# Boots the extblk test guest (vm-images/build.sh) in QEMU with one vhost-user-blk-pci disk per
# --disk socket (the guest sees /dev/vda, /dev/vdb, ... in that order), runs COMMAND inside it as
# root (chrooted into a tmpfs overlay over the host's read-only /, so host tools are available),
# prints its output and exits with its exit status.
#
# usage: scripts/run-guest.sh [options] --disk SOCK [--disk SOCK2 ...] -- COMMAND [ARG...]
#        scripts/run-guest.sh [options] --disk SOCK --script FILE [ARG...]
#   COMMAND with a single word is a bash command string ("mkfs.ext4 /dev/vda && mount ...");
#   with several words it is an argv, passed exactly.  --script FILE runs FILE with bash.
# options:
#   --timeout S      kill QEMU after S seconds and exit 124 (default 600)
#   --queues N       num-queues of every disk (default 1; at most the daemon's --queues)
#   --queue-size N   queue-size of every disk (default: QEMU's, 128 in 7.2)
#   --mem SIZE       guest memory, QEMU syntax (default 1G); always a shared memfd
#   --smp N          vCPUs (default 2)
#   --xfer DIR       host directory shared read-write with the guest at /xfer (default: a temporary
#                    one, deleted at exit); the command is written there as /xfer/cmd
#   --env VAR=VALUE  export VAR in the command's environment (repeatable)
#   --log FILE       also keep the whole serial console (boot included) in FILE
#   --reconnect S    QEMU reconnects to a socket that is not there yet / went away after S seconds
#   --append ARGS    more guest kernel command line (e.g. nowatchdog), appended to the default one
#   -v, --verbose    print the whole console (boot messages, kernel log), not only the command's
# Exit status: the command's; 124 on timeout; 125 if the guest did not boot or report a status.
# Acceleration: KVM when /proc/cpuinfo has vmx or svm and /dev/kvm is usable, otherwise TCG
# (EXTBLK_ACCEL=kvm|tcg forces one). The guest kernel, initramfs and QEMU come from
# vm-images/build.sh (cached; see vm-images/README.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
timeout_s=600 queues=1 qsize="" mem=1G smp=2 xfer="" log="" reconnect="" verbose=0 script="" append=""
disks=() envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout_s=$2; shift 2 ;;
    --queues) queues=$2; shift 2 ;;
    --queue-size) qsize=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --xfer) xfer=$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --log) log=$2; shift 2 ;;
    --reconnect) reconnect=$2; shift 2 ;;
    --append) append="$append $2"; shift 2 ;;
    --disk) disks+=("$2"); shift 2 ;;
    --script) script=$2; shift 2; break ;;
    -v|--verbose) verbose=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "run-guest: unknown option $1" >&2; usage ;;
  esac
done
[ -n "$script" ] || [ $# -gt 0 ] || { echo "run-guest: no command given" >&2; usage; }
[ -z "$script" ] || [ -r "$script" ] || { echo "run-guest: cannot read $script" >&2; exit 2; }
[[ "$timeout_s" =~ ^[0-9]+$ ]] || { echo "run-guest: bad --timeout $timeout_s" >&2; exit 2; }
for s in "${disks[@]}"; do
  [ -S "$s" ] || [ -n "$reconnect" ] || { echo "run-guest: $s is not a socket (is extblk serve running?)" >&2; exit 2; }
done

eval "$("$ROOT/vm-images/build.sh" --env)"
[ -z "$QEMU_MODDIR" ] || export QEMU_MODULE_DIR=$QEMU_MODDIR

work=$(mktemp -d "${TMPDIR:-/tmp}/extblk-guest.XXXXXX")
own_xfer=0
if [ -z "$xfer" ]; then xfer=$work/xfer; own_xfer=1; fi
mkdir -p "$xfer"
xfer=$(cd "$xfer" && pwd)
rm -f "$xfer/exit-status"
serial=${log:-$work/serial.log}
: > "$serial"

# The command file: environment, then the command.
{
  echo "# written by scripts/run-guest.sh"
  for e in "${envs[@]}"; do printf 'export %q=%q\n' "${e%%=*}" "${e#*=}"; done
  if [ -n "$script" ]; then
    cp "$script" "$xfer/script"
    printf 'exec /bin/bash /xfer/script'; printf ' %q' "$@"; echo
  elif [ $# -eq 1 ]; then
    printf '%s\n' "$1"
  else
    printf '%q ' "$@"; echo
  fi
} > "$xfer/cmd"

accel_kind=${EXTBLK_ACCEL:-}
if [ -z "$accel_kind" ]; then
  if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel_kind=kvm; else accel_kind=tcg; fi
fi
case "$accel_kind" in
  kvm) accel=(-accel kvm -cpu host) ;;
  tcg) accel=(-accel tcg,thread=multi -cpu max) ;;
  *) echo "run-guest: EXTBLK_ACCEL must be kvm or tcg" >&2; exit 2 ;;
esac

devs=()
i=0
for s in "${disks[@]}"; do
  devs+=(-chardev "socket,id=blk$i,path=$s${reconnect:+,reconnect=$reconnect}"
         -device "vhost-user-blk-pci,chardev=blk$i,num-queues=$queues${qsize:+,queue-size=$qsize}")
  i=$((i + 1))
done

# shellcheck disable=SC2206
cmd=("$QEMU" $QEMU_L "${accel[@]}" -smp "$smp" -nodefaults -no-user-config -display none
     -object "memory-backend-memfd,id=mem,size=$mem,share=on" -machine q35,memory-backend=mem -m "$mem"
     -kernel "$VM_KERNEL" -initrd "$VM_INITRD"
     -append "console=ttyS0 quiet panic=-1 extblk.disks=${#disks[@]}$append"
     "${devs[@]}"
     -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
     -virtfs "local,path=$xfer,mount_tag=xfer,security_model=none,multidevs=remap"
     -serial "file:$serial" -monitor none -no-reboot)

qpid="" tpid=""
cleanup() {
  trap - EXIT INT TERM HUP
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill -TERM "$qpid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$qpid" 2>/dev/null || true
  fi
  [ -z "$tpid" ] || { sleep 0.3; kill "$tpid" 2>/dev/null || true; }
  wait 2>/dev/null || true
  [ $own_xfer -eq 0 ] || rm -rf "$xfer"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

"${cmd[@]}" </dev/null >"$work/qemu.out" 2>&1 &
qpid=$!

# Live output: everything after the start marker, without the exit marker and CRs, line by line
# (a bash read loop: unlike awk or tr it does not buffer, so whoever reads our output sees the
# guest's progress as it happens).
show_console() {
  local line on=$verbose
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    case "$line" in
      EXTBLK-GUEST-START*) on=1; [ $verbose -eq 1 ] || continue ;;
      *EXTBLK-GUEST-EXIT=[0-9]*)   # may follow output that did not end with a newline
        [ $verbose -eq 1 ] || { [ -z "${line%EXTBLK-GUEST-EXIT=*}" ] || printf '%s\n' "${line%EXTBLK-GUEST-EXIT=*}"; on=0; continue; } ;;
    esac
    [ $on -eq 0 ] || printf '%s\n' "$line"
  done
}
tail -n +1 -f --pid="$qpid" "$serial" | show_console &
tpid=$!

# Wait for QEMU, enforcing the timeout (polling: no helper process outlives this script).
deadline=$(( $(date +%s) + timeout_s ))
timed_out=0
while kill -0 "$qpid" 2>/dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    timed_out=1
    kill -TERM "$qpid" 2>/dev/null || true
    for _ in $(seq 15); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$qpid" 2>/dev/null || true
    break
  fi
  sleep 0.2
done
set +e
wait "$qpid"; qrc=$?
set -e
qpid=""
wait "$tpid" 2>/dev/null || true; tpid=""

if [ $timed_out -eq 1 ]; then
  echo "run-guest: timeout after ${timeout_s}s, QEMU killed" >&2
  exit 124
fi
status=$(tr -d '\r' < "$serial" | sed -n 's/.*EXTBLK-GUEST-EXIT=\([0-9]*\)$/\1/p' | tail -1)
[ -n "$status" ] || status=$(cat "$xfer/exit-status" 2>/dev/null || true)
if [ -z "$status" ]; then
  echo "run-guest: the guest reported no exit status (QEMU exit $qrc)" >&2
  sed 's/^/run-guest: qemu: /' "$work/qemu.out" >&2
  echo "run-guest: last console lines:" >&2
  tr -d '\r' < "$serial" | tail -20 | sed 's/^/run-guest:   /' >&2
  exit 125
fi
if [ -s "$work/qemu.out" ] && [ $verbose -eq 1 ]; then sed 's/^/run-guest: qemu: /' "$work/qemu.out" >&2; fi
exit "$status"

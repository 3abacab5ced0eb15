#!/usr/bin/env bash
# Cost per request on the hot path, user space: instructions (valgrind's callgrind; this machine
# has no hardware counters for `perf stat`) for extblk and qemu-storage-daemon raw, and heap
# allocations for extblk (examples/alloc_count.rs: the daemon with a counting allocator), per
# 4 KiB random overwrite and per 4 KiB random read. Each daemon runs twice per pattern: a
# 64 MiB region filled by 1 MiB writes, then N1 (or N2) requests at iodepth 32; the difference
# of the totals over the difference of the requests cancels start-up, the fill and shutdown.
# For qemu-storage-daemon the figure without memset is printed too (under valgrind its
# coroutine stacks are cleared per request, which a native run does not do). Usage:
#   scripts/instructions.sh                 # N1=10000 N2=30000 PATTERNS="randwrite randread"
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${N1:-10000} N2=${N2:-30000} PATTERNS=${PATTERNS:-randwrite randread}
command -v valgrind >/dev/null || { echo "instructions: valgrind not found (apt-get install valgrind)"; exit 1; }
command -v qemu-storage-daemon >/dev/null || { echo "instructions: qemu-storage-daemon not found"; exit 1; }
# shellcheck source=scripts/measure-env.sh
. scripts/measure-env.sh instr
cargo build --release -q --example alloc_count
A=$PWD/target/release/examples/alloc_count

load() { # socket pattern n: fill the region, then n requests
  "$E" bench --socket "$1" --pattern write --bs 1M --iodepth 8 --once --runtime 600 --size 64M --output json >/dev/null
  "$E" bench --socket "$1" --pattern "$2" --bs 4K --iodepth 32 --ios "$3" --runtime 600 --size 64M --output json >/dev/null
}
wait_sock() { for _ in $(seq 600); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "instructions: no socket $1"; exit 1; }

run() { # target pattern n -> "total without-memset"
  local t=$1 n=$3 sock=$dir/s.sock out=$dir/cg.$1.$2.$3
  rm -f "$sock" "$dir/x.img" "$dir/r.raw"
  case $t in
    extblk) "$E" create --size 128M "$dir/x.img" >/dev/null
            # --sandbox none: the seccomp filter would bind valgrind too, whose own calls (its
            # translated code is mapped PROT_EXEC, its output file opened late) are not the
            # daemon's and not on the list.
            valgrind --tool=callgrind --callgrind-out-file="$out" "$E" serve --sandbox none --socket "$sock" "$dir/x.img" 2>>"$dir/vg.log" & ;;
    raw)    fallocate -l 128M "$dir/r.raw"
            valgrind --tool=callgrind --callgrind-out-file="$out" qemu-storage-daemon \
              --object iothread,id=io0,poll-max-ns=0 \
              --blockdev driver=file,node-name=f,filename="$dir/r.raw",cache.direct=on,aio=io_uring \
              --blockdev driver=raw,node-name=fmt,file=f \
              --export type=vhost-user-blk,id=e,node-name=fmt,iothread=io0,addr.type=unix,addr.path="$sock",writable=on 2>>"$dir/vg.log" & ;;
  esac
  pid=$!
  wait_sock "$sock"
  load "$sock" "$2" "$n"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=
  local total memset
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$out")
  memset=$(callgrind_annotate --inclusive=no "$out" 2>/dev/null | awk '/memset/ {gsub(",", "", $1); s += $1} END {print s + 0}')
  echo "$total $((total - memset))"
}

allocations() { # pattern n -> heap allocations of the whole run
  local sock=$dir/a.sock
  rm -f "$sock" "$dir/x.img"
  "$E" create --size 128M "$dir/x.img" >/dev/null
  "$A" serve --socket "$sock" "$dir/x.img" 2>"$dir/alloc.log" &
  pid=$!
  wait_sock "$sock"
  load "$sock" "$1" "$2"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=
  sed -n 's/^allocations=//p' "$dir/alloc.log"
}

for p in $PATTERNS; do
  what=$([ "$p" = randread ] && echo "4 KiB random read" || echo "4 KiB random overwrite")
  for t in extblk raw; do
    read -r a am < <(run "$t" "$p" "$N1")
    read -r b bm < <(run "$t" "$p" "$N2")
    per=$(( (b - a) / (N2 - N1) )); perm=$(( (bm - am) / (N2 - N1) ))
    label=$([ "$t" = raw ] && echo "qemu-storage-daemon raw" || echo "extblk serve (image)")
    echo "$what, $label: ($b - $a) / ($N2 - $N1) = $per instructions per request; without memset: $perm"
  done
  a=$(allocations "$p" "$N1"); b=$(allocations "$p" "$N2")
  echo "$what, extblk serve (image): ($b - $a) / ($N2 - $N1) = $(python3 -c "print(round(($b - $a) / ($N2 - $N1), 3))") heap allocations per request"
done

#!/usr/bin/env bash
# Memory and open time on a large image (issue 8's memory target): creates a SIZE image, serves
# it, writes WRITE bytes of random 4 KiB writes over the whole disk with `extblk bench`, then
# prints the daemon's resident set (VmRSS, VmHWM), and how long `info` and `serve` take to open
# the written image. Usage:
#   scripts/memory.sh                          # SIZE=1T WRITE=4G
#   SIZE=1T WRITE=4G EXTRA="--alloc-unit 4K" scripts/memory.sh
# With the default 64 KiB allocation unit, WRITE=4G of random writes allocates up to 64 GiB of
# the host filesystem; DIR (default /var/tmp) must have room for it.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1T} WRITE=${WRITE:-4G} EXTRA=${EXTRA:-} DIR=${DIR:-/var/tmp}
# shellcheck source=scripts/measure-env.sh
. scripts/measure-env.sh mem
bytes() { python3 -c "import sys; u={'K':1<<10,'M':1<<20,'G':1<<30,'T':1<<40}; s=sys.argv[1]; print(int(s[:-1])*u[s[-1]] if s[-1] in u else int(s))" "$1"; }
now() { date +%s.%N; }
serve() { # starts serve and waits for its socket; sets pid and took (seconds to the socket)
  rm -f "$dir/sock"
  local t0; t0=$(now)
  # shellcheck disable=SC2086
  "$E" serve $EXTRA --socket "$dir/sock" "$dir/disk.img" >/dev/null 2>>"$dir/serve.log" &
  pid=$!
  while [ ! -S "$dir/sock" ]; do sleep 0.005; done
  took=$(python3 -c "print(round($(now) - $t0, 3))")
}
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$pid/status"; }

"$E" create --size "$SIZE" "$dir/disk.img" >/dev/null
serve
echo "fresh $SIZE image: VmRSS $(kib VmRSS) KiB after open"
n=$(( $(bytes "$WRITE") / 4096 ))
"$E" bench --socket "$dir/sock" --pattern randwrite --bs 4K --iodepth 32 --ios "$n" --runtime 3600 --output json \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print("wrote %d random 4 KiB blocks in %.1f s (%.0f IOPS)" % (d["ios"], d["seconds"], d["iops"]))'
echo "after $WRITE of random 4 KiB writes: VmRSS $(kib VmRSS) KiB, VmHWM $(kib VmHWM) KiB"
kill -TERM "$pid"; wait "$pid" || true; pid=
"$E" info "$dir/disk.img" --output json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("image:", {k: d[k] for k in d if k in ("extents", "tree_depth", "allocated_bytes", "tree_blocks")})'
t0=$(now); "$E" info "$dir/disk.img" >/dev/null; echo "extblk info opens it in $(python3 -c "print(round($(now) - $t0, 3))") s"
serve
echo "extblk serve has its socket up after $took s; VmRSS $(kib VmRSS) KiB after open"
kill -TERM "$pid"; wait "$pid" || true; pid=
du -h --apparent-size "$dir/disk.img" | awk '{print "image file: " $1 " apparent,"}'; du -h "$dir/disk.img" | awk '{print "  " $1 " allocated in the host"}'

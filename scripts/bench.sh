#!/usr/bin/env bash
# Side-by-side benchmark: extblk against qemu-storage-daemon (raw file and qcow2, both with
# cache.direct=on,aio=io_uring) over vhost-user-blk, driven by `extblk bench` (libblkio).
# Each pattern runs ROUNDS times per target in alternating order (this machine's storage is
# noisy); the table shows medians and ratios. Usage:
#   scripts/bench.sh                      # ROUNDS=3 RUNTIME=10 BS=4K IODEPTH=32 QUEUES=1
#   ROUNDS=5 RUNTIME=20 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-10} BS=${BS:-4K} IODEPTH=${IODEPTH:-32} QUEUES=${QUEUES:-1}
SIZE=${SIZE:-2G} SPAN=${SPAN:-1G}
command -v qemu-storage-daemon >/dev/null || { echo "bench: qemu-storage-daemon not found (apt-get install qemu-utils)"; exit 1; }
cargo build --release -q
E=$PWD/target/release/extblk
dir=$(mktemp -d /var/tmp/extblk-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

start() { # target name -> socket; fresh images for each start
  local t=$1 sock=$dir/$1.sock
  rm -f "$sock"
  case $t in
    extblk) rm -f "$dir/x.img"; "$E" create --size "$SIZE" "$dir/x.img" >/dev/null
            "$E" serve --queues "$QUEUES" --socket "$sock" "$dir/x.img" 2>>"$dir/extblk.log" & ;;
    raw)    rm -f "$dir/r.raw"; fallocate -l "$SIZE" "$dir/r.raw"
            qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$dir/r.raw",cache.direct=on,aio=io_uring \
              --blockdev driver=raw,node-name=fmt,file=f \
              --export type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path="$sock",writable=on,num-queues="$QUEUES" 2>>"$dir/qsd.log" & ;;
    qcow2)  rm -f "$dir/q.qcow2"; qemu-img create -q -f qcow2 "$dir/q.qcow2" "$SIZE"
            qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$dir/q.qcow2",cache.direct=on,aio=io_uring \
              --blockdev driver=qcow2,node-name=fmt,file=f \
              --export type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path="$sock",writable=on,num-queues="$QUEUES" 2>>"$dir/qsd.log" & ;;
  esac
  pids+=($!)
  for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.1; done
  echo "bench: $t did not start"; exit 1
}
stop() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

bench() { # socket pattern -> iops
  "$E" bench --socket "$1" --pattern "$2" --bs "$BS" --iodepth "$IODEPTH" --queues "$QUEUES" \
    --runtime "$RUNTIME" --size "$SPAN" --output json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))'
}

# pattern : targets : needs a pre-filled disk (overwrite) or a fresh one (allocating)
plan=(
  "randwrite:extblk raw:fill"
  "randread:extblk raw:fill"
  "write:extblk raw:fill"
  "write-flush:extblk raw:fill"
  "randwrite-alloc:extblk qcow2:fresh"
  "write-flush:extblk qcow2:fresh"
)
declare -A res
for entry in "${plan[@]}"; do
  IFS=: read -r pattern targets mode <<<"$entry"
  for r in $(seq "$ROUNDS"); do
    order=$targets; [ $((r % 2)) -eq 0 ] && order=$(echo "$targets" | awk '{for(i=NF;i>0;i--) printf "%s ", $i}')
    for t in $order; do
      start "$t"
      if [ "$mode" = fill ]; then "$E" bench --socket "$dir/$t.sock" --pattern write --bs 1M --iodepth 8 --runtime 30 --size "$SPAN" --output json >/dev/null; fi
      iops=$(bench "$dir/$t.sock" "$pattern")
      stop
      res["$pattern/$mode/$t"]+="$iops "
      echo "round $r $pattern ($mode) $t: $iops IOPS" >&2
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-18s %-6s %12s %12s %8s\n' pattern disk extblk other ratio
for entry in "${plan[@]}"; do
  IFS=: read -r pattern targets mode <<<"$entry"
  other=${targets#extblk }
  x=$(echo "${res[$pattern/$mode/extblk]}" | median); o=$(echo "${res[$pattern/$mode/$other]}" | median)
  printf '%-18s %-6s %12s %12s %7.2fx  (vs qsd %s)\n' "$pattern" "$mode" "$x" "$o" "$(python3 -c "print($x/$o)")" "$other"
done
echo "bs=$BS iodepth=$IODEPTH queues=$QUEUES runtime=${RUNTIME}s rounds=$ROUNDS span=$SPAN; $(nproc) cores, $(uname -r)"

#!/usr/bin/env bash
# Side-by-side benchmark: extblk against qemu-storage-daemon (raw file and qcow2, both with
# cache.direct=on,aio=io_uring; "rawhost": raw with cache.direct=off) over vhost-user-blk,
# driven by `extblk bench` (libblkio); extblk's cache modes ("extblk" --cache none, "extblk-host"
# --cache host, "extblk-wb" --cache writeback, "extblk-wb4k" that with --alloc-unit 4K); and
# against the limit: fio with io_uring and O_DIRECT on a bare raw file of the same size on the
# same filesystem, same depth ("bare").
# Each pattern runs ROUNDS times per target in alternating order (this machine's storage is
# noisy); the table shows medians and ratios, and for extblk's fresh disks the host space the
# image file took and the bytes the daemon wrote to the host, per byte the guest wrote. Usage:
#   scripts/bench.sh                      # ROUNDS=3 RUNTIME=10 IODEPTH=32 SPAN=1G SIZE=2G
#   ROUNDS=5 RUNTIME=20 scripts/bench.sh
#   ONLY="randread randwrite-alloc" ROUNDS=7 scripts/bench.sh   # just those patterns
#   MATCH=extblk-wb scripts/bench.sh      # just the rows whose line contains that (the cache's)
#   SKIP=extblk-wb scripts/bench.sh       # every row but those
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-10} IODEPTH=${IODEPTH:-32}
SIZE=${SIZE:-2G} SPAN=${SPAN:-1G}
SIZE0=$SIZE SPAN0=$SPAN
command -v qemu-storage-daemon >/dev/null || { echo "bench: qemu-storage-daemon not found (apt-get install qemu-utils)"; exit 1; }
command -v fio >/dev/null || { echo "bench: fio not found (apt-get install fio)"; exit 1; }
cargo build --release -q
E=$PWD/target/release/extblk
dir=$(mktemp -d /var/tmp/extblk-bench.XXXXXX)
if [ -d /dev/shm ]; then shm=$(mktemp -d /dev/shm/extblk-bench.XXXXXX); else shm=$dir; fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir" "$shm"; }
trap cleanup EXIT

start() { # target name -> socket; fresh images for each start
  local t=$1 sock=$dir/$1.sock
  rm -f "$sock"
  case $t in
    bare)   rm -f "$dir/b.raw"; fallocate -l "$SIZE" "$dir/b.raw"; return 0 ;;
    extblk*)
            local extra=()
            case $t in
              extblk-wb)   extra=(--cache writeback) ;;
              extblk-wb4k) extra=(--cache writeback --alloc-unit 4K) ;;
              extblk-host) extra=(--cache host) ;;
            esac
            rm -f "$dir/$t.img"; "$E" create --size "$SIZE" "$dir/$t.img" >/dev/null
            created=$(host_space "$dir/$t.img")
            # The restart log (and the write-back cache's file beside it) on tmpfs, as /run is
            # on a systemd host.
            "$E" serve --queues "$QUEUES" --socket "$sock" --restart-log "$shm/$t.log" "${extra[@]}" "$dir/$t.img" 2>>"$dir/extblk.log" & ;;
    rawhost) rm -f "$dir/rh.raw"; fallocate -l "$SIZE" "$dir/rh.raw"
            qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$dir/rh.raw",cache.direct=off,aio=io_uring \
              --blockdev driver=raw,node-name=fmt,file=f \
              --export type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path="$sock",writable=on,num-queues="$QUEUES" 2>>"$dir/qsd.log" & ;;
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
stop() { # target; for extblk, sets hostw: the bytes the daemon sent to storage (/proc/PID/io
  # write_bytes, its io_uring workers included), read every 10 ms until it exits (so nearly all of its last commit)
  [ "$1" = bare ] && return 0
  local p=${pids[-1]} v
  hostw=0
  kill "$p"
  if [[ $1 == extblk* ]]; then
    while kill -0 "$p" 2>/dev/null; do
      v=$(awk '$1 == "write_bytes:" {print $2}' "/proc/$p/io" 2>/dev/null) && [ -n "$v" ] && hostw=$v
      sleep 0.01
    done
  fi
  wait "$p" 2>/dev/null || true; unset 'pids[-1]'
}
host_space() { # file -> bytes the host filesystem allocated for it
  stat -c '%b %B' "$1" | awk '{print $1 * $2}'
}
fio_bare() { # fio arguments...: fio on the bare file, io_uring + O_DIRECT -> iops
  fio --name=bare --filename="$dir/b.raw" --ioengine=io_uring --direct=1 --size="$SPAN" \
    --output-format=json "$@" | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]))'
}

bench() { # socket pattern bs queues -> iops
  if [[ $1 == */bare.sock ]]; then
    case $2 in
      randwrite|randread|read|write) ;;
      *) echo "bench: no bare-file form of $2" >&2; exit 1 ;;
    esac
    fio_bare --rw="$2" --bs="$3" --iodepth="$IODEPTH" --numjobs="$4" --group_reporting \
      --time_based --runtime="$RUNTIME"
    return
  fi
  # Allocating random writes: every block of the span exactly once, however long it takes, so
  # no backend is measured on overwrites once its span is covered.
  local how=(--runtime "$RUNTIME")
  [ "$2" = randwrite-alloc ] && how=(--once --runtime 300)
  "$E" bench --socket "$1" --pattern "$2" --bs "$3" --iodepth "$IODEPTH" --queues "$4" \
    "${how[@]}" --size "$SPAN" --output json | tee "$dir/last.json" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))'
}
written() { # bytes the last `extblk bench` wrote
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["ios"] * j["bs"])' "$dir/last.json"
}
fill() { # socket how: seq = 1 MiB sequential writes, rand = 4 KiB writes in random order; each block once
  if [[ $1 == */bare.sock ]]; then
    [ "$2" = seq ] || { echo "bench: the bare file is filled sequentially only" >&2; exit 1; }
    fio_bare --rw=write --bs=1M --iodepth=8 > /dev/null
    return
  fi
  case $2 in
    seq)  "$E" bench --socket "$1" --pattern write --bs 1M --iodepth 8 --once --runtime 600 --size "$SPAN" --output json >/dev/null ;;
    rand) "$E" bench --socket "$1" --pattern randwrite-alloc --bs 4K --iodepth 32 --once --runtime 600 --size "$SPAN" --output json >/dev/null ;;
  esac
}

# pattern : bs : queues : targets : disk [: size] (fill = every block written first by 1 MiB
# sequential writes, so the measured writes are overwrites; fresh = a new image/file; randfill =
# written first by 4 KiB writes in random order). "extblk~X" is extblk with disk X instead. A
# size makes the disk that large and the span all of it (scattered first writes on big disks).
plan=(
  "randwrite:4K:1:extblk raw bare:fill"
  "randread:4K:1:extblk raw bare:fill"
  "write-flush:4K:1:extblk raw:fill"
  "randwrite:4K:2:extblk raw:fill"
  "write:1M:1:extblk raw:fresh"
  "randwrite-alloc:4K:1:extblk qcow2:fresh"
  "write-flush:4K:1:extblk qcow2:fresh"
  "read:1M:1:extblk extblk~randfill:fill"
  "randwrite:4K:1:extblk qcow2:fresh:2G"
  "randwrite:4K:1:extblk qcow2:fresh:8G"
  "randwrite:4K:1:extblk qcow2:fresh:1T"
  "randwrite:4K:1:extblk-wb extblk extblk-host rawhost:fill"
  "randwrite:4K:1:extblk-wb extblk extblk-host rawhost:fresh"
  "write-flush:4K:1:extblk-wb extblk:fresh"
  "randwrite:4K:1:extblk-wb4k extblk:fresh"
  "read:1M:1:extblk-wb extblk-wb~randfill:fill"
)
if [ -n "${ONLY:-}" ]; then
  keep=()
  for entry in "${plan[@]}"; do
    [[ " $ONLY " == *" ${entry%%:*} "* ]] && keep+=("$entry")
  done
  plan=("${keep[@]}")
fi
if [ -n "${MATCH:-}" ]; then
  keep=()
  for entry in "${plan[@]}"; do
    [[ $entry == *"$MATCH"* ]] && keep+=("$entry")
  done
  plan=("${keep[@]}")
fi
if [ -n "${SKIP:-}" ]; then
  keep=()
  for entry in "${plan[@]}"; do
    [[ $entry == *"$SKIP"* ]] || keep+=("$entry")
  done
  plan=("${keep[@]}")
fi
declare -A res space hostbytes
for entry in "${plan[@]}"; do
  IFS=: read -r pattern bs queues targets mode size <<<"$entry"
  SIZE=${size:-$SIZE0} SPAN=${size:-$SPAN0}
  for r in $(seq "$ROUNDS"); do
    order=$targets; [ $((r % 2)) -eq 0 ] && order=$(echo "$targets" | awk '{for(i=NF;i>0;i--) printf "%s ", $i}')
    for t in $order; do
      how=$mode; [[ $t == *~* ]] && how=${t#*~}
      QUEUES=$queues start "${t%~*}"
      case $how in fill) fill "$dir/${t%~*}.sock" seq ;; randfill) fill "$dir/${t%~*}.sock" rand ;; esac
      iops=$(bench "$dir/${t%~*}.sock" "$pattern" "$bs" "$queues")
      stop "${t%~*}"
      res["$entry/$t"]+="$iops "
      # On a fresh extblk disk, against the bytes the guest wrote (rewrites counted): the host
      # space the image file took since `create`, and the bytes the daemon wrote to the host
      # (data, zero fill, journal, checkpoint).
      if [ "$mode" = fresh ] && [[ $t == extblk* ]] && [ "${t%~*}" = "$t" ] && [ "$pattern" != write ]; then
        space["$entry/$t"]+="$(python3 -c "print(round(($(host_space "$dir/$t.img") - $created) / $(written), 3))") "
        hostbytes["$entry/$t"]+="$(python3 -c "print(round($hostw / $(written), 3))") "
      fi
      echo "round $r $pattern bs=$bs queues=$queues ($mode${size:+ $size}) $t: $iops IOPS" >&2
    done
  done
done
median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-16s %4s %2s %-9s %-11s %10s %12s %8s\n' pattern bs q disk first "its IOPS" other ratio
for entry in "${plan[@]}"; do
  IFS=: read -r pattern bs queues targets mode size <<<"$entry"
  first=${targets%% *}
  x=$(echo "${res[$entry/$first]}" | median)
  for other in ${targets#"$first" }; do
    o=$(echo "${res[$entry/$other]}" | median)
    case $other in
      *~*) what="${other%~*} after a ${other#*~}, inverted: seq/rand" ;;
      bare) what="fio io_uring O_DIRECT on the bare file: extblk as a fraction of the limit" ;;
      extblk) what="extblk --cache none" ;;
      extblk-host) what="extblk --cache host" ;;
      rawhost) what="qsd raw cache.direct=off" ;;
      *) what="qsd $other" ;;
    esac
    printf '%-16s %4s %2s %-9s %-11s %10s %12s %7.2fx  (vs %s)\n' "$pattern" "$bs" "$queues" "$mode${size:+:$size}" "$first" "$x" "$o" \
      "$(python3 -c "print($x/$o)")" "$what"
  done
done
for key in "${!space[@]}"; do
  echo "host space / bytes written, ${key%/*} ${key##*/}: $(echo "${space[$key]}" | median)x"
  echo "host bytes written / bytes written, ${key%/*} ${key##*/}: $(echo "${hostbytes[$key]}" | median)x"
done | sort
# Ratios between rows, printed where both rows ran.
between() { # label entry/target entry/target
  local a b
  a=$(echo "${res[$2]:-}" | median); b=$(echo "${res[$3]:-}" | median)
  [ -n "$a" ] && [ -n "$b" ] && echo "$1: $(python3 -c "print(round($a/$b,2))")x"
  return 0
}
between "2 queues / 1 queue, overwrite randwrite, extblk" "randwrite:4K:2:extblk raw:fill/extblk" "randwrite:4K:1:extblk raw bare:fill/extblk"
between "2 queues / 1 queue, overwrite randwrite, qsd raw" "randwrite:4K:2:extblk raw:fill/raw" "randwrite:4K:1:extblk raw bare:fill/raw"
between "sequential read after a random fill / after a sequential fill (extblk)" \
  "read:1M:1:extblk extblk~randfill:fill/extblk~randfill" "read:1M:1:extblk extblk~randfill:fill/extblk"
between "random first writes, 1 TiB disk / 2 GiB disk (extblk)" \
  "randwrite:4K:1:extblk qcow2:fresh:1T/extblk" "randwrite:4K:1:extblk qcow2:fresh:2G/extblk"
echo "iodepth=$IODEPTH runtime=${RUNTIME}s rounds=$ROUNDS span=$SPAN0 size=$SIZE0 (unless a row names its size); $(nproc) cores, $(uname -r)"

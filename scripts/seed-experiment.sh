#!/usr/bin/env bash
# The seed's experiment on extblk: pure 4 KiB random overwrites (iodepth 32, one queue) served
#   fast               mapping from the queue's seq-validated cache, completion on the queue thread
#   worker-completion  every completion through the completion worker
#   locked-lookup      every lookup under the mapping lock
# on (a) a contiguous image (filled by 1 MiB sequential writes) and (A) a fragmented one (every
# block its own extent: `create --scatter`), with (b) nothing else running and (B) allocating
# writes and discards on a second queue (`bench --background`). Prints the 4×3 table of medians.
#   scripts/seed-experiment.sh            # ROUNDS=3 RUNTIME=5 SPAN=1G
# With CACHE=writeback, the same table for the write-back cache's path (issue 14's "seed's
# table"): the overwrites through `--cache writeback`, whose writebacks map their runs
#   wb-fast            with the queue's lockless pre-map (the seed's design)
#   wb-locked          with every lookup under the mapping lock
#   none-fast          and, for comparison, --cache none with the fast path
# (the cache is sized to hold the span: the guest's writes complete from memory, the writebacks
# run beside them and are what the variants change).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-5} SPAN=${SPAN:-1G} SIZE=${SIZE:-2G}
# --hot-path exists only in builds with the testing feature.
features=testing
# shellcheck source=scripts/measure-env.sh
. scripts/measure-env.sh seed

run() { # layout path load -> IOPS
  local img=$dir/e.img sock=$dir/e.sock
  rm -f "$img" "$sock"
  if [ "$1" = fragmented ]; then "$E" create --size "$SIZE" --scatter "$SPAN" "$img" >/dev/null
  else "$E" create --size "$SIZE" "$img" >/dev/null; fi
  local how=(--hot-path "$2")
  case $2 in
    wb-fast)   how=(--hot-path fast --cache writeback --cache-size "$CACHE_SIZE") ;;
    wb-locked) how=(--hot-path locked-lookup --cache writeback --cache-size "$CACHE_SIZE") ;;
    none-fast) how=(--hot-path fast) ;;
  esac
  "$E" serve --queues 2 "${how[@]}" --restart-log "$shm/e.log" --socket "$sock" "$img" 2>>"$dir/serve.log" &
  pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  # Every block written once, so the measured writes are pure overwrites.
  "$E" bench --socket "$sock" --pattern write --bs 1M --iodepth 8 --once --runtime 600 --size "$SPAN" --output json >/dev/null
  local bg=(); [ "$3" = busy ] && bg=(--background)
  "$E" bench --socket "$sock" --pattern randwrite --bs 4K --iodepth 32 --runtime "$RUNTIME" --size "$SPAN" "${bg[@]}" --output json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))'
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

shm=$dir; [ -d /dev/shm ] && shm=/dev/shm
CACHE_SIZE=${CACHE_SIZE:-2G}
paths=(fast worker-completion locked-lookup)
[ "${CACHE:-}" = writeback ] && paths=(wb-fast wb-locked none-fast)
declare -A res
for r in $(seq "$ROUNDS"); do
  for layout in contiguous fragmented; do
    for load in quiet busy; do
      order=("${paths[@]}"); [ $((r % 2)) -eq 0 ] && order=("${paths[2]}" "${paths[1]}" "${paths[0]}")
      for p in "${order[@]}"; do
        iops=$(run "$layout" "$p" "$load")
        res["$layout/$load/$p"]+="$iops "
        echo "round $r $layout $load $p: $iops IOPS" >&2
      done
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-28s %10s %18s %14s %12s\n' "image / background" "${paths[0]}" "${paths[1]}" "${paths[2]}" "${paths[0]}/${paths[1]}"
for layout in contiguous fragmented; do
  for load in quiet busy; do
    f=$(echo "${res[$layout/$load/${paths[0]}]}" | median)
    w=$(echo "${res[$layout/$load/${paths[1]}]}" | median)
    l=$(echo "${res[$layout/$load/${paths[2]}]}" | median)
    label="$layout, $([ $load = quiet ] && echo "no background" || echo "alloc+discard")"
    printf '%-28s %10s %18s %14s %11.2fx\n' "$label" "$f" "$w" "$l" "$(python3 -c "print($f/$w)")"
  done
done
[ "${CACHE:-}" = writeback ] && echo "through --cache writeback --cache-size $CACHE_SIZE (none-fast: --cache none)"
echo "4K randwrite overwrites, iodepth 32, 1 queue measured; runtime ${RUNTIME}s, rounds $ROUNDS, span $SPAN; $(nproc) cores, $(uname -r)"

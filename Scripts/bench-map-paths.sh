#!/usr/bin/env bash
# One path against two, where the paths and not the CPUs bound the map: each path of a
# `parley block map` goes through a `parley chaos --rate` proxy of its own (a link of that
# speed in each direction), and fio drives the map's NBD endpoint.
#
#   Scripts/bench-map-paths.sh [--rate BYTES_PER_SECOND] [--second-rate BYTES_PER_SECOND]
#                              [--repetitions N] [--duration S]
#                              [--workloads randread,randwrite] [--block-size 64k]
#                              [--iodepth 16] [--size 1G] [--policy min-inflight]
#
# Systems, alternating in each repetition: `1-path` (one proxy), `2-paths` (two proxies),
# and `1-path-free` (no proxy: what the CPUs allow). The second path's proxy runs at
# --second-rate (default: --rate; a slower second path shows what the policy does).
# Prints one line per run (MiB/s, IOPS, the map's CPU per IO) and, at the end, per
# workload the median MiB/s of each and the median ratio of 2-paths to 1-path. Needs fio
# (with its nbd engine) and a release build (swift build -c release --product parley; or
# PARLEY=path).
set -euo pipefail

rate=$((64 << 20)); second_rate=; reps=3; duration=4; workloads=randread,randwrite; bs=64k; iodepth=16; size=1G; policy=min-inflight
parley=${PARLEY:-"$(cd "$(dirname "$0")/.." && pwd)/.build/release/parley"}
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --second-rate) second_rate=$2; shift 2 ;;
    --repetitions) reps=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --block-size) bs=$2; shift 2 ;;
    --iodepth) iodepth=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --policy) policy=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-map-paths: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
second_rate=${second_rate:-$rate}
for n in "$rate" "$second_rate" "$reps" "$duration" "$iodepth"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-map-paths: --rate, --second-rate, --repetitions, --duration and --iodepth take positive whole numbers, not '$n'" >&2; exit 2; }
done
case "$policy" in round-robin|min-inflight) ;; *) echo "bench-map-paths: --policy is round-robin or min-inflight, not '$policy'" >&2; exit 2 ;; esac
for w in ${workloads//,/ }; do
  case "$w" in randread|randwrite|read|write) ;; *) echo "bench-map-paths: unknown workload $w (randread, randwrite, read, write)" >&2; exit 2 ;; esac
done
for tool in fio python3; do
  command -v "$tool" >/dev/null || { echo "bench-map-paths: $tool is not installed (apt-get install -y $tool)" >&2; exit 2; }
done
[ -x "$parley" ] || { echo "bench-map-paths: $parley is not an executable (swift build -c release --product parley, or set PARLEY)" >&2; exit 2; }

bench_name=bench-map-paths
# shellcheck source=Scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
bench_workdir bench-map-paths

bench_disk "$size"
block_port=$(free_port); a_port=$(free_port); b_port=$(free_port)
"$parley" block serve --export "bench=$work/disk.img,shared" --listen "127.0.0.1:$block_port" > "$work/server.log" 2>&1 &
pids+=($!)
"$parley" chaos --listen "127.0.0.1:$a_port" --to "127.0.0.1:$block_port" --rate "$rate" --quiet > "$work/chaos-a.log" 2>&1 & pids+=($!)
"$parley" chaos --listen "127.0.0.1:$b_port" --to "127.0.0.1:$block_port" --rate "$second_rate" --quiet > "$work/chaos-b.log" 2>&1 & pids+=($!)
sleep 0.5
declare -A paths pid_of
paths[1-path]="--path 127.0.0.1:$a_port"
paths[2-paths]="--path 127.0.0.1:$a_port --path 127.0.0.1:$b_port"
paths[1-path-free]="--path 127.0.0.1:$block_port"
systems="1-path 2-paths 1-path-free"
for s in $systems; do
  # shellcheck disable=SC2086
  "$parley" block map --session "bench-$s" ${paths[$s]} --device bench --policy "$policy" \
    --nbd "unix:$work/$s.sock" --state-dir "$work/state-$s" > "$work/$s.log" 2>&1 &
  pid_of[$s]=$!; pids+=($!)
done
paths_up() { "$parley" block list --state-dir "$work/state-$1" 2>/dev/null | grep -c ': up,' || true; }
for s in $systems; do
  wait_for "nbd+unix:///bench?socket=$work/$s.sock" || { tail -n 5 "$work/$s.log" "$work"/chaos-*.log >&2; exit 1; }
  # Every path up before the first run (a path that missed its proxy retries with back-off).
  want=$(grep -o -- '--path' <<< "${paths[$s]}" | wc -l)
  for _ in $(seq 1 50); do [ "$(paths_up "$s")" -ge "$want" ] && break; sleep 0.2; done
  [ "$(paths_up "$s")" -ge "$want" ] || { echo "bench-map-paths: $s has fewer than $want paths up:" >&2; tail -n 5 "$work/$s.log" >&2; exit 1; }
done
echo "rate per path and direction: $rate bytes/s (second path $second_rate); fio $bs, QD$iodepth, ${duration} s; policy $policy" >&2

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results="$work/results.txt"
for rep in $(seq 1 "$reps"); do
  for w in ${workloads//,/ }; do
    for s in $systems; do
      cat "$work/disk.img" > /dev/null  # warm again: this host pages out file pages unused for a minute
      pid=${pid_of[$s]}
      t0=$(ticks "$pid")
      fio --name=paths --ioengine=nbd --uri="nbd+unix:///bench?socket=$work/$s.sock" --rw="$w" --bs="$bs" --iodepth="$iodepth" \
        --time_based --runtime="$duration" --norandommap --randrepeat=0 --output-format=json --output="$work/fio.json" > "$work/fio.log" 2>&1 \
        || { echo "bench-map-paths: fio failed on $s:" >&2; tail -n 5 "$work/fio.log" >&2; exit 1; }
      t1=$(ticks "$pid")
      python3 - "$work/fio.json" "$rep" "$w" "$s" "$t0" "$t1" "$(getconf CLK_TCK)" <<'EOF' | tee -a "$results"
import json, sys
path, rep, w, s, t0, t1, hz = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job["read"] if "read" in w else job["write"]
iops, mib = side["iops"], side["bw_bytes"] / (1 << 20)
ios = max(1, side["total_ios"])
cpu = (int(t1) - int(t0)) / int(hz) * 1e6 / ios
print(f"rep {rep} {w:9} {s:12} {mib:9.1f} MiB/s {iops:9.0f} IOPS  map {cpu:6.1f} us/IO")
EOF
    done
  done
done

python3 - "$results" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    f = line.split()
    runs[(f[2], f[1])][f[3]] = float(f[4])
print("\nmedians (MiB/s) and 2 paths / 1 path:")
for w in sorted({k[0] for k in runs}):
    reps = [v for k, v in runs.items() if k[0] == w]
    med = {s: statistics.median(r[s] for r in reps if s in r) for s in ("1-path", "2-paths", "1-path-free")}
    ratios = [r["2-paths"] / r["1-path"] for r in reps if "1-path" in r and "2-paths" in r and r["1-path"] > 0]
    print(f"  {w:9}  1 path {med['1-path']:8.1f}  2 paths {med['2-paths']:8.1f}  no proxy {med['1-path-free']:8.1f}"
          f"  2/1 {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
EOF

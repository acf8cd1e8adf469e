#!/usr/bin/env bash
# A/B of two Parley builds' block servers over Parley's own block protocol: each build serves
# the same file on a Unix socket of its own, and `parley block bench` (from build B, the
# "new" one) drives them in turn, alternating, several repetitions. Prints IOPS and the
# server's CPU per IO (user+sys of all its threads, from /proc/PID/stat) for each run, then
# the medians. The host's speed drifts by 2x over hours here, so only runs alternating in one
# invocation compare.
#
#   Scripts/ab-block-protocol.sh OLD_PARLEY NEW_PARLEY [FILE]
#
# Environment: RW (randread, randwrite, read, write; default randread), QD (default 32),
# BS (default 4096), REPS (default 5), SECS (default 3), PATHS (drive BlockMultipathDevice
# over N paths instead of one BlockClient). FILE (an existing file or block device) defaults
# to a 256 MiB file of random data made in the work directory. Writes change FILE. The two
# servers take turns going first, repetition by repetition. OLD_ARGS and NEW_ARGS add options
# to the bench against each (OLD_ARGS=--no-direct with the same executable twice compares
# Io messages with DIRECT IO on one build).
set -euo pipefail
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in --help|-h) usage; exit 0 ;; esac
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage >&2; exit 2; fi
old=$1 new=$2
for exe in "$old" "$new"; do [ -x "$exe" ] || { echo "ab-block-protocol: $exe is not an executable" >&2; exit 2; }; done
if [ $# -eq 3 ] && [ ! -f "$3" ] && [ ! -b "$3" ]; then echo "ab-block-protocol: $3 is neither a file nor a block device" >&2; exit 2; fi
rw=${RW:-randread} qd=${QD:-32} bs=${BS:-4096} reps=${REPS:-5} secs=${SECS:-3}
bench_name=ab-block-protocol
# shellcheck source=Scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
bench_workdir ab-block
file=${3:-$work/data.img}
[ $# -eq 3 ] || head -c $((256 << 20)) /dev/urandom > "$file"
start() {  # start NAME EXE: serves FILE on $work/NAME.sock; sets started (its PID, a child of this shell)
  "$2" block serve --export "bench=$file,shared" --nbd "unix:$work/$1-nbd.sock" --listen "unix:$work/$1.sock" >"$work/$1.log" 2>&1 &
  started=$!; pids+=("$started")
}
start old "$old"; old_pid=$started
start new "$new"; new_pid=$started
for _ in $(seq 100); do [ -S "$work/old.sock" ] && [ -S "$work/new.sock" ] && break; sleep 0.1; done
[ -S "$work/old.sock" ] && [ -S "$work/new.sock" ] || { echo "ab-block-protocol: a server did not start:" >&2; tail -n 5 "$work"/*.log >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
echo "# $rw bs=$bs qd=$qd, $reps x ${secs}s alternating; file $file" >&2
printf 'run system iops cpu_us_per_io\n'
for rep in $(seq "$reps"); do
  order="old new"; [ $((rep % 2)) -eq 0 ] && order="new old"
  for s in $order; do
    pid=$old_pid; [ $s = new ] && pid=$new_pid
    extra=${OLD_ARGS:-}; [ $s = new ] && extra=${NEW_ARGS:-}
    cat "$file" > /dev/null   # warm the page cache: this host pages out idle file pages
    t0=$(ticks "$pid")
    json=$("$new" block bench "unix:$work/$s.sock" --export bench --rw "$rw" --block-size "$bs" \
      --queue-depth "$qd" --seconds "$secs" --json ${PATHS:+--paths "$PATHS"} $extra)
    t1=$(ticks "$pid")
    python3 - "$rep" "$s" "$t0" "$t1" "$hz" "$secs" "$json" <<'PY'
import json, sys
rep, system, t0, t1, hz, secs, out = sys.argv[1:]
result = json.loads(out)
iops = result["iops"]
cpu = (int(t1) - int(t0)) / int(hz) * 1e6 / max(result["ios"], 1)
print(f"{rep} {system} {iops:.0f} {cpu:.1f}")
PY
  done
done | tee "$work/runs.txt"
python3 - "$work/runs.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for system in ("old", "new"):
    mine = [r for r in rows if r[1] == system]
    print(f"median {system}: {statistics.median(float(r[2]) for r in mine):.0f} IOPS, "
          f"{statistics.median(float(r[3]) for r in mine):.1f} µs server CPU per IO")
PY

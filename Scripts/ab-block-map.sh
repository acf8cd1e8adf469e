#!/usr/bin/env bash
# A/B of two Parley builds through `parley block map`: fio (nbd engine, 4 KiB random IO, QD32)
# on a one-path map's Unix socket, the map's path over loopback TCP to `parley block serve`.
# Each repetition starts a fresh server and map of build A, then of build B (B first in the
# even repetitions: the second of two 1 MiB write runs was some 6% slower whichever build it
# was), then a server alone for direct NBD over TCP (fio on its NBD port), 3 s of fio each,
# and prints IOPS and the map's and the server's CPU per IO (from /proc/PID/stat); then, per
# build, the median of the per-repetition ratios to direct NBD. Only runs alternating in one invocation compare:
# this host's speed drifts by 2x over hours. (`bench-block-relays.sh` runs one build against
# other relays; this compares two builds, or one build under two settings.)
#
#   Scripts/ab-block-map.sh A_PARLEY B_PARLEY [FILE]
#
# Environment: RW (randread, randwrite, read or write; default randread), BS and IODEPTH (default 4k and 32), REPS (default 5), SECS (default
# 3), A_ENV and B_ENV (VAR=value words for the map of A and of B: one build under two
# settings; the word NBD_PORT in them becomes the NBD port of that run's server, for a map
# that talks NBD to it: `B_ENV=PARLEY_PROTO_NBD=127.0.0.1:NBD_PORT:bench` with session 40's
# prototype patch), A_SERVER_ENV and B_SERVER_ENV (the same for the servers). FILE (an existing file)
# defaults to 1 GiB of random data made in the work directory; writes change it. The page
# cache is warmed and the file synced before every run (leftover writeback would take a
# write run's CPU).
set -euo pipefail
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in --help|-h) usage; exit 0 ;; esac
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage >&2; exit 2; fi
for exe in "$1" "$2"; do [ -x "$exe" ] || { echo "ab-block-map: $exe is not an executable" >&2; exit 2; }; done
if [ $# -eq 3 ] && [ ! -f "$3" ]; then echo "ab-block-map: $3 is not a file" >&2; exit 2; fi
rw=${RW:-randread} reps=${REPS:-5} secs=${SECS:-3}
case "$rw" in randread|randwrite|read|write) ;; *) echo "ab-block-map: RW must be randread, randwrite, read or write, not $rw" >&2; exit 2 ;; esac
for tool in fio python3; do command -v "$tool" >/dev/null || { echo "ab-block-map: $tool is not installed" >&2; exit 2; }; done
declare -A exe=([A]=$1 [B]=$2 [direct]=$1) map_env=([A]=${A_ENV:-} [B]=${B_ENV:-}) server_env=([A]=${A_SERVER_ENV:-} [B]=${B_SERVER_ENV:-} [direct]=)
bench_name=ab-block-map
# shellcheck source=Scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
bench_workdir ab-block-map
if [ $# -eq 3 ]; then file=$3; else bench_disk 1G; file=$work/disk.img; fi
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results=$work/results.txt
for rep in $(seq 1 "$reps"); do
  order="A B direct"; if [ $((rep % 2)) -eq 0 ]; then order="B A direct"; fi
  for config in $order; do
    nbd_port=$(free_port); block_port=$(free_port)
    # shellcheck disable=SC2086  # the *_ENV words are VAR=value pairs for env
    env ${server_env[$config]} "${exe[$config]}" block serve --export "bench=$file,shared" --nbd "127.0.0.1:$nbd_port" \
      --listen "127.0.0.1:$block_port" > "$work/server.log" 2>&1 &
    server=$!; pids+=("$server")
    uri="nbd://127.0.0.1:$nbd_port/bench"; map=
    wait_for "$uri" || { tail -n 5 "$work/server.log" >&2; exit 1; }
    if [ "$config" != direct ]; then
      rm -rf "$work/state" "$work/map.sock"
      # shellcheck disable=SC2086
      env ${map_env[$config]//NBD_PORT/$nbd_port} "${exe[$config]}" block map --session ab --path "127.0.0.1:$block_port" --device bench \
        --nbd "unix:$work/map.sock" --state-dir "$work/state" > "$work/map.log" 2>&1 &
      map=$!; pids+=("$map")
      uri="nbd+unix:///bench?socket=$work/map.sock"
      wait_for "$uri" || { tail -n 5 "$work/map.log" >&2; exit 1; }
    fi
    cat "$file" > /dev/null; sync "$file"
    s0=$(ticks "$server"); m0=0; [ -n "$map" ] && m0=$(ticks "$map")
    fio --name=ab --ioengine=nbd --uri="$uri" --rw="$rw" --bs="${BS:-4k}" --iodepth="${IODEPTH:-32}" --time_based --runtime="$secs" \
      --norandommap --randrepeat=0 --output-format=json --output="$work/fio.json" > "$work/fio.log" 2>&1 \
      || { echo "ab-block-map: fio failed on $config:" >&2; tail -n 5 "$work/fio.log" >&2; exit 1; }
    s1=$(ticks "$server"); m1=0; [ -n "$map" ] && m1=$(ticks "$map")
    python3 - "$work/fio.json" "$rep" "$config" "$rw" "$s0" "$s1" "$m0" "$m1" "$hz" <<'EOF' | tee -a "$results"
import json, sys
path, rep, config, rw, s0, s1, m0, m1, hz = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job["read" if rw in ("randread", "read") else "write"]
ios = max(1, side["total_ios"])
us = lambda a, b: (int(b) - int(a)) / int(hz) * 1e6 / ios
print(f"{rep} {rw} {config} iops={side['iops']:.0f} map_us_per_io={us(m0, m1) if config != 'direct' else 0:.1f} server_us_per_io={us(s0, s1):.1f}")
EOF
    [ -n "$map" ] && { kill "$map"; wait "$map" 2>/dev/null || true; }
    kill "$server"; wait "$server" 2>/dev/null || true
  done
done
python3 - "$results" <<'EOF'
import statistics as st, sys, collections
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    rep, rw, config, iops, map_us, server_us = line.split()
    runs[rep][config] = (float(iops.split("=")[1]), float(map_us.split("=")[1]), float(server_us.split("=")[1]))
print()
print("| build | IOPS (median) | / direct NBD (median of paired ratios, range) | map µs per IO | server µs per IO |")
print("| --- | ---: | ---: | --- | --- |")
for config in ("A", "B", "direct"):
    rows = [r for r in runs.values() if config in r and "direct" in r]
    ratios = [r[config][0] / r["direct"][0] for r in rows]
    m = [r[config][1] for r in rows]; s = [r[config][2] for r in rows]
    maps = f"{min(m):.1f}-{max(m):.1f}" if config != "direct" else "-"
    print(f"| {config} | {st.median(r[config][0] for r in rows):,.0f} | {st.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {maps} | {min(s):.1f}-{max(s):.1f} |")
EOF

#!/usr/bin/env bash
# What a relay in front of Parley's NBD port costs on this machine: fio -> relay -> server
# against fio -> server directly, 4 KiB random IO at queue depth 32. The relays: socat (bytes
# only, no NBD at all), nbdkit's nbd plugin (an NBD proxy in C on libnbd) and `parley block
# map` (NBD in, Parley's block protocol out, one path). The question it answers: how close to
# direct NBD can anything that sits between fio and the server get when fio, the relay and
# the server share the machine's CPUs (issue 10's goal: the map at 0.8x of direct NBD).
# Run `Scripts/bench-block-relays.sh --help` for options.
set -euo pipefail
cd "$(dirname "$0")/.."

reps=5
duration=3
socat_buffer=262144
cpu_each=
hosts=
syscalls=
systems="direct-tcp,direct-unix,socat,nbdkit-nbd,map"
workloads="randread,randwrite"
parley="${PARLEY:-.build/release/parley}"
size="${BLOCK_BENCH_SIZE:-1G}"

usage() {
  cat <<EOF
Usage: Scripts/bench-block-relays.sh [options]

Serves one file of random data (pre-read into the page cache) with \`parley block serve\`
and drives it with fio's nbd engine (4 KiB random IO, queue depth 32), directly and through
relays, systems alternating inside each repetition. Prints one line per run (IOPS, the
relay's CPU per IO, the server's CPU per IO, from /proc/PID/stat) and then, per system, the
median IOPS and the median of the per-repetition ratios to direct-tcp.

Options:
  --systems LIST       comma-separated, default $systems
                       direct-tcp   fio -> Parley's NBD port over loopback TCP
                       direct-unix  fio -> Parley's NBD port over a Unix socket
                       socat        fio -> socat (Unix socket to TCP, -b BYTES) -> TCP port
                       nbdkit-nbd   fio -> nbdkit nbd plugin (Unix socket) -> TCP port
                       nio-relay    fio -> parley chaos without faults (Unix socket to
                                    TCP): a SwiftNIO byte relay, no NBD, what the
                                    cheapest relay on the map's stack costs
                       map          fio -> parley block map (Unix socket) -> block protocol
                                    over TCP -> the same server
                       map-io       the map with --no-direct: every IO as a block protocol
                                    Io message instead of a DIRECT frame (docs/protocol.md
                                    17.9), the map before DIRECT IO
                       map-unix     the map with its path over a Unix socket to the server
                                    (fio -> Unix socket -> map -> Unix socket -> server):
                                    compare with direct-unix, both hops local
                       map-apart    the same, with the map alone on the first CPU and the
                                    server and fio on the second (taskset) for its runs; the
                                    scheduler otherwise tends to stack the map and the server
                                    on one CPU (docs/performance.md says how that was seen)
  --workloads LIST     randread,randwrite (default both)
  --repetitions N      default $reps
  --duration SECONDS   fio runtime per run, default $duration
  --socat-buffer BYTES socat's -b (default $socat_buffer; socat's own default is 8192)
  --cpu-each FRACTION  cap fio, the server and each relay at FRACTION of one CPU, each in
                       a cgroup of its own (CFS bandwidth, needs root): with 0.66 on two
                       CPUs, every process has what a machine with a CPU per process
                       would give it, at two thirds of the speed (not with map-apart)
  --hosts              two hosts on one machine: the server alone on the second CPU, fio
                       and the relay (the client's side) on the first, for every system
                       (not with map-apart or --cpu-each)
  --syscalls           also count the system calls of the server and the relay during
                       each run (perf stat -e raw_syscalls:sys_enter; needs perf and the
                       right to trace them), printed per IO
  -h, --help           this text

Environment: PARLEY (the parley executable, default .build/release/parley; build it with
swift build -c release), BLOCK_BENCH_SIZE (default 1G). Needs fio, python3, and socat and
nbdkit for their systems.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --systems) systems=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --repetitions) reps=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --socat-buffer) socat_buffer=$2; shift 2 ;;
    --cpu-each) cpu_each=$2; shift 2 ;;
    --hosts) hosts=1; shift ;;
    --syscalls) syscalls=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-block-relays: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || { echo "bench-block-relays: --repetitions must be a positive integer" >&2; exit 2; }
[[ "$duration" =~ ^[1-9][0-9]*$ ]] || { echo "bench-block-relays: --duration must be a positive integer" >&2; exit 2; }
[[ "$socat_buffer" =~ ^[1-9][0-9]*$ ]] || { echo "bench-block-relays: --socat-buffer must be a positive integer" >&2; exit 2; }
for w in ${workloads//,/ }; do
  case "$w" in randread|randwrite) ;; *) echo "bench-block-relays: unknown workload $w" >&2; exit 2 ;; esac
done
for s in ${systems//,/ }; do
  case "$s" in direct-tcp|direct-unix|socat|nbdkit-nbd|nio-relay|map|map-io|map-unix|map-apart) ;; *) echo "bench-block-relays: unknown system $s" >&2; exit 2 ;; esac
done
if [ -n "$cpu_each" ]; then
  python3 -c "import sys; f = float(sys.argv[1]); sys.exit(0 if 0.1 <= f <= 1 else 1)" "$cpu_each" 2>/dev/null \
    || { echo "bench-block-relays: --cpu-each must be a fraction of a CPU between 0.1 and 1, not $cpu_each" >&2; exit 2; }
  [[ ",$systems," != *,map-apart,* ]] || { echo "bench-block-relays: --cpu-each and map-apart do not go together" >&2; exit 2; }
fi
if [ -n "$hosts" ]; then
  [ -z "$cpu_each" ] && [[ ",$systems," != *,map-apart,* ]] || { echo "bench-block-relays: --hosts goes with neither --cpu-each nor map-apart" >&2; exit 2; }
fi
tools="fio python3"
[[ ",$systems," == *,socat,* ]] && tools+=" socat"
[[ ",$systems," == *,nbdkit-nbd,* ]] && tools+=" nbdkit"
[[ ",$systems," == *,map-apart,* ]] || [ -n "$hosts" ] && tools+=" taskset"
[ -n "$syscalls" ] && tools+=" perf"
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "bench-block-relays: $tool is not installed (apt-get install -y $tool)" >&2; exit 2; }
done
# map-apart's two CPUs: the first two this script may run on.
read -r cpu_a cpu_b < <(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(c[0], c[1] if len(c) > 1 else "")')
if { [[ ",$systems," == *,map-apart,* ]] || [ -n "$hosts" ]; } && [ -z "$cpu_b" ]; then
  echo "bench-block-relays: map-apart and --hosts need two CPUs (this script may run on CPU $cpu_a only)" >&2; exit 2
fi
[ -x "$parley" ] || { echo "bench-block-relays: $parley is not an executable (swift build -c release, or set PARLEY)" >&2; exit 2; }

bench_name=bench-block-relays
# shellcheck source=Scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
bench_workdir bench-block-relays

bench_disk "$size"
nbd_port=$(free_port); block_port=$(free_port)
"$parley" block serve --export "bench=$work/disk.img,shared" --nbd "127.0.0.1:$nbd_port" --nbd "unix:$work/direct.sock" \
  --listen "127.0.0.1:$block_port" --listen "unix:$work/block.sock" > "$work/server.log" 2>&1 &
server=$!; pids+=("$server")
wait_for "nbd://127.0.0.1:$nbd_port/bench"
declare -A uri pid_of
uri[direct-tcp]="nbd://127.0.0.1:$nbd_port/bench"; pid_of[direct-tcp]=$server
uri[direct-unix]="nbd+unix:///bench?socket=$work/direct.sock"; pid_of[direct-unix]=$server
for s in ${systems//,/ }; do
  case "$s" in
    socat)
      socat -b "$socat_buffer" "UNIX-LISTEN:$work/socat.sock,fork" "TCP:127.0.0.1:$nbd_port" & pid_of[socat]=$!; pids+=($!)
      uri[socat]="nbd+unix:///bench?socket=$work/socat.sock" ;;
    nbdkit-nbd)
      nbdkit --foreground --exit-with-parent -U "$work/nbdkit.sock" nbd hostname=127.0.0.1 "port=$nbd_port" export=bench > "$work/nbdkit.log" 2>&1 &
      pid_of[nbdkit-nbd]=$!; pids+=($!)
      uri[nbdkit-nbd]="nbd+unix:///bench?socket=$work/nbdkit.sock" ;;
    nio-relay)
      "$parley" chaos --listen "unix:$work/nio-relay.sock" --to "127.0.0.1:$nbd_port" > "$work/nio-relay.log" 2>&1 &
      pid_of[nio-relay]=$!; pids+=($!)
      uri[nio-relay]="nbd+unix:///bench?socket=$work/nio-relay.sock" ;;
    map|map-io|map-unix|map-apart)
      pin=(); [ "$s" = map-apart ] && pin=(taskset -c "$cpu_a")
      carrier=(); [ "$s" = map-io ] && carrier=(--no-direct)
      path="127.0.0.1:$block_port"; [ "$s" = map-unix ] && path="unix:$work/block.sock"
      "${pin[@]}" "$parley" block map --session "bench-$s" --path "$path" --device bench "${carrier[@]}" \
        --nbd "unix:$work/$s.sock" --state-dir "$work/state-$s" > "$work/$s.log" 2>&1 &
      pid_of[$s]=$!; pids+=($!)
      uri[$s]="nbd+unix:///bench?socket=$work/$s.sock" ;;
  esac
done
for s in ${systems//,/ }; do wait_for "${uri[$s]}"; done
if [ -n "$hosts" ]; then
  # The server's host: the second CPU; the client's: the first (the relays, and fio below).
  taskset -a -p -c "$cpu_b" "$server" > /dev/null
  for s in ${systems//,/ }; do
    case "$s" in direct-*) ;; *) taskset -a -p -c "$cpu_a" "${pid_of[$s]}" > /dev/null ;; esac
  done
  echo "# two hosts: the server on CPU $cpu_b, fio and the relays on CPU $cpu_a" >&2
fi
declare -A cgroup_of
if [ -n "$cpu_each" ]; then
  bench_after_cleanup() { bench_cgroup_remove; }
  cgroup_of[server]=$(bench_cgroup_make server "$cpu_each") || exit 1
  bench_cgroup_enter "${cgroup_of[server]}" "$server"
  cgroup_of[fio]=$(bench_cgroup_make fio "$cpu_each") || exit 1
  for s in ${systems//,/ }; do
    case "$s" in direct-*) continue ;; esac
    cgroup_of[$s]=$(bench_cgroup_make "$s" "$cpu_each") || exit 1
    bench_cgroup_enter "${cgroup_of[$s]}" "${pid_of[$s]}"
  done
  echo "# each of fio, the server and the relay capped at $cpu_each of a CPU (cgroups ${cgroup_of[server]%-server}-*)" >&2
fi

# CPU ticks of a process and its reaped children (socat serves each connection in a child).
ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results="$work/results.txt"
for rep in $(seq 1 "$reps"); do
  for w in ${workloads//,/ }; do
    for s in ${systems//,/ }; do
      cat "$work/disk.img" > /dev/null  # warm again: this host pages out file pages unused for a minute (DAMON)
      sync "$work/disk.img"  # and write out what earlier write runs dirtied: its writeback would take this run's CPU
      pid=${pid_of[$s]}
      on=()
      if [ "$s" = map-apart ]; then
        server_mask=$(taskset -p "$server" | awk '{print $NF}')  # put back after the run
        taskset -a -p -c "$cpu_b" "$server" > /dev/null; on=(taskset -c "$cpu_b")
      fi
      r0=$(ticks "$pid"); s0=$(ticks "$server")
      counting=()
      if [ -n "$syscalls" ]; then
        rm -f "$work/syscalls-server.txt" "$work/syscalls-relay.txt"
        perf stat -x, -e raw_syscalls:sys_enter -p "$server" -o "$work/syscalls-server.txt" 2> /dev/null & counting+=($!)
        case "$s" in direct-*) ;; *) perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -o "$work/syscalls-relay.txt" 2> /dev/null & counting+=($!) ;; esac
        sleep 0.2  # perf attaches
      fi
      [ -n "$hosts" ] && on=(taskset -c "$cpu_a")
      [ -n "$cpu_each" ] && on=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "${cgroup_of[fio]}")
      "${on[@]}" fio --name=relay --ioengine=nbd --uri="${uri[$s]}" --rw="$w" --bs=4k --iodepth=32 --time_based --runtime="$duration" \
        --norandommap --randrepeat=0 --output-format=json --output="$work/fio.json" > "$work/fio.log" 2>&1 \
        || { echo "bench-block-relays: fio failed on $s:" >&2; tail -n 5 "$work/fio.log" >&2; exit 1; }
      sleep 0.3  # socat's child exits and is reaped: its CPU joins the parent's
      r1=$(ticks "$pid"); s1=$(ticks "$server")
      for c in "${counting[@]}"; do kill -INT "$c"; wait "$c" 2> /dev/null || true; done  # perf ends with 130 on SIGINT
      [ "$s" = map-apart ] && taskset -a -p "$server_mask" "$server" > /dev/null
      python3 - "$work/fio.json" "$rep" "$w" "$s" "$r0" "$r1" "$s0" "$s1" "$hz" "$work" "$syscalls" <<'EOF' | tee -a "$results"
import json, os, sys
path, rep, w, s, r0, r1, s0, s1, hz, work, syscalls = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job["read" if w == "randread" else "write"]
ios = max(1, side["total_ios"])
us = lambda a, b: (float(b) - float(a)) / float(hz) * 1e6 / ios
relay = "-" if s.startswith("direct") else f"{us(r0, r1):.1f}"
line = f"{rep} {w} {s} {side['iops']:.0f} relay_us_per_io={relay} server_us_per_io={us(s0, s1):.1f}"
def per_io(name):
    # perf stat -x, lines: value,unit,event,...; the count covers perf's attach to fio's end,
    # a little more than fio's run: an upper bound per IO.
    try:
        for row in open(os.path.join(work, f"syscalls-{name}.txt")):
            f = row.strip().split(",")
            if len(f) > 2 and f[2] == "raw_syscalls:sys_enter" and f[0].isdigit():
                return f"{int(f[0]) / ios:.2f}"
    except OSError:
        pass
    return "-"
if syscalls:
    line += f" relay_syscalls_per_io={per_io('relay')} server_syscalls_per_io={per_io('server')}"
print(line)
EOF
    done
  done
done

python3 - "$results" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    rep, w, s, iops = line.split()[:4]
    runs[(w, s)][rep] = float(iops)
print()
print("| workload | system | IOPS (median) | / direct-tcp (median of paired ratios, range) |")
print("| --- | --- | ---: | ---: |")
for (w, s), by_rep in runs.items():
    base = runs.get((w, "direct-tcp"), {})
    ratios = [by_rep[r] / base[r] for r in by_rep if r in base and base[r] > 0]
    ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
    print(f"| {w} QD32 | {s} | {statistics.median(by_rep.values()):,.0f} | {ratio} |")
EOF

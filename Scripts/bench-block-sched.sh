#!/usr/bin/env bash
# How the host's scheduling moves the map's ratio to direct NBD: 4 KiB random IO at QD32,
# fio (nbd engine) on direct NBD over loopback TCP and on a one-path map's Unix socket (its
# path over loopback TCP), under several host settings, alternating inside each repetition.
# A setting is a scheduling policy for all three processes (fio, the map, the server), and
# optionally the guest kernel's halt polling (cpuidle-haltpoll's guest_halt_poll_ns, where
# it is writable: root on a KVM guest) or busy loops that keep the CPUs from ever idling.
# Prints one line per run (IOPS; how often the server was preempted: its involuntary
# context switches; the inter-processor interrupts per IO that woke or rescheduled a CPU:
# /proc/interrupts' CAL, function calls, which a wake-up onto an idle CPU sends, and RES,
# rescheduling, as x86 names them; the share of the CPUs idle while fio ran, its start and
# end included; and how often per IO fio, the map and the server went to sleep: fio's
# context switches, the others' voluntary ones), then per setting the median ratio
# map / direct, and each setting's IOPS paired with the first setting's.
#
#   Scripts/bench-block-sched.sh [--settings LIST] [--repetitions N] [--duration S]
#                                [--rw randread|randwrite] [--file FILE] [PARLEY]
#
# LIST: comma-separated settings, each POLICY, POLICY+hpNS, POLICY+idle or POLICY+latUS, POLICY one of normal (what
# processes get by default), batch (SCHED_BATCH: a woken task does not preempt the running
# one), services-batch (SCHED_BATCH for the map and the server, fio normal), client-batch
# (SCHED_BATCH for fio only), fifo (SCHED_FIFO 1 for the map and the server, fio normal);
# hpNS sets guest_halt_poll_ns to NS for that setting's runs (restored at exit); idle runs
# one SCHED_IDLE busy loop per CPU beside that setting's runs (direct and map); latUS holds a
# CPU latency request of US microseconds (/dev/cpu_dma_latency, PM QoS: at 0 the cpuidle
# governor polls instead of halting) open during that setting's runs. Default:
# normal,batch,normal+hp200000,batch+hp200000 (halt polling settings are skipped with a
# note where it is not writable).
# PARLEY: the parley executable (default .build/release/parley). FILE: an existing file to
# export (default 1 GiB of random data in the work directory). Needs fio, python3, chrt.
set -euo pipefail
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }
settings="normal,batch,normal+hp200000,batch+hp200000" reps=5 secs=3 rw=randread file= parley=.build/release/parley
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --settings) settings=${2:?}; shift 2 ;;
    --repetitions) reps=${2:?}; shift 2 ;;
    --duration) secs=${2:?}; shift 2 ;;
    --rw) rw=${2:?}; shift 2 ;;
    --file) file=${2:?}; shift 2 ;;
    -*) echo "bench-block-sched: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) parley=$1; shift ;;
  esac
done
[ -x "$parley" ] || { echo "bench-block-sched: $parley is not an executable (build with swift build -c release --product parley)" >&2; exit 2; }
case "$rw" in randread|randwrite) ;; *) echo "bench-block-sched: --rw must be randread or randwrite, not $rw" >&2; exit 2 ;; esac
[[ "$reps" =~ ^[1-9][0-9]*$ && "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "bench-block-sched: --repetitions and --duration take positive integers" >&2; exit 2; }
[ -z "$file" ] || [ -f "$file" ] || { echo "bench-block-sched: $file is not a file" >&2; exit 2; }
for tool in fio python3 chrt; do command -v "$tool" >/dev/null || { echo "bench-block-sched: $tool is not installed" >&2; exit 2; }; done
halt=/sys/module/haltpoll/parameters/guest_halt_poll_ns
IFS=, read -r -a wanted <<< "$settings"
list=()
for s in "${wanted[@]}"; do
  case "${s%%+*}" in normal|batch|services-batch|client-batch|fifo) ;; *) echo "bench-block-sched: unknown policy in setting $s (see --help)" >&2; exit 2 ;; esac
  if [[ "$s" == *+hp* ]]; then
    ns=${s#*+hp}
    [[ "$ns" =~ ^[0-9]+$ ]] || { echo "bench-block-sched: setting $s: hp takes nanoseconds" >&2; exit 2; }
    if [ ! -w "$halt" ]; then echo "bench-block-sched: skipping $s: $halt is not writable here" >&2; continue; fi
  fi
  if [[ "$s" == *+lat* ]]; then
    [[ "${s#*+lat}" =~ ^[0-9]+$ ]] || { echo "bench-block-sched: setting $s: lat takes microseconds" >&2; exit 2; }
    if [ ! -w /dev/cpu_dma_latency ]; then echo "bench-block-sched: skipping $s: /dev/cpu_dma_latency is not writable here" >&2; continue; fi
  fi
  case "${s#"${s%%+*}"}" in ''|+idle|+hp*|+lat*) ;; *) echo "bench-block-sched: setting $s: one modifier at most, +hpNS, +idle or +latUS (see --help)" >&2; exit 2 ;; esac
  list+=("$s")
done
[ ${#list[@]} -gt 0 ] || { echo "bench-block-sched: no setting left to run" >&2; exit 2; }
bench_name=bench-block-sched
# shellcheck source=Scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
bench_workdir bench-block-sched
halt_before=
if [ -r "$halt" ]; then halt_before=$(cat "$halt"); fi
bench_after_cleanup() { if [ -n "$halt_before" ] && [ -w "$halt" ]; then echo "$halt_before" > "$halt"; fi; }
if [ -z "$file" ]; then bench_disk 1G; file=$work/disk.img; fi
results=$work/results.txt
ipis() { awk -v kind="$1" '$1 == kind ":" {for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i} END {print n + 0}' /proc/interrupts; }
idle() { awk '/^cpu / {print $5 + $6}' /proc/stat; }
cpus=$(getconf _NPROCESSORS_ONLN)  # all of them, as /proc/stat counts them
ticks=$(getconf CLK_TCK)
# switches KIND PID: a process's voluntary or nonvoluntary context switches, all threads (0 without a PID).
switches() { if [ -z "$2" ]; then echo 0; else awk -v kind="$1_ctxt_switches:" '$1 == kind {n += $2} END {print n + 0}' /proc/"$2"/task/*/status 2>/dev/null; fi; }
for rep in $(seq 1 "$reps"); do
  for s in "${list[@]}"; do
    policy=${s%%+*} svc=() client=()
    case "$policy" in
      batch) svc=(chrt -b 0); client=(chrt -b 0) ;;
      services-batch) svc=(chrt -b 0) ;;
      client-batch) client=(chrt -b 0) ;;
      fifo) svc=(chrt -f 1) ;;
    esac
    spinners=()
    if [[ "$s" == *+idle ]]; then
      for _ in $(seq 1 "$cpus"); do chrt -i 0 bash -c 'while :; do :; done' & spinners+=($!); pids+=($!); done
    fi
    if [[ "$s" == *+lat* ]]; then  # the request holds while the file stays open
      python3 -c 'import os, struct, sys, time
fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
os.write(fd, struct.pack("i", int(sys.argv[1])))
time.sleep(86400)' "${s#*+lat}" & spinners+=($!); pids+=($!)
    fi
    if [[ "$s" == *+hp* ]]; then echo "${s#*+hp}" > "$halt"; elif [ -n "$halt_before" ] && [ -w "$halt" ]; then echo "$halt_before" > "$halt"; fi
    for mode in direct map; do
      nbd_port=$(free_port); block_port=$(free_port)
      "${svc[@]}" "$parley" block serve --export "bench=$file,shared" --nbd "127.0.0.1:$nbd_port" \
        --listen "127.0.0.1:$block_port" > "$work/server.log" 2>&1 &
      server=$!; pids+=("$server"); map=
      uri="nbd://127.0.0.1:$nbd_port/bench"
      wait_for "$uri" || { tail -n 5 "$work/server.log" >&2; exit 1; }
      if [ "$mode" = map ]; then
        rm -rf "$work/state" "$work/map.sock"
        "${svc[@]}" "$parley" block map --session sched --path "127.0.0.1:$block_port" --device bench \
          --nbd "unix:$work/map.sock" --state-dir "$work/state" > "$work/map.log" 2>&1 &
        map=$!; pids+=("$map")
        uri="nbd+unix:///bench?socket=$work/map.sock"
        wait_for "$uri" || { tail -n 5 "$work/map.log" >&2; exit 1; }
      fi
      cat "$file" > /dev/null; sync "$file"
      v0=$(switches voluntary "$server") m0=$(switches voluntary "$map")
      i0=$(switches nonvoluntary "$server") c0=$(ipis CAL) r0=$(ipis RES) t0=$(idle) w0=$(date +%s%N)
      "${client[@]}" fio --name=sched --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth=32 --time_based \
        --runtime="$secs" --norandommap --randrepeat=0 --output-format=json --output="$work/fio.json" > "$work/fio.log" 2>&1 \
        || { echo "bench-block-sched: fio failed ($s, $mode):" >&2; tail -n 5 "$work/fio.log" >&2; exit 1; }
      v1=$(switches voluntary "$server") m1=$(switches voluntary "$map")
      i1=$(switches nonvoluntary "$server") c1=$(ipis CAL) r1=$(ipis RES) t1=$(idle) w1=$(date +%s%N)
      read -r iops sleeps <<< "$(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
n = max(1, j[sys.argv[2]]["total_ios"])
print(round(j[sys.argv[2]]["iops"]), "%.3f/%.3f/%.3f" % (j["ctx"] / n, int(sys.argv[3]) / n, int(sys.argv[4]) / n))' \
        "$work/fio.json" "$([ "$rw" = randread ] && echo read || echo write)" $((m1 - m0)) $((v1 - v0)))"
      echo "$rep $s $mode iops=$iops server_preempted=$((i1 - i0))" \
        "cal_per_io=$(python3 -c "print(round(($c1 - $c0) / max(1, $iops * $secs), 3))")" \
        "res_per_io=$(python3 -c "print(round(($r1 - $r0) / max(1, $iops * $secs), 3))")" \
        "idle_pct=$(( (t1 - t0) * 100 * 1000000000 / (ticks * (w1 - w0) * cpus) ))" "sleeps_per_io=$sleeps" | tee -a "$results"
      if [ -n "$map" ]; then kill "$map"; wait "$map" 2>/dev/null || true; fi
      kill "$server"; wait "$server" 2>/dev/null || true
    done
    for p in "${spinners[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  done
done
python3 - "$results" "$secs" "${list[@]}" <<'EOF'
import collections, statistics as st, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    rep, setting, mode, iops, pre, cal, res, idle, sleeps = line.split()
    value = lambda field: field.split("=")[1]
    runs[rep][(setting, mode)] = (int(value(iops)), int(value(pre)), (float(value(cal)), float(value(res))), int(value(idle)),
                                  [float(x) for x in value(sleeps).split("/")])
secs = int(sys.argv[2])
settings = sys.argv[3:]
first = settings[0]
print()
print(f"| setting | map / direct (median, range) | IOPS map, direct (medians) | server preempted per s (map) | IPIs per IO (CAL + RES), map; direct | CPUs idle %, map, direct | sleeps per IO fio/map/server, map; direct | map IOPS / {first}'s (paired median, faster in) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for s in settings:
    rows = [r for r in runs.values() if (s, "map") in r and (s, "direct") in r]
    if not rows:
        continue
    ratios = [r[(s, "map")][0] / r[(s, "direct")][0] for r in rows]
    pre = st.median(r[(s, "map")][1] for r in rows) / secs
    paired = [r[(s, "map")][0] / r[(first, "map")][0] for r in rows if (first, "map") in r]
    ipi = lambda mode: " + ".join(f"{st.median(r[(s, mode)][2][k] for r in rows):.3f}" for k in (0, 1))
    sleeps = lambda mode, ks: "/".join(f"{st.median(r[(s, mode)][4][k] for r in rows):.3f}" for k in ks)
    p = f"{st.median(paired):.2f} ({sum(x > 1 for x in paired)} of {len(paired)})" if s != first else "-"
    print(f"| {s} | {st.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
          f"{st.median(r[(s, 'map')][0] for r in rows):,.0f}, {st.median(r[(s, 'direct')][0] for r in rows):,.0f} | {pre:,.0f} | "
          f"{ipi('map')}; {ipi('direct')} | "
          f"{st.median(r[(s, 'map')][3] for r in rows):.0f}, {st.median(r[(s, 'direct')][3] for r in rows):.0f} | "
          f"{sleeps('map', (0, 1, 2))}; {sleeps('direct', (0, 2))} | {p} |")
EOF

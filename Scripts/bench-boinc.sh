#!/usr/bin/env bash
# Scheduler RPCs per second from simulated BOINC clients against `parley work serve --boinc`
# (SQLite store), with Scripts/bench-boinc.py posting requests shaped like a real 7.20.5
# client's, each on a new connection. Two workloads, alternating, several repetitions, each
# run on a fresh master and store; prints every run and the medians.
#
#   Scripts/bench-boinc.sh [--clients N] [--seconds S] [--jobs N] [--repetitions R]
#
# poll:  clients asking for work from an empty queue (what most RPCs of a big project are).
# cycle: --jobs jobs submitted first; each client gets a job and reports it in its next RPC.
#
# PARLEY (default .build-release/release/parley: `swift build -c release --product parley
# --scratch-path .build-release`).
set -euo pipefail
cd "$(dirname "$0")/.."
clients=32 seconds=10 jobs=2000 repetitions=5
while [ $# -gt 0 ]; do
    case "$1" in
    --clients) clients=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --repetitions) repetitions=$2; shift 2 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "bench-boinc: unknown option $1" >&2; exit 2 ;;
    esac
done
parley=${PARLEY:-.build-release/release/parley}
[ -x "$parley" ] || { echo "bench-boinc: $parley is not built" >&2; exit 1; }
work=$(mktemp -d /tmp/parley-bench-boinc.XXXXXX)
"$parley" work keygen --dir "$work/keys" >/dev/null
"$parley" work keygen --boinc --dir "$work/boinc-keys" >/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
master_pid=""
stop_master() { if [ -n "$master_pid" ]; then kill "$master_pid" 2>/dev/null || true; wait "$master_pid" 2>/dev/null || true; master_pid=""; fi; }
trap 'stop_master; rm -rf "$work"' EXIT
start_master() {
    rm -rf "$work/db"* && mkdir -p "$work/db"
    pport=$(port) bport=$(port)
    "$parley" work serve --listen "127.0.0.1:$pport" --database "sqlite:$work/db/jobs.sqlite" --trust "$work/keys/work.pub" \
        --log-level warning --boinc "http://127.0.0.1:$bport/" --boinc-key "$work/boinc-keys/code_sign_private" >"$work/serve.log" 2>&1 &
    master_pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$bport/" >/dev/null 2>&1 && break; sleep 0.1; done
}
results=()
for r in $(seq "$repetitions"); do
    for mode in poll cycle; do
        start_master
        if [ "$mode" = cycle ]; then
            "$parley" work submit --master "127.0.0.1:$pport" --key "$work/keys/work.key" --count "$jobs" -- /bin/true >/dev/null
        fi
        line=$(python3 Scripts/bench-boinc.py --url "http://127.0.0.1:$bport/scheduler" --mode "$mode" --clients "$clients" --seconds "$seconds" --jobs "$jobs")
        echo "run $r: $line"
        results+=("$line")
        stop_master
    done
done
printf '%s\n' "${results[@]}" | python3 -c '
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
for mode in ("poll", "cycle"):
    rs = [r for r in runs if r["mode"] == mode]
    if not rs:
        continue
    rpcs = statistics.median(r["rpcs_per_second"] for r in rs)
    jobs = statistics.median(r["jobs_per_second"] for r in rs)
    each = [r["rpcs_per_second"] for r in rs]
    errors = sum(r["errors"] for r in rs)
    print("%s: median %s RPCs/s, %s jobs/s over %d runs (RPCs/s per run: %s; errors %d)" % (mode, rpcs, jobs, len(rs), each, errors))
'

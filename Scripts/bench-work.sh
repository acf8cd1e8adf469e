#!/usr/bin/env bash
# Parley Work's benchmark: jobs dispatched and results accepted per second end to end, with
# simulated workers on loopback (`parley work bench`), on SQLite (one master) and on
# PostgreSQL (one master, three masters), configurations alternating, several repetitions,
# medians. Each run starts from an empty store.
#
#   Scripts/bench-work.sh [--jobs N] [--workers N] [--slots N] [--repetitions R] [--configs "sqlite pg1 pg3"]
#
# PARLEY (default .build-release/release/parley: `swift build -c release --product parley
# --scratch-path .build-release`); a PostgreSQL server of its own is started (port 55499,
# stopped at the end) with Scripts/postgres-for-tests.sh unless PARLEY_BENCH_POSTGRES names
# a server whose user may create databases.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=20000 workers=100 slots=8 repetitions=3 configs="sqlite pg1 pg3"
while [ $# -gt 0 ]; do
    case "$1" in
    --jobs) jobs=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --slots) slots=$2; shift 2 ;;
    --repetitions) repetitions=$2; shift 2 ;;
    --configs) configs=$2; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "bench-work: unknown option $1" >&2; exit 2 ;;
    esac
done
parley=${PARLEY:-.build-release/release/parley}
[ -x "$parley" ] || { echo "bench-work: $parley is not built" >&2; exit 1; }
work=$(mktemp -d /tmp/parley-bench-work.XXXXXX)
"$parley" work keygen --dir "$work/keys" >/dev/null
base="" started_postgres=""
if [[ "$configs" == *pg* ]]; then
    if [ -n "${PARLEY_BENCH_POSTGRES:-}" ]; then
        base=$PARLEY_BENCH_POSTGRES
    else
        pgdir="/tmp/parley-bench-postgres-$$"
        base=$(Scripts/postgres-for-tests.sh start "$pgdir" 55499)
        started_postgres=$pgdir
    fi
fi
pids=()
stop_masters() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
cleanup() {
    stop_masters
    if [ -n "$started_postgres" ]; then Scripts/postgres-for-tests.sh stop "$started_postgres" || true; fi
}
trap cleanup EXIT
results="$work/results.jsonl"
run=0
for rep in $(seq 1 "$repetitions"); do
    for config in $configs; do
        run=$((run + 1))
        case "$config" in
        sqlite) db="sqlite:$work/run$run.sqlite"; n=1 ;;
        pg1|pg3)
            name="parley_bench_$$_$run"
            psql -q "$base" -c "CREATE DATABASE $name" >/dev/null
            db="${base%/*}/$name"; n=${config#pg} ;;
        *) echo "bench-work: unknown configuration $config" >&2; exit 2 ;;
        esac
        masters=()
        for i in $(seq 1 "$n"); do
            port=$((17500 + i))
            "$parley" work serve --listen "127.0.0.1:$port" --database "$db" --log-level warning >>"$work/master.log" 2>&1 &
            pids+=($!)
            masters+=(--master "127.0.0.1:$port")
        done
        for i in $(seq 1 "$n"); do
            for _ in $(seq 1 100); do "$parley" work status --master "127.0.0.1:$((17500 + i))" >/dev/null 2>&1 && break; sleep 0.1; done
        done
        line=$("$parley" work bench "${masters[@]}" --key "$work/keys/work.key" --jobs "$jobs" --workers "$workers" --slots "$slots" --json)
        echo "{\"config\":\"$config\",\"repetition\":$rep,\"result\":$line}" | tee -a "$results"
        stop_masters
    done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print()
print("| store | masters | jobs/s (median) | runs | assignment p50 ms | assignment p99 ms |")
print("| --- | --- | --- | --- | --- | --- |")
for config in dict.fromkeys(r["config"] for r in rows):
    rs = [r["result"] for r in rows if r["config"] == config]
    med = lambda k: statistics.median(x[k] for x in rs)
    store = "SQLite" if config == "sqlite" else "PostgreSQL"
    print(f"| {store} | {rs[0]['masters']} | {med('jobs_per_second'):.0f} | {', '.join(str(round(x['jobs_per_second'])) for x in rs)} | {med('assignment_p50_ms'):.2f} | {med('assignment_p99_ms'):.2f} |")
PY

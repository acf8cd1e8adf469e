#!/usr/bin/env bash
# Shell commands per second through one real buildbot-worker 4.3.0: Parley's master
# (`parley work serve --buildbot`, commands relayed with `parley work command bench`) beside a
# native Parley worker on the same master, and, with --stock, Buildbot's own master 4.3.0
# (Scripts/bench-buildbot-stock.sh: one build of COUNT ShellCommand steps). Repetitions
# alternate the systems; medians and ratios at the end. Also: store jobs (`true`) per second
# through the Buildbot worker, each a whole job (claim, mkdir, shell, report, rmdir).
#
#   Scripts/bench-buildbot.sh [--count N] [--repetitions R] [--jobs J] [--stock]
#
# Needs a built parley (swift build -c release; PARLEY=path to use another) and
# buildbot-worker on PATH (pip install buildbot-worker==4.3.0).
set -euo pipefail
cd "$(dirname "$0")/.."

count=1000 repetitions=3 jobs=300 stock=0
while [ $# -gt 0 ]; do
    case "$1" in
        --count) count=$2; shift 2 ;;
        --repetitions) repetitions=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --stock) stock=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "bench-buildbot: unknown argument $1" >&2; exit 2 ;;
    esac
done
# The newer of the release and debug builds, unless PARLEY names one.
parley=${PARLEY:-}
if [ -z "$parley" ]; then
    parley=.build/release/parley
    if [ ! -x "$parley" ] || { [ -x .build/debug/parley ] && [ .build/debug/parley -nt "$parley" ]; }; then parley=.build/debug/parley; fi
fi
[ -x "$parley" ] || { echo "bench-buildbot: build parley first (swift build -c release)" >&2; exit 2; }
command -v buildbot-worker >/dev/null || { echo "bench-buildbot: buildbot-worker is not installed (pip install buildbot-worker==4.3.0)" >&2; exit 2; }
parley=$(realpath "$parley")

dir=$(mktemp -d /tmp/parley-bench-buildbot.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "bench-buildbot: timed out waiting for: $*" >&2; return 1; }
        sleep 0.2
    done
}

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; parley: $parley"
"$parley" keyring add bb1 --keyring "$dir/keyring.json" --caps work.worker >/dev/null
"$parley" work keygen --dir "$dir/keys" >/dev/null
master_port=$(free_port) buildbot_port=$(free_port)
master=127.0.0.1:$master_port
"$parley" work serve --listen "$master" --database "sqlite:$dir/jobs.sqlite" --keyring "$dir/keyring.json" \
    --trust "$dir/keys/work.pub" --allow-commands --buildbot "ws://127.0.0.1:$buildbot_port" --log-level warning 2>"$dir/master.log" &
pids+=($!)
buildbot-worker create-worker --protocol=msgpack_experimental_v7 "$dir/bbworker" "127.0.0.1:$buildbot_port" bb1 \
    "$("$parley" keyring key bb1 --keyring "$dir/keyring.json")" >/dev/null
(cd "$dir/bbworker" && exec buildbot-worker start --nodaemon . >/dev/null 2>&1) &
pids+=($!)
"$parley" work worker --master "$master" --trust "$dir/keys/work.pub" --worker-name native --accept-commands \
    --dir "$dir/native" 2>"$dir/native.log" &
pids+=($!)
wait_for 60 sh -c "\"$parley\" work workers --master $master | grep -q '^bb1 ' && \"$parley\" work workers --master $master | grep -q '^native '"

results=()
for r in $(seq 1 "$repetitions"); do
    for system in bb1 native; do
        line=$("$parley" work command bench --master "$master" --worker "$system" --count "$count" --json -- true)
        rate=$(python3 -c 'import json,sys; print("%.1f" % json.loads(sys.argv[1])["commands_per_second"])' "$line")
        p50=$(python3 -c 'import json,sys; print("%.2f" % json.loads(sys.argv[1])["p50_ms"])' "$line")
        echo "repetition $r: parley+$( [ $system = bb1 ] && echo buildbot-worker || echo native-worker ) $count commands: $rate commands/s (p50 $p50 ms)"
        results+=("$system $rate")
    done
    if [ "$stock" = 1 ]; then
        line=$(Scripts/bench-buildbot-stock.sh "$count" 1 | grep '^stock-buildbot-master' | tail -1)
        rate=$(echo "$line" | sed -n 's/.*commands_per_second=\([0-9.]*\).*/\1/p')
        echo "repetition $r: stock buildbot master + buildbot-worker $count commands: $rate commands/s"
        results+=("stock $rate")
    fi
done

# Store jobs through the Buildbot worker: submitted at once, timed until all succeeded.
# (Only the Buildbot worker takes them: they need the application "buildbot".)
start=$(date +%s.%N)
"$parley" work submit --master "$master" --key "$dir/keys/work.key" --count "$jobs" --app buildbot -- true >/dev/null
wait_for 600 sh -c "\"$parley\" work status --master $master | grep -q 'succeeded $jobs'"
end=$(date +%s.%N)
jobs_rate=$(python3 -c "print('%.1f' % ($jobs / ($end - $start)))")
echo "parley+buildbot-worker: $jobs store jobs in $(python3 -c "print('%.2f' % ($end - $start))") s: $jobs_rate jobs/s"

printf '%s\n' "${results[@]}" | python3 -c '
import sys, statistics
rates = {}
for line in sys.stdin:
    name, rate = line.split()
    rates.setdefault(name, []).append(float(rate))
med = {k: statistics.median(v) for k, v in rates.items()}
names = {"bb1": "parley master + buildbot-worker", "native": "parley master + native worker", "stock": "stock buildbot master + buildbot-worker"}
for k, v in med.items():
    print("median %-42s %8.1f commands/s  (%s)" % (names[k], v, ", ".join("%.1f" % x for x in rates[k])))
if "stock" in med:
    print("ratio parley/stock with the same buildbot-worker: %.2fx" % (med["bb1"] / med["stock"]))
print("ratio native/buildbot worker on the parley master: %.2fx" % (med["native"] / med["bb1"]))
'

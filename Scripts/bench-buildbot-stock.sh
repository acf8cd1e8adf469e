#!/usr/bin/env bash
# Benchmark the STOCK Buildbot master (PyPI buildbot==4.3.0) driving one real
# buildbot-worker 4.3.0 over the msgpack_experimental_v7 (WebSocket) protocol:
# one build of N `true` ShellCommand steps, repeated R times.
#
#   Scripts/bench-buildbot-stock.sh [N=1000] [R=1]
#
# Prints one line per build:
#   stock-buildbot-master commands=N seconds=S commands_per_second=C
# seconds = build "new" -> build "finished" (wall clock inside the master, taken
# from its own message queue events; the DB's started_at/complete_at are whole
# seconds only). Everything lives in a fresh temp directory; processes listen on
# 127.0.0.1 only and are stopped by PID on exit. The web UI (www) is disabled, so
# buildbot-www is not needed; builds are triggered through the ForceScheduler's
# force() (the same call the REST `POST /api/v2/forceschedulers/NAME` makes) by a
# small service in master.cfg that watches for trigger files.
# Env: KEEP_TMP=1 keeps the temp directory (master/worker logs) for inspection.
set -euo pipefail

N="${1:-1000}"
REPS="${2:-1}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-900}"   # seconds per build
ATTACH_TIMEOUT="${ATTACH_TIMEOUT:-60}"  # seconds for master start + worker attach

[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 ]] || { echo "N must be a positive integer" >&2; exit 2; }
[[ "$REPS" =~ ^[0-9]+$ && "$REPS" -ge 1 ]] || { echo "R must be a positive integer" >&2; exit 2; }

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import buildbot' 2>/dev/null; then
    "$PY" -m pip install --quiet buildbot==4.3.0
fi
if ! "$PY" -c 'import buildbot_worker, msgpack, autobahn' 2>/dev/null; then
    # worker side of the msgpack protocol needs autobahn + msgpack
    "$PY" -m pip install --quiet buildbot-worker==4.3.0 msgpack autobahn
fi
v=$("$PY" -c 'import buildbot; print(buildbot.version)')
[[ "$v" == "4.3.0" ]] || echo "warning: buildbot master version is $v, not 4.3.0" >&2

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-buildbot-stock.XXXXXX")
MASTER_PID=""
WORKER_PID=""

stop_pid() {
    local pid="$1"
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do           # up to 5 s, then SIGKILL
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_pid "$WORKER_PID"
    stop_pid "$MASTER_PID"
    wait 2>/dev/null || true
    if [[ "${KEEP_TMP:-0}" == "1" || $rc -ne 0 ]]; then
        echo "logs kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CTL="$TMP/ctl"
mkdir -p "$CTL"

buildbot create-master --quiet --db "sqlite:///state.sqlite" "$TMP/master" >/dev/null
rm -f "$TMP/master/master.cfg.sample"

{
    printf 'BENCH_N = %d\n' "$N"
    printf 'BENCH_PORT = %d\n' "$PORT"
    printf 'BENCH_CTL = %s\n' "$("$PY" -c 'import sys; print(repr(sys.argv[1]))' "$CTL")"
    cat <<'EOF'
# -*- python -*-
import json
import os
import time

from twisted.internet import defer, task
from twisted.python import log

from buildbot.plugins import schedulers, steps, util, worker
from buildbot.util import service

c = BuildmasterConfig = {}
c['workers'] = [worker.Worker("w1", "s3cret", max_builds=1)]
# The Dispatcher takes a plain port number: the master listens on all interfaces;
# the worker connects to 127.0.0.1.
c['protocols'] = {'msgpack_experimental_v7': {'port': BENCH_PORT}}

f = util.BuildFactory()
for i in range(BENCH_N):
    f.addStep(steps.ShellCommand(name=f"true{i}", command=["true"], logEnviron=False))
c['builders'] = [util.BuilderConfig(name="b1", workernames=["w1"], factory=f)]
c['schedulers'] = [schedulers.ForceScheduler(name="force", builderNames=["b1"])]


class BenchDriver(service.BuildbotService):
    """Writes CTL/ready once w1 is attached; for each CTL/trigger-K file forces one
    build of b1; writes CTL/done-K (JSON) when build number K finishes."""
    name = "bench-driver"

    @defer.inlineCallbacks
    def startService(self):
        yield super().startService()
        self._seen = set()
        self._new = {}
        self._ready = False
        self._consumers = [
            (yield self.master.mq.startConsuming(self._on_new, ('builds', None, 'new'))),
            (yield self.master.mq.startConsuming(self._on_finished, ('builds', None, 'finished'))),
        ]
        self._loop = task.LoopingCall(self._poll)
        self._loop.start(0.05, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        for cons in self._consumers:
            cons.stopConsuming()
        return super().stopService()

    def _write(self, name, obj):
        tmp = os.path.join(BENCH_CTL, name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(obj, fh)
        os.rename(tmp, os.path.join(BENCH_CTL, name))

    def _on_new(self, key, msg):
        self._new[msg['number']] = time.time()

    def _on_finished(self, key, msg):
        now = time.time()
        num = msg['number']
        self._write(f"done-{num}", {
            "number": num, "results": msg.get('results'),
            "new": self._new.get(num), "finished": now,
        })

    def _poll(self):
        w = self.master.workers.workers.get("w1")
        if not self._ready and w is not None and w.conn is not None:
            self._ready = True
            self._write("ready", {"t": time.time()})
        for name in sorted(os.listdir(BENCH_CTL)):
            if name.startswith("trigger-") and name not in self._seen:
                self._seen.add(name)
                sched = self.master.scheduler_manager.namedServices["force"]
                d = sched.force("bench", builderNames=["b1"])
                d.addErrback(log.err, "bench-driver: force failed")


c['services'] = [BenchDriver()]
c['title'] = "bench-stock"
c['buildbotURL'] = "http://127.0.0.1:1/"
c['db'] = {'db_url': "sqlite:///state.sqlite"}
c['buildbotNetUsageData'] = None
# no c['www']: the web UI (and the buildbot-www package) is not needed
EOF
} > "$TMP/master/master.cfg"

buildbot checkconfig "$TMP/master" >/dev/null

(cd "$TMP/master" && exec buildbot start --nodaemon . >"$TMP/master.out" 2>&1) &
MASTER_PID=$!

# wait (bounded) for the master to listen before starting the worker
listening=0
for _ in $(seq 1 $((ATTACH_TIMEOUT * 10))); do
    kill -0 "$MASTER_PID" 2>/dev/null || { echo "master exited:" >&2; tail -30 "$TMP/master/twistd.log" "$TMP/master.out" >&2 || true; exit 1; }
    if "$PY" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$PORT" 2>/dev/null; then
        listening=1; break
    fi
    sleep 0.1
done
[[ $listening == 1 ]] || { echo "master did not listen on $PORT within ${ATTACH_TIMEOUT}s" >&2; exit 1; }

buildbot-worker create-worker --quiet --protocol=msgpack_experimental_v7 \
    "$TMP/worker" "127.0.0.1:$PORT" w1 s3cret >/dev/null
(cd "$TMP/worker" && exec buildbot-worker start --nodaemon . >"$TMP/worker.out" 2>&1) &
WORKER_PID=$!

ready=0
for _ in $(seq 1 $((ATTACH_TIMEOUT * 10))); do
    [[ -f "$CTL/ready" ]] && { ready=1; break; }
    kill -0 "$MASTER_PID" 2>/dev/null || { echo "master exited" >&2; exit 1; }
    kill -0 "$WORKER_PID" 2>/dev/null || { echo "worker exited" >&2; tail -30 "$TMP/worker/twistd.log" >&2 || true; exit 1; }
    sleep 0.1
done
[[ $ready == 1 ]] || { echo "worker did not attach within ${ATTACH_TIMEOUT}s" >&2; tail -30 "$TMP/master/twistd.log" >&2; exit 1; }

for k in $(seq 1 "$REPS"); do
    : > "$CTL/trigger-$k"
    done_file="$CTL/done-$k"
    finished=0
    for _ in $(seq 1 $((BUILD_TIMEOUT * 10))); do
        [[ -f "$done_file" ]] && { finished=1; break; }
        kill -0 "$MASTER_PID" 2>/dev/null || { echo "master exited during build $k" >&2; exit 1; }
        kill -0 "$WORKER_PID" 2>/dev/null || { echo "worker exited during build $k" >&2; exit 1; }
        sleep 0.1
    done
    [[ $finished == 1 ]] || { echo "build $k did not finish within ${BUILD_TIMEOUT}s" >&2; exit 1; }
    "$PY" - "$done_file" "$N" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
if d.get("results") != 0:
    sys.exit(f"build {d['number']} did not succeed (results={d.get('results')})")
secs = d["finished"] - d["new"]
print(f"stock-buildbot-master commands={n} seconds={secs:.2f} commands_per_second={n / secs:.1f}", flush=True)
EOF
done

#!/usr/bin/env bash
# Block-serving benchmark: Parley's NBD server vs. nbdkit (file plugin) vs. qemu-nbd, all
# serving the same page-cached file, driven by fio's nbd engine (libnbd) over loopback TCP
# and Unix sockets. Systems alternate inside one run so drift (thermal, page cache, other
# load) hits every system alike. Run `Scripts/bench-block.sh --help` for options.
# Results: medians over repetitions in a markdown table on stdout (+ JSON with --json);
# progress on stderr. Parsing/reporting lives in Scripts/bench-block-report.py.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_SYSTEMS="nbdkit-tcp nbdkit-unix qemu-nbd qemu-nbd-unix parley-tcp parley-unix parleyb-tcp parleyb-unix parley-map1 parley-map2 parley-map1u parley-map2u parley-api-tcp parley-api-unix"
ALL_WORKLOADS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 seqread-1m-qd8 seqwrite-1m-qd8"
# ",shared": the maps (parley-map1/2) hold the export read-write while fio uses it over NBD.
DEFAULT_PARLEY='.build/release/parley block serve --export bench=FILE,shared --nbd 127.0.0.1:PORT --nbd unix:SOCK --listen 127.0.0.1:PORT2 --listen unix:SOCK2'

systems="nbdkit-tcp,nbdkit-unix,qemu-nbd,parley-tcp,parley-unix"
workloads="${ALL_WORKLOADS// /,}"
reps=3
duration=5
jobs=1
json_out=""
baseline="nbdkit-tcp"
cpu_mode="auto"
keep=0
pin=""
size="${BLOCK_BENCH_SIZE:-1G}"
parley_cmd="${PARLEY_BLOCK_SERVER:-$DEFAULT_PARLEY}"
parleyb_cmd="${PARLEY_BLOCK_SERVER_B:-}"
report_py="Scripts/bench-block-report.py"

usage() {
  cat <<EOF
Usage: Scripts/bench-block.sh [options]

Benchmarks NBD servers exporting the same file (random data, not sparse, pre-read into
the page cache) with fio's nbd engine. Order: for each repetition, for each workload, for
each system -- so systems alternate. Each server is started once for the whole run.

Options:
  --systems LIST      comma-separated, default: $systems
                      available: ${ALL_SYSTEMS// /,}
  --workloads LIST    comma-separated, default: all of
                      ${ALL_WORKLOADS// /,}
  --repetitions N     repetitions of the whole matrix (default $reps); median is reported
  --duration SECONDS  fio runtime per (workload, system, repetition) (default $duration)
  --jobs N            fio numjobs = NBD connections per run (default $jobs); the QD applies
                      per connection
  --json FILE         also write medians, ratios and every sample as JSON to FILE
  --baseline SYSTEM   system the ratios are relative to (default $baseline)
  --cpu MODE          server CPU per IO: auto (perf if usable, else /proc), perf, proc, off
  --pin SRV/FIO       pin every server (and map) to CPU list SRV and fio to FIO with taskset,
                      e.g. 0/0 (same CPU) or 0/1 (different CPUs): the same placement for
                      every system. Unpinned, the scheduler decides, and at queue depth 1
                      where the server runs against fio decides the result (see
                      docs/performance.md)
  --keep              keep the work dir (data file, raw fio JSON, server logs)
  -h, --help          this text

Workloads (time-based, one job section, --lat_percentiles=1 => p50/p99 are *total* latency):
  randread-4k-qd1  randread-4k-qd32  randwrite-4k-qd1  randwrite-4k-qd32
  seqread-1m-qd8   seqwrite-1m-qd8   (1 MiB sequential at queue depth 8)

Systems:
  nbdkit-tcp / nbdkit-unix     nbdkit file plugin, default thread model (parallel), defaults
                               for caching (page cache); one nbdkit process each
  qemu-nbd / qemu-nbd-unix     qemu-nbd raw, --cache=writeback (the default: page cache, no
                               O_DIRECT, like nbdkit), --shared=0 (unlimited connections)
  parley-tcp / parley-unix     one Parley process serving both; command from PARLEY_BLOCK_SERVER
  parleyb-tcp / parleyb-unix   a second Parley server, from PARLEY_BLOCK_SERVER_B: another
                               build or other options, measured alternating with the first
                               (an A/B comparison in one run, on the same load)
  parley-map1 / parley-map2    parley block map with one / two paths to that Parley server's
                               block-protocol port (PORT2), serving the export on its own Unix
                               socket: fio -> NBD -> map -> Parley block protocol -> server.
                               The CPU column is the map process's alone.
  parley-map1u / parley-map2u  the same with the paths over the Parley server's block-protocol
                               Unix socket (SOCK2) instead of TCP: on one host, the map's own
                               cost without loopback TCP's
  parley-api-tcp / parley-api-unix
                               no fio: Parley's Swift client API, parley block bench (one
                               BlockClient, completion calls), at the workload's block size,
                               direction and queue depth, to that Parley server's block
                               protocol over TCP (PORT2) or its Unix socket (SOCK2); latency is
                               from sending an IO to its answer

Environment:
  BLOCK_BENCH_SIZE     size of the exported file (default 1G; numfmt --from=iec syntax)
  BLOCK_BENCH_WRITE_BS bytes per write when creating it (default 4K; 1M puts it in large
                       folios, and 4 KiB writes then dirty whole folios)
  PARLEY_BLOCK_SERVER  command starting Parley's server, with placeholders FILE (data file),
                       PORT (NBD TCP port), SOCK (NBD Unix socket), PORT2 (second TCP port),
                       SOCK2 (second Unix socket: the block protocol's, for parley-map1u/2u);
                       it must export the file under the name "bench" (shared, for the
                       maps to hold it while fio uses it over NBD). Default:
                       $DEFAULT_PARLEY
                       Parley systems are skipped if its executable is missing.
  PARLEY_BLOCK_SERVER_B  the same for parleyb-tcp / parleyb-unix (no default), e.g.
                       PARLEY_BLOCK_SERVER_B="/tmp/parley-old ${DEFAULT_PARLEY#* }"
  TMPDIR               where the work dir (and the data file) is created (default /tmp)

Example:
  BLOCK_BENCH_SIZE=256M Scripts/bench-block.sh --duration 2 --repetitions 1 --json /tmp/b.json
EOF
}

die() { echo "bench-block: $*" >&2; exit 1; }
log() { echo "$*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

while [ $# -gt 0 ]; do
  opt="$1"; val=""
  case "$opt" in
    --*=*) val="${opt#*=}"; opt="${opt%%=*}" ;;
    --systems|--workloads|--repetitions|--duration|--jobs|--json|--baseline|--cpu|--pin)
      [ $# -ge 2 ] || die "$opt needs a value"; val="$2"; shift ;;
  esac
  case "$opt" in
    --systems) systems="$val" ;;
    --workloads) workloads="$val" ;;
    --repetitions) reps="$val" ;;
    --duration) duration="$val" ;;
    --jobs) jobs="$val" ;;
    --json) json_out="$val" ;;
    --baseline) baseline="$val" ;;
    --cpu) cpu_mode="$val" ;;
    --pin) pin="$val" ;;
    --keep) keep=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

is_uint "$reps" && [ "$reps" -ge 1 ] && [ "$reps" -le 100 ] || die "--repetitions must be 1..100"
is_uint "$duration" && [ "$duration" -ge 1 ] && [ "$duration" -le 3600 ] || die "--duration must be 1..3600"
is_uint "$jobs" && [ "$jobs" -ge 1 ] && [ "$jobs" -le 64 ] || die "--jobs must be 1..64"
case "$cpu_mode" in auto|perf|proc|off) ;; *) die "--cpu must be auto, perf, proc or off" ;; esac
server_pin=(); fio_pin=()
if [ -n "$pin" ]; then
  [[ "$pin" =~ ^[0-9,-]+/[0-9,-]+$ ]] || die "--pin must look like 0/1 (server CPUs/fio CPUs)"
  command -v taskset >/dev/null || die "--pin needs taskset (util-linux)"
  server_pin=(taskset -c "${pin%/*}"); fio_pin=(taskset -c "${pin#*/}")
fi
IFS=, read -r -a sel_systems <<<"$systems"
IFS=, read -r -a sel_workloads <<<"$workloads"
[ ${#sel_systems[@]} -gt 0 ] || die "no systems selected"
[ ${#sel_workloads[@]} -gt 0 ] || die "no workloads selected"
for s in "${sel_systems[@]}"; do [[ " $ALL_SYSTEMS " == *" $s "* ]] || die "unknown system '$s'"; done
for w in "${sel_workloads[@]}"; do [[ " $ALL_WORKLOADS " == *" $w "* ]] || die "unknown workload '$w'"; done
size_bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "bad BLOCK_BENCH_SIZE '$size'"
[ "$size_bytes" -ge $((16 * 1024 * 1024)) ] && [ $((size_bytes % (1024 * 1024))) -eq 0 ] \
  || die "BLOCK_BENCH_SIZE must be a multiple of 1M and at least 16M"
for tool in fio nbdinfo python3 numfmt timeout; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio libnbd-bin python3 coreutils)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

# fio arguments for a workload: rw, block size, iodepth (per connection; fio's nbd engine
# keeps up to iodepth libnbd async commands in flight on its single connection per job).
# Sequential 1 MiB runs at QD 8: 8 MiB in flight keeps a loopback NBD connection streaming
# without turning the run into a queueing test.
workload_args() {
  case "$1" in
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    seqread-1m-qd8) echo "--rw=read --bs=1M --iodepth=8" ;;
    seqwrite-1m-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
    *) die "no such workload $1" ;;
  esac
}

# ---------------------------------------------------------------------------------------
# Work dir, cleanup.
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-block.XXXXXX")
declare -A server_pid=()   # server name -> pid
declare -A server_uri=()   # system -> NBD URI
declare -A server_of=()    # system -> server name
declare -A server_cmd=()   # server name -> command line (for the JSON)
perf_pid=""

cleanup() {
  local rc=$? name pid i
  trap - EXIT INT TERM
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid" 2>/dev/null || true; fi
  for name in "${!server_pid[@]}"; do
    pid=${server_pid[$name]}
    kill -TERM "$pid" 2>/dev/null || continue
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$name (pid $pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  if [ "$keep" = 1 ]; then log "work dir kept: $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# The data file: random bytes (so no server can short-cut zeroes/holes), then read once so
# every system starts from the same fully page-cached file. Written 4 KiB at a time
# (BLOCK_BENCH_WRITE_BS): a file written with 1 MiB writes sits in the page cache in large
# folios, where every 4 KiB write dirties a whole folio and the write lines measure the
# kernel's writeback instead of the servers (docs/performance.md, session 22).
data="$work/disk.img"
write_bs=$(numfmt --from=iec "${BLOCK_BENCH_WRITE_BS:-4K}" 2>/dev/null) || die "bad BLOCK_BENCH_WRITE_BS"
[ $((size_bytes % write_bs)) -eq 0 ] || die "BLOCK_BENCH_SIZE must be a multiple of BLOCK_BENCH_WRITE_BS"
log "creating $size ($size_bytes bytes) of random data in $data, $write_bs bytes per write"
dd if=/dev/urandom of="$data" bs="$write_bs" count=$((size_bytes / write_bs)) iflag=fullblock status=none
cat "$data" >/dev/null

# N free loopback TCP ports (held open together so they are distinct). Each server binds
# its port before the next one is picked (we wait for readiness), so reuse races are moot.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Wait (bounded: 15 s) until the NBD export at $2 answers, or the server $1 (pid $3) dies.
wait_ready() {
  local name=$1 uri=$2 pid=$3 i deadline=$((SECONDS + 15))
  for ((i = 0; i < 150 && SECONDS < deadline; i++)); do
    kill -0 "$pid" 2>/dev/null || { log "$name exited during start-up:"; tail -n 20 "$work/$name.log" >&2; return 1; }
    if timeout 2 nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "$name did not accept NBD connections at $uri within 15 s:"; tail -n 20 "$work/$name.log" >&2
  return 1
}

# start_server NAME URI COMMAND... : start COMMAND in the background (it must stay in the
# foreground itself, so $! is the server's pid), then wait until URI answers.
start_server() {
  local name=$1 uri=$2; shift 2
  server_cmd[$name]="$*"
  "${server_pin[@]}" "$@" >"$work/$name.log" 2>&1 &
  server_pid[$name]=$!
  wait_ready "$name" "$uri" "${server_pid[$name]}"
}

# Substitutes FILE, PORT, PORT2, SOCK, SOCK2 (whole words, one pass, shell-quoted) in $1.
fill_placeholders() {
  python3 - "$1" "$2" "$3" "$4" "$5" "$6" <<'PY'
import re, shlex, sys
cmd, file, port, port2, sock, sock2 = sys.argv[1:]
vals = {"FILE": file, "PORT": port, "PORT2": port2, "SOCK": sock, "SOCK2": sock2}
print(re.sub(r"\b(FILE|PORT2|PORT|SOCK2|SOCK)\b", lambda m: shlex.quote(vals[m.group(1)]), cmd))
PY
}

# Starts whatever server the selected systems need; systems that cannot run are dropped
# from run_systems with a message. Every server is started ONCE for the whole run and
# stays up (idle) while the others are measured: an idle NBD server costs no CPU, start-up
# cost and first-connection effects stay out of the numbers, and start/stop churn would
# only add noise. Each fio run still opens fresh connections.
run_systems=()
want() { [[ ",$systems," == *",$1,"* ]]; }
skip() { log "SKIPPING $1: $2"; }

# nbdkit: --foreground so $! is nbdkit itself (killed by pid), --exit-with-parent as a
# safety net if this script dies hard. Default thread model for the file plugin is
# "parallel" (16 worker threads per connection by default, -t); default file caching
# (cache=default, fadvise=normal) means plain pread/pwrite on the page cache. nbdkit
# advertises multi-conn for the file plugin, and accepts any number of connections, so no
# extra option is needed for --jobs > 1. nbdkit ignores the export name ("bench").
if want nbdkit-tcp || want nbdkit-unix; then
  if ! command -v nbdkit >/dev/null; then
    for s in nbdkit-tcp nbdkit-unix; do if want $s; then skip $s "nbdkit not installed"; fi; done
  else
    if want nbdkit-tcp; then
      port=$(free_ports 1)
      uri="nbd://127.0.0.1:$port/bench"
      if start_server nbdkit-tcp "$uri" nbdkit --foreground --exit-with-parent \
           --ipaddr 127.0.0.1 --port "$port" file file="$data"; then
        server_of[nbdkit-tcp]=nbdkit-tcp; server_uri[nbdkit-tcp]=$uri
      else skip nbdkit-tcp "server failed to start"; fi
    fi
    if want nbdkit-unix; then
      sock="$work/nbdkit.sock"
      uri="nbd+unix:///bench?socket=$sock"
      if start_server nbdkit-unix "$uri" nbdkit --foreground --exit-with-parent \
           --unix "$sock" file file="$data"; then
        server_of[nbdkit-unix]=nbdkit-unix; server_uri[nbdkit-unix]=$uri
      else skip nbdkit-unix "server failed to start"; fi
    fi
  fi
fi

# qemu-nbd: --cache=writeback is qemu-nbd's default and the fair match for nbdkit's file
# plugin: I/O goes through the host page cache (no O_DIRECT) and data is only flushed when
# the client sends NBD_CMD_FLUSH (fio sends none here). cache=none would bypass the page
# cache (O_DIRECT) and turn the benchmark into a disk benchmark for qemu-nbd only.
# aio is left at the default (threads). --persistent keeps it alive across fio runs;
# --shared=0 lifts the default limit of 1 client (fio opens a probe connection for the
# export size, then one connection per job). file.locking=off because qemu takes OFD
# locks on the image and two qemu-nbd processes (TCP + Unix) would otherwise refuse to
# share the file for writing. qemu-nbd listens on either TCP or a Unix socket, hence one
# process per transport.
qemu_image_opts="driver=raw,file.driver=file,file.filename=$data,file.locking=off"
if want qemu-nbd || want qemu-nbd-unix; then
  if ! command -v qemu-nbd >/dev/null; then
    for s in qemu-nbd qemu-nbd-unix; do
      if want $s; then skip $s "qemu-nbd not installed (apt-get install qemu-utils)"; fi
    done
  else
    qemu_common=(qemu-nbd --persistent --shared=0 --cache=writeback --export-name=bench
                 --image-opts "$qemu_image_opts")
    if want qemu-nbd; then
      port=$(free_ports 1)
      uri="nbd://127.0.0.1:$port/bench"
      if start_server qemu-nbd "$uri" "${qemu_common[@]}" --bind=127.0.0.1 --port="$port"; then
        server_of[qemu-nbd]=qemu-nbd; server_uri[qemu-nbd]=$uri
      else skip qemu-nbd "server failed to start"; fi
    fi
    if want qemu-nbd-unix; then
      sock="$work/qemu-nbd.sock"
      uri="nbd+unix:///bench?socket=$sock"
      if start_server qemu-nbd-unix "$uri" "${qemu_common[@]}" --socket="$sock"; then
        server_of[qemu-nbd-unix]=qemu-nbd-unix; server_uri[qemu-nbd-unix]=$uri
      else skip qemu-nbd-unix "server failed to start"; fi
    fi
  fi
fi

# Parley: one process serves the NBD export on TCP and on a Unix socket; start_parley NAME
# CMD starts it for the systems NAME-tcp and NAME-unix (parley, and parleyb for an A/B run).
start_parley() {
  local name=$1 template=$2 s names="" cmd exe tcp_uri unix_uri probe q1 q2
  for s in $name-tcp $name-unix; do if want $s; then names+="$s "; fi; done
  if [ -z "$template" ]; then
    skip "${names% }" "no command (set PARLEY_BLOCK_SERVER_B)"; return
  fi
  read -r q1 q2 <<<"$(free_ports 2)"
  if [ "$name" = parley ]; then p1=$q1; p2=$q2; fi
  cmd=$(fill_placeholders "$template" "$data" "$q1" "$q2" "$work/$name.sock" "$work/$name-block.sock")
  exe=$(python3 -c 'import shlex, sys; print(shlex.split(sys.argv[1])[0])' "$cmd")
  if [ "$name" = parley ]; then parley_exe=$exe; fi
  if { [[ "$exe" == */* ]] && [ ! -x "$exe" ]; } || { [[ "$exe" != */* ]] && ! command -v "$exe" >/dev/null; }; then
    skip "${names% }" "Parley server executable '$exe' not found (build Parley in release mode, or set PARLEY_BLOCK_SERVER)"; return
  fi
  tcp_uri="nbd://127.0.0.1:$q1/bench"
  unix_uri="nbd+unix:///bench?socket=$work/$name.sock"
  probe=$tcp_uri
  want $name-tcp || probe=$unix_uri
  if start_server $name "$probe" bash -c "exec $cmd"; then
    if want $name-tcp; then server_of[$name-tcp]=$name; server_uri[$name-tcp]=$tcp_uri; fi
    if want $name-unix; then
      if wait_ready $name "$unix_uri" "${server_pid[$name]}"; then
        server_of[$name-unix]=$name; server_uri[$name-unix]=$unix_uri
      else skip $name-unix "no NBD export on the Unix socket"; fi
    fi
  else skip "${names% }" "server failed to start: $cmd"; fi
}
if want parley-tcp || want parley-unix || want parley-map1 || want parley-map2 || want parley-map1u || want parley-map2u \
   || want parley-api-tcp || want parley-api-unix; then
  start_parley parley "$parley_cmd"
fi
if want parleyb-tcp || want parleyb-unix; then
  start_parley parleyb "$parleyb_cmd"
fi

# parley-map1 / parley-map2: `parley block map` over one or two paths to the Parley server's
# block-protocol listener (PORT2), serving the export over NBD on a Unix socket of its own.
# parley-map1u / parley-map2u: the same over the server's block-protocol Unix socket (SOCK2).
for s in parley-map1 parley-map2 parley-map1u parley-map2u; do
  want $s || continue
  m=${s#parley-map}; m=${m%u}
  if [ -z "${server_pid[parley]:-}" ]; then skip $s "the Parley server is not running"; continue; fi
  path="127.0.0.1:$p2"
  if [[ $s == *u ]]; then
    path="unix:$work/parley-block.sock"
    # The server opens its NBD listeners (what wait_ready probed) before its block-protocol ones.
    for _ in $(seq 50); do [ -S "$work/parley-block.sock" ] && break; sleep 0.1; done
    [ -S "$work/parley-block.sock" ] || { skip $s "the Parley server has no block-protocol Unix socket (SOCK2)"; continue; }
  fi
  msock="$work/${s#parley-}.sock"
  margs=(block map --session bench-${s#parley-} --device bench --nbd "unix:$msock" --state-dir "$work/state")
  for ((k = 0; k < m; k++)); do margs+=(--path "$path"); done
  uri="nbd+unix:///bench?socket=$msock"
  if start_server $s "$uri" "$parley_exe" "${margs[@]}"; then server_of[$s]=$s; server_uri[$s]=$uri
  else skip $s "the map failed to start"; fi
done

# parley-api-tcp / parley-api-unix: `parley block bench` straight to the server's block protocol.
for s in parley-api-tcp parley-api-unix; do
  want $s || continue
  if [ -z "${server_pid[parley]:-}" ]; then skip $s "the Parley server is not running"; continue; fi
  # One client at the workload's depth: not comparable with fio's --jobs N connections.
  if [ "$jobs" -gt 1 ]; then skip $s "parley block bench drives one connection (--jobs $jobs asks for $jobs)"; continue; fi
  if [ $s = parley-api-unix ]; then
    for _ in $(seq 50); do [ -S "$work/parley-block.sock" ] && break; sleep 0.1; done
    [ -S "$work/parley-block.sock" ] || { skip $s "the Parley server has no block-protocol Unix socket (SOCK2)"; continue; }
    server_uri[$s]="unix:$work/parley-block.sock"
  else
    server_uri[$s]="127.0.0.1:$p2"
  fi
  server_of[$s]=parley
done

for s in "${sel_systems[@]}"; do [ -n "${server_uri[$s]:-}" ] && run_systems+=("$s"); done
[ ${#run_systems[@]} -gt 0 ] || die "no system could be started"
[ -n "${server_uri[$baseline]:-}" ] || log "note: baseline $baseline is not running; ratios will be empty"

# ---------------------------------------------------------------------------------------
# Server CPU time around each fio run. perf stat -p counts task-clock of all threads of the
# process, including threads created while it is attached (nbdkit starts its workers per
# connection). /proc/PID/stat utime+stime (also all threads, 10 ms ticks) is the fallback.
if [ "$cpu_mode" = auto ]; then
  if command -v perf >/dev/null && perf stat -e task-clock -x, -o /dev/null true >/dev/null 2>&1; then
    cpu_mode=perf
  else cpu_mode=proc; fi
elif [ "$cpu_mode" = perf ]; then
  perf stat -e task-clock -x, -o /dev/null true >/dev/null 2>&1 || die "perf stat -e task-clock does not work here"
fi
clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

cpu_begin() { # pid outfile
  case "$cpu_mode" in
    perf)
      perf stat -e task-clock -x, -o "$2" -p "$1" >/dev/null 2>&1 &
      perf_pid=$!
      local i; for ((i = 0; i < 50; i++)); do [ -s "$2" ] && break; sleep 0.02; done
      sleep 0.1 ;;  # perf writes its header before attaching; give it a moment
    proc) cpu_ticks "$1" >"$2" ;;
  esac
}
cpu_end() { # pid outfile -> prints CPU nanoseconds (or nothing)
  case "$cpu_mode" in
    perf)
      kill -INT "$perf_pid" 2>/dev/null || true
      local i; for ((i = 0; i < 50; i++)); do kill -0 "$perf_pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$perf_pid" 2>/dev/null || true   # only if it ignored SIGINT for 5 s
      wait "$perf_pid" 2>/dev/null || true; perf_pid=""
      awk -F, '$3 == "task-clock" && $1 ~ /^[0-9.]+$/ { printf "%.0f", $1 * 1e6 }' "$2" ;;
    proc)
      local t0 t1; t0=$(cat "$2"); t1=$(cpu_ticks "$1")
      echo $(( (t1 - t0) * 1000000000 / clk_tck )) ;;
  esac
}

# ---------------------------------------------------------------------------------------
results="$work/results.jsonl"
: >"$results"
mkdir -p "$work/fio"
total=$((reps * ${#sel_workloads[@]} * ${#run_systems[@]}))
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# Client, server and perf share the machine's CPUs; other load skews everything.
if awk -v l="${load_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  log "warning: load average $load_start on $(nproc) CPUs before starting; results will be noisy"
fi
log "systems: ${run_systems[*]} | workloads: ${sel_workloads[*]} | $reps x ${duration}s, jobs=$jobs, cpu=$cpu_mode"
log "estimated time: ~$((total * (duration + 1))) s ($total fio runs)"

failures=0
for ((rep = 1; rep <= reps; rep++)); do
  for w in "${sel_workloads[@]}"; do
    read -r -a wargs <<<"$(workload_args "$w")"
    for s in "${run_systems[@]}"; do
      name=${server_of[$s]}
      pid=${server_pid[$name]}
      out="$work/fio/rep$rep-$w-$s.json"
      if ! kill -0 "$pid" 2>/dev/null; then
        log "rep $rep/$reps $w $s: server $name (pid $pid) is gone"; failures=$((failures + 1)); continue
      fi
      # Read the whole file first, so that every run serves it from the page cache: this
      # machine's DAMON scheme pages out file pages unused for a minute (at up to 128 MiB/s),
      # and a run that finds half the file evicted measures the disk, not the server.
      cat "$data" >/dev/null
      # And write out what earlier write runs left dirty: the kernel's writeback of up to a
      # few GB otherwise runs during the next run and takes its CPU (4 KiB QD32 writes fell
      # from about 80k to 40k IOPS with 1.8 GB dirty; session 22).
      sync "$data"
      cpu_begin "$pid" "$out.cpu"
      # No ramp time: the CPU window covers the whole fio process, and so does total_ios.
      rc=0
      source_args=(--fio "$out")
      if [[ $s == parley-api-* ]]; then
        # fio's arguments, spelled for `parley block bench`.
        brw=${wargs[0]#--rw=} bbs=${wargs[1]#--bs=} bqd=${wargs[2]#--iodepth=}
        bbs=$(numfmt --from=iec "${bbs^^}")
        timeout $((duration + 60)) "${fio_pin[@]}" "$parley_exe" block bench "${server_uri[$s]}" --export bench \
          --rw "$brw" --block-size "$bbs" --queue-depth "$bqd" --seconds "$duration" --json >"$out" 2>"$out.log" || rc=$?
        source_args=(--bench "$out")
      else
        timeout $((duration + 60)) "${fio_pin[@]}" fio --name="$w" --ioengine=nbd --uri="${server_uri[$s]}" \
          "${wargs[@]}" --numjobs="$jobs" --group_reporting \
          --time_based --runtime="$duration" --norandommap --randrepeat=0 \
          --lat_percentiles=1 --percentile_list=50:99 \
          --output-format=json --output="$out" >"$out.log" 2>&1 || rc=$?
      fi
      cpu_ns=$(cpu_end "$pid" "$out.cpu")
      if [ "$rc" -ne 0 ]; then
        log "rep $rep/$reps $w $s: the client failed (exit $rc):"; tail -n 5 "$out.log" >&2
      fi
      summary=$(python3 "$report_py" record "${source_args[@]}" --out "$results" --rep "$rep" \
                  --workload "$w" --system "$s" --cpu-ns "$cpu_ns") || failures=$((failures + 1))
      log "rep $rep/$reps $w $s: $summary"
    done
  done
done

# ---------------------------------------------------------------------------------------
ver() { "$@" 2>/dev/null | head -n 1 || true; }
meta=(--meta "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" --meta "host=$(uname -srm)" --meta "cpus=$(nproc)"
      --meta "size_bytes=$size_bytes" --meta "duration_s=$duration" --meta "repetitions=$reps"
      --meta "jobs=$jobs" --meta "cpu_mode=$cpu_mode" --meta "fio=$(ver fio --version)"
      --meta "loadavg_start=$load_start" --meta "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)"
      --meta "nbdkit=$(ver nbdkit --version)" --meta "qemu-nbd=$(ver qemu-nbd --version)")
for name in "${!server_cmd[@]}"; do meta+=(--meta "command.$name=${server_cmd[$name]}"); done
run_list=$(IFS=,; echo "${run_systems[*]}")
echo
echo "## NBD block benchmark: $size file, ${duration}s x $reps reps, fio nbd engine, numjobs=$jobs ($(nproc) CPUs)"
echo
python3 "$report_py" report --results "$results" --workloads "$workloads" --systems "$run_list" \
  --baseline "$baseline" ${json_out:+--json "$json_out"} "${meta[@]}"
if [ -n "$json_out" ]; then log "JSON written to $json_out"; fi
[ "$failures" -eq 0 ] || { log "$failures run(s) failed"; exit 1; }

# Shared by the benchmark scripts (sourced, not run): a work directory removed at exit with
# every process started into `pids`, a free loopback port, and waiting for an NBD endpoint.
# The sourcing script sets `bench_name` (for messages) first.

# bench_workdir PREFIX: sets `work` (a new directory under /tmp) and `pids` (stopped at exit).
bench_workdir() {
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for URI: until a 4 KiB fio read through it works, at most 10 s.
wait_for() {
  local i
  for i in $(seq 1 50); do
    if fio --name=probe --ioengine=nbd --uri="$1" --rw=read --bs=4k --size=4k --output=/dev/null >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "$bench_name: nothing answers at $1" >&2; return 1
}

# bench_disk SIZE: $work/disk.img, SIZE (numfmt's IEC: 1G, 512M) of random data.
bench_disk() {
  echo "creating $1 of random data in $work/disk.img" >&2
  head -c "$(numfmt --from=iec "$1")" /dev/urandom > "$work/disk.img"
}

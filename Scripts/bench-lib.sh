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
  # A script's own cleanup after its processes have gone (cgroups to remove), if it has one.
  if declare -F bench_after_cleanup >/dev/null; then bench_after_cleanup; fi
  rm -rf "$work"
}

# CPU caps (`bench_cgroup_*`): each capped process in a cgroup of its own, at most FRACTION of
# one CPU (CFS bandwidth: quota = FRACTION x a 10 ms period), cgroup v2 where its cpu
# controller is on, else v1's cpu hierarchy. Needs root.
bench_cgroup_root() {
  if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    echo "v2 /sys/fs/cgroup"
  elif [ -w /sys/fs/cgroup/cpu/cpu.cfs_quota_us ] || [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    echo "v1 /sys/fs/cgroup/cpu"
  else
    return 1
  fi
}

# bench_cgroup_make NAME FRACTION: prints the new cgroup's directory.
bench_cgroup_make() {
  local kind root dir period=10000 quota
  read -r kind root < <(bench_cgroup_root) || { echo "$bench_name: no cgroup cpu controller to cap CPUs with" >&2; return 1; }
  quota=$(python3 -c "print(max(1000, round(float('$2') * $period)))")
  dir="$root/$bench_name-$$-$1"
  mkdir "$dir" || { echo "$bench_name: cannot create cgroup $dir (root needed)" >&2; return 1; }
  # Called as `x=$(bench_cgroup_make ...) || exit 1`, where set -e does not hold: every
  # write is checked, and read back, so that a run never goes on uncapped claiming a cap.
  local failed="$bench_name: cannot set the CPU cap of cgroup $dir"
  if [ "$kind" = v2 ]; then
    echo +cpu > "$root/cgroup.subtree_control" 2>/dev/null || true
    echo "$quota $period" > "$dir/cpu.max" || { echo "$failed" >&2; rmdir "$dir"; return 1; }
    [ "$(cat "$dir/cpu.max")" = "$quota $period" ] || { echo "$failed (cpu.max reads $(cat "$dir/cpu.max"))" >&2; rmdir "$dir"; return 1; }
  else
    echo "$period" > "$dir/cpu.cfs_period_us" && echo "$quota" > "$dir/cpu.cfs_quota_us" || { echo "$failed" >&2; rmdir "$dir"; return 1; }
    [ "$(cat "$dir/cpu.cfs_quota_us")" = "$quota" ] || { echo "$failed (cpu.cfs_quota_us reads $(cat "$dir/cpu.cfs_quota_us"))" >&2; rmdir "$dir"; return 1; }
  fi
  echo "$dir"
}

# bench_cgroup_enter DIR PID: moves process PID (all its threads) into DIR.
bench_cgroup_enter() { echo "$2" > "$1/cgroup.procs"; }

# Removes the cgroups this script made. Processes still in them (a fio the script was
# waiting for when it was interrupted: bash runs the EXIT trap without stopping it) are
# killed first; a cgroup that cannot be removed is named.
bench_cgroup_remove() {
  local kind root d p i
  read -r kind root < <(bench_cgroup_root) || return 0
  for d in "$root/$bench_name-$$-"*; do
    [ -d "$d" ] || continue
    for i in 1 2 3 4 5 6 7 8 9 10; do
      while read -r p; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null; done < "$d/cgroup.procs"
      rmdir "$d" 2>/dev/null && break
      sleep 0.1
    done
    [ -d "$d" ] && echo "$bench_name: could not remove cgroup $d" >&2
  done
  return 0
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

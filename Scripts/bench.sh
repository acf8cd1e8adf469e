#!/usr/bin/env bash
# Builds the benchmark harness (Benchmarks/, its own package) in release mode and runs it:
# Parley (crc mode, lossless sessions, secure mode, over TLS) vs. a raw SwiftNIO echo (plain
# and inside TLS 1.3) vs. gRPC over TCP loopback, servers in child processes. Two raw baselines:
# raw (its client flushes every request) and raw-coalesced (its client coalesces writes as
# Parley's does). The reconnect workload runs the real `parley chaos`: the `parley` command is
# built into the same scratch directory, next to parley-bench.
# Arguments are passed to parley-bench, e.g.:
#   Scripts/bench.sh                                   # full run: 5 repetitions, 2 s each
#   Scripts/bench.sh --repetitions 3 --duration 1 --workloads latency,throughput-64b
#   Scripts/bench.sh --systems parley,parley-secure,tls-echo --workloads throughput-64b,bulk,handshake
#   Scripts/bench.sh run --systems raw,raw-coalesced,parley --workloads latency,throughput-64b,bulk
#   Scripts/bench.sh run --systems parley,parley-lossless --workloads throughput-64b,bulk,reconnect
#   Scripts/bench.sh aead                              # the AEAD ceiling of secure mode
#   Scripts/bench.sh --help
# See docs/performance.md for what it measures and the latest figures.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --package-path Benchmarks --scratch-path .build-bench >&2
# `parley` (for `parley chaos`), a product of the Parley package the harness depends on.
swift build -c release --package-path Benchmarks --scratch-path .build-bench --product parley >&2
# Where this ran (the harness's own header says it too): processor model, cores, commit.
cpu=$(awk -F': *' '/^model name/ && !n {n=$2} /^cpu family/ && !f {f=$2} /^model[ \t]*:/ && !m {m=$2}
  END {if (n != "") printf "%s (family %s, model %s)", n, f, m}' /proc/cpuinfo 2>/dev/null || true)
commit=$(git describe --always --dirty 2>/dev/null || echo unknown)
echo "bench.sh: processor ${cpu:-unknown}, $(nproc 2>/dev/null || echo '?') cores online; commit $commit" >&2
exec .build-bench/release/parley-bench "$@"

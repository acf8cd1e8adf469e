#!/usr/bin/env bash
# Builds the benchmark harness (Benchmarks/, its own package) in release mode and runs it:
# Parley (crc mode, secure mode, over TLS) vs. a raw SwiftNIO echo (plain and inside TLS 1.3)
# vs. gRPC over TCP loopback, servers in child processes.
# Arguments are passed to parley-bench, e.g.:
#   Scripts/bench.sh                                   # full run: 5 repetitions, 2 s each
#   Scripts/bench.sh --repetitions 3 --duration 1 --workloads latency,throughput-64b
#   Scripts/bench.sh --systems parley,parley-secure,tls-echo --workloads throughput-64b,bulk,handshake
#   Scripts/bench.sh aead                              # the AEAD ceiling of secure mode
#   Scripts/bench.sh --help
# See docs/performance.md for what it measures and the latest figures.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --package-path Benchmarks --scratch-path .build-bench >&2
exec .build-bench/release/parley-bench "$@"

#!/usr/bin/env bash
# Regenerates the committed Swift code from Protos/*.proto.
# Needs Debian's protobuf-compiler (protoc) and protoc-gen-swift built from swift-protobuf:
#   apt-get install -y protobuf-compiler
#   git clone <swift-protobuf> && cd swift-protobuf && git checkout 1.39.0 \
#     && swift build -c release --product protoc-gen-swift
#   PROTOC_GEN_SWIFT=/path/to/.build/release/protoc-gen-swift Scripts/generate-protos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
plugin="${PROTOC_GEN_SWIFT:-$(command -v protoc-gen-swift || true)}"
[ -x "$plugin" ] || { echo "protoc-gen-swift not found: set PROTOC_GEN_SWIFT" >&2; exit 1; }
command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }
gen() { # proto visibility outdir
  mkdir -p "$3"
  protoc --plugin=protoc-gen-swift="$plugin" -I Protos \
    --swift_opt=Visibility="$2" --swift_opt=FileNaming=DropPath --swift_out="$3" "$1"
}
gen parley/v1/parley.proto Public Sources/ParleyWire/Generated
gen parley/echo/v1/echo.proto Public Sources/ParleyServices/Generated
gen parley/block/v1/block.proto Public Sources/ParleyBlock/Generated
gen parley/work/v1/work.proto Public Sources/ParleyWork/Generated
gen parley/work/v1/store.proto Internal Sources/ParleyWork/Generated
echo "generated."

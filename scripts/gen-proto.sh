#!/usr/bin/env bash
# Regenerates src/sandboxd/envd/gen from proto/ (dev-time only; the output is committed).
# Needs: protoc (apt protobuf-compiler), protoc-gen-py==0.6.0, protoc-gen-connectrpc==0.12.1 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/sandboxd/envd/gen
protoc -I proto --py_out="$out" --connectrpc_out="$out" proto/process/process.proto proto/filesystem/filesystem.proto
touch "$out/__init__.py" "$out/process/__init__.py" "$out/filesystem/__init__.py"

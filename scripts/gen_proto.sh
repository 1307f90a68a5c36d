#!/usr/bin/env bash
# Regenerate src/flowstate/wire/flowstate_pb2.py and .pyi from proto/flowstate/v1/flowstate.proto.
#
# protoc comes from grpcio-tools, installed into a throwaway virtual environment (nothing is
# added to the project's own environment). grpcio-tools 1.65 bundles protoc 26.1, whose Python
# code (protobuf 5.26.1 gencode) loads on every protobuf runtime from 5.26.1 on, 7.x included.
#
#   scripts/gen_proto.sh                 # creates and removes a temporary venv
#   GEN_PROTO_VENV=/tmp/v scripts/gen_proto.sh   # reuses (or creates) the venv at /tmp/v
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
tools_version="1.65.5"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

venv="${GEN_PROTO_VENV:-$work/venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import grpc_tools" 2>/dev/null; then
    "$venv/bin/pip" install --quiet "grpcio-tools==$tools_version"
fi

"$venv/bin/python" -m grpc_tools.protoc \
    --proto_path="$root/proto" \
    --python_out="$work" \
    --pyi_out="$work" \
    "$root/proto/flowstate/v1/flowstate.proto"

out="$root/src/flowstate/wire"
cp "$work/flowstate/v1/flowstate_pb2.py" "$out/flowstate_pb2.py"
cp "$work/flowstate/v1/flowstate_pb2.pyi" "$out/flowstate_pb2.pyi"
echo "generated $out/flowstate_pb2.py and flowstate_pb2.pyi"

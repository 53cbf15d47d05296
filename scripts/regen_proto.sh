#!/usr/bin/env bash
# Regenerate the protobuf modules (caffelite_pb2.py, tensorboard_pb2.py) from their .proto files.
# Run from the repository root. Needs grpcio-tools (python -m grpc_tools.protoc).
set -euo pipefail

PYTHON="${PYTHON:-python}"

if [ ! -f caffelite/proto/caffelite.proto ]; then
  echo "regen_proto.sh: run this from the repository root" >&2
  exit 1
fi

for proto in caffelite/proto/caffelite.proto caffelite/proto/tensorboard.proto; do
  "$PYTHON" -m grpc_tools.protoc -I . --python_out=. "$proto"
  echo "wrote ${proto%.proto}_pb2.py"
done

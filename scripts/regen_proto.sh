#!/usr/bin/env bash
# Regenerate caffelite/proto/caffelite_pb2.py from caffelite.proto.
# Run from the repository root. Needs grpcio-tools (python -m grpc_tools.protoc).
set -euo pipefail

PYTHON="${PYTHON:-python}"

if [ ! -f caffelite/proto/caffelite.proto ]; then
  echo "regen_proto.sh: run this from the repository root" >&2
  exit 1
fi

"$PYTHON" -m grpc_tools.protoc -I . --python_out=. caffelite/proto/caffelite.proto
echo "wrote caffelite/proto/caffelite_pb2.py"

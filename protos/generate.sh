#!/usr/bin/env bash
# Regenerate the Python for protos/*.proto. Run from the repository root: bash protos/generate.sh
#
# grpcio-tools pins its own protobuf, so it lives in a throwaway venv rather than the project's. Set
# PROTOC_PYTHON to a python that already has grpcio-tools to skip the venv. Keep GRPC_TOOLS_VERSION equal to
# the grpcio the project runs, so the generated code's version check passes.
#
# Running protoc with the repository root as the include path names the file protos/expert_service.proto,
# so the generated stubs import their messages as `from protos import expert_service_pb2` (the package).
set -euo pipefail

GRPC_TOOLS_VERSION="${GRPC_TOOLS_VERSION:-1.85.1}"
cd "$(dirname "$0")/.."

if [[ -z "${PROTOC_PYTHON:-}" ]]; then
  venv="$(mktemp -d)"
  trap 'rm -rf "$venv"' EXIT
  "${PYTHON:-python3.11}" -m venv "$venv"
  "$venv/bin/pip" install --quiet "grpcio-tools==${GRPC_TOOLS_VERSION}"
  PROTOC_PYTHON="$venv/bin/python"
fi

"$PROTOC_PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/*.proto

# Older grpcio-tools wrote a top-level `import x_pb2`; make sure the package import is used.
for grpc_py in protos/*_pb2_grpc.py; do
  name="$(basename "$grpc_py" _grpc.py)"
  sed -i -E "s/^import ${name} as /from protos import ${name} as /" "$grpc_py"
  grep -q "^from protos import ${name} as " "$grpc_py"
done

#!/usr/bin/env bash
# Create .venv and install latentpipe with its dev tools.
# Without a GPU (no nvidia-smi) torch is pinned to the CPU build via infra/constraints-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c infra/constraints-cpu.txt)
  "$VENV/bin/python" -m pip install -q "${constraints[@]}" torch
fi
"$VENV/bin/python" -m pip install -q "${constraints[@]}" -e ".[dev]"
echo "latentpipe installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# Run the test suite (unit, integration with real Ray/DeepSpeed/MLflow, and e2e).
# Extra arguments go to pytest, e.g. `bash infra/test.sh -m "not integration"`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# One DeepSpeed op build per venv (a shared ~/.cache/torch_extensions was rebuilt on most starts).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=${MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING:-false}
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"

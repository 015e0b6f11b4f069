"""Shared fixtures. Tests never reach the network: the hub is offline."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _isolate_mlflow_uri() -> Iterator[None]:
    """Each test starts with the MLflow URIs it was given and leaves them as it found them.

    ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``; leaked into a later test, every
    training subprocess that test starts would log into the earlier test's store."""
    saved = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    yield
    if "mlflow" in sys.modules:  # reset the in-process defaults too (without importing mlflow otherwise)
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]  # None: unset
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

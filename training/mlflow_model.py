"""The MLflow pyfunc wrapper of a latentpipe export, logged as a *model from code*.

``latentpipe.training.tracking`` saves registered models with ``mlflow.pyfunc.save_model(python_model=
<this file>, artifacts={"export": <export dir>})``: MLflow copies this source file and the
export folder (``model.safetensors`` + ``export.json``, see ``training/export.py``) into the model,
and on load executes this file and calls ``load_context``. Nothing is pickled; the weights
load through ``latentpipe.training.export.load_export`` (safetensors only), so the loading environment
needs latentpipe installed.

    model = mlflow.pyfunc.load_model("models:/toy@best")
    out = model.predict({"x": images})             # module(**inputs) -> numpy
    family, module = model.unwrap_python_model().family, model.unwrap_python_model().module
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

EXPORT_ARTIFACT = "export"


def _to_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return torch.tensor(value)
    return value


def _to_numpy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # diffusers output objects
        return out.sample.detach().cpu().numpy()
    if isinstance(out, (tuple, list)):
        return type(out)(_to_numpy(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _to_numpy(v) for k, v in out.items()}
    return out


class LatentpipeExport(PythonModel):
    """Rebuilds the exported primary module through its family; ``predict`` runs its forward."""

    family: Any
    module: torch.nn.Module

    def load_context(self, context: PythonModelContext) -> None:
        try:
            from latentpipe.training.export import load_export
        except ImportError as e:  # the model is code + weights: the code must be importable
            raise ImportError(f"loading a latentpipe model needs the latentpipe package installed: {e}") from e
        self.family, self.module = load_export(Path(context.artifacts[EXPORT_ARTIFACT]))
        self.module.eval()

    # np.ndarray is the one hint MLflow neither warns about nor turns into a schema check; a dict of
    # arrays is accepted as well (MLflow passes inputs through untouched when there is no schema).
    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> Any:
        """``model_input``: one array -> ``module(x)``, or a dict of arrays -> ``module(**inputs)``.

        Arrays are numpy or torch (e.g. images [B, 3, H, W] in [-1, 1] for the toy family);
        the output comes back as numpy.
        """
        with torch.no_grad():
            if isinstance(model_input, Mapping):
                out = self.module(**{k: _to_tensor(v) for k, v in model_input.items()})
            else:
                out = self.module(_to_tensor(model_input))
        return _to_numpy(out)


mlflow.models.set_model(LatentpipeExport())

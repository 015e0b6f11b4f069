"""Models registered before the namespace stay loadable through the opt-in aliases."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

import latentpipe.training.export as export
from latentpipe.training import legacy_names, mlflow_model
from latentpipe.training.families import get_family, model_config_dict


def test_a_model_saved_with_the_old_import_loads_while_enabled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    family = get_family("toy")(get_family("toy").config_class())
    module = family.build_primary().eval()
    exported = export.save_export(tmp_path / "export", "toy", model_config_dict(family), module.state_dict())
    # The code file an old registered model carries: it imports ``training.export``.
    old_code = Path(mlflow_model.__file__).read_text(encoding="utf-8").replace(
        "from latentpipe.training.export import", "from training.export import")
    assert "from training.export import load_export" in old_code
    (tmp_path / "old_model.py").write_text(old_code, encoding="utf-8")
    mlflow.pyfunc.save_model(path=str(tmp_path / "model"), python_model=str(tmp_path / "old_model.py"),
                             artifacts={"export": str(exported)}, pip_requirements=[])
    legacy_names.enable()
    try:
        loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
        assert sys.modules["training.export"] is export  # the alias is the installed module itself
        assert export.__spec__ is not None and export.__spec__.name == "latentpipe.training.export"
    finally:
        legacy_names.disable()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(loaded.predict(x), want, rtol=1e-5, atol=1e-6)
    assert "training.export" not in sys.modules and legacy_names._FINDER not in sys.meta_path

"""Aliases that keep MLflow models registered before the ``latentpipe.`` namespace loadable.

Models registered before the rename store a copy of ``mlflow_model.py`` that imports
``training.export``. Call ``enable()`` once before ``mlflow.pyfunc.load_model`` (or serve with
``python -c "import latentpipe.training.legacy_names as l; l.enable(); ..."``): the old names
``training``, ``pipeline`` and ``preprocessing`` then resolve to ``latentpipe.<name>``. Opt-in on
purpose: installing the bare names for everyone would bring back the collisions the namespace
removed. Models registered after the rename need nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

OLD_NAMES = ("pipeline", "preprocessing", "training")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``<old>.x`` as the already-importable ``latentpipe.<old>.x`` (the same module object)."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in OLD_NAMES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(f"latentpipe.{spec.name}")
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias spec next
        return module

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__spec__
        if alias is not None and alias.loader_state is not None:
            module.__spec__ = alias.loader_state  # the module keeps its own spec


_FINDER = _Alias()


def enable() -> None:
    """Make ``training.*``, ``pipeline.*`` and ``preprocessing.*`` aliases of ``latentpipe.*``."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def disable() -> None:
    """Undo ``enable`` (aliases already imported stay in ``sys.modules`` until removed)."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in [n for n in sys.modules if n.partition(".")[0] in OLD_NAMES]:
        del sys.modules[name]


__all__ = ["OLD_NAMES", "disable", "enable"]

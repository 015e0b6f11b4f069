"""Checkpoint files are read back without unpickling: every ``torch.load`` is weights-only.

DeepSpeed reads its checkpoints with ``torch.load(..., weights_only=False)`` in many places
(its checkpoint engine, the ZeRO optimizer states, ``ds_to_universal`` and the universal
loader), and only the first of them has an extension point. So for the duration of a
restore, ``weights_only_loads()`` routes *every* ``torch.load`` of this process through
``load()`` (weights-only, whatever the caller asked for, plus the few DeepSpeed classes its
state dicts hold), and sets torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch for anything
that holds a reference to the original function or runs in a child process. A file that
needs anything else (an object whose ``__reduce__`` runs code, a raw pickle) is refused with
``UnsafeCheckpointError`` naming the file; an unreadable one with ``CheckpointFileError``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from latentpipe.preprocessing.config import ConfigError


class CheckpointFileError(ConfigError):
    """A checkpoint file that cannot be read (truncated, not what its name says)."""


class UnsafeCheckpointError(CheckpointFileError):
    """A checkpoint file that would run code (or build arbitrary objects) if it were unpickled."""


def safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed's state dicts hold (found by saving and reloading real
    checkpoints at ZeRO 0-3, fp32 and bf16, and their universal conversions); all plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # DynamicLossScaler: the fp16 counterpart of LossScaler (same module, plain attributes).
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_torch_load = torch.load  # the real function, whatever weights_only_loads() does to torch.load


def _reason(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "Unsupported" in line or "WeightsUnpickler error" in line:
            return line.strip().split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def load(f: Any, map_location: Any = None, *, mmap: bool = False, **_ignored: Any) -> Any:
    """``torch.load(f, weights_only=True)`` with DeepSpeed's safe globals; errors name ``f``."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return _torch_load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{f}: refused to load (it holds more than tensors: {_reason(e)})") from None
    except (RuntimeError, EOFError, ValueError) as e:  # zip reader: truncated or not a torch file
        raise CheckpointFileError(f"{f}: unreadable ({_reason(e)})") from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every ``torch.load`` in this process is ``load()`` (see the module docstring)."""
    old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = _torch_load
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


__all__ = ["CheckpointFileError", "UnsafeCheckpointError", "load", "safe_globals", "weights_only_loads"]

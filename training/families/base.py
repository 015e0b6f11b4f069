"""The model-family contract the trainer runs.

A family owns its modules, its objective and its sample grids; the engine owns
distribution, optimisation, EMA, checkpoints and export. One DeepSpeed engine (with its
own optimizer) is built per entry of ``Family.build()``; ``"model"`` is the primary
module: the one averaged by the EMA, exported and sampled from. GAN-style families
return more parts (e.g. ``{"model": generator, "disc": discriminator}``) and choose
which parts step at a given step with ``parts(step)``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

PRIMARY = "model"
M = TypeVar("M", bound=nn.Module)


def unwrap(module: nn.Module, cls: type[M]) -> M:
    """The ``cls`` inside a DeepSpeed engine (or ``module`` itself); TypeError for anything else."""
    inner = getattr(module, "module", module)
    if not isinstance(inner, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(inner).__name__}")
    return inner


class Family(abc.ABC):
    """A model family: modules + objective (+ optional sample grids).

    Subclasses set ``name``, ``data_kind`` and ``config_class`` (a dataclass with
    defaults for every field: the ``model:`` section of a training config minus ``kind``).
    """

    name: ClassVar[str]
    data_kind: ClassVar[Literal["images", "latents"]]
    config_class: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    def bind_data(self, manifest: Mapping[str, Any] | None) -> None:  # noqa: B027 (an optional hook)
        """Adopt what the training shards' ``_manifest.json`` records (before ``build``); default: nothing."""

    @abc.abstractmethod
    def build(self) -> dict[str, nn.Module]:
        """Fresh modules, one DeepSpeed engine each; must contain ``"model"`` (the primary one).

        Called once per rank with the same RNG state on every rank (the engine seeds first),
        so initial weights agree across ranks.
        """

    def build_primary(self) -> nn.Module:
        """The primary module alone (used by ``load_export``); override to skip building other parts."""
        return self.build()[PRIMARY]

    def parts(self, step: int) -> list[str]:
        """Names of the parts optimised at ``step``, in order (default: the primary only)."""
        return [PRIMARY]

    @abc.abstractmethod
    def loss(
        self, part: str, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Scalar loss for ``part`` (a 0-dim tensor with grad) and values to log: floats or detached
        0-dim tensors (the trainer reads tensors on the host only at its log points).

        ``modules`` maps part names to the engine-wrapped modules. Keep the other parts'
        gradients out of this part's step (e.g. ``requires_grad_(False)`` on the
        discriminator while computing the generator loss, or ``.detach()`` its inputs).
        """

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int) -> dict[str, float]:
        """Metrics on a held batch for the periodic eval hook (default: each part's loss, no grad)."""
        out: dict[str, float] = {}
        for part in self.parts(step):
            loss, logs = self.loss(part, modules, batch, step)
            out[f"{part}/loss"] = float(loss.detach().float())
            out.update({f"{part}/{k}": float(v) for k, v in logs.items()})
        return out

    def log_images(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Image.Image]:
        """Periodic sample grids keyed by name (default: none). Runs on every rank (ZeRO-3
        forward passes are collective); only rank 0's images are logged."""
        return {}


__all__ = ["PRIMARY", "Family"]

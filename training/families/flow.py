"""The ``flow`` family: rectified-flow prior on VAE latents conditioned on text tokens.

Same data path as ``ddpm`` (a fresh posterior sample per step, the VAE scaling factor,
caption dropout with the model's null embedding; see ``training/families/diffusion.py``),
with the flow-matching objective (``training/objectives/flow.py``: X_t = t X_1 + (1 - t) X_0,
velocity X_1 - X_0, logit-normal t with the resolution-dependent shift) and Euler / Heun
samplers on a time grid shifted the same way. Backbone: a DiT (``dit_*``) or a UNet (``unet_*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latentpipe.training.families import register
from latentpipe.training.families.diffusion import LatentPriorConfig, LatentPriorFamily
from latentpipe.training.objectives.flow import FlowConfig, FlowObjective
from latentpipe.training.samplers import Sampler, flow_sampler


@dataclass
class FlowSampleConfig:
    """How sample grids (and ``generate``) integrate the flow ODE."""

    sampler: Literal["euler", "heun"] = "euler"
    steps: int = 50  # heun evaluates the model twice per step
    guidance: float | None = 4.0  # CFG weight; null: conditional model only


@dataclass
class FlowFamilyConfig(LatentPriorConfig):
    """The ``model:`` section of a flow-matching prior (minus ``kind: flow``)."""

    backbone: str = "dit_demo"
    objective: FlowConfig = field(default_factory=FlowConfig)
    sample: FlowSampleConfig = field(default_factory=FlowSampleConfig)


@register
class FlowFamily(LatentPriorFamily):
    """Rectified flow over a text-conditioned DiT or UNet."""

    name = "flow"
    config_class = FlowFamilyConfig
    cfg: FlowFamilyConfig
    time_scale = 1000.0  # t in [0, 1] -> the backbones' usual 0..1000 timestep range (as SD3)

    def __init__(self, cfg: FlowFamilyConfig) -> None:
        super().__init__(cfg)
        self.objective = FlowObjective(cfg.objective)

    def sampler(self) -> tuple[Sampler, int, float | None]:
        s = self.cfg.sample
        return flow_sampler(s.sampler, self.cfg.objective.time_shift), s.steps, s.guidance


__all__ = ["FlowFamily", "FlowFamilyConfig", "FlowSampleConfig"]

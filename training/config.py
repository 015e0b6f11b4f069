"""The training config: one typed dataclass tree filled from YAML and ``key=value`` overrides.

``model`` is a plain mapping whose ``kind`` names the family; the rest of it is parsed by
that family's ``config_class`` (errors name ``model.<key>``). Every other section is a
dataclass with defaults, so an empty config trains the toy family on ``data.shards``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latentpipe.training.data import DataConfig
from latentpipe.training.tracking import TrackingConfig


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay (DeepSpeed's ``WarmupCosineLR``) + global-norm clipping."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    part_lr: dict[str, float] = field(default_factory=dict)  # per-part lr override, e.g. {disc: 2e-4}

    def __post_init__(self) -> None:
        if self.lr <= 0 or any(v <= 0 for v in self.part_lr.values()):
            raise ValueError("lr (and every part_lr) must be > 0")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.grad_clip < 0:
            raise ValueError("need warmup_steps >= 0, 0 <= min_lr_ratio <= 1, grad_clip >= 0")


@dataclass
class DeepSpeedSection:
    """How DeepSpeed shards and computes; ``extra`` is merged verbatim into the generated DS config."""

    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1  # micro-batches per optimizer step
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state + fp32 master on CPU (stages 1-3)
    offload_params: bool = False  # ZeRO-Infinity style parameter offload to CPU (stage 3 only)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPU
    auto_stage: bool = True  # fp32 at one rank: ZeRO-1/2 run as ZeRO-0 (latentpipe.training.zero.effective_stage)
    extra: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None  # a DeepSpeed JSON (e.g. infra/deepspeed/zero3_offload.json): see below

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")


@dataclass
class EmaConfig:
    """EMA of the primary module's trainable weights, sharded like the fp32 master weights."""

    enabled: bool = True
    decay: float = 0.999
    start_step: int = 0  # the EMA starts as a copy of the weights after this many steps
    every: int = 1  # update every N optimizer steps (decay applied as decay**N)
    # > 0: warm-up, the n-th update uses min(decay, 1 - (1 + n) ** -warmup_power) (diffusers'
    # use_ema_warmup with inv_gamma 1): the average spans ~n / 4 steps early on (power 3/4), so a
    # short run does not sample from near-initial weights. 0: the constant decay from the start.
    warmup_power: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.warmup_power < 0:
            raise ValueError(f"warmup_power must be >= 0, got {self.warmup_power}")
        if self.start_step < 0 or self.every < 1:
            raise ValueError("need start_step >= 0 and every >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0: only at the end and on SIGTERM
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted after a new one completes)
    dir: str = ""  # default <workdir>/checkpoints
    export: bool = True  # consolidated safetensors export at the end (<workdir>/export)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("need every_steps >= 0 and keep_last >= 1")


@dataclass
class TrainConfig:
    """``latentpipe train`` config (see configs/train_toy.yaml)."""

    model: dict[str, Any] = field(default_factory=lambda: {"kind": "toy"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    steps: int = 1000  # optimizer steps in the whole run
    eval_every: int = 0  # steps between evaluations on a fixed batch (0 = off)
    sample_every: int = 0  # steps between sample grids (Family.log_images) (0 = off)
    log_every: int = 1  # steps between metric logs (losses stay on the device in between)
    progress_interval: float = 30.0  # seconds between progress lines when stderr is not a terminal
    compile: bool = False  # torch.compile the DeepSpeed engines' modules
    eval_shards: str = ""  # shards of the fixed eval batch (default: data.shards)
    workdir: str = "runs/train"
    seed: int = 0  # model init and torch/numpy/python RNG (the data order has data.seed)
    nonfinite: Literal["skip", "stop"] = "skip"  # a non-finite loss: skip that step, or stop the run
    max_nonfinite: int = 100  # stop anyway after this many skipped steps
    resume: bool = False  # continue from the latest complete checkpoint (none: an error)
    resume_on_changed_data: bool = False  # resume even if the shards, data.seed or global batch changed
    log_keys: bool = False  # append each step's keys to <workdir>/keys/start-S-rank-R.jsonl (audit)

    def __post_init__(self) -> None:
        if self.deepspeed.config_file:
            apply_deepspeed_file(self, self.deepspeed.config_file)
        if not isinstance(self.model.get("kind"), str):
            raise ValueError("model.kind must name a model family, e.g. 'toy'")
        if self.steps < 0 or self.eval_every < 0 or self.sample_every < 0 or self.log_every < 1:
            raise ValueError("need steps, eval_every, sample_every >= 0 and log_every >= 1")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {self.max_nonfinite}")


def apply_deepspeed_file(cfg: TrainConfig, path: str) -> None:
    """Adopt a plain DeepSpeed JSON config; its values win over the YAML's.

    The keys the trainer itself depends on become the typed settings they mean (ZeRO stage,
    precision, offload, accumulation, micro-batch = ``data.batch_size``, clipping =
    ``optim.grad_clip``); ``train_batch_size`` is dropped (it follows from the world size at
    launch); every other key is merged into ``deepspeed.extra`` (where the YAML's own ``extra``
    keys win), so bucket sizes, prefetch and pinning settings reach DeepSpeed as written.
    """
    file = Path(path).expanduser()
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"deepspeed.config_file {file}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config_file {file}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"deepspeed.config_file {file}: expected a JSON object")
    ds = raw  # consumed: the keys adopted as typed settings are popped, the rest go to ``extra``
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"deepspeed.config_file {file}: zero_optimization must be an object")
    sec = cfg.deepspeed
    if "stage" in zero:
        sec.zero_stage = int(zero.pop("stage"))
    if "offload_optimizer" in zero:
        sec.offload_optimizer = (zero["offload_optimizer"] or {}).get("device", "none") != "none"
    if "offload_param" in zero:
        sec.offload_params = (zero["offload_param"] or {}).get("device", "none") != "none"
    for precision in ("bf16", "fp16"):
        if isinstance(ds.get(precision), dict) and ds[precision].pop("enabled", False):
            sec.precision = precision  # type: ignore[assignment]
    if "gradient_accumulation_steps" in ds:
        sec.grad_accum = int(ds.pop("gradient_accumulation_steps"))
    if "train_micro_batch_size_per_gpu" in ds:
        cfg.data.batch_size = int(ds.pop("train_micro_batch_size_per_gpu"))
    if "gradient_clipping" in ds:
        cfg.optim.grad_clip = float(ds.pop("gradient_clipping"))
    ds.pop("train_batch_size", None)
    sec.extra = merge_into(ds, sec.extra)  # the file's remaining keys, the YAML's extra over them
    sec.config_file = str(file.resolve())
    sec.__post_init__()  # re-validate the adopted values (stage / offload combinations)


def merge_into(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update of ``dst`` by ``src`` (copies of ``src``'s values); returns ``dst``."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            merge_into(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


__all__ = ["CheckpointConfig", "DeepSpeedSection", "EmaConfig", "OptimConfig", "TrainConfig"]

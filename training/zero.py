"""DeepSpeed setup: process group from the environment, DS configs, one engine per family part.

ZeRO (Rajbhandari et al. 2020) stage 0-3, optimizer/parameter offload, bf16/fp16/fp32,
gradient accumulation and clipping come from ``TrainConfig.deepspeed``/``optim``; the LR
schedule is DeepSpeed's ``WarmupCosineLR`` (linear warmup, cosine decay to a floor).

Settings per world size and precision (``effective_stage``, ``ds_config``): in fp32 or bf16 at one
rank ZeRO-1/2 run as ZeRO-0 (nothing to partition; ``deepspeed.auto_stage``); alone at ZeRO-0 the
engine skips its after-backward gradient all-reduce (a flatten-and-copy-back of every gradient that
changed nothing cost this CPU a third of a step at 21.8M parameters); DeepSpeed's synchronized
throughput timer is off; the optimizer is torch's fused AdamW built here (``client_optimizer``),
which skips a step on the device when the trainer sets its ``found_inf`` flag (DeepSpeed's bf16
gradient-overflow check stays on: that flag covers a non-finite loss, not non-finite gradients
of a finite one); at ZeRO-0 in fp32 the trainer clips with torch's multi-tensor norm instead of
DeepSpeed's loop, and a non-finite norm also sets the flag.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentpipe.preprocessing.config import ConfigError
from latentpipe.training.config import TrainConfig, merge_into
from latentpipe.training.monitor import drop_known_prints

log = logging.getLogger("latentpipe.train")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def setup_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the default process group from RANK/WORLD_SIZE/MASTER_* (torchrun, the
    deepspeed launcher, SLURM via our scripts, Ray Train). Without them: a 1-rank group in this process."""
    import deepspeed

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    chosen = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    # A long collective timeout: rank 0 alone converts a checkpoint to universal form on a rescale.
    timeout = datetime.timedelta(minutes=60)
    env = os.environ
    alone = "RANK" not in env or (env.get("WORLD_SIZE", "1") == "1" and "MASTER_ADDR" not in env)
    if not dist.is_initialized() and alone:
        # One rank, no launcher: an in-process store, so no port to pick (a port found free can be
        # taken by another job before we bind it); DeepSpeed adopts this group. It still wants
        # RANK/LOCAL_RANK set, and a child process that inherits them (with no MASTER_ADDR) takes
        # this same path instead of waiting for a rendezvous that does not exist.
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    # DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" per rank and
    # per start (it loads a cached op); the line tells a user nothing.
    with drop_known_prints("deepspeed_shm_comm_op built successfully"):
        deepspeed.init_distributed(dist_backend=chosen, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def effective_stage(cfg: TrainConfig, world_size: int, resumed: Mapping[str, Any] | None = None) -> int:
    """The ZeRO stage the trainer's engines run at ``world_size``, resuming from a checkpoint whose
    state is ``resumed`` (or None).

    With ``deepspeed.auto_stage`` ZeRO-1/2 in fp32 or bf16 at one rank run as ZeRO-0: with
    nothing to partition across, their gradient hooks, buckets and flat copies are pure overhead.
    Such checkpoints hold no per-rank ZeRO files (at ZeRO-0 the optimizer state, bf16's fp32
    masters included, is replicated and saved whole by rank 0; nothing for DeepSpeed's universal
    checkpoint to convert): they resume at one rank, or at more ranks with ``zero_stage=0``
    (ZeRO-1/2 reload only partitioned optimizer state: a ConfigError before any engine is built).
    """
    ds = cfg.deepspeed
    stage = ds.zero_stage
    unpartitioned = resumed is not None and not resumed.get("partitioned", True)
    if world_size > 1 and unpartitioned and stage in (1, 2) and resumed is not None:
        raise ConfigError(f"the checkpoint was written by a {resumed.get('world_size')}-rank run without partitioned "
                          f"optimizer state (ZeRO-0; at one rank deepspeed.auto_stage runs ZeRO-1/2 as ZeRO-0): "
                          f"resume it at 1 rank or with deepspeed.zero_stage=0 (or train 1-rank runs meant "
                          f"to grow with deepspeed.auto_stage=false)")
    auto = (ds.auto_stage and world_size == 1 and stage in (1, 2) and ds.precision in ("fp32", "bf16")
            and not ds.offload_optimizer)
    if auto and (resumed is None or unpartitioned):
        return 0
    return stage


def trainer_clips(cfg: TrainConfig, stage: int) -> bool:
    """True when the trainer clips the gradients itself (ZeRO-0 in fp32: DeepSpeed's loop replaced
    by torch's multi-tensor ``clip_grad_norm_``; gradients are already all-reduced after backward)."""
    return stage == 0 and cfg.deepspeed.precision == "fp32" and cfg.optim.grad_clip > 0


def ds_config(cfg: TrainConfig, part: str, world_size: int, universal: bool = False,
              stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict of one part's engine (at ZeRO ``stage``; default the configured one)."""
    ds, opt = cfg.deepspeed, cfg.optim
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    stage = ds.zero_stage if stage is None else stage
    zero: dict[str, Any] = {"stage": stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    warmup = max(1, opt.warmup_steps)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": cfg.data.batch_size * ds.grad_accum * world_size,
        "gradient_clipping": 0.0 if trainer_clips(cfg, stage) else opt.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": opt.part_lr.get(part, opt.lr), "betas": list(opt.betas), "eps": opt.eps,
            "weight_decay": opt.weight_decay,
            # torch's (foreach) AdamW: DeepSpeed's fused Adam JIT-compiles a CUDA op (nvcc) at start-up;
            # with optimizer offload DeepSpeed's CPU Adam is needed (it compiles a C++ op once).
            **({} if ds.offload_optimizer else {"torch_adam": True})}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(cfg.steps, warmup + 1), "warmup_num_steps": warmup,
            "warmup_type": "linear", "warmup_min_ratio": 0.0 if opt.warmup_steps else 1.0,
            "cos_min_ratio": opt.min_lr_ratio}},
        # DeepSpeed's bf16 gradient-overflow check stays on: the trainer's found_inf flag covers a
        # non-finite *loss*, not non-finite gradients from a finite loss.
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "checkpoint": {"load_universal": universal},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "zero_allow_untested_optimizer": True,
    }
    return merge_into(out, ds.extra)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases and norms (parameters with < 2 dims)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_modules(family: Any, cfg: TrainConfig, world_size: int) -> dict[str, nn.Module]:
    """``family.build()`` with the same seed on every rank; under ZeRO-3 inside ``zero.Init``
    (parameters are partitioned as they are created, so no rank holds the full model)."""
    import deepspeed

    torch.manual_seed(cfg.seed)
    ctx: Any = contextlib.nullcontext()
    if cfg.deepspeed.zero_stage == 3:
        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, "model", world_size))
    with ctx:
        modules = family.build()
    if "model" not in modules:
        raise ValueError(f"family {family.name!r}: build() must return a 'model' entry, got {sorted(modules)}")
    return modules


def build_engines(modules: Mapping[str, nn.Module], cfg: TrainConfig, world_size: int,
                  universal: bool = False, stage: int | None = None) -> dict[str, Any]:
    """One DeepSpeed engine (own optimizer + scheduler) per part, at ZeRO ``stage`` (default: configured)."""
    import deepspeed

    engines: dict[str, Any] = {}
    for part, module in modules.items():
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"part {part!r} has no trainable parameters")
        config = ds_config(cfg, part, world_size, universal, stage)
        groups = param_groups(module, cfg.optim.weight_decay)
        optimizer = client_optimizer(config, groups)
        if optimizer is not None:
            del config["optimizer"]
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, optimizer=optimizer,
                                               config=config)
        if world_size == 1 and engine.zero_optimization_stage() == 0:
            # Alone, DeepSpeed's after-backward all-reduce (ZeRO-0's ``buffered_allreduce_fallback``)
            # still flattens every gradient into a bucket, "reduces" it, divides it by 1 and copies
            # it back: four passes over the gradients that change nothing.
            engine.enable_backward_allreduce = False
        if cfg.compile:
            engine.compile()
        engines[part] = engine
    return engines


def client_optimizer(config: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer | None:
    """torch's fused AdamW for the config's (torch) AdamW section, or None to let DeepSpeed build its
    own (CPU Adam under optimizer offload, or another optimizer from a DeepSpeed config file)."""
    section = config.get("optimizer") or {}
    params = dict(section.get("params") or {})
    if str(section.get("type", "")).lower() != "adamw" or not params.pop("torch_adam", False):
        return None
    params.pop("foreach", None)
    params.pop("adam_w_mode", None)
    return torch.optim.AdamW(groups, **params, fused=True)


def step_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """The fused torch optimizer that takes the step inside ``engine`` (under DeepSpeed's ZeRO /
    bf16 wrappers), or None when the step is not a fused torch AdamW's (no device-side skip)."""
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.AdamW):
        opt = getattr(opt, "optimizer", None)
    if opt is None or not opt.defaults.get("fused"):
        return None
    return opt


def deepspeed_skips_overflow(engine: Any) -> bool:
    """True when DeepSpeed's own overflow check skips a step with non-finite gradients (ZeRO-1-3
    and its bf16/fp16 wrappers, which keep fp32 masters; partitioned only at ZeRO-1-3)."""
    return bool(engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


__all__ = ["DistInfo", "build_engines", "build_modules", "client_optimizer", "deepspeed_skips_overflow", "ds_config",
           "effective_stage", "param_groups", "setup_distributed", "step_optimizer", "trainer_clips"]

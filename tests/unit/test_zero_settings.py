"""DeepSpeed settings per world size and precision (latentpipe.training.zero): the ZeRO stage the trainer runs,
the trainer-side clip, the fused AdamW it hands DeepSpeed, and DeepSpeed's timers."""

from __future__ import annotations

import pytest
import torch

from latentpipe.preprocessing.config import ConfigError, load_config
from latentpipe.training.config import TrainConfig
from latentpipe.training.zero import client_optimizer, ds_config, effective_stage, param_groups, trainer_clips


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, list(overrides))


@pytest.mark.parametrize(("overrides", "world", "stage"), [
    (["deepspeed.zero_stage=2"], 1, 0),  # fp32, one rank: nothing to partition
    (["deepspeed.zero_stage=1"], 1, 0),
    (["deepspeed.zero_stage=2"], 2, 2),
    (["deepspeed.zero_stage=3"], 1, 3),
    (["deepspeed.zero_stage=2", "deepspeed.precision=bf16"], 1, 0),  # bf16 too (fp32 masters replicated)
    (["deepspeed.zero_stage=2", "deepspeed.precision=bf16"], 2, 2),
    (["deepspeed.zero_stage=2", "deepspeed.precision=fp16"], 1, 2),  # fp16: DeepSpeed's loss-scaled ZeRO path
    (["deepspeed.zero_stage=2", "deepspeed.auto_stage=false"], 1, 2),
    (["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"], 1, 2),
])
def test_effective_stage(overrides: list[str], world: int, stage: int) -> None:
    assert effective_stage(_cfg(*overrides), world) == stage


def test_resume_follows_the_checkpoints_layout() -> None:
    cfg = _cfg("deepspeed.zero_stage=2")
    assert effective_stage(cfg, 1, {"partitioned": True, "world_size": 2}) == 2  # universal path into ZeRO-2
    assert effective_stage(cfg, 1, {"partitioned": False, "world_size": 1}) == 0
    with pytest.raises(ConfigError, match="resume it at 1 rank or with deepspeed.zero_stage=0"):
        effective_stage(cfg, 2, {"partitioned": False, "world_size": 1})
    assert effective_stage(_cfg("deepspeed.zero_stage=0"), 2, {"partitioned": False, "world_size": 1}) == 0
    bf16 = _cfg("deepspeed.zero_stage=2", "deepspeed.precision=bf16")
    assert effective_stage(bf16, 1, {"partitioned": False, "world_size": 1}) == 0
    assert effective_stage(bf16, 1, {"partitioned": True, "world_size": 1}) == 2  # written at ZeRO-2 (before auto)
    with pytest.raises(ConfigError, match="without partitioned optimizer state"):
        effective_stage(bf16, 2, {"partitioned": False, "world_size": 1})


def test_ds_config_per_stage_and_precision() -> None:
    cfg = _cfg("optim.grad_clip=0.5")
    at0 = ds_config(cfg, "model", 1, stage=0)
    assert trainer_clips(cfg, 0) and at0["gradient_clipping"] == 0.0  # torch's foreach clip instead
    at2 = ds_config(cfg, "model", 2)
    assert not trainer_clips(cfg, 2) and at2["gradient_clipping"] == 0.5 and at2["zero_optimization"]["stage"] == 2
    assert at2["timers"]["throughput"] == {"enabled": False, "synchronized": False}
    bf16 = ds_config(_cfg("deepspeed.precision=bf16"), "model", 1)
    assert bf16["bf16"] == {"enabled": True}  # DeepSpeed's gradient-overflow check stays on (its default)
    assert not trainer_clips(_cfg("deepspeed.precision=bf16"), 0)


def test_client_optimizer_is_fused_adamw_with_the_configs_settings() -> None:
    cfg = _cfg("optim.lr=0.01", "optim.weight_decay=0.1", "optim.betas=[0.8,0.9]")
    net = torch.nn.Linear(4, 4)
    config = ds_config(cfg, "model", 1)
    opt = client_optimizer(config, param_groups(net, cfg.optim.weight_decay))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert opt.defaults["lr"] == 0.01 and opt.defaults["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    offload = ds_config(_cfg("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"), "model", 1)
    assert client_optimizer(offload, param_groups(net, 0.0)) is None  # DeepSpeed's CPU Adam

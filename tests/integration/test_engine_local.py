"""The trainer in this process (1 rank, ZeRO-0 fallback paths): a non-finite loss is skipped and
counted (skip) or stops the run before it reaches a checkpoint (stop); --resume rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentpipe.preprocessing.config import ConfigError, load_config
from latentpipe.training.checkpoint import latest_complete
from latentpipe.training.config import TrainConfig
from latentpipe.training.engine import NonFiniteLossError, Trainer
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, shards: Path, name: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/train_toy.yaml", [
        f"data.shards={shards}", f"workdir={tmp / name}", "data.batch_size=4", "data.num_workers=0",
        "deepspeed.zero_stage=0", "steps=4", "checkpoint.every_steps=2", "ema.start_step=0", "ema.decay=0.5",
        "tracking.system_metrics=false", "eval_every=2", "sample_every=0", *extra])


def test_nonfinite_policies_and_resume_rules(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 1, 16)

    res = Trainer(_cfg(tmp_path, shards, "skip", "model.nan_loss_steps=[1]")).run()
    assert res.step == 4 and res.nonfinite_steps == 1 and res.export is not None
    assert res.losses[1] != res.losses[1]  # the NaN step is reported as NaN, and skipped
    exported = load_file(str(Path(res.export) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values())
    last = latest_complete(tmp_path / "skip" / "checkpoints")
    assert last is not None and last.step == 4 and last.state["nonfinite_steps"] == 1
    assert last.state["ema"]["mode"] == "replicated"

    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(_cfg(tmp_path, shards, "skip"))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        Trainer(_cfg(tmp_path, shards, "empty", "resume=true"))

    stop = Trainer(_cfg(tmp_path, shards, "stop", "model.nan_loss_steps=[3]", "nonfinite=stop"))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        stop.run()
    kept = latest_complete(tmp_path / "stop" / "checkpoints")
    assert kept is not None and kept.step == 2  # nothing after the NaN was written

"""A 1-rank run's checkpoint (ZeRO-1/2 run as ZeRO-0 by ``deepspeed.auto_stage``) grows to 2
ranks with ``deepspeed.zero_stage=0``, as the README says, in fp32 and in bf16: torchrun resumes
it and the continuation follows the uninterrupted 1-rank run (same global batch, same samples)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentpipe.preprocessing.config import load_config
from latentpipe.training import safe_load
from latentpipe.training.config import TrainConfig
from latentpipe.training.engine import Trainer
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "configs/train_toy.yaml"


def _masters(step_dir: Path) -> torch.Tensor:
    """The fp32 master weights in a ZeRO-0 checkpoint, flattened in parameter order (fp32: the
    module's weights; bf16: DeepSpeed's fp32 copies in the optimizer state)."""
    state = safe_load.load(step_dir / "model" / "mp_rank_00_model_states.pt", map_location="cpu")
    groups = state["optimizer"].get("fp32_groups")
    tensors = [t for g in groups for t in g] if groups else list(state["module"].values())
    return torch.cat([t.detach().float().flatten() for t in tensors])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_checkpoint_resumes_at_two_ranks_with_zero_stage_0(precision: str, tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 2, 16)
    common = [f"data.shards={shards}", "data.num_workers=0", f"deepspeed.precision={precision}", "steps=6",
              "checkpoint.every_steps=3", "checkpoint.export=false", "ema.enabled=false", "tracking.enabled=false",
              "eval_every=0", "sample_every=0", "optim.warmup_steps=0", "log_every=1"]
    ref = Trainer(load_config(TrainConfig, TOY, [*common, f"workdir={tmp_path / 'ref'}", "data.batch_size=4",
                                                 "deepspeed.zero_stage=2"]))
    assert ref.stage == 0
    ref.run()
    at3, at6 = (tmp_path / "ref" / "checkpoints" / f"step-00000{s}" for s in (3, 6))

    grown = tmp_path / "grown"
    (grown / "checkpoints").mkdir(parents=True)
    shutil.copytree(at3, grown / "checkpoints" / at3.name)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(TOY), *common, f"workdir={grown}",
           "data.batch_size=2", "deepspeed.zero_stage=0", "--launcher", "torchrun", "--nproc", "2", "--resume"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                          check=False)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    end = grown / "checkpoints" / at6.name
    assert json.loads((end / "trainer_state.json").read_text())["world_size"] == 2

    # Same samples and the same optimizer state: the 2-rank steps 4-6 land where the 1-rank ones
    # did, up to rounding (batch 2 per rank vs 4). Dropped Adam moments or weights would put them
    # a good part of the three steps' travel away.
    w3, w6, g6 = _masters(at3), _masters(at6), _masters(end)
    travel, apart = (w6 - w3).norm().item(), (g6 - w6).norm().item()
    assert travel > 0 and apart < 0.01 * travel, (apart, travel)

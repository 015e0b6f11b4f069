"""bf16 training at one rank (the GPU configs' precision, run here on the CPU): the ZeRO stage it
runs at, a skipped non-finite step, and a resume from a checkpoint that reproduces the
uninterrupted run's weights, fp32 masters and EMA bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from latentpipe.preprocessing.config import load_config
from latentpipe.training.config import TrainConfig
from latentpipe.training.engine import Trainer
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cfg(shards: Path, workdir: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/train_toy.yaml", [
        f"data.shards={shards}", f"workdir={workdir}", "data.batch_size=4", "data.num_workers=0",
        "deepspeed.precision=bf16", "deepspeed.zero_stage=2", "steps=6", "log_every=1",
        "checkpoint.every_steps=3", "checkpoint.export=false", "ema.start_step=1", "tracking.enabled=false",
        "eval_every=0", "sample_every=0", "optim.warmup_steps=0", "model.nan_loss_steps=[4]", *extra])


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The module's bf16 weights, the fp32 masters (through the EMA's view of them) and the EMA."""
    assert trainer.ema is not None
    out = {f"w/{k}": v.detach().clone() for k, v in trainer.engines["model"].module.state_dict().items()}
    out |= {f"master/{f.name}": f.source.detach().clone() for f in trainer.ema._sources(refresh=True)}
    return out | {f"ema/{k}": v.clone() for k, v in trainer.ema.shadow.items()}


@pytest.mark.parametrize(("extra", "stage"), [([], 0), (["deepspeed.auto_stage=false"], 2)])
def test_bf16_one_rank_stage_skip_and_exact_resume(extra: list[str], stage: int, tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 1, 32)
    ref = Trainer(_cfg(shards, tmp_path / "ref", *extra))
    assert ref.stage == stage and ref.engines["model"].bfloat16_enabled()
    assert ref.ema is not None
    init = {f.name: f.source.detach().clone() for f in ref.ema._sources(refresh=True)}  # the fp32 masters
    res = ref.run()
    assert res.step == 6 and res.nonfinite_steps == 1 and res.losses[4] != res.losses[4]
    assert all(v == v for i, v in enumerate(res.losses) if i != 4)
    want = _state(ref)
    assert all(torch.isfinite(v.float()).all() for v in want.values())
    # The EMA follows each weight's fp32 master: rounded to bf16 it is the module's weight.
    weights = dict(ref.engines["model"].module.named_parameters())
    for f in ref.ema._sources():
        assert f.source.dtype == torch.float32 and f.numel == f.full_numel
        assert torch.equal(f.source.view(f.shape).to(torch.bfloat16), weights[f.name].detach()), f.name
    assert any(not torch.equal(want[f"master/{k}"], init[k]) for k in init)  # the steps moved the masters

    # A second run starts from the reference's step-3 checkpoint (as after a kill there) and resumes.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-000003",
                    tmp_path / "resumed" / "checkpoints" / "step-000003")
    again = Trainer(_cfg(shards, tmp_path / "resumed", *extra, "resume=true"))
    assert again.stage == stage
    res2 = again.run()
    assert res2.step == 6 and res2.nonfinite_steps == 1
    got = _state(again)
    assert sorted(got) == sorted(want)
    diff = [k for k in want if not torch.equal(want[k], got[k])]
    assert diff == [], diff

"""The step loop never reads the device on the host between two log points (1 rank, CPU): every
``item()``/``float()``/``bool()``/``int()``/``tolist()`` on a tensor is counted with a torch
function mode, and where in the trainer it happened; a skipped non-finite step stays exact; and
alone at ZeRO-0, DeepSpeed's after-backward gradient all-reduce does not run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from latentpipe.preprocessing.config import load_config
from latentpipe.training.config import TrainConfig
from latentpipe.training.engine import Trainer
from latentpipe.training.zero import step_optimizer
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HOST_READS = {"item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy"}


class HostReads(TorchFunctionMode):
    """Records (trainer step, innermost trainer method on the stack, the reading function's file) of
    every host read of a tensor."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.reads: list[tuple[int, str, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READS:
            frame, where = sys._getframe(1), "?"
            reader = frame.f_code.co_filename
            while frame is not None:
                if frame.f_code.co_filename.endswith("training/engine.py") and not frame.f_code.co_name.startswith("<"):
                    where = frame.f_code.co_name
                    break
                frame = frame.f_back
            self.reads.append((self.trainer.step, where, reader))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", [0, 2])
def test_no_host_read_between_log_points(stage: int, tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 1, 16)
    cfg = load_config(TrainConfig, ROOT / "configs/train_toy.yaml", [
        f"data.shards={shards}", f"workdir={tmp_path / 'run'}", "data.batch_size=4", "data.num_workers=0",
        f"deepspeed.zero_stage={stage}", "deepspeed.auto_stage=false", "steps=8", "log_every=4", "checkpoint.every_steps=0",
        "checkpoint.export=false", "ema.start_step=0", "tracking.enabled=false", "eval_every=0",
        "model.nan_loss_steps=[2]"])
    trainer = Trainer(cfg)
    engine = trainer.engines["model"]
    reduces: list[int] = []
    reduce = engine.allreduce_gradients

    def counted(*a: Any, **k: Any) -> Any:
        reduces.append(trainer.step)
        return reduce(*a, **k)

    engine.allreduce_gradients = counted
    mode = HostReads(trainer)
    with mode:
        res = trainer.run()
    # Alone at ZeRO-0 the all-reduce would flatten, "reduce" and copy back every gradient for
    # nothing; ZeRO-2 (even alone) moves the gradients into its partitions there, so it runs.
    assert reduces == ([] if stage == 0 else list(range(cfg.steps))), reduces
    # The step loop (steps 1-7, after the FLOP count of step 0; the run's end saves a checkpoint)
    # reads nothing on the host but in _flush, at the log point after step 4. At ZeRO-0 that holds
    # for DeepSpeed's step too; ZeRO-1/2 (stage 2 runs as 1 at one rank) read the gradient norm
    # inside DeepSpeed.
    in_loop = [r for r in mode.reads if 1 <= r[0] < cfg.steps and r[1] != "_flush"]
    if stage != 0:
        in_loop = [r for r in in_loop if "deepspeed" not in r[2]]
    assert in_loop == [], in_loop
    flushes = sorted({r[0] for r in mode.reads if r[1] == "_flush"})
    assert flushes == [4, 8], mode.reads  # the counter does see the reads it should (positive control)
    # The skipped step is exact and counted: NaN loss reported, Adam took 7 of the 8 steps.
    assert res.nonfinite_steps == 1 and res.losses[2] != res.losses[2] and len(res.losses) == 8
    assert all(v == v for i, v in enumerate(res.losses) if i != 2)
    opt = step_optimizer(trainer.engines["model"])
    assert opt is not None
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {7.0}, steps
    assert all(torch.isfinite(p).all() for p in trainer.engines["model"].module.parameters())


def test_compile_switch_trains_compiled_engines(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 1, 8)
    cfg = load_config(TrainConfig, ROOT / "configs/train_toy.yaml", [
        f"data.shards={shards}", f"workdir={tmp_path / 'run'}", "data.batch_size=4", "data.num_workers=0",
        "steps=3", "checkpoint.every_steps=0", "checkpoint.export=false", "tracking.enabled=false",
        "eval_every=0", "sample_every=0", "compile=true"])
    trainer = Trainer(cfg)
    assert all(e.is_compiled for e in trainer.engines.values())
    res = trainer.run()
    assert res.step == 3 and res.nonfinite_steps == 0 and all(v == v for v in res.losses)

"""``deepspeed.config_file``: the JSONs in infra/deepspeed/ drive real DeepSpeed engines (1 rank,
gloo, in this process): their ZeRO stage, precision, offload, batch and accumulation become the
trainer's typed settings, their other keys reach DeepSpeed as written, and a few optimizer steps
lower the toy model's loss (zero3_offload.json runs DeepSpeed's CPU Adam on offloaded state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentpipe.preprocessing.config import load_config
from latentpipe.training.config import TrainConfig
from latentpipe.training.families import family_from_config
from latentpipe.training.zero import build_engines, build_modules, ds_config, setup_distributed

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "infra" / "deepspeed").glob("*.json"))


def test_there_are_files_to_check() -> None:
    assert {f.name for f in FILES} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_settings_become_the_trainers(path: Path) -> None:
    raw = json.loads(path.read_text())
    cfg = load_config(TrainConfig, None, [f"deepspeed.config_file={path}", "deepspeed.extra={steps_per_print: 7}"])
    zero = raw["zero_optimization"]
    assert cfg.deepspeed.zero_stage == zero["stage"]
    assert cfg.deepspeed.precision == ("bf16" if raw.get("bf16", {}).get("enabled") else "fp32")
    assert cfg.deepspeed.grad_accum == raw["gradient_accumulation_steps"]
    assert cfg.data.batch_size == raw["train_micro_batch_size_per_gpu"]
    assert cfg.deepspeed.offload_optimizer == ("offload_optimizer" in zero)
    out = ds_config(cfg, "model", world_size=4)
    assert out["train_batch_size"] == cfg.data.batch_size * cfg.deepspeed.grad_accum * 4
    for key, value in zero.items():  # bucket sizes, overlap, pinning: as written
        assert out["zero_optimization"][key] == value
    assert out["steps_per_print"] == 7  # the YAML's own extra wins over the file


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_config(TrainConfig, None, [f"deepspeed.config_file={tmp_path / 'missing.json'}"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_config(TrainConfig, None, [f"deepspeed.config_file={tmp_path / 'bad.json'}"])
    (tmp_path / "stage.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {
        "device": "cpu"}}}))
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        load_config(TrainConfig, None, [f"deepspeed.config_file={tmp_path / 'stage.json'}"])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_trains(path: Path) -> None:
    cfg = load_config(TrainConfig, None, [f"deepspeed.config_file={path}", "data.batch_size=4",
                                          "deepspeed.grad_accum=1", "optim.lr=0.01"])
    cfg.model = {"kind": "toy", "channels": 4, "hidden": 8}
    cfg.data.batch_size, cfg.deepspeed.grad_accum = 4, 1  # the file's values won at load time
    info = setup_distributed("gloo")
    family = family_from_config(cfg.model)
    engines = build_engines(build_modules(family, cfg, info.world_size), cfg, info.world_size)
    engine = engines["model"]
    batch = {"image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    losses = []
    for _ in range(6):
        loss, _ = family.loss("model", engines, batch, 0)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert engine.zero_optimization_stage() == cfg.deepspeed.zero_stage
    assert engine.bfloat16_enabled() == (cfg.deepspeed.precision == "bf16")



def test_a_child_of_a_one_rank_process_trains_alone(tmp_path: Path) -> None:
    """A 1-rank group made in-process leaves RANK/LOCAL_RANK (DeepSpeed reads them) but no
    rendezvous in the environment; a child process inheriting them also trains as one rank
    (in CI it failed: first on a stale MASTER_PORT, then on a missing MASTER_ADDR)."""
    import os
    import subprocess
    import sys

    setup_distributed("gloo")
    assert os.environ["WORLD_SIZE"] == "1" and "MASTER_ADDR" not in os.environ
    code = ("from latentpipe.training.zero import setup_distributed; d = setup_distributed('gloo'); "
            "print(d.rank, d.world_size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert out.returncode == 0 and out.stdout.split()[-2:] == ["0", "1"], out.stderr[-2000:]

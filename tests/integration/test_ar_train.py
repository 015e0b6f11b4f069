"""The ``ar`` family under the real trainer: 2 ranks (torchrun, DeepSpeed ZeRO-2, gloo on CPU) on
latent shard fixtures, with sample grids, a checkpoint, a resume and the safetensors export.

A run resumed from step 3 to 6 must end with the same weights as an uninterrupted
6-step run (data position, RNG of the caption dropout, optimizer and EMA all restored).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from latentpipe.preprocessing.config import from_dict
from latentpipe.training.ar_sampling import ARSampleConfig
from latentpipe.training.config import TrainConfig
from latentpipe.training.export import load_export
from latentpipe.training.families.ar import ARFamily
from latentpipe.training.launch import LaunchOptions, launch
from tests.shards import make_latent_shards

pytestmark = pytest.mark.integration


def config(shards: Path, workdir: Path, steps: int, resume: bool = False) -> TrainConfig:
    data: dict[str, Any] = {
        "model": {"kind": "ar", "cond_drop": 0.3, "grid_samples": 2,
                  "net": {"codebook_size": 16, "grid": [4, 4], "text_dim": 8, "text_len": 6, "width": 32,
                          "depth": 2, "heads": 2}},
        "data": {"shards": str(shards), "kind": "latents", "batch_size": 4, "num_workers": 0, "max_text_len": 6},
        # A constant LR: DeepSpeed's cosine schedule depends on `steps`, which differs between the runs.
        "optim": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "ema": {"enabled": True, "decay": 0.9},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "tracking": {"enabled": False},
        "steps": steps, "sample_every": 3, "eval_every": 3, "workdir": str(workdir), "resume": resume,
    }
    return from_dict(TrainConfig, data)


def test_two_rank_training_with_resume_matches_uninterrupted(tmp_path: Path) -> None:
    shards = make_latent_shards(tmp_path / "data", 2, 12, h=4, w=4, text_dim=8, codebook=16, max_len=6)
    opts = LaunchOptions(launcher="torchrun", nproc=2)
    assert launch(config(shards, tmp_path / "full", 6), opts) == 0
    # The uninterrupted run's step-3 checkpoint, alone in a fresh workdir, is a run stopped at step 3.
    step3 = tmp_path / "full" / "checkpoints" / "step-000003"
    shutil.copytree(step3, tmp_path / "split" / "checkpoints" / step3.name)
    assert launch(config(shards, tmp_path / "split", 6, resume=True), opts) == 0

    full = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "export" / "model.safetensors"))
    assert full.keys() == split.keys() and "null_prefix" in full
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "split" / "checkpoints" / "step-000006" / "COMPLETE").is_file()  # it trained on from 3

    # The export loads back through the family and samples valid codes.
    family, module = load_export(tmp_path / "split" / "export")
    assert isinstance(family, ARFamily)
    tokens, images = family.generate(module, None, None, torch.Generator().manual_seed(0),
                                     ARSampleConfig(top_k=8), batch_size=3)
    assert tokens.shape == (3, 16) and int(tokens.max()) < 16 and images.shape == (3, 3, 16, 16)

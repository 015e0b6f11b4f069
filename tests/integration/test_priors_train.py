"""The ddpm and flow priors under the real trainer: 2 ranks (torchrun, DeepSpeed ZeRO-2, gloo on
CPU) on latent shards, with eval and sample-grid hooks, a checkpoint, and a resume from it that
ends in exactly the weights of the uninterrupted run; the export then loads and samples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentpipe.training.export import load_export
from latentpipe.training.families.diffusion import LatentPriorFamily
from latentpipe.training.guidance import TextCond
from tests.shards import make_latent_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _train(config: str, workdir: Path, overrides: list[str], resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "train", "--launcher", "torchrun", "--nproc", "2",
           *(["--resume"] if resume else []), str(ROOT / "configs" / config), *overrides, f"workdir={workdir}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize(("config", "backbone"), [("prior_ddpm_demo.yaml", "unet_demo"),
                                                  ("prior_flow_demo.yaml", "dit_demo")])
def test_two_rank_training_resumes_to_the_same_weights(tmp_path: Path, config: str, backbone: str) -> None:
    shards = make_latent_shards(tmp_path, n=2, per_shard=16, C=4, h=8, w=8, text_dim=16, max_len=6,
                                with_tokens=False)
    overrides = [
        f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0", "data.max_text_len=6",
        f"model.backbone={backbone}", "model.text_dim=16", "model.scaling_factor=0.18215",
        "model.grid_samples=2", "model.sample.steps=2", "model.cond_drop=0.25",
        "steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "eval_every=2", "sample_every=4",
        "ema.enabled=true", "ema.start_step=0", "ema.decay=0.5", "optim.warmup_steps=0", "tracking.enabled=false",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(config, full, overrides)  # 4 steps, checkpoints at 2 and 4, export at 4
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    _train(config, resumed, overrides, resume=True)  # steps 3 and 4 again, from the step-2 checkpoint

    a, b = load_file(full / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    assert a.keys() == b.keys() and "null_text" in a
    for k in a:  # a resume that redraws different noise or data is off by ~lr (3e-4) per step
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)

    family, module = load_export(resumed / "export")
    assert isinstance(family, LatentPriorFamily) and family.name == config.split("_")[1]
    cond = TextCond.of(torch.randn(3, 6, 16), torch.arange(6)[None].expand(3, 6) < 4)
    z, images = family.generate(module.eval(), cond, torch.Generator().manual_seed(0), steps=3, guidance=2.0)
    assert images is None and z.shape == (3, 4, 8, 8) and bool(torch.isfinite(z).all())

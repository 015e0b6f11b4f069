"""The trainer on Ray Train (``TorchTrainer``, 2 workers, gloo): ZeRO-2, the loss falls, the EMA
sharded like ZeRO-2's fp32 partitions equals a hand-computed EMA of the per-step weights, and the
export is it. (ZeRO-3 runs under torchrun in test_engine.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentpipe.preprocessing.config import load_config
from latentpipe.training.checkpoint import latest_complete
from latentpipe.training.config import TrainConfig
from latentpipe.training.export import load_export
from latentpipe.training.launch import LaunchOptions, launch
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS, EMA_START, DECAY = 16, 4, 0.7


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="model").items()}


def test_ray_zero2_loss_falls_and_sharded_ema(tmp_path: Path, ray_local: None) -> None:
    from mlflow.tracking import MlflowClient

    shards = make_image_shards(tmp_path / "data", 2, 32)
    workdir = tmp_path / "run"
    cfg = load_config(TrainConfig, ROOT / "configs/train_toy.yaml", [
        f"data.shards={shards}", f"workdir={workdir}", "data.batch_size=8", "deepspeed.zero_stage=2",
        f"steps={STEPS}", "optim.lr=0.005", "optim.warmup_steps=2", f"ema.decay={DECAY}", f"ema.start_step={EMA_START}",
        "checkpoint.every_steps=1", "checkpoint.keep_last=100", "tracking.system_metrics=false",
        "eval_every=4", "sample_every=8"])
    assert launch(cfg, LaunchOptions(launcher="ray", nproc=2)) == 0

    final = latest_complete(workdir / "checkpoints")
    assert final is not None and final.step == STEPS and final.state["world_size"] == 2
    assert final.state["ema"]["mode"] == "hp" and final.state["zero_stage"] == 2

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss/model"), key=lambda m: m.step)]
    assert len(loss) == STEPS and sum(loss[-4:]) < 0.5 * sum(loss[:4]), loss
    held = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "eval/model/loss"),
                                    key=lambda m: m.step)]
    assert len(held) == STEPS // 4 and held[-1] < 0.5 * held[0], held  # on one fixed batch
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images/samples")]
    assert len(images) == 2, images

    ema = _weights(workdir / "checkpoints" / f"step-{EMA_START:06d}")
    for s in range(EMA_START + 1, STEPS + 1):
        w = _weights(workdir / "checkpoints" / f"step-{s:06d}")
        ema = {k: DECAY * ema[k] + (1 - DECAY) * w[k] for k in ema}
    exported = load_file(str(workdir / "export" / "model.safetensors"))
    for k in ema:
        torch.testing.assert_close(exported[k], ema[k], rtol=1e-5, atol=1e-6)
    family, module = load_export(workdir / "export")
    net = family.build_primary()
    net.load_state_dict(ema)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(module(x), net.eval()(x), rtol=1e-5, atol=1e-6)

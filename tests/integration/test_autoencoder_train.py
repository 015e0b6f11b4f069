"""Stage-1 autoencoders through the real trainer: torchrun 2 ranks (DeepSpeed ZeRO-2 on CPU, gloo),
generator and discriminator engines, checkpoint + --resume, export, MLflow registration, and
identical reconstructions from the export, the registered MLflow model and a diffusers folder.

    VQGAN  2 ranks, steps 0-3 (disc from step 1, k-means init, a dead-code restart), checkpoint;
           --resume to step 6; export + registration by the trainer -> load three ways.
    KL-VAE 1 rank with the optional adversary, 3 steps; export -> diffusers folder -> same images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentpipe.training.checkpoint import latest_complete
from latentpipe.training.export import load_export, read_export_meta
from latentpipe.training.models.autoencoders import AutoencoderArchConfig, build_autoencoder, reconstruct
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.arch.block_out_channels=[8,16,16]", "model.arch.norm_num_groups=4", "model.disc.channels=8",
        "model.disc.n_layers=2", "data.batch_size=4", "data.num_workers=1", "tracking.system_metrics=false",
        "optim.warmup_steps=1", "log_every=1", "deepspeed.zero_stage=2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def _train(config: str, workdir: Path, shards: Path, *extra: str, nproc: int = 1, resume: bool = False,
           timeout: float = 240) -> str:
    flags = ["--launcher", "torchrun", "--nproc", str(nproc)] if nproc > 1 else []
    flags += ["--resume"] if resume else []
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs" / config),
           f"data.shards={shards}", f"workdir={workdir}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", *TINY,
           *extra, *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _held(n: int = 6) -> torch.Tensor:
    import numpy as np

    from latentpipe.preprocessing.synthetic import make_scene

    arr = np.stack([np.asarray(make_scene(7, i, 32).image) for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # [n,3,32,32]


def _metrics(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    out: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        for key in run.data.metrics:
            out.setdefault(key, []).extend((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    return out


def test_vqgan_two_ranks_two_optimizers_resume_export_register_load(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", n=2, per_shard=16)
    work = tmp_path / "vq"
    common = ["model.loss.disc_start=1", "model.codebook.restart_every=2", "checkpoint.every_steps=2",
              "eval_every=2", "sample_every=4", "optim.lr=1e-4", "tracking.register_as=ae-vq-test"]
    _train("ae_vq_demo.yaml", work, shards, "steps=4", *common, nproc=2)
    first = latest_complete(work / "checkpoints")
    assert first is not None and first.step == 4 and sorted(first.state["parts"]) == ["disc", "model"]
    _train("ae_vq_demo.yaml", work, shards, "steps=6", *common, nproc=2, resume=True)
    assert latest_complete(work / "checkpoints").step == 6

    m = _metrics(work)
    assert {s for s, _ in m["loss/disc"]} >= {2, 3, 4, 5, 6}  # the disc stepped from step 1 on, both runs
    assert {"model/psnr", "model/codebook_usage", "model/perplexity", "model/rec_l1"} <= set(m)
    assert {"eval/model/psnr", "eval/model/codebook_usage"} <= set(m)

    export = work / "export"
    meta = read_export_meta(export)
    assert meta["family"] == "vqgan" and meta["extra"]["step"] == 6
    sf = meta["model_config"]["arch"]["scaling_factor"]
    assert isinstance(sf, float) and sf > 0
    _, module = load_export(export)
    assert module.config.scaling_factor == pytest.approx(sf)
    # k-means init (step 0) went into DeepSpeed's fp32 master: with lr 1e-4 for 6 steps, the codes could
    # not have moved from diffusers' uniform(+-1/512) init to the encoder-output scale otherwise.
    assert float(module.quantize.embedding.weight.abs().max()) > 0.01
    x = _held()
    ref = reconstruct(module, x)

    # each run's export was registered by the trainer (training/tracking.py): version 2 holds alias "final"
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert str(MlflowClient(uri).get_model_version_by_alias("ae-vq-test", "final").version) == "2"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # (also sets $MLFLOW_TRACKING_URI: restored below)
    try:
        loaded = mlflow.pyfunc.load_model("models:/ae-vq-test@final").unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None unsets it
    assert torch.equal(reconstruct(loaded.module, x), ref)

    # a plain diffusers folder loads in its place, with the stock class and through our builder
    from diffusers import VQModel

    module.save_pretrained(tmp_path / "diffusers_vq")
    stock = VQModel.from_pretrained(tmp_path / "diffusers_vq", local_files_only=True).eval()
    assert torch.equal(reconstruct(stock, x), ref)
    assert stock.config.scaling_factor == pytest.approx(sf)
    ours = build_autoencoder(AutoencoderArchConfig(pretrained=str(tmp_path / "diffusers_vq")), "vq").eval()
    assert torch.equal(reconstruct(ours, x), ref)


def test_kl_vae_with_adversary_exports_a_diffusers_loadable_model(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", n=1, per_shard=12)
    work = tmp_path / "kl"
    out = _train("ae_kl_demo.yaml", work, shards, "steps=3", "model.loss.disc_weight=0.5",
                 "model.loss.disc_start=1", "checkpoint.every_steps=0", "sample_every=3",
                 "tracking.register_as=null")
    ckpt = latest_complete(work / "checkpoints")
    assert ckpt is not None and sorted(ckpt.state["parts"]) == ["disc", "model"], out[-2000:]
    m = _metrics(work)
    assert {"model/kl", "model/psnr", "model/adv_weight", "loss/disc"} <= set(m)
    _, module = load_export(work / "export")
    x = _held()
    ref = reconstruct(module, x)
    from diffusers import AutoencoderKL

    module.save_pretrained(tmp_path / "diffusers_kl")
    config = json.loads((tmp_path / "diffusers_kl" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] > 0
    stock = AutoencoderKL.from_pretrained(tmp_path / "diffusers_kl", local_files_only=True).eval()
    assert torch.equal(reconstruct(stock, x), ref)

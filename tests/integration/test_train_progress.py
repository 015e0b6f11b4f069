"""``latentpipe train`` with stderr not a terminal: rank 0 writes a progress line every
``progress_interval`` seconds with step/total, loss, samples/s, MFU (peak from the environment),
data-wait share, memory and ETA, and a summary table at the end; DeepSpeed's known LR-scheduler
warning and its op-load print are not shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_progress_lines_and_summary_when_not_a_terminal(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 1, 16)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "LATENTPIPE_PEAK_FLOPS": "1e12"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs/train_toy.yaml"),
                        "--launcher", "local", f"data.shards={shards}", f"workdir={tmp_path / 'run'}",
                        "data.batch_size=4", "data.num_workers=0", "steps=6", "log_every=2", "eval_every=3",
                        "sample_every=0", "progress_interval=0", "tracking.system_metrics=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train: ")]
    assert [ln.split()[1] for ln in lines] == [f"{i}/6" for i in range(1, 7)], r.stderr[-3000:]
    last = lines[-1]
    for field in (r"[\d.]+ step/s", r"[\d.]+ samples/s", r"loss [\d.e+-]+", r"mfu [\d.]+%",
                  r"data wait \d+%", r"rss [\d.]+ GiB", r"ETA 0:00"):
        assert re.search(field, last), (field, last)
    assert "loss" not in lines[0] and "loss" in lines[1]  # values of the last log point (after step 2)
    summary = r.stderr[r.stderr.index("training summary"):]
    for row in (r"steps\s+6/6 \(6 in this run\)", r"wall time\s+\d+:\d\d", r"mean samples/s\s+[\d.]+",
                r"best eval/model/loss\s+[\d.e+-]+ \(step [36]\)", r"export\s+\S*run/export", r"registered\s+-"):
        assert re.search(row, summary), (row, summary)
    assert "before it has started" not in r.stderr
    assert "built successfully" not in r.stdout + r.stderr  # DeepSpeed's per-rank op-load print

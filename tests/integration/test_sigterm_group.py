"""SIGTERM to every process of a training job (what SLURM's scancel and time limit do, and a
shell's process group): the data-loader workers ignore it, the rank finishes its step, saves a
complete checkpoint and exits 0, and a --resume continues from that step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from latentpipe.training.checkpoint import latest_complete
from tests.shards import make_image_shards

ROOT = Path(__file__).resolve().parents[2]


def _cmd(work: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs/train_toy.yaml"),
            f"data.shards={shards}", f"workdir={work}", "steps=400", "data.batch_size=4", "data.num_workers=2",
            "checkpoint.every_steps=0", "eval_every=0", "sample_every=0", "log_keys=true",
            "tracking.enabled=false", *extra]


def test_sigterm_to_the_whole_process_group_checkpoints(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 2, 16)
    work, log = tmp_path / "run", tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(_cmd(work, shards), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        keys = work / "keys" / "start-000000-rank-00000.jsonl"
        deadline = time.monotonic() + 600  # a wait limit for a loaded machine, not a measured threshold
        while not (keys.is_file() and len(keys.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the rank and both loader workers
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, log.read_text()[-3000:]
    stopped = latest_complete(work / "checkpoints")
    assert stopped is not None and 5 <= stopped.step < 400, log.read_text()[-3000:]

    resumed = subprocess.run(_cmd(work, shards, "steps=" + str(stopped.step + 3), "--resume"), cwd=ROOT, env=env,
                             capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode(errors="replace")[-3000:]
    final = latest_complete(work / "checkpoints")
    assert final is not None and final.step == stopped.step + 3

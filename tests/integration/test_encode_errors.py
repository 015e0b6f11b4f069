"""Errors raised inside Ray tasks and actors reach the user as the one line of their root cause.

A real ``latentpipe encode`` whose text encoder folder holds a pickle (with a payload) instead of
safetensors: the actor refuses it, the payload never runs, and the user reads one line naming the
refusal, not Ray's ``ActorDiedError`` over the actor's whole traceback (that comes with -v)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from latentpipe.pipeline.cli import one_line
from latentpipe.preprocessing.encoders import minilm_path
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_an_actor_refusing_a_pickle_is_one_line(tmp_path: Path) -> None:
    images = make_image_shards(tmp_path / "data", 1, 4)
    text = tmp_path / "text-encoder"
    shutil.copytree(minilm_path(), text)
    for f in text.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "payload-ran"
    with open(text / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": _Payload(marker)}, fh)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "encode", "--images", str(images), "--out", str(tmp_path / "out"),
           "--text-encoder", str(text), "--num-actors", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert not marker.exists()
    assert "Traceback" not in r.stderr and "EncoderWorker pid=" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("latentpipe encode: an actor failed to start: UnpicklingError: Weights only load failed")
    assert "ActorDiedError" not in r.stderr


def test_a_task_error_names_the_root_cause(ray_local: None) -> None:
    import ray

    @ray.remote(max_retries=0)
    def write() -> None:
        raise OSError(28, "No space left on device")

    @ray.remote(max_retries=0)
    def after(x: None) -> None:
        return x

    with pytest.raises(ray.exceptions.RayError) as direct:
        ray.get(write.remote())
    assert one_line(direct.value) == "in ray::write(): OSError: [Errno 28] No space left on device"
    with pytest.raises(ray.exceptions.RayError) as chained:  # failed upstream, seen downstream
        ray.get(after.remote(write.remote()))
    assert one_line(chained.value).endswith("OSError: [Errno 28] No space left on device")

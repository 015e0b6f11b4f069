"""--resume on a real 2-rank toy checkpoint (torchrun, ZeRO-2, EMA) that was tampered with, damaged,
or whose shards changed: code planted in any file never runs, damage is named and skipped, other data
is refused unless overridden; ``latentpipe verify`` checks checkpoints without training."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentpipe.training import safe_load
from latentpipe.training.checkpoint import MARKER, digests, latest_complete
from tests.integration import test_engine as te
from tests.shards import make_image_shards
from tests.unit.test_train_checkpoint import Exploit

pytestmark = pytest.mark.integration
_reap = te._reap  # never leave ranks behind

ROOT = te.ROOT
BASE = ["model.kind=toy", "data.batch_size=4", "data.num_workers=0", "steps=3", "ema.start_step=0",
        "checkpoint.every_steps=1", "checkpoint.keep_last=10", "checkpoint.export=false", "eval_every=0",
        "sample_every=0", "tracking.system_metrics=false", "deepspeed.zero_stage=2"]
TWO = ("--launcher", "torchrun", "--nproc", "2")


def _cmd(workdir: Path, shards: Path, *extra: str) -> list[str]:
    flags = [a for a in extra if "=" not in a or a.startswith("-")]  # after every key=value
    return [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs/train_toy.yaml"),
            f"data.shards={shards}", f"workdir={workdir}", *BASE, *[a for a in extra if a not in flags], *flags]


def _run(cmd: list[str], log: Path) -> tuple[int, str]:
    rc = te._finish(te._start(cmd, log), log)
    return rc, log.read_text(errors="replace")


def _verify(path: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "latentpipe.pipeline.cli", "verify", str(path)], cwd=ROOT, env=te._env(),
                         capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(workdir, shards) of a 2-rank run: complete checkpoints at steps 1, 2 and 3."""
    root = tmp_path_factory.mktemp("trained")
    shards = make_image_shards(root / "data", 2, 16)
    rc, log = _run(_cmd(root / "run", shards, *TWO), root / "train.log")
    assert rc == 0, log[-3000:]
    return root / "run", shards


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _reseal(ckpt: Path) -> None:
    """What an attacker who can write the files can also do: record the new files' digests."""
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"] = digests(ckpt)
    (ckpt / MARKER).write_text(json.dumps(marker))


@pytest.mark.timeout(2400)
def test_code_planted_in_any_checkpoint_file_never_runs(trained: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, shards = trained
    newest = latest_complete(workdir / "checkpoints")
    assert newest is not None and newest.step == 3
    rel = {"model": "model/mp_rank_00_model_states.pt", "optimizer": "model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
           "ema": "ema/rank-00001.safetensors", "rng": "rng/rank-00000.json"}
    why = {"model": "refused to load (it holds more than tensors: Unsupported global: GLOBAL io.open)",
           "optimizer": "refused to load (it holds more than tensors: Unsupported global: GLOBAL io.open)",
           "ema": "not a readable safetensors file", "rng": "not an RNG state"}
    cases = [(name, TWO) for name in rel] + [("optimizer", ())]  # 1 rank: DeepSpeed's universal-checkpoint path
    for name, launcher in cases:
        tag = f"{name}-{len(launcher)}"
        wd = _copy(workdir, tmp_path / tag)
        ckpt = wd / "checkpoints" / newest.path.name
        target, marker = ckpt / rel[name], tmp_path / f"MARKER-{tag}"
        if name in ("model", "optimizer"):  # the exploit inside DeepSpeed's real state dict
            state = safe_load.load(str(target))
            state["exploit"] = Exploit(marker)
            torch.save(state, target)
        else:
            target.write_bytes(pickle.dumps(Exploit(marker)))
        _reseal(ckpt)
        extra = ("data.batch_size=8",) if not launcher else ()  # same global batch at 1 rank
        rc, log = _run(_cmd(wd, shards, "--resume", *launcher, *extra), tmp_path / f"{tag}.log")
        assert rc != 0, f"{tag}: resumed anyway\n{log[-3000:]}"
        assert not marker.exists(), f"{tag}: the planted code ran"
        lines = [ln for ln in log.splitlines() if f"{target}: {why[name]}" in ln]
        assert lines, f"{tag}: no one-line error naming {target}\n{log[-3000:]}"
        if not launcher:  # one rank in the CLI's process: exactly one line, the CLI's error
            assert log.strip().splitlines()[-1] == f"latentpipe train: error: {target}: {why[name]}", log[-2000:]


@pytest.mark.timeout(2400)
def test_damaged_checkpoint_is_named_skipped_or_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, shards = trained
    rc, out = _verify(workdir)
    assert rc == 0 and out.count("ok   ") == 3, out

    # 64 EMA floats overwritten with 1e30 in the newest checkpoint: detected, the older one is used.
    wd = _copy(workdir, tmp_path / "ema")
    ema = wd / "checkpoints" / "step-000003" / "ema" / "rank-00000.safetensors"
    data = bytearray(ema.read_bytes())
    data[-256:] = torch.full((64,), 1e30, dtype=torch.float32).numpy().tobytes()
    ema.write_bytes(bytes(data))
    rc, out = _verify(wd)
    assert rc == 1 and f"BAD  {ema.parents[1]}: {ema}: sha256 differs" in out, out
    assert _verify(wd / "checkpoints" / "step-000002")[0] == 0
    rc, log = _run(_cmd(wd, shards, "--resume", *TWO), tmp_path / "ema.log")
    assert rc == 0, log[-3000:]
    assert f"is damaged, not used: {ema}: sha256 differs" in log and "resumed from" in log
    assert "step-000002 (step 2" in log, log[-3000:]
    assert (wd / "checkpoints" / "step-000003.damaged").is_dir()  # kept aside for inspection
    assert _verify(wd)[0] == 0  # step 3 was trained again from step 2 and saved intact

    # A truncated model-state file in the only checkpoint: named, and resume refuses up front.
    wd = tmp_path / "trunc"
    (wd / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / "step-000003", wd / "checkpoints" / "step-000003")
    states = wd / "checkpoints" / "step-000003" / "model" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[: size // 2])
    rc, out = _verify(wd / "checkpoints" / "step-000003")
    assert rc == 1 and f"{states}: {size // 2} bytes, {size} when saved (truncated)" in out, out
    rc, log = _run(_cmd(wd, shards, "--resume", "data.batch_size=8"), tmp_path / "trunc.log")
    assert rc == 2 and log.strip().splitlines()[-1] == (
        f"latentpipe train: error: --resume: no intact checkpoint under {wd / 'checkpoints'}: "
        f"{states}: {size // 2} bytes, {size} when saved (truncated)"), log[-2000:]


@pytest.mark.timeout(2400)
def test_resume_on_changed_shards_is_refused_unless_overridden(trained: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, shards = trained
    other = make_image_shards(tmp_path / "other", 3, 16, seed=5)

    def variant(name: str) -> Path:
        data = _copy(shards, tmp_path / name / "images")
        if name == "added":
            for ext in (".tar", ".stats.json"):
                shutil.copy(other / f"shard-000002{ext}", data / f"shard-000002{ext}")
        elif name == "removed":
            (data / "shard-000001.stats.json").unlink()  # no completion marker: the reader drops it
        else:  # replaced: other content under the same name
            for ext in (".tar", ".stats.json"):
                shutil.copy(other / f"shard-000001{ext}", data / f"shard-000001{ext}")
        return data

    for name in ("added", "removed", "replaced"):
        data = variant(name)
        rc, log = _run(_cmd(_copy(workdir, tmp_path / name / "run"), data, "--resume", "data.batch_size=8"),
                       tmp_path / f"{name}.log")
        last = log.strip().splitlines()[-1]
        assert rc == 2 and last.startswith("latentpipe train: error: --resume on other data than the "
                                           "checkpoint's: data fingerprint "), f"{name}: {log[-2000:]}"
        assert last.endswith("shards added, removed or changed (pass --resume-on-changed-data to continue anyway)")
    # 2 ranks: refused on the ranks too; then the explicit override continues to the end.
    data = tmp_path / "replaced" / "images"
    wd = _copy(workdir, tmp_path / "override")
    rc, log = _run(_cmd(wd, data, "--resume", *TWO), tmp_path / "two.log")
    assert rc != 0 and "DataChangedError: --resume on other data than the checkpoint's" in log, log[-3000:]
    # At 1 rank (same global batch): through DeepSpeed's universal checkpoint, read weights-only.
    rc, log = _run(_cmd(wd, data, "--resume", "--resume-on-changed-data", "steps=4", "data.batch_size=8"),
                   tmp_path / "override.log")
    assert rc == 0 and "resuming on changed data (--resume-on-changed-data): data fingerprint" in log, log[-3000:]
    assert "universal" in log and not (wd / ".universal-000003").exists()
    done = latest_complete(wd / "checkpoints")
    assert done is not None and done.step == 4 and done.state["data"]["samples_seen"] == 4 * 8

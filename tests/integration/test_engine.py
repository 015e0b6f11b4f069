"""The trainer under real faults: torchrun 2 ranks (ZeRO-3, two-part toy_gan), SIGKILL mid-save,
--resume, SIGTERM, a 2-rank checkpoint resumed at 1 rank, EMA vs a hand-computed reference,
and the exported safetensors. One chain of 4 processes (about 3-4 minutes on 2 CPU cores).

    P1 reference   deepspeed launcher, 2 ranks, 16 steps, a checkpoint after every step (all kept)
    P2 victim      same config, SIGKILL while a checkpoint is half-written
    P3 resume      torchrun 2 ranks --resume; SIGTERM to the launcher mid-run -> exit 0
    P4 resume      1 rank --resume from P3's 2-rank ZeRO-3 checkpoint (DeepSpeed universal) to the end
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentpipe.training.checkpoint import latest_complete, list_complete
from latentpipe.training.export import load_export
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS, EMA_START, DECAY, NAN_STEP = 16, 3, 0.8, 6
BASE = [
    "model.kind=toy_gan", f"model.nan_loss_steps=[{NAN_STEP}]", "data.batch_size=8", "data.num_workers=1",
    "optim.lr=0.005", "optim.warmup_steps=2", f"steps={STEPS}", f"ema.decay={DECAY}",
    f"ema.start_step={EMA_START}", "checkpoint.every_steps=1", "log_keys=true", "tracking.system_metrics=false",
    "eval_every=4", "sample_every=8", "deepspeed.zero_stage=3",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def _cmd(workdir: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs/train_toy.yaml"),
            f"data.shards={shards}", f"workdir={workdir}", *BASE, *extra]


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Never leave ranks behind: kill every process tree a test started."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _STARTED.append(proc)
    return proc


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_tree(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out; log tail:\n{log.read_text()[-3000:]}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keys(workdir: Path) -> dict[int, list[str]]:
    """step -> global batch keys (rank order), taken from the run that executed the step last."""
    runs: dict[int, dict[int, dict[int, list[str]]]] = {}  # start -> rank -> step -> keys
    for f in sorted((workdir / "keys").glob("start-*-rank-*.jsonl")):
        start, rank = int(f.name.split("-")[1]), int(f.name.split("-")[3].split(".")[0])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            runs.setdefault(start, {}).setdefault(rank, {})[rec["step"]] = rec["keys"]
    out: dict[int, list[str]] = {}
    for start in sorted(runs):
        ranks = runs[start]
        for step in ranks[0]:
            out[step] = [k for r in sorted(ranks) for k in ranks[r][step]]
    return out


def _ds_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="model").items()}


def _metric(workdir: Path, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)]


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun starts ranks in their own sessions)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _kill_mid_save(proc: subprocess.Popen[bytes], ckpts: Path, log: Path) -> Path:
    """Freeze the whole process group when a save is in flight; if it is still half-written, SIGKILL."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"victim ended early:\n{log.read_text()[-3000:]}"
        done = latest_complete(ckpts)
        tmps = list(ckpts.glob("step-*.tmp")) if ckpts.is_dir() else []
        if done is not None and done.step >= 3 and tmps:
            _signal_tree(proc.pid, signal.SIGSTOP)
            tmps = [t for t in ckpts.glob("step-*.tmp") if t.is_dir()]
            if tmps:
                _signal_tree(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(0.5)  # let the kernel reap the ranks
                return tmps[0]
            _signal_tree(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    raise AssertionError("never caught a checkpoint in flight")


@pytest.mark.timeout(2400)
def test_kill_resume_sigterm_rescale_ema_export(tmp_path: Path) -> None:
    shards = make_image_shards(tmp_path / "data", 2, 32)  # 64 samples: 4 steps of 16 per epoch
    ref, chain = tmp_path / "ref", tmp_path / "chain"

    # P1 (reference) and P2 (victim) run side by side.
    p1 = _start(_cmd(ref, shards, "checkpoint.keep_last=100", "--launcher", "deepspeed", "--nproc", "2",
                     "--master-port", str(_free_port())), tmp_path / "p1.log")
    p2 = _start(_cmd(chain, shards, "checkpoint.keep_last=3", "--launcher", "torchrun", "--nproc", "2"),
                tmp_path / "p2.log")
    half = _kill_mid_save(p2, chain / "checkpoints", tmp_path / "p2.log")
    assert _finish(p1, tmp_path / "p1.log") == 0, (tmp_path / "p1.log").read_text()[-3000:]

    # The half-written save is never chosen: resume picks the newest *complete* checkpoint.
    killed_at = int(half.name.split("-")[1].split(".")[0])
    resume_from = latest_complete(chain / "checkpoints")
    assert resume_from is not None and resume_from.step < killed_at
    assert all(c.step != killed_at for c in list_complete(chain / "checkpoints"))

    # P3: --resume at 2 ranks; SIGTERM to the launcher a few steps later -> checkpoint + exit 0.
    p3 = _start(_cmd(chain, shards, "checkpoint.keep_last=3", "--resume", "--launcher", "torchrun", "--nproc", "2"),
                tmp_path / "p3.log")
    keys_file = chain / "keys" / f"start-{resume_from.step:06d}-rank-00000.jsonl"
    deadline = time.monotonic() + 900
    while not (keys_file.is_file() and len(keys_file.read_text().splitlines()) >= 3):
        assert p3.poll() is None and time.monotonic() < deadline, (tmp_path / "p3.log").read_text()[-3000:]
        time.sleep(0.05)
    p3.send_signal(signal.SIGTERM)
    assert _finish(p3, tmp_path / "p3.log") == 0, (tmp_path / "p3.log").read_text()[-3000:]
    stopped = latest_complete(chain / "checkpoints")
    assert stopped is not None and resume_from.step + 3 <= stopped.step < STEPS
    assert stopped.state["world_size"] == 2 and stopped.state["ema"]["mode"] == "zero3"
    # Same world size: the resumed run is bit-identical to the uninterrupted one (weights of both parts).
    for part in ("model", "disc"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as fp32

        a = fp32(str(ref / "checkpoints" / f"step-{stopped.step:06d}"), tag=part)
        b = fp32(str(stopped.path), tag=part)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part

    # P4: the 2-rank checkpoint resumes at 1 rank (same global batch 16) and finishes.
    p4 = _start(_cmd(chain, shards, "checkpoint.keep_last=3", "data.batch_size=16", "--resume"),
                tmp_path / "p4.log")
    assert _finish(p4, tmp_path / "p4.log") == 0, (tmp_path / "p4.log").read_text()[-3000:]
    final = latest_complete(chain / "checkpoints")
    assert final is not None and final.step == STEPS and final.state["world_size"] == 1

    # Data: every step of the interrupted chain saw exactly the reference's samples.
    ref_keys, chain_keys = _keys(ref), _keys(chain)
    assert sorted(ref_keys) == list(range(STEPS)) and sorted(chain_keys) == list(range(STEPS))
    assert all(len(ref_keys[s]) == 16 for s in ref_keys)
    assert chain_keys == ref_keys

    # Loss falls; the injected NaN step was skipped and counted; images were logged.
    mse = _metric(ref, "model/mse")
    assert sum(mse[-3:]) < 0.5 * sum(mse[:3]), mse
    assert _metric(ref, "nonfinite_steps")[-1] == 1.0
    for s in range(1, STEPS + 1):  # no checkpoint holds non-finite weights
        w = _ds_weights(ref / "checkpoints" / f"step-{s:06d}")
        assert all(torch.isfinite(v).all() for v in w.values())

    # EMA: recompute it by hand from the weights after every step; the export holds exactly that.
    ema = _ds_weights(ref / "checkpoints" / f"step-{EMA_START:06d}")
    for s in range(EMA_START + 1, STEPS + 1):
        w = _ds_weights(ref / "checkpoints" / f"step-{s:06d}")
        ema = {k: DECAY * ema[k] + (1 - DECAY) * w[k] for k in ema}
    exported = load_file(str(ref / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(ema)
    for k in ema:
        torch.testing.assert_close(exported[k], ema[k], rtol=1e-5, atol=1e-6)
    meta = json.loads((ref / "export" / "export.json").read_text())
    assert meta["family"] == "toy_gan" and meta["extra"]["ema"] is True and meta["extra"]["step"] == STEPS

    # The export loads back through the family and gives the same outputs as the EMA weights.
    family, module = load_export(ref / "export")
    net = family.build_primary()
    net.load_state_dict(ema)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(module(x), net.eval()(x), rtol=1e-5, atol=1e-6)

    # The chain's final EMA (2 ranks, then 1 rank via universal checkpoint) matches the reference.
    chain_export = load_file(str(chain / "export" / "model.safetensors"))
    for k in ema:
        torch.testing.assert_close(chain_export[k], exported[k], rtol=1e-4, atol=1e-5)

"""A real 2-rank ``latentpipe train`` (torchrun, then the DeepSpeed launcher) on one machine:
- every listening TCP socket of its process tree is on loopback (and there is at least one);
- a second ``train`` on the same workdir is refused at once, naming the holder;
- after SIGKILL of the launcher (torchrun: the whole ``latentpipe train`` process group, as a
  shell's ``kill -9 -PGID`` or an OOM kill of the group; deepspeed: the ``latentpipe train`` process
  alone) no rank or data-loader worker survives 30 s, and the rest of the tree (DeepSpeed's
  ``launch.py``, which polls its ranks) exits after them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from latentpipe.training.launch import _rank_processes
from latentpipe.training.orphans import remove_stale_buffers
from tests.integration.process_tree import LOOPBACK, alive, listening, tree
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
WAIT = 1200.0  # a wait limit for a loaded machine, not a measured threshold
SURVIVAL_LIMIT = 30.0  # the promise: no rank survives its launcher by more than this


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # Rank identities left by an enclosing job (or an earlier in-process run): the launcher must not
    # pass them on, or its agent looks like a rank and neither SIGTERM nor these checks find the ranks.
    env.update(LOCAL_RANK="5", RANK="5", WORLD_SIZE="8")
    return env


def _cmd(work: Path, shards: Path, launcher: str) -> list[str]:
    return [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs/train_toy.yaml"),
            f"data.shards={shards}", f"workdir={work}", "steps=100000", "data.batch_size=4",
            "data.num_workers=1", "checkpoint.every_steps=0", "eval_every=0", "sample_every=0", "log_keys=true",
            "tracking.enabled=false", "--launcher", launcher, "--nproc", "2"]


def _start(tmp_path: Path, launcher: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A 2-rank training in its own session, its log in a file; returns once both ranks have run 3 steps."""
    shards = make_image_shards(tmp_path / "data", 2, 16)
    work, log = tmp_path / "run", tmp_path / "train.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(_cmd(work, shards, launcher), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    keys = [work / "keys" / f"start-000000-rank-{r:05d}.jsonl" for r in (0, 1)]
    deadline = time.monotonic() + WAIT
    while not all(k.is_file() and len(k.read_text().splitlines()) >= 3 for k in keys):
        if proc.poll() is not None or time.monotonic() > deadline:
            _cleanup(proc, [])
            pytest.fail(log.read_text()[-3000:])
        time.sleep(0.1)
    return proc, work, shards


def _assert_gone(ranks: list[psutil.Process], procs: list[psutil.Process]) -> None:
    """No rank or loader worker (``ranks``) outlives its launcher by SURVIVAL_LIMIT, and the rest of the
    tree (``procs``) exits after them."""
    deadline = time.monotonic() + SURVIVAL_LIMIT
    while alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = alive(ranks)
    assert not survivors, [(p.pid, p.cmdline()) for p in survivors]
    deadline = time.monotonic() + WAIT
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(procs), [(p.pid, p.cmdline()[:3]) for p in alive(procs)]


def _cleanup(proc: subprocess.Popen[bytes], procs: list[psutil.Process]) -> None:
    for p in alive([*procs, *tree(proc.pid)]):
        p.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("launcher", "kill_group"), [("torchrun", True), ("deepspeed", False)])
def test_ranks_die_with_their_launcher(tmp_path: Path, launcher: str, kill_group: bool) -> None:
    proc, work, shards = _start(tmp_path, launcher, _env())
    procs: list[psutil.Process] = []
    store = None
    try:
        procs = tree(proc.pid)
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2, [p.cmdline() for p in procs]
        store = ranks[0].environ()["LATENTPIPE_STORE"]  # "127.0.0.1:PORT", also names DeepSpeed's shm
        workers = [c for r in ranks for c in r.children(recursive=True)]

        ports = listening(procs)
        assert ports, "the launcher's rendezvous store should be listening"
        assert all(ip in LOOPBACK for ip, _, _ in ports), ports

        second = subprocess.run(_cmd(work, shards, launcher), cwd=ROOT, env=_env(), capture_output=True,
                                text=True, timeout=WAIT)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"in use by PID {proc.pid} on {socket.gethostname()} since " in lines[0]

        if kill_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
        # DeepSpeed's launch.py (not a rank) exits on its own once its ranks are gone (it polls them).
        _assert_gone([*ranks, *workers], procs)
        # What SIGKILLed ranks leave in /dev/shm, the next `latentpipe train` removes (remove_stale_buffers).
        remove_stale_buffers()
        left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{store.replace(':', '_')}_*"))
        assert not left, left
    finally:
        _cleanup(proc, procs)
        if store:  # DeepSpeed's CPU all-reduce buffers outlive SIGKILLed ranks (a known leak): remove them
            for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{store.replace(':', '_')}_*"):
                f.unlink(missing_ok=True)


def test_ray_ranks_die_with_their_launcher(tmp_path: Path) -> None:
    """``--launcher ray`` on one machine: the ``latentpipe train`` process is the Ray driver and its local
    cluster's head. Its ranks are Ray Train workers (children of the raylet, not of the launcher), so
    the parent-death signal does not reach them; their watchdog does. After SIGKILL of the driver no
    rank or loader worker survives 30 s, and Ray's own processes exit after them."""
    env = {**_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    proc, _, _ = _start(tmp_path, "ray", env)
    procs: list[psutil.Process] = []
    try:
        procs = tree(proc.pid)

        def train_worker(p: psutil.Process | None) -> bool:
            return p is not None and "RayTrainWorker" in " ".join(p.cmdline())

        # Loader workers are forks of a rank and show its title too: a rank's parent is the raylet.
        ranks = [p for p in procs if train_worker(p) and not train_worker(p.parent())]
        assert len(ranks) == 2, [p.cmdline() for p in procs]
        workers = [c for r in ranks for c in r.children(recursive=True)]
        exposed = [s for s in listening(procs) if s[0] not in LOOPBACK]
        assert not exposed, exposed

        proc.kill()
        proc.wait()
        _assert_gone([*ranks, *workers], procs)  # Ray's head processes follow their dead driver
    finally:
        _cleanup(proc, procs)

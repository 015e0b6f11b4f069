"""Multi-node behaviour on Ray's own multi-node test cluster (3 raylets on this machine).

- ``latentpipe shard`` runs its shard tasks on several nodes at once, and ``latentpipe encode``
  spreads decode / encode / write over the nodes (which node ran what: the GCS task events).
- A node removed while it runs a shard task (``Cluster.remove_node`` kills its raylet and
  workers): Ray retries the task elsewhere and the dataset still holds every sample exactly once.
- ``latentpipe train --launcher ray --nproc 2`` (Ray Train ``TorchTrainer``, DeepSpeed on gloo)
  on that cluster: two ranks on two nodes, each its own data slice, and the loss falls.

Each command runs as its own driver process joined to the cluster by address, as on a real
cluster. The shard sources are image URLs on a real HTTP server on 127.0.0.1 whose answers
wait behind a gate, so the test controls when tasks may finish: it opens the gate once tasks
run on two nodes (a job that ran its shards one at a time would never get there), or after
it removed the node that runs one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.cluster_fixtures import MultiNodeCluster, TaskRecord, ray_multinode  # noqa: F401
from tests.integration.http_fixture import ServerState, http_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
N, PER_SHARD = 60, 10
KEYS = [f"{i:09d}" for i in range(N)]  # latentpipe.pipeline.shard.sample_key of each input row
WAIT = 180.0  # upper bound on waiting for a cluster event (a wait limit, not a measured threshold)
TRAIN_STEPS = 30  # x global batch 8 = 4 epochs of N


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", **extra}


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "latentpipe.pipeline.cli", *args], cwd=ROOT, env=_env(**env),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out after {timeout:.0f}s; log tail:\n{_tail(log)}") from None


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _nodes(records: list[TaskRecord], state: str) -> Counter[str | None]:
    """How many task attempts reached ``state`` on each node."""
    return Counter(r.node for r in records if state in r.states)


def _write_table(path: Path, base_url: str, prefix: str) -> Path:
    """A JSONL table of N gated image URLs with captions (row i becomes key i)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N):
            f.write(json.dumps({"url": f"{base_url}/gate/{prefix}{i:03d}.jpg",
                                "caption": f"synthetic scene {prefix} number {i}"}) + "\n")
    return path


def _tar_keys(folder: Path) -> Counter[str]:
    keys: Counter[str] = Counter()
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            keys.update({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})
    return keys


def _assert_every_sample_once(folder: Path) -> None:
    """_index.parquet and the tars hold each source row's key exactly once, nothing else."""
    index = pq.read_table(folder / "_index.parquet").column("key").to_pylist()
    assert sorted(index) == KEYS, f"index keys: {len(index)} rows, {len(set(index))} distinct"
    assert _tar_keys(folder) == Counter(KEYS)
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["shard_count"] == N // PER_SHARD
    assert manifest["totals"]["written"] == N


@dataclass
class GatedRun:
    """A ``latentpipe shard`` driver on the cluster whose URL fetches wait for a gate."""

    out: Path
    log: Path
    rc: int
    job_ids: set[str]
    tasks: list[TaskRecord]


def _gated_shard_job(cluster: MultiNodeCluster, tmp: Path, prefix: str,
                     ready: Callable[[list[TaskRecord]], bool],
                     act: Callable[[list[TaskRecord]], None] = lambda recs: None) -> GatedRun:
    """Run the job; once ``ready(write_shard attempts)`` holds, ``act`` on them, then open the gate."""
    log, out = tmp / f"shard-{prefix}.log", tmp / f"data-{prefix}"
    with http_server(ServerState()) as (url, state):
        table = _write_table(tmp / f"{prefix}.jsonl", url, prefix)
        proc = _start(["shard", "--source", str(table), "--out", str(out), "--size", "32",
                       "--samples-per-shard", str(PER_SHARD), "--ray-address", cluster.address,
                       "dedup=false", "fetch.timeout=300", "fetch.deadline=300", "fetch.retries=0"], log)
        try:
            deadline, records = time.monotonic() + WAIT, []
            while time.monotonic() < deadline and proc.poll() is None:
                jobs = cluster.job_ids(driver_pid=proc.pid)
                records = cluster.tasks(job_ids=jobs, names={"write_shard"}) if jobs else []
                if ready(records):
                    act(records)
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"the condition never held (driver exit code {proc.poll()}); "
                                     f"shard attempts by node: {_nodes(records, 'RUNNING')}\n{_tail(log)}")
        finally:
            state.gate.set()
            rc = _finish(proc, log)
    jobs = cluster.job_ids(driver_pid=proc.pid)
    time.sleep(1.5)  # task events reach the GCS every second
    return GatedRun(out / "images", log, rc, jobs, cluster.tasks(job_ids=jobs, names={"write_shard"}))


@pytest.fixture(scope="module")
def sharded(ray_multinode: MultiNodeCluster, tmp_path_factory: pytest.TempPathFactory) -> GatedRun:  # noqa: F811
    """One shard job on the 3 nodes; the gate opens once shard tasks run on two nodes at once."""
    return _gated_shard_job(ray_multinode, tmp_path_factory.mktemp("multinode"), "a",
                            ready=lambda recs: len({r.node for r in recs if "RUNNING" in r.states}) >= 2)


def test_shard_tasks_run_on_several_nodes(sharded: GatedRun) -> None:
    assert sharded.rc == 0, _tail(sharded.log)
    finished = [r for r in sharded.tasks if r.final == "FINISHED"]
    assert len({r.task_id for r in finished}) == N // PER_SHARD
    by_node = _nodes(finished, "FINISHED")
    assert len(by_node) >= 2 and None not in by_node, f"shard tasks by node: {by_node}"
    _assert_every_sample_once(sharded.out)


def test_encode_spreads_over_nodes(ray_multinode: MultiNodeCluster, sharded: GatedRun,  # noqa: F811
                                   tmp_path: Path) -> None:
    from tests.unit.test_encoders import make_vae

    vae = make_vae(tmp_path / "vae")
    log = tmp_path / "encode.log"
    proc = _start(["encode", "--images", str(sharded.out), "--out", str(tmp_path / "enc"), "--vae", str(vae),
                   "--device", "cpu", "--batch-size", "4", "--ray-address", ray_multinode.address], log)
    assert _finish(proc, log) == 0, _tail(log)
    time.sleep(1.5)  # task events reach the GCS every second
    tasks = ray_multinode.tasks(job_ids=ray_multinode.job_ids(driver_pid=proc.pid))
    kinds = {name: _nodes([r for r in tasks if r.name == name], "FINISHED")
             for name in ("decode_shard", "EncoderWorker.encode_shard", "write_shard")}
    assert all(sum(c.values()) == N // PER_SHARD for c in kinds.values()), kinds
    nodes = {node for c in kinds.values() for node in c}
    assert len(nodes) >= 2 and None not in nodes, f"encode work by node: {kinds}"
    (out,) = (tmp_path / "enc" / "latents").iterdir()
    latent_keys = pq.read_table(out / "_index.parquet").column("key").to_pylist()
    assert sorted(latent_keys) == KEYS
    assert _tar_keys(out) == Counter(KEYS)


def test_train_two_ranks_under_ray_train(ray_multinode: MultiNodeCluster, sharded: GatedRun,  # noqa: F811
                                         tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from latentpipe.training.checkpoint import latest_complete

    work, log = tmp_path / "run", tmp_path / "train.log"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = _start(["train", str(ROOT / "configs/train_toy.yaml"), f"data.shards={sharded.out}", f"workdir={work}",
                   f"steps={TRAIN_STEPS}", "data.batch_size=4", "data.num_workers=0", "checkpoint.every_steps=0",
                   "eval_every=0", "sample_every=0", "log_keys=true", f"tracking.uri={uri}",
                   "tracking.experiment=multinode", "--launcher", "ray", "--nproc", "2"],
                  log, RAY_ADDRESS=ray_multinode.address)
    assert _finish(proc, log) == 0, _tail(log)

    # Two ranks, each in a Ray Train worker actor on its own node (every node has one CPU).
    actors = ray_multinode.actors(job_ids=ray_multinode.job_ids(driver_pid=proc.pid))
    workers = [a for a in actors if "TrainWorker" in a.class_name]
    assert len(workers) == 2 and len({a.node for a in workers}) == 2 and None not in {a.node for a in workers}, actors

    ckpt = latest_complete(work / "checkpoints")
    assert ckpt is not None and ckpt.step == TRAIN_STEPS and ckpt.state["world_size"] == 2
    # Data parallel (training/data.py's order): global step s is rank 0's slice then rank 1's, and
    # the global sample order walks one permutation of the dataset per epoch.
    slices: dict[tuple[int, int], list[str]] = {}
    for rank in (0, 1):
        (f,) = (work / "keys").glob(f"start-*-rank-{rank:05d}.jsonl")
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            slices[rec["step"], rank] = rec["keys"]
    assert sorted(slices) == [(s, r) for s in range(TRAIN_STEPS) for r in (0, 1)]
    order = [k for s in range(TRAIN_STEPS) for r in (0, 1) for k in slices[s, r]]
    assert len(order) == 4 * N  # 30 steps x 8 samples: four whole epochs
    assert all(sorted(order[e * N:(e + 1) * N]) == KEYS for e in range(4))

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("multinode")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    hist = sorted(client.get_metric_history(run.info.run_id, "loss/model"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, TRAIN_STEPS + 1))
    first, last = hist[:5], hist[-5:]
    assert sum(m.value for m in last) < 0.5 * sum(m.value for m in first), [m.value for m in hist]


def test_node_removed_mid_job_every_sample_once(ray_multinode: MultiNodeCluster,  # noqa: F811
                                                tmp_path: Path) -> None:
    """A 4th node runs a shard task when it is removed; the job ends complete, no sample twice."""
    ray_multinode.add_node("victim")
    run = _gated_shard_job(
        ray_multinode, tmp_path, "b",
        ready=lambda recs: any(r.node == "victim" and "RUNNING" in r.states for r in recs),
        act=lambda recs: ray_multinode.remove_node("victim"))
    assert "victim" not in ray_multinode.alive()
    assert run.rc == 0, _tail(run.log)
    on_victim = [r for r in run.tasks if r.node == "victim"]
    assert on_victim and all(r.final != "FINISHED" for r in on_victim), on_victim
    for lost in on_victim:  # each task the node was running finished in a later attempt elsewhere
        retries = [r for r in run.tasks if r.task_id == lost.task_id and r.attempt > lost.attempt]
        assert any(r.final == "FINISHED" and r.node not in (None, "victim") for r in retries), run.tasks
    finished = {r.task_id for r in run.tasks if r.final == "FINISHED"}
    assert len(finished) == N // PER_SHARD
    _assert_every_sample_once(run.out)
    assert not list(run.out.glob("*.tmp*")), "a killed attempt's partial tar was left behind"


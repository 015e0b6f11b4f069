"""A real multi-node Ray cluster on this machine for tests: ``ray.cluster_utils.Cluster``, 3 nodes.

Ray's own multi-node test cluster starts a head node and worker nodes as separate raylets
(their own object stores and worker pools) on one machine; jobs connect to it by address like
to any cluster, and ``remove_node`` kills a node's processes as a machine loss would.

The cluster lives in a helper process (``python -m tests.integration.cluster_fixtures serve``),
not in the pytest process: creating ``Node`` objects rebinds process-wide Ray globals (the
internal KV client) that a ``ray.init`` already made in the test process (the session
``ray_local`` fixture) relies on. The helper also sets ``RAY_TMPDIR`` to a private folder,
so the cluster's address file does not make other ``ray.init()`` calls on this machine join it.

Which node ran what comes from the task events the GCS keeps (attempt, node id, states); the
state API (``ray.util.state``) would need the dashboard, which this install (ray without the
``default`` extra) does not have. Each node carries a custom resource ``lp_node_<name>`` too.

    from tests.integration.cluster_fixtures import ray_multinode  # noqa: F401

    def test_x(ray_multinode):              # a MultiNodeCluster
        ray_multinode.address               # "ip:port" for ray.init / --ray-address / RAY_ADDRESS
        ray_multinode.add_node("extra")     # another 1-CPU node; .remove_node("extra") kills it
        ray_multinode.tasks(job_ids={...})  # TaskRecord per task attempt
        ray_multinode.job_ids(driver_pid=proc.pid)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAD = "head"
DEFAULT_NODES: dict[str, float] = {HEAD: 1.0, "w1": 1.0, "w2": 1.0}  # name -> CPUs; the first is the head
OBJECT_STORE = 100 * 1024 * 1024
START_TIMEOUT = 180.0


@dataclass(frozen=True)
class TaskRecord:
    """One attempt of one task (or actor task / actor creation) as the GCS recorded it."""

    task_id: str
    attempt: int
    job_id: str
    name: str           # e.g. "write_shard", "EncoderWorker.encode_shard"
    type: str           # NORMAL_TASK, ACTOR_CREATION_TASK, ACTOR_TASK, DRIVER_TASK
    node: str | None    # node name given at add_node (None if it never got a node)
    states: tuple[str, ...]  # in time order, e.g. (..., "RUNNING", "FINISHED")

    @property
    def final(self) -> str:
        return self.states[-1] if self.states else "UNKNOWN"


@dataclass(frozen=True)
class ActorRecord:
    actor_id: str
    class_name: str     # e.g. "RayTrainWorker"
    job_id: str
    node: str | None    # node name of its (last) worker process
    state: str          # ALIVE, DEAD, ...


class MultiNodeCluster:
    """Client of the helper process that owns a ``ray.cluster_utils.Cluster``."""

    def __init__(self, nodes: Mapping[str, float] = DEFAULT_NODES, log_dir: Path | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lpray-"))  # short: Ray's unix socket paths must fit 107 bytes
        self.log_path = (log_dir or self.tmp) / "cluster-helper.log"
        self._lock = threading.Lock()
        read_fd, write_fd = os.pipe()
        spec = json.dumps({"nodes": dict(nodes), "tmp": str(self.tmp)})
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.cluster_fixtures", "serve", spec, str(write_fd)],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r", encoding="utf-8")
        try:
            hello = self._reply(START_TIMEOUT)
        except BaseException:
            self.shutdown()
            raise
        self.address: str = hello["address"]
        self.node_ids: dict[str, str] = hello["nodes"]  # name -> node id (hex), every node ever added

    # -- protocol ----------------------------------------------------------------------------------

    def _reply(self, timeout: float) -> Any:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self._replies.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"cluster helper gave no answer within {timeout:.0f}s "
                               f"(exit code {self.proc.poll()}); log tail:\n{self.log_tail()}")
        msg = json.loads(result[0])
        if "error" in msg:
            raise RuntimeError(f"cluster helper: {msg['error']}")
        return msg["ok"]

    def _call(self, cmd: str, timeout: float = 120.0, **kw: Any) -> Any:
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None:
                raise RuntimeError(f"cluster helper is gone; log tail:\n{self.log_tail()}")
            self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
            self.proc.stdin.flush()
            return self._reply(timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- API ---------------------------------------------------------------------------------------

    def add_node(self, name: str, num_cpus: float = 1.0) -> str:
        """Start another worker node (custom resource ``lp_node_<name>``); returns its node id."""
        node_id: str = self._call("add", name=name, num_cpus=num_cpus)
        self.node_ids[name] = node_id
        return node_id

    def remove_node(self, name: str) -> None:
        """Kill every process of node ``name`` (its raylet, object store and workers)."""
        self._call("remove", name=name)

    def alive(self) -> list[str]:
        """Names of the nodes the GCS sees alive."""
        names: list[str] = self._call("alive")
        return names

    def job_ids(self, driver_pid: int | None = None) -> set[str]:
        """Job ids (hex) known to the GCS, or those whose driver process is ``driver_pid``."""
        jobs: list[dict[str, Any]] = self._call("jobs")
        return {j["job_id"] for j in jobs if driver_pid is None or j["driver_pid"] == driver_pid}

    def tasks(self, job_ids: set[str] | None = None, names: set[str] | None = None) -> list[TaskRecord]:
        """Task attempts from the GCS task events, optionally of some jobs and task names only."""
        by_id = {v: k for k, v in self.node_ids.items()}
        out = []
        for r in self._call("tasks"):
            if job_ids is not None and r["job_id"] not in job_ids:
                continue
            if names is not None and r["name"] not in names:
                continue
            node = by_id.get(r["node_id"], r["node_id"]) if r["node_id"] else None
            out.append(TaskRecord(r["task_id"], r["attempt"], r["job_id"], r["name"], r["type"], node,
                                  tuple(r["states"])))
        return out

    def actors(self, job_ids: set[str] | None = None) -> list[ActorRecord]:
        """Actors from the GCS actor table (dead ones included), optionally of some jobs only."""
        by_id = {v: k for k, v in self.node_ids.items()}
        return [ActorRecord(a["actor_id"], a["class_name"], a["job_id"], by_id.get(a["node_id"]), a["state"])
                for a in self._call("actors") if job_ids is None or a["job_id"] in job_ids]

    def shutdown(self) -> None:
        """Stop every node and the helper; SIGKILL the helper's process group if it hangs."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(b'{"cmd": "shutdown"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # Ray's reaper then stops the node processes
            self.proc.wait(timeout=30)
        finally:
            self._replies.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNodeCluster]:
    """A real 3-node Ray cluster (head, w1, w2: 1 CPU each), stopped at the end of the module."""
    cluster = MultiNodeCluster(log_dir=tmp_path_factory.mktemp("ray-multinode"))
    try:
        yield cluster
    finally:
        cluster.shutdown()


# ----------------------------------------------------------------------------------- the helper


def _task_records(cluster: Any) -> list[dict[str, Any]]:
    """Merge the GCS task events per (task, attempt) into plain dicts."""
    from ray.core.generated import common_pb2

    task_type: Any = getattr(common_pb2, "TaskType")  # noqa: B009 (protobuf enums the stubs lack)
    task_status: Any = getattr(common_pb2, "TaskStatus")  # noqa: B009
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for ev in cluster.global_state._get_all_task_events():
        key = (ev.task_id.hex(), int(ev.attempt_number))
        rec = merged.setdefault(key, {"task_id": key[0], "attempt": key[1], "job_id": ev.job_id.hex(),
                                      "name": "", "type": "", "node_id": "", "ts": {}})
        if ev.HasField("task_info"):
            rec["name"] = ev.task_info.name or rec["name"]
            rec["type"] = task_type.Name(ev.task_info.type)
        if ev.HasField("state_updates"):
            if ev.state_updates.node_id:
                rec["node_id"] = ev.state_updates.node_id.hex()
            for state, ts in ev.state_updates.state_ts_ns.items():
                rec["ts"][task_status.Name(state)] = int(ts)
    out = []
    for rec in merged.values():
        ts = rec.pop("ts")
        rec["states"] = sorted(ts, key=lambda s: ts[s])
        out.append(rec)
    return out


def serve(spec: Mapping[str, Any], reply_fd: int) -> None:
    """Start the cluster, then answer JSON commands from stdin until ``shutdown`` or EOF."""
    os.environ["RAY_TMPDIR"] = spec["tmp"]  # the address file and session dirs stay private
    from ray.cluster_utils import Cluster

    replies = os.fdopen(reply_fd, "w", encoding="utf-8")

    def reply(**msg: Any) -> None:
        replies.write(json.dumps(msg) + "\n")
        replies.flush()

    nodes_spec = dict(spec["nodes"])
    head_name, head_cpus = next(iter(nodes_spec.items()))
    started = time.monotonic()
    cluster: Any = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "resources": {f"lp_node_{head_name}": 1.0}, "include_dashboard": False,
        "object_store_memory": OBJECT_STORE})
    nodes: dict[str, Any] = {head_name: cluster.head_node}
    ids: dict[str, str] = {head_name: cluster.head_node.node_id}

    def add(name: str, cpus: float) -> str:
        if name in nodes:
            raise ValueError(f"node {name!r} exists")
        node = cluster.add_node(num_cpus=cpus, resources={f"lp_node_{name}": 1.0}, object_store_memory=OBJECT_STORE)
        nodes[name], ids[name] = node, node.node_id
        cluster.wait_for_nodes()
        return str(node.node_id)

    try:
        for name, cpus in list(nodes_spec.items())[1:]:
            add(name, cpus)
        print(f"cluster up at {cluster.address} in {time.monotonic() - started:.1f}s: {ids}", flush=True)
        reply(ok={"address": cluster.address, "nodes": ids})
        for line in sys.stdin:
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "shutdown":
                break
            try:
                if cmd == "add":
                    reply(ok=add(msg["name"], float(msg["num_cpus"])))
                elif cmd == "remove":
                    cluster.remove_node(nodes.pop(msg["name"]))
                    reply(ok=None)
                elif cmd == "alive":
                    live = set(cluster.global_state._live_node_ids())
                    reply(ok=[n for n, i in ids.items() if i in live])
                elif cmd == "jobs":
                    reply(ok=[{"job_id": j["JobID"], "driver_pid": j["DriverPid"], "dead": j["IsDead"]}
                              for j in cluster.global_state.job_table()])
                elif cmd == "tasks":
                    reply(ok=_task_records(cluster))
                elif cmd == "actors":
                    reply(ok=[{"actor_id": a["ActorID"], "class_name": a["ActorClassName"], "job_id": a["JobID"],
                               "node_id": a["Address"]["NodeID"], "state": a["State"]}
                              for a in cluster.global_state.actor_table(None).values()])
                else:
                    reply(error=f"unknown command {cmd!r}")
            except Exception as e:  # answered, so the test sees it; the cluster keeps running
                reply(error=f"{cmd}: {type(e).__name__}: {e}")
    finally:
        for name in [n for n in nodes if n != head_name]:
            cluster.remove_node(nodes.pop(name))
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node)
        print("cluster down", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "serve":
        print("usage: python -m tests.integration.cluster_fixtures serve SPEC_JSON REPLY_FD", file=sys.stderr)
        sys.exit(2)
    serve(json.loads(sys.argv[2]), int(sys.argv[3]))

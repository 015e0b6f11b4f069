"""A single-machine `latentpipe shard` (its own local Ray cluster: no --ray-address, no RAY_ADDRESS)
listens on loopback only: every listening TCP socket of the driver's process tree (the driver, the
GCS, the raylet, Ray's agents and workers) is on 127.0.0.1, checked while a shard task runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.http_fixture import ServerState, http_server
from tests.integration.process_tree import LOOPBACK, listening, tree

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
WAIT = 300.0  # a wait limit for a loaded machine, not a measured threshold


def test_local_shard_job_listens_on_loopback_only(tmp_path: Path) -> None:
    state = ServerState()
    with http_server(state) as (base, _):
        urls = [f"{base}/gate/g{i}.jpg" for i in range(4)]
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"url": u, "caption": f"c {i}"})
                                                    for i, u in enumerate(urls)) + "\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_USAGE_STATS_ENABLED="0")
        cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "shard", "--source", str(tmp_path / "t.jsonl"),
               "--out", str(tmp_path / "out"), "--samples-per-shard", "2", "image.size=32"]
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + WAIT
            while state.count("/gate/") == 0:  # a Ray worker is running a shard task now
                assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()[-3000:]  # type: ignore[union-attr]
                time.sleep(0.1)
            ports = listening(tree(driver.pid))
            names = {name for _, _, name in ports}
            assert {"gcs_server", "raylet"} <= names, ports  # Ray's servers are in the tree and were seen
            assert all(ip in LOOPBACK for ip, _, _ in ports), [p for p in ports if p[0] not in LOOPBACK]
        finally:
            state.gate.set()
        _, err = driver.communicate(timeout=WAIT)
        assert driver.returncode == 0, err.decode(errors="replace")[-3000:]

"""Tracking against real MLflow stores: a sqlite file and a real ``mlflow server`` that is killed.

The server tests share one server per module (starting one costs ~15 s); each test first
brings it to the state it needs (running, or killed). Faults are real: SIGKILL of the
server's process group. No timing thresholds: waits have generous limits and the checks
are on what arrived (every metric once, in order, with its original step and timestamp).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow  # imported up front: the tracker's threads import it lazily
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import latentpipe.training.families.toy  # noqa: F401  (registers "toy" without importing every family)
from latentpipe.training.export import save_export
from latentpipe.training.families import family_from_config
from latentpipe.training.tracking import (
    RUN_FILE,
    Tracker,
    TrackingConfig,
    check_db_driver,
    flatten_params,
    git_commit,
    replay_spool,
    resolve_uri,
)
from latentpipe.training.tracking import main as tracking_main
from latentpipe.training.tracking_spool import RUN_KEY_TAG, SPOOL_DIR
from tests.integration.mlflow_fixtures import MlflowServer, free_port, kill_when, migrated_sqlite

pytestmark = pytest.mark.integration

MODEL_CFG = {"channels": 4, "hidden": 8, "depth": 1}
LINEAGE = {"data_manifest_hash": "0123abcd", "encoder_versions": "vae=sd-vae@1;text=minilm@2"}
CONFIG = {"model": {"kind": "toy", **MODEL_CFG}, "train": {"lr": 1e-3, "betas": [0.9, 0.99], "steps": 30},
          "data": {"shards": "/data/images", "batch_size": 4}, "notes": "x" * 7000}


def client_for(uri: str) -> MlflowClient:
    """A client for one store; the registry too (else it follows mlflow's process-wide registry URI)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def wait_until(pred: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def make_export(root: Path) -> tuple[Path, torch.nn.Module]:
    module = family_from_config({"kind": "toy", **MODEL_CFG}).build_primary()
    return save_export(root / "export", "toy", MODEL_CFG, module.state_dict(), {"step": 30}), module


def red(step: int) -> Image.Image:
    return Image.new("RGB", (32, 16), (255, step % 256, 0))


def run_by_key(client: MlflowClient, experiment: str, key: str) -> mlflow.entities.Run:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, f"expected exactly one run with key {key}, found {len(runs)}"
    return runs[0]


def check_metric_history(client: MlflowClient, run_id: str, steps: int) -> list[mlflow.entities.Metric]:
    """Every step 0..steps-1 exactly once, with the value logged for it."""
    hist = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in hist] == list(range(steps))
    assert [m.value for m in hist] == [1.0 / (s + 1) for s in range(steps)]
    return hist


def check_model(client: MlflowClient, uri: str, name: str, alias: str, module: torch.nn.Module,
                run_id: str) -> None:
    mv = client.get_model_version_by_alias(name, alias)
    assert mv.run_id == run_id
    for k, v in LINEAGE.items():
        assert mv.tags[k] == v
    commit = git_commit()
    if commit is not None:  # in a git checkout the tracker adds the commit itself
        assert mv.tags["git_commit"] == commit
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    np.testing.assert_allclose(loaded.predict(x.numpy()), expected, rtol=1e-6, atol=1e-6)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}"))
    assert not list(local.rglob("*.pkl")), "nothing may be pickled in a registered model"
    assert (local / "artifacts" / "export" / "model.safetensors").is_file()


# ---- cheap checks (no store) ---------------------------------------------------------------

def test_inactive_tracker_is_a_noop(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    t = Tracker(TrackingConfig(), tmp_path, active=False)
    t.log_config(CONFIG)
    t.log_metrics({"loss": 1.0}, step=0)
    t.log_image(red(0), "grid", step=0)
    t.set_tags({"a": "b"})
    assert t.register_model(tmp_path / "nowhere", "m", {}, ["best"]) is None
    assert t.flush(0.0)
    t.close()
    assert t.run_id is None
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t not in before and t.name.startswith("tracking-")]


def test_params_flatten_to_dotted_keys_within_mlflow_limits() -> None:
    flat = flatten_params(CONFIG)
    assert flat["model.kind"] == "toy"
    assert flat["train.betas"] == "[0.9, 0.99]"
    assert flat["data.batch_size"] == "4"
    assert len(flat["notes"]) == 6000 and flat["notes"].endswith("[truncated; full value in config.yaml]")
    assert set(flatten_params({"bad key!": 1})) == {"bad key_"}


def test_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_uri(None, tmp_path) == "http://tracking.example:5000"
    assert resolve_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"


def test_a_database_store_without_its_driver_is_a_config_error(tmp_path: Path) -> None:
    """Not an 'outage' spooled for ever: plain postgresql:// means psycopg v3 under SQLAlchemy 2.1,
    which is not installed here (psycopg2 is)."""
    cfg = TrackingConfig(uri="postgresql://user@127.0.0.1:1/db")
    with pytest.raises(ValueError, match="database driver is not installed"):
        Tracker(cfg, tmp_path, active=True)
    check_db_driver("postgresql+psycopg2://user@127.0.0.1:1/db")  # psycopg2 is installed: no error


# ---- sqlite store --------------------------------------------------------------------------

def exercise(tracker: Tracker, export: Path, steps: int, name: str) -> str | None:
    tracker.log_config(CONFIG)
    tracker.set_tags(LINEAGE)
    for s in range(steps):
        tracker.log_metrics({"loss": 1.0 / (s + 1), "lr": 1e-3}, step=s)
    tracker.log_image(red(7), "samples/grid", step=7)
    return tracker.register_model(export, name, LINEAGE, aliases=["best", "latest"])  # latest: MLflow's own


def check_run(client: MlflowClient, run_id: str, steps: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "toy" and run.data.params["train.lr"] == "0.001"
    assert run.data.tags["data_manifest_hash"] == LINEAGE["data_manifest_hash"]
    check_metric_history(client, run_id, steps)
    cfg_file = Path(client.download_artifacts(run_id, "config.yaml"))
    assert "betas:" in cfg_file.read_text()
    png = Path(client.download_artifacts(run_id, "images/samples/grid_step00000007.png"))
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (32, 16) and img.getpixel((0, 0)) == (255, 7, 0)


def test_sqlite_store_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    export, module = make_export(tmp_path)
    work = tmp_path / "work"
    migrated_sqlite(work / "mlflow.db")  # an empty store where the default puts it (skips migrations)
    tracker = Tracker(TrackingConfig(run_name="sqlite-test"), work, active=True)

    version = exercise(tracker, export, steps=20, name="toy-sqlite")
    tracker.close()

    uri = f"sqlite:///{work.resolve()}/mlflow.db"
    assert tracker.uri == uri and version == "models:/toy-sqlite/1"
    client = client_for(uri)
    assert tracker.run_id is not None
    check_run(client, tracker.run_id, steps=20)
    assert client.get_run(tracker.run_id).info.run_name == "sqlite-test"
    check_model(client, uri, "toy-sqlite", "best", module, tracker.run_id)
    assert client.get_registered_model("toy-sqlite").aliases == {"best": 1}
    assert list((work / "mlartifacts").rglob("model.safetensors")), "artifacts live under <workdir>/mlartifacts"
    system = [k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/")]
    try:
        import psutil  # noqa: F401  (mlflow's system monitors need it)
    except ImportError:
        assert client.get_run(tracker.run_id).data.tags["latentpipe.system_metrics"].startswith("unavailable")
    else:
        assert "system/cpu_utilization_percentage" in system
    assert not list((work / SPOOL_DIR).glob("*.jsonl")), "a fully sent spool is removed"


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    cfg = TrackingConfig(uri=migrated_sqlite(tmp_path / "store.db"), system_metrics=False)
    first = Tracker(cfg, tmp_path / "work", active=True)
    first.log_params({"train": {"lr": 0.1}})
    for s in range(5):
        first.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
    first.close("KILLED")
    second = Tracker(cfg, tmp_path / "work", active=True, resume=True)
    second.log_params({"train": {"lr": 0.2, "warmup": 10}})  # MLflow params are immutable: lr is refused
    for s in range(5, 8):
        second.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
    second.close()
    fresh = Tracker(cfg, tmp_path / "work", active=True)  # not resuming: a new run
    fresh.close()

    assert first.run_id == second.run_id != fresh.run_id
    client = client_for(cfg.uri)
    check_metric_history(client, str(second.run_id), 8)
    run = client.get_run(str(second.run_id))
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.1", "train.warmup": "10"}  # the good param of the batch got in
    rejected = [json.loads(line) for line in (tmp_path / "work" / SPOOL_DIR / "rejected.jsonl").open()]
    assert [r["event"]["params"] for r in rejected] == [{"train.lr": "0.2"}]  # recorded, not silently lost
    assert json.loads((tmp_path / "work" / RUN_FILE).read_text())["run_id"] == fresh.run_id


def test_spool_rotates_once_sent_without_losing_or_doubling(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("latentpipe.training.tracking_sender.ROTATE_BYTES", 1500)  # a few dozen events per spool file
    cfg = TrackingConfig(uri=migrated_sqlite(tmp_path / "store.db"), system_metrics=False)
    tracker = Tracker(cfg, tmp_path, active=True)
    spool = tracker.spool_path
    assert spool is not None
    for s in range(60):
        tracker.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
        if s % 15 == 14:
            assert tracker.flush(timeout=60)
            assert wait_until(lambda: spool.stat().st_size < 1500)
    assert tracker.flush(timeout=60)
    assert '"step": 0,' not in spool.read_text(), "the sent events were cut from the spool"
    tracker.close()
    check_metric_history(client_for(str(cfg.uri)), str(tracker.run_id), 60)


def test_spool_from_an_unreachable_server_replays_once_into_another_store(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    export, module = make_export(tmp_path)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    work = tmp_path / "work"
    cfg = TrackingConfig(uri=down, system_metrics=False, experiment="offline")
    with caplog.at_level(logging.WARNING, logger="latentpipe.training.tracking"):
        tracker = Tracker(cfg, work, active=True)
        before = int(time.time() * 1000)
        assert exercise(tracker, export, steps=25, name="toy-offline") is None  # unreachable: None
        assert wait_until(lambda: tracker.online is False)
        tracker.close(timeout=1.0)
    assert tracker.run_id is None
    spool = work / SPOOL_DIR / f"{tracker.run_key}.jsonl"
    assert spool.is_file() and spool.stat().st_size > 0
    assert any("python -m latentpipe.training.tracking replay" in r.getMessage() for r in caplog.records)

    copy = tmp_path / "spool-copy"
    shutil.copytree(work / SPOOL_DIR, copy)
    store = migrated_sqlite(tmp_path / "other.db")
    assert tracking_main(["replay", str(spool), "--uri", store]) == 0  # python -m latentpipe.training.tracking replay
    sent = int(capsys.readouterr().out.split()[1])  # "replayed N events"
    assert sent > 25 and not spool.exists()
    # A crash between send and commit means the same events are sent again: nothing doubles.
    replay_spool(copy / spool.name, store)

    client = client_for(store)
    run = run_by_key(client, "offline", tracker.run_key)
    check_run(client, run.info.run_id, steps=25)
    hist = check_metric_history(client, run.info.run_id, 25)
    assert all(before <= m.timestamp <= int(time.time() * 1000) for m in hist)  # the original timestamps
    assert len(client.search_model_versions("name = 'toy-offline'")) == 1
    check_model(client, store, "toy-offline", "best", module, run.info.run_id)


CRASHING_JOB = """
import os, signal, sys, time
from pathlib import Path
from latentpipe.training.tracking import Tracker, TrackingConfig
work, uri = Path(sys.argv[1]), sys.argv[2]
tracker = Tracker(TrackingConfig(uri=uri, system_metrics=False, experiment="crashed"), work, active=True)
for s in range(50):
    tracker.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
spool = tracker.spool_path
while spool.read_bytes().count(b"\\n") < 51:  # the start event and 50 metric events are on disk
    time.sleep(0.01)
print(tracker.run_key, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(): the training process dies
"""


def test_spool_of_a_sigkilled_training_process_is_replayed(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-c", CRASHING_JOB, str(tmp_path), down], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_key = proc.stdout.strip()
    with open(tmp_path / SPOOL_DIR / f"{run_key}.jsonl", "ab") as f:
        f.write(b'{"op": "metrics", "metr')  # as if the kill had torn a write: cut off on replay

    store = migrated_sqlite(tmp_path / "store.db")
    assert replay_spool(tmp_path / SPOOL_DIR, store) == 51  # the dead process's lock is gone with it

    client = client_for(store)
    run = run_by_key(client, "crashed", run_key)
    check_metric_history(client, run.info.run_id, 50)
    assert run.info.status == "RUNNING"  # it never ended: MLflow shows it as it was left


# ---- a real mlflow server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv
    finally:
        srv.stop()


def test_server_run_roundtrip(server: MlflowServer, tmp_path: Path) -> None:
    server.start()
    export, module = make_export(tmp_path)
    tracker = Tracker(TrackingConfig(uri=server.uri, experiment="srv", system_metrics=False), tmp_path, active=True)
    version = exercise(tracker, export, steps=15, name="toy-server")
    tracker.close(timeout=120)

    assert version is not None and version.startswith("models:/toy-server/")
    client = client_for(server.uri)
    check_run(client, str(tracker.run_id), steps=15)
    check_model(client, server.uri, "toy-server", "best", module, str(tracker.run_id))


def test_server_killed_mid_run_then_restarted(server: MlflowServer, tmp_path: Path) -> None:
    server.start()
    export, module = make_export(tmp_path)
    cfg = TrackingConfig(uri=server.uri, experiment="killed", system_metrics=False)
    tracker = Tracker(cfg, tmp_path, active=True)
    tracker.log_config(CONFIG)
    for s in range(10):
        tracker.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
    reached = threading.Event()
    stopper = kill_when(server, reached.is_set)  # how a training test kills the server mid-run
    assert tracker.flush(timeout=120)  # reached the server while it was up
    spool = tracker.spool_path
    assert spool is not None

    reached.set()
    stopper.join(60)
    assert not server.running
    size_before = spool.stat().st_size
    for s in range(10, 40):  # each call returns while the server is dead
        tracker.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
    tracker.log_image(red(7), "samples/grid", step=7)
    tracker.set_tags(LINEAGE)
    assert wait_until(lambda: tracker.online is False)
    assert tracker.register_model(export, "toy-killed", LINEAGE, aliases=["best"]) is None
    assert not tracker.flush(timeout=1.0)
    assert spool.stat().st_size > size_before, "events spool to disk while the server is down"

    restarted_ms = int(time.time() * 1000)
    server.start()
    tracker.close(timeout=120)

    assert not spool.exists(), "everything was replayed"
    client = client_for(server.uri)
    hist = check_run_metrics_and_image(client, str(tracker.run_id), steps=40)
    assert all(m.timestamp < restarted_ms for m in hist[10:]), "replayed metrics keep their original timestamps"
    check_model(client, server.uri, "toy-killed", "best", module, str(tracker.run_id))


def check_run_metrics_and_image(client: MlflowClient, run_id: str, steps: int) -> list[mlflow.entities.Metric]:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "toy"
    assert run.data.tags["encoder_versions"] == LINEAGE["encoder_versions"]
    assert [a.path for a in client.list_artifacts(run_id, "images/samples")] == [
        "images/samples/grid_step00000007.png"]
    return check_metric_history(client, run_id, steps)


def test_server_down_from_the_start(server: MlflowServer, tmp_path: Path) -> None:
    server.start()
    # Killed from another process, as a harness around a training subprocess would.
    kill = [sys.executable, "-m", "tests.integration.mlflow_fixtures", "kill", str(server.pidfile)]
    subprocess.run(kill, check=True, timeout=120, cwd=Path(__file__).parents[2])
    assert wait_until(lambda: not server.running)
    export, module = make_export(tmp_path)
    cfg = TrackingConfig(uri=server.uri, experiment="late", system_metrics=False)
    first = Tracker(cfg, tmp_path, active=True)  # training starts although the server is down
    assert exercise(first, export, steps=12, name="toy-late") is None
    first.close(timeout=2.0)
    assert first.run_id is None and first.spool_path is not None and first.spool_path.exists()

    server.start()
    second = Tracker(cfg, tmp_path, active=True)  # the next job in this workdir replays the leftover
    second.log_metrics({"loss": 1.0}, step=0)
    second.close(timeout=120)

    assert not first.spool_path.exists()
    client = client_for(server.uri)
    run = run_by_key(client, "late", first.run_key)
    check_run(client, run.info.run_id, steps=12)
    check_model(client, server.uri, "toy-late", "best", module, run.info.run_id)
    assert client.get_run(str(second.run_id)).data.metrics["loss"] == 1.0

"""MLflow tracking that never stalls or crashes training.

A write-ahead log between the training loop and MLflow:

- ``log_*`` calls only put a small record on a bounded in-memory queue: no I/O, no network.
- A *spooler* thread (``training/tracking_spool.py``) appends the records to a JSONL spool
  under the workdir (``<workdir>/mlflow-spool/<run_key>.jsonl``); images are encoded,
  artifacts hard-linked (or copied), registered models saved and dataset records built next
  to it, so a spool is self-contained and survives a crash of the training process.
- A *sender* thread (``training/tracking_sender.py``) replays the spool in order to MLflow
  with short HTTP timeouts and no client retries (MLflow's own retry one call for minutes),
  committing a byte offset after each success. While the server is unreachable it backs off
  and the spool grows; when the server is back the spool drains in order and each metric
  keeps its step and timestamp.
- Replays are idempotent, so a crash between a send and its commit never duplicates anything.
- ``close()`` waits a bounded time; what is still unsent stays in the spool and is replayed
  by the next Tracker in the same workdir, or by ``replay_spool(path, uri)`` /
  ``python -m latentpipe.training.tracking replay PATH [--uri URI]``.

Registered models are MLflow 3 logged models of the run, pyfunc *models from code*
(``training/mlflow_model.py``) whose artifact is the export folder (safetensors +
export.json): nothing is pickled. A run's training data is its dataset input
(``training/tracking_data.py``). Only rank 0 tracks: ``Tracker(active=False)`` starts no
thread and every call returns at once.

Naming rule: a run is called ``tracking.run_name``, else what the job passes as its
``default_name`` (training: ``<family>/<preset> <workdir name>``); every run of one pipeline
(shard, encode, train, eval) goes to the experiment ``tracking.experiment`` (default
``latentpipe``).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from latentpipe.training.tracking_sender import Replayer, Sender, replay_spool
from latentpipe.training.tracking_spool import (
    RUN_KEY_TAG,
    SPOOL_DIR,
    Spool,
    SpoolWriter,
    TrackingUnavailable,
    fast_fail_http,
    import_mlflow,
    link_tree,
)

log = logging.getLogger(__name__)

RUN_FILE = "mlflow-run.json"  # <workdir>/mlflow-run.json: this workdir's run key, for --resume
SPOOL_GRACE_S = 30.0  # close() always lets the spooler put queued events on disk for this long
SENDER_GRACE_S = 2.0  # ... and the sender end its current attempt for this long
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LEN = 250  # MAX_ENTITY_KEY_LENGTH


@dataclass
class TrackingConfig:
    """The ``tracking:`` section of a training config."""

    uri: str | None = None          # None: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    experiment: str = "latentpipe"  # every run of one pipeline (shard, encode, train, eval) goes here
    run_name: str | None = None     # None: <family>/<preset> <workdir name>
    enabled: bool = True
    system_metrics: bool = True     # mlflow's CPU/memory/disk/network/GPU monitors as system/* metrics
    register_as: str | None = None  # registered model name for final/best exports
    http_timeout: int = 10          # seconds per HTTP request to a tracking server (0 client retries)
    retry_max_s: float = 30.0       # longest pause between attempts while the server is unreachable


def check_db_driver(uri: str) -> None:
    """A database store whose Python driver is missing is a config error now: left to the sender it
    would look like an outage and the run would be spooled for ever."""
    scheme = uri.split(":", 1)[0]
    if not scheme.startswith(("postgresql", "mysql", "mssql")):
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as e:
        raise ValueError(f"tracking.uri {scheme}://...: its database driver is not installed ({e}); install "
                         "it, or name one that is (postgresql+psycopg2://... with psycopg2-binary)") from None


def resolve_uri(uri: str | None, workdir: Path) -> str:
    """The tracking URI: config, else $MLFLOW_TRACKING_URI, else ``sqlite:///<workdir>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def default_run_name(model: Mapping[str, Any], workdir: Path) -> str:
    """``<family>/<preset> <workdir name>``, e.g. ``ddpm/unet_demo ddpm`` (preset: ``arch.preset``,
    ``backbone`` or ``net.arch``, left out when the config names none)."""
    def sub(key: str, name: str) -> Any:
        section = model.get(key)
        return section.get(name) if isinstance(section, Mapping) else None

    preset = sub("arch", "preset") or model.get("backbone") or sub("net", "arch")
    family = str(model.get("kind", "model"))
    return f"{family}/{preset} {Path(workdir).resolve().name}" if preset else f"{family} {Path(workdir).resolve().name}"


def _safe_key(key: str) -> str:
    """An MLflow-valid param/metric/tag key (alphanumerics, ``_-. /:``; <= 250 chars)."""
    return re.sub(r"[^\w./\- :]", "_", key)[:MAX_KEY_LEN]


def _param_value(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) > MAX_PARAM_LEN:
        marker = "...[truncated; full value in config.yaml]"
        text = text[: MAX_PARAM_LEN - len(marker)] + marker
    return text


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> ``{"a.b.c": "value"}`` (lists as JSON, values cut to MLflow's 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + "."))
        else:
            out[_safe_key(key)] = _param_value(v)
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class _SystemMetrics:
    """Samples mlflow's system monitors (CPU, memory, disk, network, NVIDIA/AMD GPUs) into the tracker."""

    def __init__(self, tracker: Tracker, interval: float) -> None:
        self.tracker, self.interval = tracker, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tracking-sysmetrics", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            import_mlflow()
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        except ImportError as e:  # mlflow's monitors need psutil
            log.info("system metrics unavailable: %s", e)
            self.tracker.set_tags({"latentpipe.system_metrics": f"unavailable: {e}"})
            return
        monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        with contextlib.suppress(Exception):
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            monitors.append(GPUMonitor())
        try:
            self._sample(monitors)
        except Exception as e:  # a failing monitor ends system metrics, never training
            log.warning("system metrics stopped: %s: %s", type(e).__name__, e)

    def _sample(self, monitors: list[Any]) -> None:
        step = 0
        while True:
            for m in monitors:
                m.collect_metrics()
            stopping = self._stop.wait(self.interval)
            if stopping:
                for m in monitors:
                    m.collect_metrics()
            values: dict[str, float] = {}
            for m in monitors:
                values.update({f"system/{k}": float(v) for k, v in m.aggregate_metrics().items()})
                m.clear_metrics()
            self.tracker.log_metrics(values, step)
            step += 1
            if stopping:
                return

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.thread.join(timeout)


class Tracker:
    """One MLflow run per job, logged from rank 0 without ever blocking or failing the step.

    ``Tracker(cfg, workdir, active=rank == 0)``; with ``resume=True`` a job restarted in the
    same workdir continues its MLflow run. Every method is a cheap no-op when inactive.
    """

    def __init__(self, cfg: TrackingConfig, workdir: Path, active: bool, *, resume: bool = False,
                 default_name: str | None = None) -> None:
        self.cfg, self.workdir = cfg, Path(workdir)
        self.active = bool(active and cfg.enabled)
        self.run_id: str | None = None
        self.uri: str | None = None
        self.spool_path: Path | None = None
        self._closed = False
        if not self.active:
            return
        self.uri = resolve_uri(cfg.uri, self.workdir)
        if self.uri.startswith(("http://", "https://")):
            fast_fail_http(cfg.http_timeout)
        check_db_driver(self.uri)
        spool_dir = self.workdir / SPOOL_DIR
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.run_key = self._run_key(resume)
        self._spool = Spool(spool_dir / f"{self.run_key}.jsonl")
        if not self._spool.try_lock():
            raise RuntimeError(f"{self._spool.path}: another tracker is logging this run in this workdir")
        self._spool.repair()
        state = self._spool.load_state()
        if state.get("uri") not in (None, self.uri):  # the old run lives in another store: start afresh
            state = {"offset": state.get("offset", 0)}
        self._spool.save_state({**state, "uri": self.uri, "run_key": self.run_key})
        self.spool_path = self._spool.path
        self.git_commit = git_commit()

        self._cond = threading.Condition()
        spool_lock = threading.Lock()
        self._results: dict[str, str | None] = {}
        self._replayer = Replayer(self._spool, self.uri, self._on_run, self._on_register)
        self._sender = Sender(self._spool, self._replayer, self.uri, cfg.retry_max_s, self._cond, spool_lock)
        self._writer = SpoolWriter(self._spool, self._cond, spool_lock, self._sender.wake.set, self._replayer.reject)

        tags = {RUN_KEY_TAG: self.run_key, "mlflow.source.type": "LOCAL", "latentpipe.host": socket.gethostname(),
                "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"}
        with contextlib.suppress(Exception):
            tags["mlflow.user"] = getpass.getuser()
        if self.git_commit:
            tags.update({"mlflow.source.git.commit": self.git_commit, "git_commit": self.git_commit})
        self._put({"op": "start", "run_key": self.run_key, "experiment": cfg.experiment,
                   "run_name": cfg.run_name or default_name, "tags": tags, "start_time": _now_ms()})
        self._writer.start()
        self._sender.start()
        env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower()
        self._sysmon = None
        if cfg.system_metrics and env not in ("false", "0"):
            interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10.0)
            self._sysmon = _SystemMetrics(self, interval)

    # ---- the public, never-blocking API -------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts are flattened to dotted keys; values are cut to MLflow's 6000 chars."""
        if self.active:
            self._put({"op": "params", "params": flatten_params(params)})

    def log_config(self, cfg_dict: Mapping[str, Any]) -> None:
        """The resolved config as params and as the ``config.yaml`` artifact."""
        if not self.active:
            return
        self.log_params(cfg_dict)
        text = yaml.safe_dump(json.loads(json.dumps(dict(cfg_dict), default=str)), sort_keys=False)
        self._put({"op": "artifact", "artifact_path": None}, ("text", "config.yaml", text))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` with the current time; never blocks (drops, counted, if full)."""
        if self.active:
            self._put({"op": "metrics", "metrics": {_safe_key(k): float(v) for k, v in metrics.items()},
                       "step": int(step), "timestamp": _now_ms()})

    def log_image(self, image: Image.Image, name: str, step: int | None = None) -> None:
        """A PNG artifact under ``images/`` named ``<name>[_step00000123].png``."""
        if not self.active:
            return
        parts = [re.sub(r"[^\w.\-]", "_", p) for p in name.split("/") if p not in ("", ".", "..")]
        stem = parts[-1] if parts else "image"
        file = f"{stem}_step{step:08d}.png" if step is not None else f"{stem}.png"
        self._put({"op": "artifact", "artifact_path": "/".join(["images", *parts[:-1]])},
                  ("image", file, image.copy()))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or folder, snapshotted now (hard links, else a copy in the background)."""
        if not self.active:
            return
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"no such artifact: {src}")
        rel = f"{uuid.uuid4().hex}/{src.name}"
        try:
            link_tree(src, self._spool.files / rel)
            payload: Any = None
        except OSError:
            payload = ("copy", rel, src)
        self._put({"op": "artifact", "artifact_path": artifact_path, "file": rel}, payload)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            self._put({"op": "tags", "tags": {_safe_key(k): str(v)[:8000] for k, v in tags.items()}})

    def log_input(self, root: str, manifest: Mapping[str, Any] | None, fingerprint: str | None = None,
                  num_samples: int | None = None, context: str = "training") -> None:
        """The shard folder ``root`` as a dataset input of the run (``training/tracking_data.py``).

        Digest: the manifest's hash, or ``fingerprint`` for a folder without a manifest.
        """
        if self.active:
            self._put({"op": "input", "context": context},
                      ("dataset", str(root), dict(manifest or {}), fingerprint, num_samples))

    def register_model(self, export_dir: Path, name: str, tags: Mapping[str, str],
                       aliases: Sequence[str] = (), timeout: float = 600.0) -> str | None:
        """Log an export folder as a logged model of the run (pyfunc from code) and register it as a
        new version of ``name`` with ``aliases``.

        The logged model is named by the first alias, output of the run at ``tags["step"]``, with
        the run's latest metrics linked; its ``model_type`` is the export's family. Lineage
        ``tags`` (data manifest hash, encoder versions, ...) get ``git_commit`` added and go on
        both the logged model and the version.
        The alias "latest" needs no setting: ``models:/<name>/latest`` is MLflow's newest version.
        Returns ``models:/<name>/<version>`` once registered, or None when the store is
        unreachable (or slower than ``timeout``): the registration then stays spooled and is
        done on replay.
        """
        if not self.active or self._closed:
            return None
        src = Path(export_dir)
        for f in ("export.json", "model.safetensors"):
            if not (src / f).is_file():
                raise FileNotFoundError(f"not an export folder (no {f}): {src}")
        # "latest" is MLflow's own reserved pointer (models:/<name>/latest is always the newest version):
        # nothing to set. Other aliases follow MLflow's rules.
        aliases = [a for a in aliases if a.lower() != "latest"]
        for a in aliases:
            if not re.fullmatch(r"[\w\-]+", a) or re.fullmatch(r"[vV]\d+", a):
                raise ValueError(f"invalid model alias {a!r} (letters, digits, _ and -; not v<N>)")
        key = f"{self.run_key}-{uuid.uuid4().hex[:12]}"
        label = f"{aliases[0] if aliases else 'model'}-{key[-12:]}"
        link_tree(src, self._spool.files / key / "export")
        all_tags = {**{str(k): str(v) for k, v in tags.items()}, RUN_KEY_TAG: self.run_key}
        if self.git_commit:
            all_tags.setdefault("git_commit", self.git_commit)
        family = json.loads((src / "export.json").read_text(encoding="utf-8")).get("family")
        self._put({"op": "register", "key": key, "name": name, "tags": all_tags, "aliases": list(aliases),
                   "label": label, "model_dir": f"{key}/model", "family": family, "step": tags.get("step")},
                  ("model", key, self.git_commit))
        if self._sender.online is False:  # known unreachable: registered on replay
            return None
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._results:
                left = deadline - time.monotonic()
                if self._sender.online is False or left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
            return self._results.pop(key)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to ``timeout`` s until everything logged so far reached MLflow; True if it did."""
        if not self.active:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._writer.n_put
        self._sender.nudge()
        with self._cond:
            while not (self._writer.n_written >= target and not self._replayer.pending()):
                left = deadline - time.monotonic()
                if left <= 0 or not self._sender.thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    @property
    def online(self) -> bool | None:
        """Whether the last attempt to reach MLflow worked (None before the first)."""
        return self._sender.online if self.active else None

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """End the run: send what is spooled within ``timeout`` s, else leave it on disk and say how to replay.

        Queued events are first written to the spool (local disk; allowed SPOOL_GRACE_S even
        past ``timeout``), so nothing logged is lost when the server is down.
        """
        if not self.active or self._closed:
            return
        deadline = time.monotonic() + timeout
        if self._sysmon is not None:
            self._sysmon.stop(max(0.0, min(5.0, deadline - time.monotonic())))
        if self._writer.dropped:
            log.warning("tracking: %d events were dropped because the queue was full", self._writer.dropped)
            self.set_tags({"latentpipe.tracking_dropped_events": self._writer.dropped})
        self._put({"op": "end", "status": status, "end_time": _now_ms()})
        self._closed = True
        # Writing the spool is local disk work and losing it loses data: it gets at least SPOOL_GRACE_S.
        self._writer.finish(max(SPOOL_GRACE_S, deadline - time.monotonic()))
        self._sender.closing = True
        sent = self.flush(max(0.0, deadline - time.monotonic()))
        self._sender.stop.set()
        self._sender.nudge()
        # A short grace past the deadline lets a quick last attempt end; a hung one releases the spool on exit.
        self._sender.thread.join(max(SENDER_GRACE_S, deadline - time.monotonic()))
        with self._cond:
            release = self._sender.done and not self._writer.thread.is_alive()
            self._sender.abandoned = not release
        if sent and release:
            self._spool.remove()
            return
        pending = self._spool.size() - int(self._replayer.state["offset"])
        log.warning(
            "MLflow tracking at %s was not reachable before close: %d bytes of tracking events (metrics, "
            "params, images, model registrations) are kept in %s. The next run in %s replays them "
            "automatically; to replay them now: python -m latentpipe.training.tracking replay %s --uri %s",
            self.uri, pending, self._spool.path, self.workdir, self._spool.path, self.uri)
        if release:
            self._spool.unlock()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    # ---- internals ---------------------------------------------------------------------
    def _run_key(self, resume: bool) -> str:
        run_file = self.workdir / RUN_FILE
        if resume and run_file.exists():
            info = json.loads(run_file.read_text(encoding="utf-8"))
            if info.get("uri") == self.uri and info.get("experiment") == self.cfg.experiment:
                return str(info["run_key"])
        key = uuid.uuid4().hex
        self._write_run_file({"run_key": key, "uri": self.uri, "experiment": self.cfg.experiment, "run_id": None})
        return key

    def _write_run_file(self, info: Mapping[str, Any]) -> None:
        tmp = self.workdir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.replace(tmp, self.workdir / RUN_FILE)

    def _on_run(self, run_id: str) -> None:
        self.run_id = run_id
        self._write_run_file({"run_key": self.run_key, "uri": self.uri, "experiment": self.cfg.experiment,
                              "run_id": run_id})

    def _on_register(self, key: str, uri: str | None) -> None:
        with self._cond:
            self._results[key] = uri
            self._cond.notify_all()

    def _put(self, event: dict[str, Any], payload: Any = None) -> None:
        if self._closed:
            log.warning("tracking: %s after close() ignored", event.get("op"))
            return
        self._writer.put(event, payload)


def _now_ms() -> int:
    return int(time.time() * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m latentpipe.training.tracking replay PATH [--uri URI]``."""
    p = argparse.ArgumentParser(prog="python -m latentpipe.training.tracking", description="Replay MLflow tracking spools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="send a spool left on disk to MLflow")
    r.add_argument("path", help="a <run_key>.jsonl spool, or a workdir's mlflow-spool/ folder")
    r.add_argument("--uri", default=None, help="tracking URI (default: the one the spool was written for)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        n = replay_spool(args.path, args.uri)
    except (TrackingUnavailable, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"replayed {n} events")
    return 0


__all__ = ["Tracker", "TrackingConfig", "TrackingUnavailable", "default_run_name", "flatten_params", "git_commit", "main",
           "replay_spool", "resolve_uri"]


if __name__ == "__main__":
    sys.exit(main())

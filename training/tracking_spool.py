"""The tracking spool: a JSONL write-ahead log of MLflow events and its idempotent, in-order replay.

A spool is ``<workdir>/mlflow-spool/<run_key>.jsonl`` (one event per line: start, params,
metrics, tags, artifact, register, end), ``<run_key>.state.json`` (the byte offset sent so
far, the run id and the URI), ``<run_key>.files/`` (images, artifact snapshots, saved
models) and ``<run_key>.lock`` (held by the process writing or replaying it). It is
self-contained: copy it anywhere and ``replay_spool(path, uri)`` it.

Replaying is idempotent, so a crash between a send and its commit never duplicates: runs
are looked up by a client-side run key tag before they are created, SQL stores ignore a
metric equal in (key, step, timestamp, value) to one they hold, params, tags and artifacts
are rewritten with equal values, and model versions carry a registration key tag. Events
the store refuses for good (invalid values) go to ``rejected.jsonl`` with the reason.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow-spool"
REJECTED_FILE = "rejected.jsonl"  # events the store refused for good (bad values), with the reason
RUN_KEY_TAG = "latentpipe.run_key"
REGISTER_KEY_TAG = "latentpipe.register_key"
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "INVALID_STATE", "BAD_REQUEST"}
_IMPORT_LOCK = threading.Lock()


def import_mlflow() -> None:
    """Import mlflow (and the parts the trackers use) once, under a lock.

    The tracker's threads would otherwise import it concurrently, and mlflow's circular
    package imports then fail with "partially initialized module".
    """
    with _IMPORT_LOCK:
        import mlflow  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
        from mlflow import MlflowClient  # noqa: F401


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached (or failed transiently); the events stay spooled."""


class Rejected(ValueError):
    """An event that no retry can make the store accept."""


def artifact_location(uri: str) -> str | None:
    """For a sqlite store: ``<folder of the db>/mlartifacts``; other stores choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def fast_fail_http(timeout: int) -> None:
    """Short timeouts and no retries for MLflow's HTTP client; the spool is the retry layer.

    MLflow reads these per request, process-wide; values already set in the environment win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout)))


def link_tree(src: Path, dst: Path) -> None:
    """Snapshot ``src`` (file or folder) at ``dst`` with hard links; copies where links fail."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


class Spool:
    """One run's spool: ``X.jsonl`` events, ``X.state.json`` replay state, ``X.files/``, ``X.lock``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_suffix(".state.json")
        self.files = self.path.with_suffix(".files")
        self.lock_path = self.path.with_suffix(".lock")
        self._lock_fd: int | None = None

    def try_lock(self) -> bool:
        """Take the spool's exclusive lock (held by its live tracker or replayer); False if taken."""
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            state: dict[str, Any] = json.loads(self.state_path.read_text(encoding="utf-8"))
            return state
        return {"offset": 0}

    def save_state(self, state: Mapping[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def repair(self) -> None:
        """Cut a partial last line (the process died mid-write); that event was never complete."""
        size = self.size()
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            cut, pos = 0, size
            while pos > 0:  # back to the end of the last complete line (lines can be long: params)
                start = max(0, pos - 65536)
                f.seek(start)
                i = f.read(pos - start).rfind(b"\n")
                if i >= 0:
                    cut = start + i + 1
                    break
                pos = start
            log.warning("%s: dropping a partial last line (%d bytes) written by a crashed process",
                        self.path, size - cut)
            f.truncate(cut)

    def read(self, offset: int, limit: int) -> list[tuple[dict[str, Any], int]]:
        """Up to ``limit`` complete events from byte ``offset``: [(event, offset after it)]."""
        out: list[tuple[dict[str, Any], int]] = []
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            f.seek(offset)
            while len(out) < limit:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"op": "corrupt", "line": line.decode("utf-8", "replace")}
                out.append((event, offset))
        return out

    def remove(self) -> None:
        """Delete the spool (everything in it was sent) and release its lock."""
        for p in (self.path, self.state_path):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        self.unlock()


def units(items: Sequence[tuple[dict[str, Any], int]]) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Group consecutive metrics/params/tags events into log_batch-sized units; others go alone."""
    unit: list[dict[str, Any]] = []
    count, end = 0, 0
    for event, offset in items:
        op = event.get("op", "")
        size = len(event.get(op, {})) if op in BATCH_LIMITS else 0
        if unit and (op != unit[0].get("op") or op not in BATCH_LIMITS or count + size > BATCH_LIMITS[op]):
            yield unit, end
            unit, count = [], 0
        unit.append(event)
        count += size
        end = offset
    if unit:
        yield unit, end


def chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


class Replayer:
    """Applies a spool's events in order to one MLflow store, committing its offset after each unit."""

    def __init__(self, spool: Spool, uri: str, on_run: Any = None, on_register: Any = None) -> None:
        self.spool, self.uri = spool, uri
        self.state = spool.load_state()
        self.on_run, self.on_register = on_run, on_register
        self.rejected = 0
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import_mlflow()
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def pending(self) -> bool:
        return int(self.state["offset"]) < self.spool.size()

    def step(self, limit: int = 2000) -> int:
        """Send up to ``limit`` events; the number done. Raises TrackingUnavailable (offset kept)."""
        items = self.spool.read(int(self.state["offset"]), limit)
        for events, end in units(items):
            try:
                self._apply_unit(events)
            except Exception as e:
                raise TrackingUnavailable(f"{type(e).__name__}: {e}") from e
            self.state["offset"] = end
            self.spool.save_state(self.state)
        return len(items)

    def _apply_unit(self, events: list[dict[str, Any]]) -> None:
        try:
            self._apply(events)
        except Exception as e:
            if not is_permanent(e):
                raise
            if len(events) == 1 and not (events[0].get("op") == "params" and len(events[0]["params"]) > 1):
                self.reject(events[0], e)
                return
            for event in events:  # isolate the refused event (or param) from the good ones
                parts = ([{**event, "params": {k: v}} for k, v in event["params"].items()]
                         if event.get("op") == "params" else [event])
                for part in parts:
                    try:
                        self._apply([part])
                    except Exception as e2:
                        if not is_permanent(e2):
                            raise
                        self.reject(part, e2)

    def reject(self, event: dict[str, Any], err: BaseException) -> None:
        self.rejected += 1
        if self.rejected & (self.rejected - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: said, not flooded
            log.warning("MLflow refused %d tracking event(s) for good, latest %s: %s; all are recorded in %s",
                        self.rejected, event.get("op"), err, self.spool.path.parent / REJECTED_FILE)
        with open(self.spool.path.parent / REJECTED_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run_key": self.spool.path.stem, "error": str(err), "event": event}) + "\n")
        if event.get("op") == "register" and self.on_register:
            self.on_register(event["key"], None)

    def _run(self) -> str:
        run_id = self.state.get("run_id")
        if not run_id:
            raise Rejected("no MLflow run: the spool's start event was refused or is missing")
        return str(run_id)

    def _apply(self, events: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op = events[0].get("op")
        c = self.client
        if op == "metrics":
            metrics = [Metric(k, float(v), int(e["timestamp"]), int(e["step"]))
                       for e in events for k, v in e["metrics"].items()]
            for chunk in chunks(metrics, BATCH_LIMITS["metrics"]):
                c.log_batch(self._run(), metrics=chunk)
        elif op == "params":
            params = [Param(k, v) for e in events for k, v in e["params"].items()]
            for chunk in chunks(params, BATCH_LIMITS["params"]):
                c.log_batch(self._run(), params=chunk)
        elif op == "tags":
            tags = [RunTag(k, v) for e in events for k, v in e["tags"].items()]
            for chunk in chunks(tags, BATCH_LIMITS["tags"]):
                c.log_batch(self._run(), tags=chunk)
        elif op == "start":
            self._start(events[0])
        elif op == "artifact":
            src = self.spool.files / events[0]["file"]
            if src.exists():  # else: sent before a crash that came before its commit
                (c.log_artifacts if src.is_dir() else c.log_artifact)(self._run(), str(src),
                                                                      events[0].get("artifact_path"))
                shutil.rmtree(src.parent, ignore_errors=True)
        elif op == "register":
            self._register(events[0])
        elif op == "end":
            c.set_terminated(self._run(), status=events[0]["status"], end_time=events[0]["end_time"])
        else:
            raise Rejected(f"unknown or corrupt spool event {events[0]!r:.200}")

    def _start(self, ev: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        c = self.client
        exp = c.get_experiment_by_name(ev["experiment"])
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise Rejected(f"experiment {ev['experiment']!r} is deleted: restore it or name another")
        if exp is None:
            try:
                exp_id = c.create_experiment(ev["experiment"], artifact_location=artifact_location(self.uri))
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = c.get_experiment_by_name(ev["experiment"]).experiment_id
        else:
            exp_id = exp.experiment_id
        found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{ev['run_key']}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                c.update_run(run_id, status="RUNNING")  # a resumed job continues its run
        else:
            run_id = c.create_run(exp_id, start_time=ev["start_time"], tags=ev["tags"],
                                  run_name=ev.get("run_name")).info.run_id
        self.state.update(run_id=run_id, experiment_id=exp_id)
        if self.on_run:
            self.on_run(run_id)

    def _register(self, ev: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        c, run_id, name = self.client, self._run(), ev["name"]
        found = [mv for mv in c.search_model_versions(f"run_id = '{run_id}'")
                 if mv.name == name and mv.tags.get(REGISTER_KEY_TAG) == ev["key"]]
        if found:
            mv = found[0]
        else:
            model_dir = self.spool.files / ev["model_dir"]
            if not model_dir.is_dir():
                raise Rejected(f"saved model missing from the spool: {model_dir}")
            artifact_path = f"models/{ev['label']}"
            c.log_artifacts(run_id, str(model_dir), artifact_path)
            try:
                c.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = c.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                        tags={**ev["tags"], REGISTER_KEY_TAG: ev["key"]})
        for alias in ev["aliases"]:
            c.set_registered_model_alias(name, alias, mv.version)
        shutil.rmtree((self.spool.files / ev["model_dir"]).parent, ignore_errors=True)
        if self.on_register:
            self.on_register(ev["key"], f"models:/{name}/{mv.version}")


def is_permanent(err: BaseException) -> bool:
    if isinstance(err, Rejected):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(err, MlflowException) and err.error_code in PERMANENT_ERRORS


def drain(spool: Spool, uri: str) -> int:
    """Send everything in ``spool`` (locked by the caller) to ``uri``; remove it when done."""
    state = spool.load_state()
    if state.get("run_id") and state.get("uri") not in (None, uri):
        raise ValueError(f"{spool.path}: its run was created in {state['uri']}, not {uri}; "
                         "replay it there (the run id only exists in that store)")
    spool.repair()
    replayer = Replayer(spool, uri)
    done = 0
    while n := replayer.step():
        done += n
    spool.remove()
    return done


def replay_spool(path: str | Path, uri: str | None = None) -> int:
    """Send a spool left on disk (a ``.jsonl`` file, or a ``mlflow-spool`` folder) to MLflow, in order.

    ``uri`` defaults to the one the spool was written for. Returns the number of events sent.
    Raises TrackingUnavailable if the store is still unreachable (the spool is kept; retry later).
    """
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    files = [f for f in files if f.name != REJECTED_FILE]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no spool (*.jsonl) at {path}")
    total = 0
    for f in files:
        spool = Spool(f)
        if not spool.try_lock():
            raise RuntimeError(f"{f} is in use by a running tracker")
        try:
            target = uri or spool.load_state().get("uri")
            if not target:
                raise ValueError(f"{f}: no tracking URI recorded; pass one")
            if target.startswith(("http://", "https://")):
                fast_fail_http(10)
            total += drain(spool, target)
        finally:
            spool.unlock()
    return total


__all__ = ["REJECTED_FILE", "RUN_KEY_TAG", "SPOOL_DIR", "Spool", "TrackingUnavailable", "replay_spool"]

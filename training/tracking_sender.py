"""The tracking sender: replays a spool to MLflow in order, idempotently, on its own thread.

``Replayer`` applies a spool's events (``training/tracking_spool.py``) to one MLflow store and
commits its byte offset after each unit; ``Sender`` is the tracker's thread that runs it while
training goes on, backing off (up to ``retry_max_s``) while the store is unreachable and
emptying the spool file once everything in it was sent. ``drain`` / ``replay_spool`` send a
spool left on disk by a crashed or offline run.

Replaying is idempotent, so a crash between a send and its commit never duplicates: runs
are looked up by a client-side run key tag before they are created, SQL stores ignore a
metric equal in (key, step, timestamp, value) to one they hold, params, tags, artifacts and
dataset inputs are rewritten with equal values, and logged models and model versions carry a
registration key tag. Events the store refuses for good go to ``rejected.jsonl`` with the reason.

A registration becomes an MLflow 3 *logged model* of the run (its artifacts: the pyfunc model
from code, its linked metrics: the run's latest values) and a registered version made from
it (``models:/<model_id>``), so the run's "Logged models", the model page and the registry agree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from latentpipe.training.tracking_spool import (
    REGISTER_KEY_TAG,
    REJECTED_FILE,
    RUN_KEY_TAG,
    Rejected,
    Spool,
    TrackingUnavailable,
    fast_fail_http,
    import_mlflow,
)

log = logging.getLogger("latentpipe.training.tracking")

BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "INVALID_STATE", "BAD_REQUEST"}
ROTATE_BYTES = 8 << 20
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS


def artifact_location(uri: str) -> str | None:
    """For a sqlite store: ``<folder of the db>/mlartifacts``; other stores choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


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
        elif op == "input":
            from latentpipe.training.tracking_data import dataset_input

            c.log_inputs(self._run(), datasets=[dataset_input(events[0]["dataset"], events[0]["context"])])
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
            model = self._logged_model(ev, run_id)
            try:
                c.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # The source is the logged model's storage (a "models:/<model_id>" source would be resolved
            # by the store against MLflow's process-wide tracking URI, not this client's).
            mv = c.create_model_version(name, model.artifact_location, run_id=run_id, model_id=model.model_id,
                                        tags={**ev["tags"], REGISTER_KEY_TAG: ev["key"]})
            versions = json.loads(model.tags.get(MODEL_VERSIONS_TAG) or "[]")
            versions.append({"name": name, "version": mv.version})
            c.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
        for alias in ev["aliases"]:
            c.set_registered_model_alias(name, alias, mv.version)
        shutil.rmtree((self.spool.files / ev["model_dir"]).parent, ignore_errors=True)
        if self.on_register:
            self.on_register(ev["key"], f"models:/{name}/{mv.version}")

    def _logged_model(self, ev: dict[str, Any], run_id: str) -> Any:
        """The run's logged model for this registration (found by its key, else created).

        Artifacts: the saved pyfunc model. Linked metrics: the run's latest value of each metric
        (system metrics aside), with their own step and timestamp. An output of the run at ``step``.
        """
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

        c = self.client
        exp_id = str(self.state.get("experiment_id") or c.get_run(run_id).info.experiment_id)
        found = c.search_logged_models([exp_id], filter_string=f"tags.`{REGISTER_KEY_TAG}` = '{ev['key']}'")
        if found and found[0].status == LoggedModelStatus.READY:  # created, filled and linked before a crash
            return found[0]
        model_dir = self.spool.files / ev["model_dir"]
        if not model_dir.is_dir():
            raise Rejected(f"saved model missing from the spool: {model_dir}")
        if found:
            model = found[0]
        else:
            name = ev["aliases"][0] if ev["aliases"] else "model"
            model = c.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type=ev.get("family"),
                                          tags={**ev["tags"], REGISTER_KEY_TAG: ev["key"]})
        c.log_model_artifacts(model.model_id, str(model_dir))
        step = int(ev.get("step") or 0)
        latest = [m for m in c.get_run(run_id).data._metric_objs if not m.key.startswith("system/")]
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id) for m in latest]
        for chunk in chunks(linked, BATCH_LIMITS["metrics"]):
            c.log_batch(run_id, metrics=chunk)
        c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return c.finalize_logged_model(model.model_id, "READY")


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


class Sender:
    """The tracker's sender thread: runs a ``Replayer`` while training goes on.

    It wakes when the spooler wrote events (``wake``), retries an unreachable store with a
    doubling pause up to ``retry_max_s`` (``kick`` cuts a pause short), replays spools left
    in the same folder by earlier runs once, and empties the spool file once everything in it
    was sent and it grew past ROTATE_BYTES. ``cond`` is the tracker's condition: it is notified
    after each attempt, and guards ``done``/``abandoned``.
    """

    def __init__(self, spool: Spool, replayer: Replayer, uri: str, retry_max_s: float,
                 cond: threading.Condition, spool_lock: threading.Lock) -> None:
        self.spool, self.replayer, self.uri, self.retry_max_s = spool, replayer, uri, retry_max_s
        self.cond, self.spool_lock = cond, spool_lock
        self.wake, self.kick, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.closing = self.abandoned = self.done = False
        self.online: bool | None = None
        self._last_warning = 0.0
        self.thread = threading.Thread(target=self._loop, name="tracking-sender", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def nudge(self) -> None:
        """Try now: end a back-off pause and an idle wait."""
        self.kick.set()
        self.wake.set()

    def _loop(self) -> None:
        try:
            self._send()
        finally:
            with self.cond:
                self.done = True
                if self.abandoned:  # close() stopped waiting for this thread: release the spool now
                    self.spool.unlock()

    def _send(self) -> None:
        self._replay_leftovers()
        backoff = 1.0
        while True:
            self.wake.clear()
            try:
                n = self.replayer.step()
            except TrackingUnavailable as e:
                self._set_online(False, e)
                if self.stop.is_set():
                    return
                self.kick.wait(0.5 if self.closing else backoff)
                self.kick.clear()
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            if n:
                self._set_online(True)
                backoff = 1.0
            with self.cond:
                self.cond.notify_all()
            if n == 0:
                if self.stop.is_set():
                    return
                try:
                    self._maybe_rotate()
                except OSError as e:
                    log.warning("tracking: could not rotate %s: %s", self.spool.path, e)
                self.wake.wait(1.0)

    def _set_online(self, ok: bool, err: BaseException | None = None) -> None:
        with self.cond:
            before, self.online = self.online, ok
            self.cond.notify_all()
        now = time.monotonic()
        if not ok and (before is not False or now - self._last_warning > 300):
            self._last_warning = now
            log.warning("MLflow tracking at %s unreachable (%s); training goes on, events are spooled to %s "
                        "and sent when it is back", self.uri, err, self.spool.path)
        elif ok and before is False:
            log.warning("MLflow tracking at %s reachable again; sending the spooled events", self.uri)

    def _maybe_rotate(self) -> None:
        """Empty the spool file once everything in it was sent and it grew past ROTATE_BYTES."""
        with self.spool_lock:
            size = self.spool.size()
            if size >= ROTATE_BYTES and int(self.replayer.state["offset"]) == size:
                self.replayer.state["offset"] = 0
                self.spool.save_state(self.replayer.state)  # before the cut: a crash in between only resends
                os.truncate(self.spool.path, 0)

    def _replay_leftovers(self) -> None:
        """Spools of earlier runs in this folder whose process is gone: one attempt each."""
        for path in sorted(self.spool.path.parent.glob("*.jsonl")):
            spool = Spool(path)
            if path == self.spool.path or path.name == REJECTED_FILE or not spool.try_lock():
                continue
            try:
                n = drain(spool, str(spool.load_state().get("uri") or self.uri))
                log.warning("tracking: replayed %d events left in %s by an earlier run", n, path)
            except Exception as e:
                log.warning("tracking: could not replay %s now (%s); it is kept for later", path, e)
            finally:
                spool.unlock()


__all__ = ["Replayer", "Sender", "artifact_location", "drain", "replay_spool"]

"""The tracking spool: a JSONL write-ahead log of MLflow events, and the thread that writes it.

A spool is ``<workdir>/mlflow-spool/<run_key>.jsonl`` (one event per line: start, params,
metrics, tags, artifact, input, register, end), ``<run_key>.state.json`` (the byte offset sent so
far, the run id and the URI), ``<run_key>.files/`` (images, artifact snapshots, saved
models) and ``<run_key>.lock`` (held by the process writing or replaying it). It is
self-contained: copy it anywhere and ``replay_spool(path, uri)`` it
(``training/tracking_sender.py`` sends it).

``SpoolWriter`` is the tracker's spooler thread: ``put`` only queues (no I/O); the thread
materializes payloads (PNG images, hard-linked artifacts, the pyfunc model from code next to
an export, the MLflow dataset record of a shard folder) and appends the events whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("latentpipe.training.tracking")

SPOOL_DIR = "mlflow-spool"
REJECTED_FILE = "rejected.jsonl"  # events the store refused for good (bad values), with the reason
RUN_KEY_TAG = "latentpipe.run_key"
REGISTER_KEY_TAG = "latentpipe.register_key"
QUEUE_SIZE = 100_000
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
_IMPORT_LOCK = threading.Lock()
_STOP = object()


def import_mlflow() -> None:
    """Import mlflow (and the parts the trackers use) once, under a lock.

    The tracker's threads would otherwise import it concurrently, and mlflow's circular
    package imports then fail with "partially initialized module".
    """
    with _IMPORT_LOCK:
        import mlflow  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
        from mlflow import MlflowClient  # noqa: F401

        import latentpipe.training.tracking_data  # noqa: F401  (mlflow.data)


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached (or failed transiently); the events stay spooled."""


class Rejected(ValueError):
    """An event that no retry can make the store accept."""


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


class SpoolWriter:
    """The spooler thread: queued ``(event, payload)`` pairs -> complete lines of the spool file.

    ``put`` never blocks or does I/O; a full queue drops the event (counted in ``dropped``).
    Payloads: ``("text", name, str)``, ``("image", name, PIL image)``, ``("copy", rel, path)``,
    ``("model", key, git_commit)`` (a pyfunc model from code around ``files/<key>/export``),
    ``("dataset", root, manifest, fingerprint, num_samples)`` (an MLflow dataset record).
    A payload that fails is rejected through ``on_reject``; the other events go on.
    ``cond`` guards the counters and is notified after each write; ``lock`` is held while
    appending (the sender holds it to empty the file).
    """

    def __init__(self, spool: Spool, cond: threading.Condition, lock: threading.Lock,
                 on_written: Callable[[], None], on_reject: Callable[[dict[str, Any], BaseException], None]) -> None:
        self.spool, self.cond, self.lock = spool, cond, lock
        self.on_written, self.on_reject = on_written, on_reject
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self.n_put = self.n_written = self.dropped = 0
        self.thread = threading.Thread(target=self._loop, name="tracking-spooler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, event: dict[str, Any], payload: Any = None) -> None:
        with self.cond:
            try:
                self.queue.put_nowait((event, payload))
            except queue.Full:
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...: say it, but not each time
                    log.warning("tracking queue full (the spool disk is stalled?): %d events dropped", self.dropped)
                return
            self.n_put += 1

    def finish(self, timeout: float) -> None:
        """Let the thread write what is queued, then end; waits up to ``timeout`` s (twice at most)."""
        with contextlib.suppress(queue.Full):
            self.queue.put(_STOP, timeout=timeout)
        self.thread.join(timeout)

    def _loop(self) -> None:
        fd = os.open(self.spool.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._write_items(fd)
        finally:
            os.close(fd)

    def _write_items(self, fd: int) -> None:
        while True:
            items = [self.queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < 1000:
                    items.append(self.queue.get_nowait())
            lines, stop = [], False
            for item in items:
                if item is _STOP:
                    stop = True
                    continue
                try:
                    event = self._materialize(*item)
                except Exception as e:  # a bad image/artifact must not stop the other events
                    log.error("tracking: could not spool %s: %s", item[0].get("op"), e)
                    self.on_reject(item[0], e)
                    continue
                lines.append(json.dumps(event).encode() + b"\n")
            try:
                with self.lock:
                    append_all(fd, b"".join(lines))
            except OSError as e:  # e.g. a full disk: these events are lost, said and counted
                with self.cond:
                    self.dropped += len(lines)
                log.error("tracking: could not write %d events to %s: %s", len(lines), self.spool.path, e)
            with self.cond:
                self.n_written += len(items) - stop
                self.cond.notify_all()
            self.on_written()
            if stop:
                return

    def _materialize(self, event: dict[str, Any], payload: Any) -> dict[str, Any]:
        """Write an event's payload (image, text, copy, saved model, dataset record) into the spool."""
        if payload is None:
            return event
        kind = payload[0]
        if kind in ("text", "image"):
            rel = f"{uuid.uuid4().hex}/{payload[1]}"
            dst = self.spool.files / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if kind == "text":
                dst.write_text(payload[2], encoding="utf-8")
            else:
                payload[2].save(dst, format="PNG")
            return {**event, "file": rel}
        if kind == "copy":
            dst = self.spool.files / payload[1]
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if payload[2].is_dir() else shutil.copy2)(payload[2], dst)
            return event
        if kind == "model":  # pyfunc from code: MLmodel + mlflow_model.py + the export folder
            import_mlflow()
            import mlflow.pyfunc

            logging.getLogger("mlflow.pyfunc").addFilter(_SIGNATURE_NOTICE)
            folder = self.spool.files / payload[1]
            mlflow.pyfunc.save_model(
                path=str(folder / "model"), python_model=str(MODEL_CODE),
                artifacts={"export": str(folder / "export")}, pip_requirements=_requirements(),
                metadata={"latentpipe_export": "artifacts/export", "git_commit": payload[2] or ""})
            shutil.rmtree(folder / "export")
            return event
        if kind == "dataset":
            import_mlflow()
            from latentpipe.training.tracking_data import ShardDataset

            return {**event, "dataset": ShardDataset(*payload[1:]).entity_dict()}
        raise ValueError(f"unknown payload {kind!r}")


def append_all(fd: int, data: bytes) -> None:
    """Append ``data`` to an O_APPEND file whole, or not at all (a failed write is cut back off)."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.ftruncate(fd, start)
        raise


class _DropSignatureNotice(logging.Filter):
    """MLflow warns that our ``predict(np.ndarray)`` hint gives no signature; inputs are free-form on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to infer model signature: Type hint")


_SIGNATURE_NOTICE = _DropSignatureNotice()


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "safetensors", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{pkg}=={version(pkg)}")
    return out


__all__ = ["REGISTER_KEY_TAG", "REJECTED_FILE", "RUN_KEY_TAG", "SPOOL_DIR", "Rejected", "Spool", "SpoolWriter",
           "TrackingUnavailable", "fast_fail_http", "import_mlflow", "link_tree"]

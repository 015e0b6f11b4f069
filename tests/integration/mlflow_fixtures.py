"""A real ``mlflow server`` on 127.0.0.1 for tests: start it, really kill it, restart it on the same port.

The server runs in its own process group (``mlflow server`` starts uvicorn as a child),
with a sqlite backend and a local artifact root under a temp folder. Use from any test module:

    from tests.integration.mlflow_fixtures import mlflow_server, mlflow_server_handle  # noqa: F401

    def test_a(mlflow_server):                # the tracking URI, "http://127.0.0.1:PORT"
        ...
    def test_b(mlflow_server_handle):         # an MlflowServer: .uri, .kill(), .start(), .stop()
        stopper = kill_when(mlflow_server_handle, lambda: (workdir / "ckpt").exists())
        ...                                   # train; the server is SIGKILLed once the predicate holds
        stopper.join()

From another process (e.g. a training subprocess's test harness): the process group id is in
``MlflowServer.pidfile``; ``python -m tests.integration.mlflow_fixtures kill PIDFILE`` kills it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_TEMPLATE: list[Path] = []


def migrated_sqlite(dst: Path) -> str:
    """Put an empty, fully migrated MLflow sqlite database at ``dst``; return its URI.

    MLflow migrates a new sqlite store on first use (~10 s on a busy CI machine); tests copy
    one database migrated once per session instead. It is still a real MLflow store.
    """
    if not _TEMPLATE or not _TEMPLATE[0].exists():
        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        atexit.register(shutil.rmtree, folder, True)
        db = folder / "template.db"
        MlflowClient(f"sqlite:///{db}").search_experiments()  # runs the migrations
        _TEMPLATE[:] = [db]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE[0], dst)
    return f"sqlite:///{dst.resolve()}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """One ``mlflow server`` (sqlite backend, proxied local artifacts) that can be killed and restarted."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = migrated_sqlite(self.root / "server.db")
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.pidfile = self.root / "server.pgid"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait until ``/health`` answers (a wait limit, not a test assertion)."""
        if self.running:
            return
        deadline = time.monotonic() + 10.0
        while _listening(self.port):  # our previous server may still be dying (killed from elsewhere)
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} is taken by another process")
            time.sleep(0.1)
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts)]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # own process group: kill takes uvicorn too
        self.pidfile.write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{self._log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole server (process group) and wait until its port is closed."""
        self._signal(signal.SIGKILL, wait=10.0)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        if self.running:
            self._signal(signal.SIGTERM, wait=10.0)
        self.kill()

    def _signal(self, sig: int, wait: float) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return
        deadline = time.monotonic() + wait
        while _listening(self.port) and time.monotonic() < deadline:  # the uvicorn child, if still exiting
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            self.proc = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def kill_when(server: MlflowServer, predicate: Callable[[], bool], poll: float = 0.05,
              timeout: float = 600.0) -> threading.Thread:
    """Start a thread that SIGKILLs ``server`` as soon as ``predicate()`` is true; join it afterwards."""
    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                server.kill()
                return
            time.sleep(poll)

    t = threading.Thread(target=run, name="mlflow-killer", daemon=True)
    t.start()
    return t


def kill_pidfile(pidfile: str | Path) -> None:
    """SIGKILL the server whose process group id is in ``pidfile`` (for use from another process)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(Path(pidfile).read_text().strip()), signal.SIGKILL)


@pytest.fixture
def mlflow_server_handle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A started real ``mlflow server``; the test may kill and restart it; stopped at teardown."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of a started real ``mlflow server`` on 127.0.0.1, stopped at teardown."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server.uri
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "kill":
        print("usage: python -m tests.integration.mlflow_fixtures kill PIDFILE", file=sys.stderr)
        sys.exit(2)
    kill_pidfile(sys.argv[2])

"""A throwaway PostgreSQL server for tests, from Debian's binaries (``/usr/lib/postgresql/*/bin``).

``initdb`` into a fresh temp folder (password auth: scram-sha-256 with a random password),
``pg_ctl start`` listening on 127.0.0.1 only, a free port, its unix socket inside that folder;
``pg_ctl stop`` and the folder removed at teardown. PostgreSQL refuses to run as root, so
under root the folder is handed to the ``postgres`` OS user and the binaries run as that user
(``runuser -u postgres --``).

    from tests.integration.postgres_fixtures import postgres  # noqa: F401

    def test_x(postgres):          # a PostgresServer
        postgres.uri               # postgresql+psycopg2://latentpipe:<password>@127.0.0.1:<port>/latentpipe
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mlflow_fixtures import free_port

USER = DB = "latentpipe"


def find_bindir() -> Path | None:
    """The bin folder of the newest installed PostgreSQL (Debian layout), or of ``initdb`` on PATH."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and (Path(initdb).parent / "pg_ctl").is_file() else None


class PostgresServer:
    """One PostgreSQL cluster in its own temp folder, on 127.0.0.1:``port``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="lp-pg-"))  # not under pytest's root-only tmp tree
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.uri = f"postgresql+psycopg2://{USER}:{self.password}@127.0.0.1:{self.port}/{DB}"
        self.as_root = os.geteuid() == 0
        self.started = False

    def _run(self, *args: str, timeout: float = 120.0) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}\n"
                               f"{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        os.chmod(pwfile, 0o600)
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "120", "start")
        self.started = True
        self._create_db()

    def _create_db(self) -> None:
        conn = self.connect(dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DB}")
        finally:
            conn.close()

    def connect(self, dbname: str = DB) -> Any:
        """A psycopg2 connection to the test database (to look at what MLflow stored)."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                dbname=dbname, connect_timeout=10)

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A started throwaway PostgreSQL server on 127.0.0.1, stopped and deleted at teardown."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()

"""Private PostgreSQL and Redis servers for the scale-out tests.

Each is started in a temp folder of its own, listening on a unix socket only (no TCP
port, nothing shared with the machine's own services), and stopped, folder and all, when
its context ends. PostgreSQL runs as the ``postgres`` user when the tests run as root (it
refuses to run as root). A test module that needs a server imports the fixtures below
(``from tests.services import postgres_fixture``: the fixture is ``postgres``); they
skip, with the reason, only where the server binaries are missing (.ci/run installs
Debian's ``postgresql`` and ``redis-server``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

STARTUP_BOUND = 60.0  # seconds; a busy 2-core machine starts slowly


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@attrs.frozen
class Postgres:
    folder: Path  # its data folder and socket live here

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.folder}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def psql(self, sql: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            cursor = connection.execute(sql)
            return repr(cursor.fetchall()) if cursor.description else ""


@contextmanager
def postgres_server(*, fsync: bool = False) -> Iterator[Postgres]:
    """``initdb`` and ``pg_ctl start`` in a fresh folder; stopped and removed on exit.
    Without ``fsync`` (the tests), commits do not wait for the disk."""
    bin_ = _postgres_bin()
    if bin_ is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    folder = Path(tempfile.mkdtemp(prefix="trio-agent-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    os.chmod(folder, 0o755)
    run = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    try:
        subprocess.run(
            _as_postgres(
                [str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                 "UTF8", "--no-sync"]
            ),
            **run,  # type: ignore[call-overload]
            timeout=STARTUP_BOUND,
        )
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{folder}' "
            f"-c fsync={'on' if fsync else 'off'} "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        subprocess.run(
            _as_postgres(
                [str(bin_ / "pg_ctl"), "start", "-w", "-D", str(data), "-o", options, "-l",
                 str(folder / "log"), "-t", str(int(STARTUP_BOUND))]
            ),
            **run,  # type: ignore[call-overload]
            timeout=STARTUP_BOUND + 5,
        )
        try:
            yield Postgres(folder)
        finally:
            subprocess.run(
                _as_postgres([str(bin_ / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate",
                              "-w"]),
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=STARTUP_BOUND,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@attrs.define
class Redis:
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.folder / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start (or restart) the server on the same socket, with nothing persisted."""
        assert self.process is None
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_BOUND
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=STARTUP_BOUND)
        if self.socket.exists():
            self.socket.unlink()


@contextmanager
def redis_server() -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    redis = Redis(Path(tempfile.mkdtemp(prefix="trio-agent-redis-")))
    try:
        redis.start()
        yield redis
    finally:
        redis.stop()
        shutil.rmtree(redis.folder, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[Postgres]:
    """One private PostgreSQL server for the whole session (a fresh database per test)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(name="redis")
def redis_fixture() -> Iterator[Redis]:
    with redis_server() as server:
        yield server

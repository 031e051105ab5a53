"""The Store port on a SQLite file: the embedded default.

One connection is kept for the store's life (WAL, ``synchronous=NORMAL``: a commit costs
about 0.3 ms through a thread, where opening a connection per call costs about 2.4 ms).
Every call runs in a worker thread, one at a time, so the event loop never blocks.
Waiting for the connection can be cancelled; a statement that has started is not
interrupted and its result is returned even if a cancel arrives meanwhile, so a caller
never sees "cancelled" for a write that was in fact committed (the stop commit relies on
this to report truthfully whether the partial was saved).

Failures are mapped to ``SQLiteStoreError`` in ``SQLiteStore._error`` only, with a
sentence that says what happened (locked by another connection, disk full, I/O error).
Before every write the store checks that its path still names the file it opened: on
Linux, SQLite in WAL mode goes on writing to a deleted file without a word, and all of it
would vanish at the next restart.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, final

import attrs
import trio

from runtime import Message, RunRecord, SessionSettings, converter

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    stop_policy TEXT NOT NULL DEFAULT 'keep_partial',
    concurrency TEXT NOT NULL DEFAULT 'enqueue',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key TEXT NOT NULL,
    run_id TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_key, id);
CREATE INDEX IF NOT EXISTS messages_by_run ON messages (run_id);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    session_key TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    checkpoint TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
"""


class SQLiteStoreError(Exception):
    """The database could not be read or written; the message says why and what to do."""


@final
@attrs.define(eq=False)
class SQLiteStore:
    """``async with SQLiteStore(path) as store``: a Store on the file at ``path``."""

    path: Path = attrs.field(converter=Path)
    busy_timeout: float = 5.0
    _connection: sqlite3.Connection | None = attrs.field(default=None, init=False)
    _turn: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _file_id: tuple[int, int] | None = attrs.field(default=None, init=False)

    async def __aenter__(self) -> SQLiteStore:
        self._connection = await trio.to_thread.run_sync(self._open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with trio.CancelScope(shield=True):
                async with self._turn:
                    await trio.to_thread.run_sync(connection.close)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout, check_same_thread=False, isolation_level=None
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SCHEMA)
        self._file_id = _file_id(self.path)
        return connection

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection
        if connection is None:
            raise RuntimeError("Use the SQLiteStore inside 'async with' before calling it.")
        async with self._turn:
            with trio.CancelScope(shield=True):
                try:
                    result = await trio.to_thread.run_sync(fn, connection)
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
        return result

    async def _transaction(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        def run(connection: sqlite3.Connection) -> None:
            if _file_id(self.path) != self._file_id:
                raise SQLiteStoreError(
                    f"The SQLite database file {self.path} was deleted or replaced while the "
                    "store had it open, so nothing more can be saved to it. Restore the file "
                    "and restart, or restart to begin a new, empty database there."
                )
            connection.execute("BEGIN IMMEDIATE")
            try:
                fn(connection)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:  # SQLite rolls back by itself after some errors
                    connection.execute("ROLLBACK")
                raise

        await self._run(run)

    def _error(self, exc: sqlite3.Error) -> SQLiteStoreError:
        """The one place where SQLite's errors become SQLiteStoreError."""
        name = getattr(exc, "sqlite_errorname", "")
        where = f"The SQLite database {self.path}"
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return SQLiteStoreError(
                f"{where} is locked by another connection (waited {self.busy_timeout:g} s). "
                "Stop the other program that holds it, or raise busy_timeout."
            )
        if name == "SQLITE_FULL":
            return SQLiteStoreError(
                f"{where} is full: the disk has no room left. Free space, then try again."
            )
        if name.startswith("SQLITE_IOERR"):
            return SQLiteStoreError(
                f"{where} could not be read or written ({exc}): the disk may be full, or "
                "the file size limit reached. Free space or check the disk, then try again."
            )
        return SQLiteStoreError(f"{where} failed: {exc} ({name or type(exc).__name__}).")

    # -- the Store port -----------------------------------------------------------

    async def get_settings(self, session_key: str) -> SessionSettings:
        row = await self._run(
            lambda c: c.execute(
                "SELECT stop_policy, concurrency FROM sessions WHERE key = ?", (session_key,)
            ).fetchone()
        )
        return SessionSettings() if row is None else SessionSettings(row[0], row[1])

    async def set_settings(self, session_key: str, settings: SessionSettings) -> None:
        await self._transaction(
            lambda c: c.execute(
                "INSERT INTO sessions (key, stop_policy, concurrency, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "stop_policy = excluded.stop_policy, concurrency = excluded.concurrency, "
                "updated_at = excluded.updated_at",
                (session_key, settings.stop_policy, settings.concurrency, _now()),
            )
        )

    async def sessions(self) -> list[str]:
        rows = await self._run(
            lambda c: c.execute("SELECT key FROM sessions ORDER BY updated_at DESC").fetchall()
        )
        return [row[0] for row in rows]

    async def history(self, session_key: str, limit: int | None = None) -> list[Message]:
        def read(c: sqlite3.Connection) -> list[Any]:
            if limit is None:
                sql = "SELECT body FROM messages WHERE session_key = ? ORDER BY id"
                return c.execute(sql, (session_key,)).fetchall()
            sql = "SELECT body FROM messages WHERE session_key = ? ORDER BY id DESC LIMIT ?"
            return c.execute(sql, (session_key, limit)).fetchall()[::-1]

        rows = await self._run(read)
        return [converter.structure(json.loads(row[0]), Message) for row in rows]

    async def begin_run(self, record: RunRecord, prompt: Message) -> None:
        def write(c: sqlite3.Connection) -> None:
            _touch(c, record.session_key)
            _append(c, record.session_key, [prompt])
            _put_run(c, record)

        await self._transaction(write)

    async def checkpoint_runs(self, checkpoints: Mapping[str, str]) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE runs SET checkpoint = ? WHERE run_id = ? AND status = 'running'",
                [(checkpoint, run_id) for run_id, checkpoint in checkpoints.items()],
            )

        await self._transaction(write)

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        def write(c: sqlite3.Connection) -> None:
            _touch(c, record.session_key)
            if rollback:
                c.execute("DELETE FROM messages WHERE run_id = ?", (record.run_id,))
            _append(c, record.session_key, items)
            _put_run(c, attrs.evolve(record, checkpoint=None))

        await self._transaction(write)

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT body, checkpoint FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        )
        return None if row is None else _record(row)

    async def running_runs(self) -> list[RunRecord]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT body, checkpoint FROM runs WHERE status = 'running'"
            ).fetchall()
        )
        return [_record(row) for row in rows]


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None if it names none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _now() -> float:
    return time.time()


def _touch(c: sqlite3.Connection, session_key: str) -> None:
    c.execute(
        "INSERT INTO sessions (key, updated_at) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at",
        (session_key, _now()),
    )


def _append(c: sqlite3.Connection, session_key: str, items: Sequence[Message]) -> None:
    c.executemany(
        "INSERT INTO messages (session_key, run_id, body) VALUES (?, ?, ?)",
        [
            (session_key, m.meta.get("run_id"), json.dumps(converter.unstructure(m, Message)))
            for m in items
        ],
    )


def _put_run(c: sqlite3.Connection, record: RunRecord) -> None:
    body = converter.unstructure(attrs.evolve(record, checkpoint=None))
    c.execute(
        "INSERT OR REPLACE INTO runs (run_id, session_key, status, body, checkpoint) "
        "VALUES (?, ?, ?, ?, ?)",
        (record.run_id, record.session_key, record.status, json.dumps(body), record.checkpoint),
    )


def _record(row: Any) -> RunRecord:
    record = converter.structure(json.loads(row[0]), RunRecord)
    return attrs.evolve(record, checkpoint=row[1])


def default_db_path() -> Path:
    """Where ``trio-agent serve`` keeps its database unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "trio-agent" / "trio-agent.db"

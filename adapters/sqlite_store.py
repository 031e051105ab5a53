"""The Store port on a SQLite file: the embedded default.

One connection is kept for the store's life (WAL, ``synchronous=NORMAL``: a commit costs
about 0.3 ms through a thread, where opening a connection per call costs about 2.4 ms).
Every call runs in the store's own worker thread (its own ``CapacityLimiter``, so tools'
threads, hung or not, never hold it up), one at a time, so the event loop never blocks;
rows are decoded there too, so a long history is not parsed on the loop.

Waiting for the connection can be cancelled; a statement that has started is not
abandoned, and its result is returned even if a cancel arrives meanwhile, so a caller
never sees "cancelled" for a write that was in fact committed (the stop commit relies on
this to report truthfully whether the partial was saved). A *deadline* is kept, though:
SQLite's lock wait is cut to the time left, and a statement still running at the
deadline is interrupted (``sqlite3_interrupt``), which rolls its transaction back and
raises. So a stop commit under ``move_on_after(commit_timeout)`` ends by that bound, and
"not saved" is the truth when it says so.

Writes are idempotent by run id: ``commit_run`` for a run whose final record is already
written does nothing, so a commit retried after an uncertain failure never doubles a
message, and ``rollback`` removes a run's prompt whether or not it was written.

Failures are mapped to ``SQLiteStoreError`` in ``SQLiteStore._error`` only, with a
sentence that says what happened (locked by another connection, disk full, I/O error).
Before every write the store checks that its path still names the file it opened: on
Linux, SQLite in WAL mode goes on writing to a deleted file without a word, and all of it
would vanish at the next restart.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, final

import attrs
import trio

from adapters._migrations import CREATE_VERSION_TABLE, pending
from adapters._store_rows import message_body, message_from, record_body, record_from
from runtime import Message, RunRecord, SessionSettings

T = TypeVar("T")

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
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False
    )
    _file_id: tuple[int, int] | None = attrs.field(default=None, init=False)

    async def __aenter__(self) -> SQLiteStore:
        self._connection = await trio.to_thread.run_sync(self._open, limiter=self._limiter)
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
                    await trio.to_thread.run_sync(connection.close, limiter=self._limiter)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout, check_same_thread=False, isolation_level=None
        )
        try:
            # Switching a new file to WAL can answer "locked" at once, without waiting
            # for busy_timeout, while another connection opens it (seen in CI, stores
            # opening together): retried here, within busy_timeout.
            give_up = time.monotonic() + self.busy_timeout
            while True:
                try:
                    connection.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > give_up:
                        raise
                    time.sleep(0.01)  # a worker thread
            connection.execute("PRAGMA synchronous=NORMAL")
            _migrate(connection, f"The SQLite database {self.path}")
        except BaseException:
            connection.close()
            raise
        self._file_id = _file_id(self.path)
        return connection

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection
        if connection is None:
            raise RuntimeError("Use the SQLiteStore inside 'async with' before calling it.")
        deadline = trio.current_effective_deadline()
        async with self._turn:
            wait = min(self.busy_timeout, max(deadline - trio.current_time(), 0.0))

            def call() -> tuple[bool, Any]:
                try:
                    connection.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
                    return True, fn(connection)
                except Exception as exc:  # raised below, outside the nursery
                    return False, exc

            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    if deadline < math.inf:
                        nursery.start_soon(_interrupt_at, connection, deadline)
                    ok, result = await trio.to_thread.run_sync(call, limiter=self._limiter)
                    nursery.cancel_scope.cancel()
        if not ok:
            if isinstance(result, sqlite3.Error):
                raise self._error(result) from result
            raise result
        return result  # type: ignore[no-any-return]

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
        if name == "SQLITE_INTERRUPT":
            return SQLiteStoreError(
                f"{where} did not finish the write in the time it was given, so it was "
                "rolled back and nothing of it was saved."
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
        return SQLiteStoreError(f"{where} failed: {exc}.")

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
        def read(c: sqlite3.Connection) -> list[Message]:
            if limit is None:
                sql = "SELECT body FROM messages WHERE session_key = ? ORDER BY id"
                rows = c.execute(sql, (session_key,)).fetchall()
            else:
                sql = "SELECT body FROM messages WHERE session_key = ? ORDER BY id DESC LIMIT ?"
                rows = c.execute(sql, (session_key, limit)).fetchall()[::-1]
            return [message_from(row[0]) for row in rows]

        return await self._run(read)

    async def begin_run(self, record: RunRecord, prompt: Message) -> None:
        def write(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT 1 FROM runs WHERE run_id = ?", (record.run_id,))
            if row.fetchone() is not None:
                return  # begun already (a retry): never a second prompt
            _touch(c, record.session_key)
            _append(c, record.session_key, [prompt])
            _put_run(c, record)

        await self._transaction(write)

    async def checkpoint_runs(self, checkpoints: Mapping[str, str]) -> None:
        # One statement for every run's fragment (a group commit): the runs are joined
        # in SQL, so a tick costs one statement and one transaction however many stream.
        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO checkpoints (run_id, fragment) "
                "SELECT j.key, j.value FROM json_each(?) AS j "
                "JOIN runs ON runs.run_id = j.key AND runs.status = 'running'",
                (json.dumps(checkpoints),),
            )

        if not checkpoints:
            return

        await self._transaction(write)

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        def write(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT status FROM runs WHERE run_id = ?", (record.run_id,))
            if (status := row.fetchone()) is not None and status[0] != "running":
                return  # committed already: a retry after an uncertain failure
            _touch(c, record.session_key)
            if rollback:
                c.execute("DELETE FROM messages WHERE run_id = ?", (record.run_id,))
            _append(c, record.session_key, items)
            _put_run(c, attrs.evolve(record, checkpoint=None))
            c.execute("DELETE FROM checkpoints WHERE run_id = ?", (record.run_id,))

        await self._transaction(write)

    async def get_run(self, run_id: str) -> RunRecord | None:
        def read(c: sqlite3.Connection) -> RunRecord | None:
            sql = f"{_RECORD_SELECT} WHERE run_id = ?"
            row = c.execute(sql, (run_id,)).fetchone()
            return None if row is None else _record(c, row)

        return await self._run(read)

    async def running_runs(self) -> list[RunRecord]:
        def read(c: sqlite3.Connection) -> list[RunRecord]:
            rows = c.execute(f"{_RECORD_SELECT} WHERE status = 'running'").fetchall()
            return [_record(c, row) for row in rows]

        return await self._run(read)


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
        [(session_key, m.meta.get("run_id"), message_body(m)) for m in items],
    )


def _put_run(c: sqlite3.Connection, record: RunRecord) -> None:
    c.execute(
        "INSERT OR REPLACE INTO runs (run_id, session_key, status, body, checkpoint) "
        "VALUES (?, ?, ?, ?, ?)",
        (record.run_id, record.session_key, record.status, record_body(record), record.checkpoint),
    )


_RECORD_SELECT = "SELECT run_id, session_key, status, body, checkpoint FROM runs"


def _record(c: sqlite3.Connection, row: Any) -> RunRecord:
    """A record from its row, with its checkpoint: the whole-state column of older
    versions, then the fragments."""
    run_id, session_key, status, body, legacy = row
    sql = "SELECT fragment FROM checkpoints WHERE run_id = ? ORDER BY id"
    fragments = [f for (f,) in c.execute(sql, (run_id,))]
    return record_from(run_id, session_key, status, body, [legacy, *fragments])


def _migrate(connection: sqlite3.Connection, where: str) -> None:
    """Bring the schema to the newest version, in one transaction (see _migrations)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(CREATE_VERSION_TABLE)
        row = connection.execute("SELECT version FROM schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        todo = pending("sqlite", current, where)
        for migration in todo:
            for statement in _statements(migration.sql):
                connection.execute(statement)
        if row is None:
            connection.execute("INSERT INTO schema_version (version) VALUES (0)")
        if todo:
            connection.execute("UPDATE schema_version SET version = ?", (todo[-1].version,))
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (executescript would commit the transaction)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if not buffer and line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


async def _interrupt_at(connection: sqlite3.Connection, deadline: float) -> None:
    """Interrupt the statement running at ``deadline``: see the module docstring."""
    await trio.sleep_until(deadline)
    connection.interrupt()


def default_db_path() -> Path:
    """Where ``trio-agent serve`` keeps its database unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "trio-agent" / "trio-agent.db"

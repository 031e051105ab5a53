"""The Store port on PostgreSQL: the shared history of several gateway processes.

psycopg 3's synchronous API is called through ``trio.to_thread`` (its async API is
asyncio's only), on connections from a ``psycopg_pool.ConnectionPool``. The store's own
``CapacityLimiter`` is the size of the pool, so a call that holds a slot always finds a
connection free: waiting for a slot is an ordinary Trio wait, cancellable, and the
threads of tools, hung or not, never hold the store up.

Bounds, as in the SQLite store (its docstring tells the model): a statement that has
started is not abandoned, and its result is returned even if a cancel arrives meanwhile,
so a caller never sees "cancelled" for a write that was in fact committed. Every
statement is bounded on the server by ``statement_timeout`` (a thread cannot be
interrupted mid-query, the server can), and a call made under a Trio deadline has its
query cancelled at that deadline (``cancel_safe`` from another thread), which rolls its
transaction back and raises. So a stop commit under ``move_on_after(commit_timeout)``
ends by that bound, and "not saved" is the truth when it says so.

Every write that changes more than one row is one transaction. Writes are idempotent by
run id: ``begin_run`` for a run already recorded writes nothing, and ``commit_run`` for a
run whose final record is written does nothing (two processes committing the same run,
its owner retrying and another closing it as interrupted, take the run's row lock in
turn; the second finds it final). ``checkpoint_runs`` appends the fragments of every
running run in one statement (a group commit), under a share lock on their rows, so a
fragment never lands after its run's commit dropped the others.

Failures are mapped to ``PostgresStoreError`` in ``PostgresStore._error`` only, with a
sentence that says what happened and what to do. The schema is migrated when the store
opens (``adapters/migrations/postgres``), under an advisory lock, so processes that
start together migrate once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar, final

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from adapters._migrations import CREATE_VERSION_TABLE, SchemaTooNew, pending
from adapters._store_rows import message_body, message_from, record_body, record_from
from runtime import Message, RunRecord, SessionSettings

T = TypeVar("T")

logger = logging.getLogger(__name__)

MIGRATION_LOCK = 0x7472_696F  # pg_advisory_xact_lock key: "trio"


class PostgresStoreError(Exception):
    """The database could not be read or written; the message says why and what to do."""


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


@final
@attrs.define(eq=False)
class PostgresStore:
    """``async with PostgresStore("postgresql://...") as store``: a Store on PostgreSQL.

    ``pool_size`` connections are opened at start and kept; ``statement_timeout`` (seconds)
    bounds every statement on the server; ``connect_timeout`` bounds the start and each
    reconnection."""

    url: str
    pool_size: int = 8
    statement_timeout: float = 5.0
    connect_timeout: float = 10.0
    _pool: ConnectionPool[psycopg.Connection[Any]] | None = attrs.field(default=None, init=False)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _cancellers: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.pool_size)
        self._cancellers = trio.CapacityLimiter(self.pool_size)

    @property
    def where(self) -> str:
        """The database, named without its password."""
        try:
            parts = conninfo_to_dict(self.url)
        except psycopg.ProgrammingError:
            return "The PostgreSQL database (its URL could not be read)"
        host = parts.get("host") or "localhost"
        port = f":{parts['port']}" if parts.get("port") else ""
        return f"The PostgreSQL database {parts.get('dbname') or ''!s} at {host}{port}"

    async def __aenter__(self) -> PostgresStore:
        ms = max(1, round(self.statement_timeout * 1000))
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            min_size=self.pool_size,
            max_size=self.pool_size,
            open=False,
            timeout=self.connect_timeout,
            kwargs={"autocommit": True, "options": f"-c statement_timeout={ms}"},
            name="trio-agent-store",
        )

        def open_() -> None:
            try:
                pool.open(wait=True, timeout=self.connect_timeout)
                with pool.connection(timeout=self.connect_timeout) as connection:
                    _migrate(connection, self.where)
            except BaseException:
                pool.close()
                raise

        try:
            await trio.to_thread.run_sync(open_, limiter=self._limiter)
        except SchemaTooNew:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._error(exc) from exc
        self._pool = pool
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pool.close)

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        pool = self._pool
        if pool is None:
            raise RuntimeError("Use the PostgresStore inside 'async with' before calling it.")
        deadline = trio.current_effective_deadline()
        async with self._limiter:  # a free connection is waiting: see the module docstring
            wait = max(min(deadline - trio.current_time(), self.connect_timeout), 0.001)
            call = _Call(pool, fn, wait)
            with trio.CancelScope(shield=True):
                # The canceller is a system task, not a child: the call returns without
                # waiting for it to wind down (under load, a scheduler pass of the stop).
                canceller = trio.CancelScope()
                if deadline < math.inf:
                    trio.lowlevel.spawn_system_task(
                        self._cancel_at, call, deadline, canceller, name="store call canceller"
                    )
                try:
                    ok, result = await trio.to_thread.run_sync(call.run, limiter=_UNLIMITED)
                finally:
                    canceller.cancel()
        if not ok:
            if isinstance(result, (psycopg.Error, PoolTimeout)):
                raise self._error(result) from result
            raise result
        return result  # type: ignore[no-any-return]

    async def _cancel_at(self, call: _Call[Any], deadline: float, scope: trio.CancelScope) -> None:
        """Cancel the call's query at ``deadline``: see the module docstring."""
        with scope:
            await trio.sleep_until(deadline)
            with trio.CancelScope(shield=True):  # never leave a cancel half sent
                try:
                    await trio.to_thread.run_sync(
                        call.cancel, self.connect_timeout, limiter=self._cancellers
                    )
                except Exception as exc:  # a system task must not raise: Trio would stop
                    logger.warning("a query past its deadline could not be cancelled: %s", str(exc))

    def _error(self, exc: psycopg.Error | PoolTimeout) -> PostgresStoreError:
        """The one place where psycopg's errors become PostgresStoreError."""
        where = self.where
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return PostgresStoreError(
                f"{where} did not finish the call in the time it was given (the caller's "
                f"deadline, or statement_timeout {self.statement_timeout:g} s), so it was "
                "rolled back and nothing of it was saved."
            )
        if isinstance(exc, PoolTimeout) or isinstance(exc, psycopg.OperationalError):
            return PostgresStoreError(
                f"{where} could not be reached ({str(exc).strip()}). Check that the server "
                "is up and the URL, user and password are right; the store reconnects by "
                "itself once it is."
            )
        if isinstance(exc, psycopg.errors.DiskFull):
            return PostgresStoreError(
                f"{where} is full: the server's disk has no room left. Free space, then try "
                "again."
            )
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            return PostgresStoreError(
                f"{where} is read-only (a standby?): point the store at the primary."
            )
        return PostgresStoreError(f"{where} failed: {str(exc).strip()}.")

    # -- the Store port -----------------------------------------------------------

    async def get_settings(self, session_key: str) -> SessionSettings:
        row = await self._run(
            lambda c: c.execute(
                "SELECT stop_policy, concurrency FROM sessions WHERE key = %s", (session_key,)
            ).fetchone()
        )
        return SessionSettings() if row is None else SessionSettings(row[0], row[1])

    async def set_settings(self, session_key: str, settings: SessionSettings) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO sessions (key, stop_policy, concurrency, updated_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET "
                "stop_policy = excluded.stop_policy, concurrency = excluded.concurrency, "
                "updated_at = excluded.updated_at",
                (session_key, settings.stop_policy, settings.concurrency, time.time()),
            )
        )

    async def sessions(self) -> list[str]:
        rows = await self._run(
            lambda c: c.execute("SELECT key FROM sessions ORDER BY updated_at DESC").fetchall()
        )
        return [row[0] for row in rows]

    async def history(self, session_key: str, limit: int | None = None) -> list[Message]:
        def read(c: psycopg.Connection[Any]) -> list[Message]:
            if limit is None:
                sql = "SELECT body FROM messages WHERE session_key = %s ORDER BY id"
                rows = c.execute(sql, (session_key,)).fetchall()
            else:
                sql = (
                    "SELECT body FROM messages WHERE session_key = %s "
                    "ORDER BY id DESC LIMIT %s"
                )
                rows = c.execute(sql, (session_key, limit)).fetchall()[::-1]
            return [message_from(row[0]) for row in rows]

        return await self._run(read)

    async def begin_run(self, record: RunRecord, prompt: Message) -> None:
        def write(c: psycopg.Connection[Any]) -> None:
            with c.pipeline(), c.transaction():  # two round trips, as in commit_run
                inserted = c.execute(
                    "INSERT INTO runs (run_id, session_key, status, body) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING RETURNING 1",
                    (record.run_id, record.session_key, record.status, record_body(record)),
                ).fetchone()
                if inserted is None:
                    return  # begun already (a retry, or another process): no second prompt
                _touch(c, record.session_key)
                _append(c, record.session_key, [prompt])

        await self._run(write)

    async def checkpoint_runs(self, checkpoints: Mapping[str, str]) -> None:
        if not checkpoints:
            return
        ids, fragments = list(checkpoints), list(checkpoints.values())
        await self._run(
            lambda c: c.execute(
                "WITH live AS (SELECT run_id FROM runs WHERE run_id = ANY(%s) "
                "AND status = 'running' FOR SHARE) "
                "INSERT INTO checkpoints (run_id, fragment) "
                "SELECT given.run_id, given.fragment "
                "FROM unnest(%s::text[], %s::text[]) AS given (run_id, fragment) "
                "JOIN live USING (run_id)",
                (ids, ids, fragments),
            )
        )

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        def write(c: psycopg.Connection[Any]) -> None:
            # Pipelined: two round trips (up to the run's status, then the rest with the
            # COMMIT) where one per statement took about 1 ms each with the gateway busy.
            with c.pipeline(), c.transaction():
                # Commits of one run are serialised (the row may not exist yet, so a row
                # lock alone would not do); the row lock then holds checkpoints off.
                c.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (record.run_id,))
                row = c.execute(
                    "SELECT status FROM runs WHERE run_id = %s FOR UPDATE", (record.run_id,)
                ).fetchone()
                if row is not None and row[0] != "running":
                    return  # committed already: a retry, or another process closed it
                _touch(c, record.session_key)
                if rollback:
                    c.execute("DELETE FROM messages WHERE run_id = %s", (record.run_id,))
                _append(c, record.session_key, items)
                c.execute(
                    "INSERT INTO runs (run_id, session_key, status, body) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE SET "
                    "session_key = excluded.session_key, status = excluded.status, "
                    "body = excluded.body",
                    (record.run_id, record.session_key, record.status, record_body(record)),
                )
                c.execute("DELETE FROM checkpoints WHERE run_id = %s", (record.run_id,))

        await self._run(write)

    async def get_run(self, run_id: str) -> RunRecord | None:
        def read(c: psycopg.Connection[Any]) -> RunRecord | None:
            row = c.execute(f"{_RECORD_SELECT} WHERE r.run_id = %s", (run_id,)).fetchone()
            return None if row is None else record_from(*row)

        return await self._run(read)

    async def running_runs(self) -> list[RunRecord]:
        def read(c: psycopg.Connection[Any]) -> list[RunRecord]:
            rows = c.execute(f"{_RECORD_SELECT} WHERE r.status = 'running'").fetchall()
            return [record_from(*row) for row in rows]

        return await self._run(read)


_RECORD_SELECT = (
    "SELECT r.run_id, r.session_key, r.status, r.body, "
    "ARRAY(SELECT fragment FROM checkpoints k WHERE k.run_id = r.run_id ORDER BY k.id) "
    "FROM runs r"
)

# The store's own limiter is taken before its threads start: they need no other bound.
_UNLIMITED = trio.CapacityLimiter(math.inf)


@final
class _Call(Generic[T]):
    """One store call in a worker thread: a pooled connection, ``fn`` on it, and the
    connection handed back by the same thread (no second trip to a thread on the way
    back). A cancel at the caller's deadline (``cancel``, from another thread) reaches
    only this call's query: the connection is not handed back while one is being sent,
    and none is sent once it has been."""

    def __init__(
        self, pool: ConnectionPool[psycopg.Connection[Any]], fn: Callable[..., T], wait: float
    ):
        self._pool, self._fn, self._wait = pool, fn, wait
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None

    def run(self) -> tuple[bool, Any]:
        try:
            connection = self._pool.getconn(timeout=self._wait)
        except Exception as exc:  # raised by the caller, outside the thread
            return False, exc
        self._connection = connection
        try:
            return True, self._fn(connection)
        except Exception as exc:
            return False, exc
        finally:
            with self._lock:
                self._connection = None
            self._pool.putconn(connection)

    def cancel(self, timeout: float) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.cancel_safe(timeout=timeout)


def _touch(c: psycopg.Connection[Any], session_key: str) -> None:
    c.execute(
        "INSERT INTO sessions (key, updated_at) VALUES (%s, %s) "
        "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at",
        (session_key, time.time()),
    )


def _append(c: psycopg.Connection[Any], session_key: str, items: Sequence[Message]) -> None:
    if items:
        with c.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO messages (session_key, run_id, body) VALUES (%s, %s, %s)",
                [(session_key, m.meta.get("run_id"), message_body(m)) for m in items],
            )


def _migrate(connection: psycopg.Connection[Any], where: str) -> None:
    """Bring the schema to the newest version, in one transaction (see _migrations)."""
    with connection.transaction():
        connection.execute("SET LOCAL statement_timeout = 0")
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute(CREATE_VERSION_TABLE)
        row = connection.execute("SELECT version FROM schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        todo = pending("postgres", current, where)
        for migration in todo:
            connection.execute(migration.sql.encode())
        if row is None:
            connection.execute("INSERT INTO schema_version (version) VALUES (0)")
        if todo:
            connection.execute("UPDATE schema_version SET version = %s", (todo[-1].version,))

"""What the sim remembers about each model request: when it opened, sent its first body
byte and closed, and which side closed it.

These records are the evidence a test or a benchmark uses to show that a client hung up
at the instant of a stop, so times come from ``time.monotonic()``, the clock tests read,
and a close is stamped the moment it is seen.
"""

from __future__ import annotations

import time
from typing import Literal, final

import attrs
import trio

ClosedBy = Literal["client", "server"]


@attrs.frozen
class ConnectionRecord:
    """One model request the sim answered. Times are ``time.monotonic()`` seconds.

    ``closed_by`` is ``"client"`` when the client disconnected before the response ended,
    ``"server"`` when the sim finished, refused or aborted it (or shut down).
    """

    id: int
    path: str
    opened_at: float
    status: int | None = None  # the HTTP status sent, once sent
    directive: str | None = None  # the #sim line, if the request had one
    first_byte_at: float | None = None  # first response body byte
    closed_at: float | None = None
    closed_by: ClosedBy | None = None


@final
@attrs.define(eq=False)
class Registry:
    """The records, plus the counters behind ``fail_count``. Shared by the ASGI app and
    ``SimServer``; all calls come from the one Trio thread."""

    _records: dict[int, ConnectionRecord] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=1, init=False)
    _closed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _fail_seen: dict[str, int] = attrs.field(factory=dict, init=False)

    def open(self, path: str) -> int:
        record_id = self._next_id
        self._next_id += 1
        self._records[record_id] = ConnectionRecord(record_id, path, time.monotonic())
        return record_id

    def update(
        self, record_id: int, *, status: int | None = None, directive: str | None = None
    ) -> None:
        record = self._records.get(record_id)
        if record is None:  # cleared meanwhile
            return
        if status is not None:
            record = attrs.evolve(record, status=status)
        if directive is not None:
            record = attrs.evolve(record, directive=directive)
        self._records[record_id] = record

    def first_byte(self, record_id: int) -> None:
        record = self._records.get(record_id)
        if record is not None and record.first_byte_at is None:
            self._records[record_id] = attrs.evolve(record, first_byte_at=time.monotonic())

    def close(self, record_id: int, by: ClosedBy) -> None:
        """Stamp the close now; the first close of a record wins."""
        now = time.monotonic()
        record = self._records.get(record_id)
        if record is None or record.closed_at is not None:
            return
        self._records[record_id] = attrs.evolve(record, closed_at=now, closed_by=by)
        self._closed.set()
        self._closed = trio.Event()

    def records(self) -> list[ConnectionRecord]:
        return list(self._records.values())

    def clear(self) -> int:
        count = len(self._records)
        self._records.clear()
        return count

    async def wait_closed(self, path: str | None, count: int) -> list[ConnectionRecord]:
        while True:
            closed = [
                record
                for record in self._records.values()
                if record.closed_at is not None and (path is None or record.path == path)
            ]
            if len(closed) >= count:
                await trio.lowlevel.checkpoint()
                return closed
            await self._closed.wait()

    def take_failure(self, line: str, fail_count: int | None) -> bool:
        """Count one more request carrying ``line``; True while it is still to fail."""
        seen = self._fail_seen.get(line, 0) + 1
        self._fail_seen[line] = seen
        return fail_count is None or seen <= fail_count

"""The abort-bus port: carries a stop to the process that owns the run.

In one process the runtime's registry is the whole truth, and ``LocalAbortBus`` (the
default) does nothing. When several processes share a store, a bus adapter
(``adapters/redis_bus.py``) makes each run *owned*: the runtime claims a run before it
registers it, and releases it once the run's end is committed. The bus then carries

- an abort to the process that owns the run (``abort_elsewhere``), so a Stop sent to any
  process stops the run where it lives, and says truthfully whether it did;
- an abort that arrived before its run registered: ``registered`` answers True, and the
  runtime stops the run at once (the abort that beats the start still wins);
- the same run id sent to two processes at once: the second ``claim`` fails, and that
  process starts nothing;
- a session's live runs as they stand on the process that holds the session
  (``live_elsewhere``), so a client that reconnects to any process resumes a run;
- a message for a session whose runs live on another process, to that process
  (``start_elsewhere``; ``claim`` raised ``SessionElsewhere``), which admits it;
- the runs of a process that died: the bus notices, and asks a live runtime to close
  them as interrupted (``Runtime.close_interrupted``), their checkpointed partials kept.

The runtime calls ``claim`` and ``abort_elsewhere`` with an await, ``registered`` and
``released`` without one (they are on paths that must not wait: registration, and the end
of a run); an adapter does the I/O of ``released`` in a task of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, final

import attrs
import trio

from ._store import RunRecord

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._runtime import RunSnapshot, Runtime


@final
@attrs.frozen
class AbortResult:
    aborted: bool
    run_ids: tuple[str, ...]
    # live runs the abort left alone because they were started with allow_cancel=False
    refused: tuple[str, ...] = ()


class AbortBus(Protocol):
    def open(self, runtime: Runtime) -> AbstractAsyncContextManager[Any]:
        """Serve the bus for ``runtime`` while the context lasts (the runtime enters it
        first and leaves it last, so its runs' ends are released before it closes)."""
        ...

    async def claim(self, run_id: str, session_key: str) -> bool:
        """Take ownership of a run about to be registered; False when another live
        process owns a run of that id (the same idempotency key sent there). Raises
        SessionElsewhere when the session's runs live on another process."""
        ...

    def registered(self, run_id: str) -> bool:
        """Called right after a claimed run is registered: True when an abort for it
        arrived first (a tombstone, or a request while it was being claimed)."""
        ...

    def released(self, run_id: str) -> None:
        """The run ended and its end was written, or its admission failed after the
        claim: it is no longer owned here."""
        ...

    async def abort_elsewhere(
        self,
        run_id: str | None,
        session_key: str | None,
        reason: str,
        stop_policy: str | None,
    ) -> AbortResult:
        """Abort a run (or a session's runs) on the other processes: the owner's answer,
        ``aborted=False`` at once when no live process owns the run."""
        ...

    async def live_elsewhere(self, session_key: str) -> list[RunSnapshot]:
        """The session's live and queued runs on the process that holds it, if that is
        another live process (``Runtime.live_runs_anywhere``); else none."""
        ...

    async def held_elsewhere(self, session_keys: Sequence[str]) -> set[str]:
        """Of these sessions, the ones with live runs on another live process."""
        ...

    async def start_elsewhere(
        self,
        process_id: str,
        session_key: str,
        message: str,
        run_id: str,
        options: Mapping[str, Any],
    ) -> None:
        """Have ``process_id``, which holds the session, start the run (``start_run`` with
        ``options``); raises what that raised there. Returns once the run is registered
        there and this process receives the session's events."""
        ...

    async def orphans(self, records: Sequence[RunRecord]) -> list[RunRecord]:
        """Of these runs recorded as running, the ones no live process owns (recovery at
        start closes only those)."""
        ...


@final
@attrs.define(eq=False)
class LocalAbortBus:
    """One process: every run is this process's, and every recorded running run that is
    not live here was left by a dead one."""

    def open(self, runtime: Runtime) -> AbstractAsyncContextManager[None]:
        return _nothing()

    async def claim(self, run_id: str, session_key: str) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    def registered(self, run_id: str) -> bool:
        return False

    def released(self, run_id: str) -> None:
        pass

    async def abort_elsewhere(
        self,
        run_id: str | None,
        session_key: str | None,
        reason: str,
        stop_policy: str | None,
    ) -> AbortResult:
        await trio.lowlevel.checkpoint()
        return AbortResult(False, ())

    async def live_elsewhere(self, session_key: str) -> list[RunSnapshot]:
        await trio.lowlevel.checkpoint()
        return []

    async def held_elsewhere(self, session_keys: Sequence[str]) -> set[str]:
        await trio.lowlevel.checkpoint()
        return set()

    async def start_elsewhere(
        self,
        process_id: str,
        session_key: str,
        message: str,
        run_id: str,
        options: Mapping[str, Any],
    ) -> None:
        raise RuntimeError("In one process no session lives elsewhere.")

    async def orphans(self, records: Sequence[RunRecord]) -> list[RunRecord]:
        await trio.lowlevel.checkpoint()
        return list(records)


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield

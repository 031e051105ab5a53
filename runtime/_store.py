"""The Store port and its in-memory implementation.

A store keeps sessions (with their policies), history items and run records. Every
method that changes more than one thing does so in one transaction: ``begin_run`` writes
the user's message with the run record, ``commit_run`` writes everything a run produced,
its final record and (under rollback) removes its user message, all or nothing.

What the runtime requires of a store, cancellation included:

- A call cancelled before its write began writes nothing. Once its write began, it may
  land or not: the runtime never trusts a flag set after an awaited write. A run whose
  ``begin_run`` did not return is stopped with a rollback by run id, so its prompt is
  removed if it was written and nothing happens if it was not.
- ``commit_run`` is idempotent by run id: once a run's final record is written, another
  ``commit_run`` for it does nothing (a commit retried after an uncertain failure never
  doubles a message), and a rollback of messages that were never written is no error.
- A call made under a deadline (``move_on_after``) should end by it, reporting the truth:
  raise if the write did not land, return if it did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, final

import attrs
import trio

from ._errors import InvalidRequest
from ._events import CONCURRENCY_POLICIES, STOP_POLICIES, ConcurrencyPolicy, StopPolicy, Usage
from ._history import Message

RunStatus = Literal["running", "finished", "cancelled", "failed", "interrupted"]


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise InvalidRequest(
                f"Unknown {attribute.name.replace('_', ' ')} {value!r}; choose one of "
                f"{', '.join(choices)}."
            )

    return check


@attrs.frozen
class SessionSettings:
    """A session's policies; see ``Runtime.start_run`` and the README for their meaning."""

    stop_policy: StopPolicy = attrs.field(default="keep_partial", validator=_one_of(STOP_POLICIES))
    concurrency: ConcurrencyPolicy = attrs.field(
        default="enqueue", validator=_one_of(CONCURRENCY_POLICIES)
    )


@attrs.frozen(kw_only=True)
class RunRecord:
    run_id: str
    session_key: str
    status: RunStatus
    started_at: float  # wall-clock seconds (time.time())
    ended_at: float | None = None
    stop_reason: str | None = None
    usage: Usage = attrs.field(factory=Usage)
    # for stopped runs: ms from the abort request to the run leaving its scope (the
    # commit's own time is in the RunCancelled event, as it ends after this is written)
    scope_exited_ms: float | None = None
    error: str | None = None
    # the run's state while it streams: fragments, one JSON document a line, each holding
    # what changed since the one before (see RunState.checkpoint_fragment)
    checkpoint: str | None = None
    # messages of a run whose session went on before they could be saved: kept here,
    # out of the history, where they would have broken the order
    set_aside: tuple[Message, ...] = ()


class Store(Protocol):
    async def get_settings(self, session_key: str) -> SessionSettings: ...

    async def set_settings(self, session_key: str, settings: SessionSettings) -> None: ...

    async def sessions(self) -> list[str]:
        """Session keys, most recently active first."""
        ...

    async def history(self, session_key: str, limit: int | None = None) -> list[Message]:
        """The last ``limit`` messages (all when None), oldest first."""
        ...

    async def begin_run(self, record: RunRecord, prompt: Message) -> None: ...

    async def checkpoint_runs(self, checkpoints: Mapping[str, str]) -> None:
        """Append one checkpoint fragment to each running run (run id -> fragment), in
        one call; a run already committed is left as it is. A run's ``checkpoint`` reads
        back as its fragments in order, one a line."""
        ...

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        """Finish a run: append ``items``, replace its record and drop its checkpoint;
        with ``rollback``, also remove every message of the run, its prompt included.
        Does nothing if the run's final record is already written."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def running_runs(self) -> list[RunRecord]:
        """Runs recorded as running: after a restart, the ones a dead process left."""
        ...


@final
@attrs.define(eq=False)
class MemoryStore:
    """A Store in memory, for tests and embedding where nothing must outlive the process.

    Every method checkpoints first, as Trio's own async functions do, so a cancel that
    arrives before a write means the write did not happen."""

    _settings: dict[str, SessionSettings] = attrs.field(factory=dict, init=False)
    _history: dict[str, list[Message]] = attrs.field(factory=dict, init=False)
    _runs: dict[str, RunRecord] = attrs.field(factory=dict, init=False)
    _activity: list[str] = attrs.field(factory=list, init=False)

    async def get_settings(self, session_key: str) -> SessionSettings:
        await trio.lowlevel.checkpoint()
        return self._settings.get(session_key, SessionSettings())

    async def set_settings(self, session_key: str, settings: SessionSettings) -> None:
        await trio.lowlevel.checkpoint()
        self._settings[session_key] = settings
        self._touch(session_key)

    async def sessions(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return list(reversed(self._activity))

    async def history(self, session_key: str, limit: int | None = None) -> list[Message]:
        await trio.lowlevel.checkpoint()
        items = self._history.get(session_key, [])
        return list(items if limit is None else items[-limit:] if limit else [])

    async def begin_run(self, record: RunRecord, prompt: Message) -> None:
        await trio.lowlevel.checkpoint()
        self._history.setdefault(record.session_key, []).append(prompt)
        self._runs[record.run_id] = record
        self._touch(record.session_key)

    async def checkpoint_runs(self, checkpoints: Mapping[str, str]) -> None:
        await trio.lowlevel.checkpoint()
        for run_id, checkpoint in checkpoints.items():
            record = self._runs.get(run_id)
            if record is not None and record.status == "running":
                saved = f"{record.checkpoint}\n{checkpoint}" if record.checkpoint else checkpoint
                self._runs[run_id] = attrs.evolve(record, checkpoint=saved)

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        await trio.lowlevel.checkpoint()
        if (done := self._runs.get(record.run_id)) is not None and done.status != "running":
            return
        history = self._history.setdefault(record.session_key, [])
        if rollback:
            history[:] = [m for m in history if m.meta.get("run_id") != record.run_id]
        history.extend(items)
        self._runs[record.run_id] = attrs.evolve(record, checkpoint=None)
        self._touch(record.session_key)

    async def get_run(self, run_id: str) -> RunRecord | None:
        await trio.lowlevel.checkpoint()
        return self._runs.get(run_id)

    async def running_runs(self) -> list[RunRecord]:
        await trio.lowlevel.checkpoint()
        return [r for r in self._runs.values() if r.status == "running"]

    def _touch(self, session_key: str) -> None:
        if session_key in self._activity:
            self._activity.remove(session_key)
        self._activity.append(session_key)

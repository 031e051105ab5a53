"""The Store port and its in-memory implementation.

A store keeps sessions (with their policies), history items and run records. Every
method that changes more than one thing does so in one transaction: ``begin_run`` writes
the user's message with the run record, ``commit_run`` writes everything a run produced,
its final record and (under rollback) removes its user message, all or nothing.
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
    # JSON text of the run's state, written while it streams (see _state.Checkpoint)
    checkpoint: str | None = None


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
        """Save running runs' states (run id -> checkpoint) in one call; a run already
        committed is left as it is."""
        ...

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        """Finish a run: append ``items``, replace its record; with ``rollback``, also
        remove every message of the run, its prompt included."""
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
                self._runs[run_id] = attrs.evolve(record, checkpoint=checkpoint)

    async def commit_run(
        self, record: RunRecord, items: Sequence[Message], *, rollback: bool
    ) -> None:
        await trio.lowlevel.checkpoint()
        history = self._history.setdefault(record.session_key, [])
        if rollback:
            history[:] = [m for m in history if m.meta.get("run_id") != record.run_id]
        history.extend(items)
        self._runs[record.run_id] = record
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

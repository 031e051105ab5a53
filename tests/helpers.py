"""Shared checks: the six invariants of ARCHITECTURE.md, stated once for every test."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from runtime import (
    Event,
    Message,
    Run,
    RunCancelled,
    Runtime,
    Subscription,
    TerminalEvent,
    TextDelta,
    is_terminal,
    validate_history,
)


async def events_until_terminal(events: Subscription, run_id: str) -> list[Event]:
    """Events of one run, up to and including its terminal event."""
    seen: list[Event] = []
    async for event in events:
        if event.run_id == run_id:
            seen.append(event)
            if is_terminal(event):
                return seen
    raise AssertionError(f"the subscription closed before run {run_id} ended")


async def wait_for(events: Subscription, kind: type, run_id: str | None = None) -> Event:
    async for event in events:
        if isinstance(event, kind) and (run_id is None or event.run_id == run_id):
            return event
    raise AssertionError(f"no {kind.__name__} arrived")


def drain(events: Subscription) -> list[Event]:
    """Everything buffered right now."""
    out = []
    while (event := events.receive_nowait()) is not None:
        out.append(event)
    return out


def check_run_events(events: Sequence[Event]) -> TerminalEvent:
    """Invariant 1: exactly one terminal event, last; seq strictly increasing from 0."""
    terminals = [e for e in events if is_terminal(e)]
    assert len(terminals) == 1, f"expected one terminal event, got {terminals}"
    assert is_terminal(events[-1]), "an event followed the terminal event"
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), f"seq not increasing: {seqs}"
    return terminals[0]  # type: ignore[return-value]


def delivered_text(events: Sequence[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def check_partial(events: Sequence[Event], history: Sequence[Message]) -> None:
    """Invariant 3: a kept partial's text is the text delivered in its last turn."""
    terminal = check_run_events(events)
    if isinstance(terminal, RunCancelled) and terminal.message is not None:
        assert delivered_text(events).endswith(terminal.message.text)
        assert terminal.message in history


async def check_settled(rt: Runtime, model: object, session_key: str) -> list[Message]:
    """Invariants 2 and 4: valid history; nothing of any run left."""
    await trio.testing.wait_all_tasks_blocked()
    history = await rt.store.history(session_key)
    validate_history(history)
    assert rt.live_runs() == [], "a run is still registered"
    assert getattr(model, "open_streams", 0) == 0, "a model stream is still open"
    return history


async def run_and_abort_when(
    rt: Runtime, run: Run, events: Subscription, ready: type | None, **abort: object
) -> list[Event]:
    """Abort ``run`` as soon as an event of type ``ready`` arrives (at once when None)."""
    seen: list[Event] = []
    if ready is None:
        result = rt.abort(run_id=run.run_id, **abort)  # type: ignore[arg-type]
        assert result.aborted
    async for event in events:
        if event.run_id != run.run_id:
            continue
        seen.append(event)
        if ready is not None and isinstance(event, ready):
            assert rt.abort(run_id=run.run_id, **abort).aborted  # type: ignore[arg-type]
            ready = None
        if is_terminal(event):
            return seen
    raise AssertionError("subscription ended early")

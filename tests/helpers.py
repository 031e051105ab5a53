"""Shared checks: the six invariants of ARCHITECTURE.md, stated once for every test."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from runtime import (
    Event,
    Message,
    Run,
    RunCancelled,
    RunFailed,
    RunFinished,
    Runtime,
    Subscription,
    TerminalEvent,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCallFinished,
    ToolCallStarted,
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


def is_unsaved(terminal: Event) -> bool:
    """A run whose final commit failed: it reported so, and the runtime saves it later
    (its messages set aside in its record if the session went on meanwhile)."""
    return isinstance(terminal, RunFailed) and terminal.error_kind == "store"


def check_kept_text(events: Sequence[Event], history: Sequence[Message]) -> None:
    """Invariant 3, for every way a run ends: history holds exactly the text and thinking
    its subscribers were sent, over all turns, unless the stop rolled the run back, and
    then history holds nothing of it."""
    terminal = check_run_events(events)
    mine = [m for m in history if m.meta.get("run_id") == terminal.run_id]
    if isinstance(terminal, RunCancelled) and terminal.restored_prompt is not None:
        assert mine == [], f"a rolled-back run left {mine}"
        return
    replies = [m for m in mine if m.role == "assistant"]
    if is_unsaved(terminal):  # saved later, or set aside: never a part of it
        assert "".join(m.text for m in replies) in ("", delivered_text(events))
        return
    assert "".join(m.text for m in replies) == delivered_text(events)
    kept_thinking = "".join(
        b.text for m in replies for b in m.content if isinstance(b, ThinkingBlock)
    )
    assert kept_thinking == "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    if isinstance(terminal, RunFinished) and terminal.message is not None:
        assert terminal.message in history
    check_partial(events, history)


def check_prompt_once(prompt: str, events: Sequence[Event], history: Sequence[Message]) -> None:
    """Nothing lost or doubled: an accepted prompt is in history exactly once, unless the
    stop handed it back as ``restored_prompt``, and then it is not in history at all."""
    terminal = check_run_events(events)
    prompts = [
        m.text for m in history if m.role == "user" and m.meta.get("run_id") == terminal.run_id
    ]
    if isinstance(terminal, RunCancelled) and terminal.restored_prompt is not None:
        assert terminal.restored_prompt == prompt and prompts == []
    elif is_unsaved(terminal):  # stored once, or never if the run was stopped unbegun
        assert prompts in ([prompt], []), f"run {terminal.run_id}: prompt stored as {prompts}"
    else:
        assert prompts == [prompt], f"run {terminal.run_id}: prompt stored as {prompts}"


def check_receipt(events: Sequence[Event]) -> None:
    """No tool left running after a stop: a stopped run's receipt names every tool call
    it started, and each call's fate is the one its events showed (finished: a result was
    sent; cancelled: started, never finished; not_started: never started)."""
    terminal = check_run_events(events)
    started = {e.tool_call_id for e in events if isinstance(e, ToolCallStarted)}
    finished = {e.tool_call_id for e in events if isinstance(e, ToolCallFinished)}
    assert finished <= started
    if is_unsaved(terminal):
        return
    if not isinstance(terminal, RunCancelled):
        assert finished == started, "a run ended normally with a tool call unfinished"
        return
    for receipt in terminal.receipt:
        call = receipt.tool_call_id
        fate = "finished" if call in finished else "cancelled" if call in started else "not_started"
        assert receipt.status == fate, f"{receipt} but its events say {fate}"
    assert started <= {r.tool_call_id for r in terminal.receipt}


def check_abort_claims(
    claims: Mapping[str, Sequence[str]],
    terminals: Mapping[str, TerminalEvent],
    requested: Collection[str],
    beaten: Collection[str] = (),
) -> None:
    """Invariant 5: an abort that reported a run aborted (``claims``: run id -> the reasons
    of the aborts that said so) won, and the run ended cancelled for that reason; an abort
    too late reported nothing. So each run stopped for a ``requested`` reason has exactly
    one claim, and a run that finished, failed or stopped otherwise has none. A run in
    ``beaten`` was named by an abort that found it nowhere (``aborted: false``) and may
    have been stopped by it all the same as it started (a bus's tombstone, see
    ``runtime._abort``): it may have no claim."""
    assert set(claims) <= set(terminals), "an abort reported a run that never ran"
    for run_id, terminal in terminals.items():
        said = list(claims.get(run_id, ()))
        if isinstance(terminal, RunCancelled) and terminal.reason in requested:
            allowed = [[terminal.reason], []] if run_id in beaten else [[terminal.reason]]
            assert said in allowed, f"run {run_id} stopped; aborts said {said}"
        elif is_unsaved(terminal):  # it may have been a stop whose commit failed
            assert len(said) <= 1, f"run {run_id}: aborts said {said}"
        else:
            assert said == [], f"run {run_id} ended {terminal}, yet aborts said {said}"


async def check_settled(rt: Runtime, model: object, session_key: str) -> list[Message]:
    """Invariants 2 and 4: valid history; nothing of any run left."""
    await trio.testing.wait_all_tasks_blocked()
    history = await rt.store.history(session_key)
    validate_history(history)
    assert rt.live_runs() == [], "a run is still registered"
    assert getattr(model, "open_streams", 0) == 0, "a model stream is still open"
    return history


async def run_and_abort_when(
    rt: Runtime,
    run: Run,
    events: Subscription,
    ready: type | None,
    *,
    delay: float = 0,
    **abort: object,
) -> list[Event]:
    """Abort ``run`` ``delay`` seconds after an event of type ``ready`` arrives (at once
    when None)."""
    seen: list[Event] = []
    if ready is None:
        result = rt.abort(run_id=run.run_id, **abort)  # type: ignore[arg-type]
        assert result.aborted
    async for event in events:
        if event.run_id != run.run_id:
            continue
        seen.append(event)
        if ready is not None and isinstance(event, ready):
            await trio.sleep(delay)
            assert rt.abort(run_id=run.run_id, **abort).aborted  # type: ignore[arg-type]
            ready = None
        if is_terminal(event):
            return seen
    raise AssertionError("subscription ended early")


MCP_SERVER = Path(__file__).with_name("mcp_server.py")  # the tests' MCP server script


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose command line carries ``tag``: the process table, read."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


# -- frames a gateway client received ----------------------------------------------


def deltas(frames: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [
        f["payload"]
        for f in frames
        if f.get("event") == "chat"
        and f["payload"]["runId"] == run_id
        and f["payload"]["state"] == "delta"
    ]


def final_text(payload: dict[str, Any]) -> str:
    return "".join(b["text"] for b in payload["message"]["content"] if b["type"] == "text")


def rebuilt(frames: list[dict[str, Any]], run_id: str) -> str:
    """A client's text: the first delta's message (the text so far), then deltaText only."""
    text = ""
    for n, payload in enumerate(deltas(frames, run_id)):
        if "message" in payload:
            assert n == 0 or payload.get("replace"), "a snapshot only on the first delta"
            text = final_text(payload)
        else:
            text += payload["deltaText"]
    return text

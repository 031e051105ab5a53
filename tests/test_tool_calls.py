"""What a tool may say besides its result: progress, and that it passed a stop on
(``runtime.current_tool_call``). In memory, on the autojump clock."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from runtime import (
    RunCancelled,
    RunFinished,
    Runtime,
    ScriptedModel,
    Tool,
    ToolCallFinished,
    ToolCallProgress,
    ToolCallStarted,
    converter,
    current_tool_call,
    text_turn,
    tool_turn,
)
from tests.helpers import check_receipt, check_settled, drain, events_until_terminal


async def test_progress_reports_become_events_between_start_and_result(autojump_clock):
    async def counting(arguments: Mapping[str, Any]) -> str:
        call = current_tool_call()
        assert call is not None and call.name == "counting" and call.id == "c1"
        for step in range(3):
            call.report_progress(step, 3, f"step {step}")
            await trio.sleep(1)
        call.report_progress(3, 3)
        call.report_progress(3, 3, "too soon after the last: dropped")
        return "counted"

    model = ScriptedModel.from_turns(tool_turn(("c1", "counting", {})), text_turn("done"))
    async with Runtime(model=model, tools=[Tool("counting", counting)]) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "count")
            seen = await events_until_terminal(events, run.run_id)
        assert isinstance(seen[-1], RunFinished)
        tool_events = [
            e for e in seen if isinstance(e, ToolCallStarted | ToolCallProgress | ToolCallFinished)
        ]
        assert [type(e).__name__ for e in tool_events] == [
            "ToolCallStarted",
            *["ToolCallProgress"] * 4,
            "ToolCallFinished",
        ]
        progress = [(e.progress, e.total, e.message) for e in tool_events[1:-1]]
        assert progress == [(0, 3, "step 0"), (1, 3, "step 1"), (2, 3, "step 2"), (3, 3, None)]
        assert current_tool_call() is None
        # the event survives the wire converter
        assert converter.structure(converter.unstructure(tool_events[1]), ToolCallProgress)


async def test_a_tool_that_passed_the_stop_on_says_so_in_the_receipt(autojump_clock):
    kept: list[Any] = []

    async def remote(arguments: Mapping[str, Any]) -> str:
        call = current_tool_call()
        assert call is not None
        kept.append(call)
        try:
            await trio.sleep(1000)
        except trio.Cancelled as stop:
            assert stop.reason == "rpc"
            call.note_cancel_delivered("the worker was told (reason rpc)")
            raise
        return "never"

    async def local(arguments: Mapping[str, Any]) -> str:
        await trio.sleep(1000)
        return "never"

    model = ScriptedModel.from_turns(tool_turn(("c1", "remote", {}), ("c2", "local", {})))
    tools = [Tool("remote", remote), Tool("local", local)]
    async with Runtime(model=model, tools=tools) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "work")
            await trio.sleep(1)
            assert rt.abort(run_id=run.run_id).aborted
            seen = await events_until_terminal(events, run.run_id)
        terminal = seen[-1]
        assert isinstance(terminal, RunCancelled)
        check_receipt(seen)
        receipts = {r.tool_call_id: (r.status, r.cancel_delivered) for r in terminal.receipt}
        assert receipts == {
            "c1": ("cancelled", "the worker was told (reason rpc)"),
            "c2": ("cancelled", None),
        }
        await check_settled(rt, model, "s")
        # after the call, its handle is inert: no event can follow the terminal one
        with rt.subscribe("s") as later:
            await trio.sleep(1)
            kept[0].report_progress(1.0)
            assert drain(later) == []

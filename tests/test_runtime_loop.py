"""The agent loop: turns, tools, budgets, bad input (in-memory model, autojump clock)."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from runtime import (
    InvalidRequest,
    MemoryStore,
    ModelError,
    RunCancelled,
    RunExists,
    RunFailed,
    RunFinished,
    RunStarted,
    Runtime,
    ScriptedModel,
    StreamOptions,
    TextDelta,
    Tool,
    ToolCallFinished,
    ToolCallStarted,
    ToolResultBlock,
    UsageReport,
    text_turn,
    tool_turn,
)
from tests.helpers import check_run_events, check_settled, events_until_terminal


async def echo(arguments):
    return {"echo": arguments.get("text", "")}


async def test_a_run_streams_and_finishes() -> None:
    model = ScriptedModel.from_turns(text_turn("Hello", ", ", "world"))
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "hi")
            seen = await events_until_terminal(events, run.run_id)
        assert [type(e) for e in seen[:2]] == [StreamOptions, RunStarted]
        assert seen[0].allow_cancel is True
        terminal = check_run_events(seen)
        assert isinstance(terminal, RunFinished)
        assert terminal.stop_reason == "end_turn"
        assert terminal.message is not None and terminal.message.text == "Hello, world"
        assert terminal.usage.input_tokens == 10 and terminal.usage.output_tokens == 3
        history = await check_settled(rt, model, "s")
        assert [m.role for m in history] == ["user", "assistant"]
        assert history[0].text == "hi"
        assert await run.wait() is terminal


async def test_stream_options_can_disallow_cancel() -> None:
    model = ScriptedModel.from_turns(text_turn("ok"))
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "hi", allow_cancel=False)
            seen = await events_until_terminal(events, run.run_id)
        assert [e.allow_cancel for e in seen if isinstance(e, StreamOptions)] == [False]


async def test_tools_run_concurrently_and_results_reach_the_model(autojump_clock) -> None:
    async def slow(arguments):
        await trio.sleep(10)
        return f"slept for {arguments['n']}"

    model = ScriptedModel.from_turns(
        tool_turn(("c1", "slow", {"n": 1}), ("c2", "slow", {"n": 2})), text_turn("done")
    )
    async with Runtime(model=model, tools=[Tool("slow", slow)]) as rt:
        with rt.subscribe("s") as events:
            started = trio.current_time()
            run = await rt.start_run("s", "go")
            seen = await events_until_terminal(events, run.run_id)
        assert trio.current_time() - started < 15  # both ran in the same 10 s
        assert {e.tool_call_id for e in seen if isinstance(e, ToolCallStarted)} == {"c1", "c2"}
        assert isinstance(seen[-1], RunFinished)
        second = model.requests[1].messages
        results = [b for b in second[-1].content if isinstance(b, ToolResultBlock)]
        assert sorted(r.content for r in results) == ["slept for 1", "slept for 2"]
        history = await check_settled(rt, model, "s")
        assert [m.role for m in history] == ["user", "assistant", "tool", "assistant"]


async def test_a_tool_that_raises_becomes_an_error_result() -> None:
    async def broken(arguments):
        raise KeyError("missing")

    model = ScriptedModel.from_turns(
        tool_turn(("c1", "broken", {}), ("c2", "nosuch", {})), text_turn("sorry")
    )
    async with Runtime(model=model, tools=[Tool("broken", broken)]) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "go")
            seen = await events_until_terminal(events, run.run_id)
        finished = {e.tool_call_id: e for e in seen if isinstance(e, ToolCallFinished)}
        assert finished["c1"].is_error and "KeyError" in finished["c1"].result
        assert finished["c2"].is_error and "no tool named 'nosuch'" in finished["c2"].result
        results = {b.tool_call_id: b for b in model.requests[1].messages[-1].content}
        assert results["c2"].content == finished["c2"].result
        assert isinstance(seen[-1], RunFinished)
        await check_settled(rt, model, "s")


async def test_max_turns_stops_a_stuck_tool_loop() -> None:
    model = ScriptedModel(lambda request: tool_turn((f"c{len(request.messages)}", "echo", {})))
    async with Runtime(model=model, tools=[Tool("echo", echo)], max_turns=4) as rt:
        run = await rt.start_run("s", "loop")
        terminal = await run.wait()
        assert isinstance(terminal, RunFinished)
        assert terminal.stop_reason == "max_turns"
        assert len(model.requests) == 4
        await check_settled(rt, model, "s")


async def test_max_tool_calls_answers_the_rest_without_running_them() -> None:
    calls = []

    async def count(arguments):
        calls.append(arguments["i"])
        return "ok"

    model = ScriptedModel.from_turns(tool_turn(*[(f"c{i}", "count", {"i": i}) for i in range(5)]))
    async with Runtime(model=model, tools=[Tool("count", count)], max_tool_calls=3) as rt:
        run = await rt.start_run("s", "go")
        terminal = await run.wait()
        assert isinstance(terminal, RunFinished) and terminal.stop_reason == "max_tool_calls"
        assert sorted(calls) == [0, 1, 2]
        history = await check_settled(rt, model, "s")
        skipped = [b for b in history[-1].content if "budget" in b.content]
        assert [b.tool_call_id for b in skipped] == ["c3", "c4"]


async def test_run_timeout_cancels_with_reason_timeout(autojump_clock) -> None:
    model = ScriptedModel.from_turns(text_turn("a", "b", "c", pause=10))
    async with Runtime(model=model, run_timeout=15) as rt:
        run = await rt.start_run("s", "slow")
        terminal = await run.wait()
        assert isinstance(terminal, RunCancelled)
        assert terminal.reason == "timeout"
        assert terminal.message is not None and terminal.message.text == "a"
        await check_settled(rt, model, "s")


async def test_a_model_error_fails_the_run_with_its_kind() -> None:
    model = ScriptedModel.from_turns(
        [UsageReport(input_tokens=3), ModelError("rate_limit", "Slow down.", retry_after=2)]
    )
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "hi")
            seen = await events_until_terminal(events, run.run_id)
        terminal = check_run_events(seen)
        assert isinstance(terminal, RunFailed)
        assert (terminal.error_kind, terminal.error_message) == ("rate_limit", "Slow down.")
        record = await rt.store.get_run(run.run_id)
        assert record is not None and record.status == "failed"
        await check_settled(rt, model, "s")


async def test_a_blocking_tool_in_a_thread_is_abandoned_on_stop() -> None:
    release = threading.Event()

    def blocking(arguments):
        release.wait(30)  # ignores cancellation entirely
        return "too late"

    model = ScriptedModel.from_turns(tool_turn(("c1", "block", {})), text_turn("never"))
    try:
        async with Runtime(model=model, tools=[Tool.from_sync("block", blocking)]) as rt:
            with rt.subscribe("s") as events, trio.fail_after(10):
                run = await rt.start_run("s", "go")
                async for event in events:
                    if isinstance(event, ToolCallStarted):
                        break
                started = time.monotonic()
                assert rt.abort(run_id=run.run_id).aborted
                terminal = await run.wait()
                assert time.monotonic() - started < 5
            assert isinstance(terminal, RunCancelled)
            assert [r.status for r in terminal.receipt] == ["cancelled"]
            await check_settled(rt, model, "s")
    finally:
        release.set()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"message": "  "}, "message is empty"),
        ({"message": "hi", "stop_policy": "forget"}, "Unknown stop policy 'forget'"),
        ({"message": "hi", "concurrency": "queue"}, "Unknown concurrency policy 'queue'"),
        ({"message": "hi", "session_key": ""}, "sessionKey is empty"),
    ],
)
async def test_bad_input_gets_a_clear_error(kwargs, fragment) -> None:
    model = ScriptedModel.from_turns(text_turn("x"))
    async with Runtime(model=model) as rt:
        arguments = {"session_key": "s", **kwargs}
        with pytest.raises(InvalidRequest, match=fragment):
            await rt.start_run(arguments.pop("session_key"), arguments.pop("message"), **arguments)
        assert rt.live_runs() == []


async def test_a_run_id_is_an_idempotency_key() -> None:
    model = ScriptedModel.from_turns(text_turn("x"))
    async with Runtime(model=model) as rt:
        run = await rt.start_run("s", "hi", run_id="r1")
        with pytest.raises(RunExists, match="still running"):
            await rt.start_run("s", "hi", run_id="r1")
        await run.wait()
        with pytest.raises(RunExists, match="already run"):
            await rt.start_run("s", "hi", run_id="r1")
        assert len(await rt.store.history("s")) == 2


async def test_many_sessions_run_concurrently(autojump_clock) -> None:
    model = ScriptedModel.from_turns(text_turn("a", "b", pause=5))
    async with Runtime(model=model) as rt:
        start = trio.current_time()
        runs = [await rt.start_run(f"s{i}", "hi") for i in range(20)]
        for run in runs:
            assert isinstance(await run.wait(), RunFinished)
        assert trio.current_time() - start < 15
        for i in range(20):
            await check_settled(rt, model, f"s{i}")


async def test_statistics_count_live_queued_and_aborts(autojump_clock) -> None:
    model = ScriptedModel.from_turns(text_turn("a", pause=100))
    async with Runtime(model=model, store=MemoryStore()) as rt:
        first = await rt.start_run("s", "one")
        await rt.start_run("s", "two")
        await trio.testing.wait_all_tasks_blocked()
        stats = rt.statistics()
        assert (stats.live_runs, stats.queued_runs, stats.aborts) == (1, 1, 0)
        assert rt.abort(session_key="s").run_ids[0] == first.run_id
        await first.wait()
        await trio.testing.wait_all_tasks_blocked()
        stats = rt.statistics()
        assert (stats.live_runs, stats.queued_runs, stats.aborts) == (0, 0, 2)
        assert stats.stop_latency.count == 2
        assert stats.stop_latency.max_ms is not None


async def test_text_deltas_carry_run_and_session() -> None:
    model = ScriptedModel.from_turns(text_turn("x", "y"))
    async with Runtime(model=model) as rt:
        with rt.subscribe() as events:  # all sessions
            run = await rt.start_run("chat-1", "hi")
            seen = await events_until_terminal(events, run.run_id)
        deltas = [e for e in seen if isinstance(e, TextDelta)]
        assert [(d.session_key, d.run_id, d.text) for d in deltas] == [
            ("chat-1", run.run_id, "x"),
            ("chat-1", run.run_id, "y"),
        ]

"""Stopping: every state a run can be in, every policy, the races (in-memory, autojump)."""

from __future__ import annotations

import attrs
import pytest
import trio

from runtime import (
    MemoryStore,
    Pause,
    RunCancelled,
    RunFinished,
    RunQueued,
    RunSessionMismatch,
    RunStarted,
    Runtime,
    ScriptedModel,
    SessionBusy,
    StreamOptions,
    TextChunk,
    TextDelta,
    ThinkingChunk,
    Tool,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallStarted,
    TurnEnd,
    UsageReport,
    note_stopped_by_user,
    text_turn,
    tool_turn,
)
from tests.helpers import (
    check_partial,
    check_run_events,
    check_settled,
    delivered_text,
    events_until_terminal,
    run_and_abort_when,
)

SLOW_TEXT = text_turn("one ", "two ", "three ", "four ", pause=1)


async def sleepy(arguments):
    await trio.sleep(1000)
    return "woke"


async def stop_case(model, ready, *, tools=(), policy=None, delay=0, **runtime_options):
    """Start a run, abort it ``delay`` s after ``ready`` arrives, check the invariants,
    return all."""
    rt_options = {"tools": tools, **runtime_options}
    async with Runtime(model=model, **rt_options) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "question", stop_policy=policy)
            seen = await run_and_abort_when(rt, run, events, ready, delay=delay)
        terminal = check_run_events(seen)
        assert isinstance(terminal, RunCancelled), terminal
        assert terminal.reason == "rpc"
        history = await check_settled(rt, model, "s")
        check_partial(seen, history)
        assert not rt.abort(run_id=run.run_id).aborted  # twice is harmless
        return terminal, seen, history


async def test_abort_before_the_run_starts_returns_the_prompt(autojump_clock) -> None:
    terminal, seen, history = await stop_case(ScriptedModel.from_turns(SLOW_TEXT), None)
    assert terminal.restored_prompt == "question"
    assert terminal.message is None
    assert history == []  # the prompt never entered history
    assert [type(e) for e in seen] == [StreamOptions, RunCancelled]  # options come first


async def test_abort_while_the_model_is_silent(autojump_clock) -> None:
    model = ScriptedModel.from_turns([UsageReport(input_tokens=42), Pause(3600), TextChunk("late")])
    terminal, seen, history = await stop_case(model, RunStarted, delay=1)  # in the pause
    assert terminal.message is None  # nothing was said: no empty assistant message
    assert [m.role for m in history] == ["user"]
    assert terminal.usage.input_tokens == 42 and terminal.usage.output_tokens is None
    assert terminal.timings.committed_ms >= terminal.timings.scope_exited_ms >= 0


async def test_abort_mid_text_keeps_exactly_the_delivered_text(autojump_clock) -> None:
    terminal, seen, history = await stop_case(ScriptedModel.from_turns(SLOW_TEXT), TextDelta)
    assert terminal.message is not None
    assert terminal.message.text == delivered_text(seen) == "one "
    assert terminal.message.meta["aborted"] is True
    assert terminal.message.meta["origin"] == "rpc"
    assert terminal.usage.output_tokens == 1 and terminal.usage.estimated
    assert history[-1] == terminal.message


async def test_abort_mid_thinking_keeps_unsigned_thinking(autojump_clock) -> None:
    model = ScriptedModel.from_turns([ThinkingChunk("hmm, "), Pause(100), ThinkingChunk("so")])
    async with Runtime(model=model) as rt:
        run = await rt.start_run("s", "q")
        await trio.sleep(10)
        assert rt.abort(run_id=run.run_id).aborted
        terminal = await run.wait()
        thinking = terminal.message.content[0]
        assert (thinking.text, thinking.signature) == ("hmm, ", None)
        await check_settled(rt, model, "s")


async def test_abort_mid_tool_call_arguments_drops_the_unfinished_call(autojump_clock) -> None:
    model = ScriptedModel.from_turns(
        [
            TextChunk("Let me look."),
            ToolCallBegin("c1", "sleepy"),
            ToolCallArgs("c1", '{"q": "ab'),
            Pause(3600),
            ToolCallArgs("c1", 'c"}'),
            TurnEnd("tool_use"),
        ]
    )
    terminal, seen, history = await stop_case(model, TextDelta, tools=[Tool("sleepy", sleepy)])
    assert [(r.tool_call_id, r.status) for r in terminal.receipt] == [("c1", "not_started")]
    assert terminal.message.text == "Let me look."
    assert terminal.message.tool_uses() == ()  # arguments were cut off: never ran


async def test_abort_while_a_tool_runs_closes_the_call(autojump_clock) -> None:
    model = ScriptedModel.from_turns(
        tool_turn(("c1", "sleepy", {}), ("c2", "quick", {})), text_turn("never")
    )

    async def quick(arguments):
        return "quick result"

    terminal, seen, history = await stop_case(
        model, ToolCallStarted, tools=[Tool("sleepy", sleepy), Tool("quick", quick)]
    )
    statuses = {r.tool_call_id: r.status for r in terminal.receipt}
    assert statuses["c1"] == "cancelled"
    assert [m.role for m in history] == ["user", "assistant", "tool"]
    results = {b.tool_call_id: b for b in history[-1].content}
    assert "side effects are unknown" in results["c1"].content and results["c1"].is_error
    if statuses["c2"] == "finished":
        assert results["c2"].content == "quick result"
    else:
        assert statuses["c2"] in ("cancelled", "not_started")
    assert history[1].meta["aborted"] is True  # the turn's message carries the abort


async def test_abort_between_turns(autojump_clock) -> None:
    box = {}

    async def stopper(arguments):
        box["rt"].abort(run_id=box["run"].run_id)
        return "stopped it myself"

    model = ScriptedModel.from_turns(tool_turn(("c1", "stopper", {})), text_turn("never"))
    async with Runtime(model=model, tools=[Tool("stopper", stopper)]) as rt:
        box["rt"] = rt
        box["run"] = run = await rt.start_run("s", "q")
        terminal = await run.wait()
        assert isinstance(terminal, RunCancelled)
        assert [(r.tool_call_id, r.status) for r in terminal.receipt] == [("c1", "finished")]
        history = await check_settled(rt, model, "s")
        assert history[-1].content[0].content == "stopped it myself"
        assert len(model.requests) == 1  # the second turn never started


@attrs.define
class SlowCommitStore:
    """A MemoryStore whose commits take a while, to abort during one."""

    inner: MemoryStore = attrs.Factory(MemoryStore)
    committing: trio.Event = attrs.Factory(trio.Event)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def commit_run(self, record, items, *, rollback):
        self.committing.set()
        await trio.sleep(1)
        await self.inner.commit_run(record, items, rollback=rollback)


async def test_abort_during_the_commit_is_too_late(autojump_clock) -> None:
    store = SlowCommitStore()
    model = ScriptedModel.from_turns(text_turn("whole answer"))
    async with Runtime(model=model, store=store) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "q")
            await store.committing.wait()
            result = rt.abort(run_id=run.run_id)
            assert (result.aborted, result.run_ids) == (False, ())
            assert not rt.abort(session_key="s").aborted
            seen = await events_until_terminal(events, run.run_id)
        assert isinstance(check_run_events(seen), RunFinished)
        await check_settled(rt, model, "s")


async def test_abort_after_the_end_aborts_nothing() -> None:
    model = ScriptedModel.from_turns(text_turn("done"))
    async with Runtime(model=model) as rt:
        run = await rt.start_run("s", "q")
        assert isinstance(await run.wait(), RunFinished)
        assert not rt.abort(run_id=run.run_id).aborted
        assert not rt.abort(session_key="s").aborted
        assert not rt.abort(run_id="never-existed").aborted


async def test_abort_that_wins_the_race_with_completion_cancels(autojump_clock) -> None:
    # The model has said everything; the abort lands before the run could commit.
    model = ScriptedModel.from_turns([TextChunk("all of it"), Pause(5), TurnEnd("end_turn")])
    async with Runtime(model=model) as rt:
        run = await rt.start_run("s", "q")
        await trio.sleep(1)
        assert rt.abort(run_id=run.run_id).aborted
        terminal = await run.wait()
        assert isinstance(terminal, RunCancelled)
        assert terminal.message.text == "all of it"
        await check_settled(rt, model, "s")


async def test_an_abort_of_another_sessions_run_is_refused(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model) as rt:
        run = await rt.start_run("mine", "q")
        with pytest.raises(RunSessionMismatch, match="runId does not match sessionKey"):
            rt.abort(run_id=run.run_id, session_key="theirs")
        assert run.phase in ("queued", "running")
        assert rt.abort(run_id=run.run_id, session_key="mine").aborted
        await run.wait()


async def test_rollback_removes_the_prompt_and_returns_it(autojump_clock) -> None:
    terminal, seen, history = await stop_case(
        ScriptedModel.from_turns(SLOW_TEXT), TextDelta, policy="rollback"
    )
    assert terminal.policy == "rollback"
    assert terminal.restored_prompt == "question"
    assert terminal.message is None
    assert history == []


async def test_rollback_keeps_earlier_history(autojump_clock) -> None:
    model = ScriptedModel.from_turns(text_turn("first answer"), SLOW_TEXT)
    async with Runtime(model=model) as rt:
        await (await rt.start_run("s", "first")).wait()
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "second", stop_policy="rollback")
            await run_and_abort_when(rt, run, events, TextDelta)
        history = await check_settled(rt, model, "s")
        assert [m.text for m in history] == ["first", "first answer"]


async def test_session_settings_choose_the_stop_policy(autojump_clock) -> None:
    from runtime import SessionSettings

    store = MemoryStore()
    await store.set_settings("s", SessionSettings(stop_policy="rollback"))
    model = ScriptedModel.from_turns(SLOW_TEXT)
    terminal, _, history = await stop_case(model, TextDelta, store=store)
    assert terminal.policy == "rollback" and history == []


async def test_the_on_cancelled_hook_can_add_a_hidden_note(autojump_clock) -> None:
    terminal, _, history = await stop_case(
        ScriptedModel.from_turns(SLOW_TEXT), TextDelta, on_cancelled=note_stopped_by_user
    )
    assert [m.role for m in history] == ["user", "assistant", "user"]
    assert history[-1].meta["hidden"] is True and "stopped" in history[-1].text


async def test_a_failing_hook_saves_the_items_unchanged(autojump_clock, caplog) -> None:
    def broken(run, items, context):
        raise RuntimeError("hook bug")

    terminal, _, history = await stop_case(
        ScriptedModel.from_turns(SLOW_TEXT), TextDelta, on_cancelled=broken
    )
    assert history[-1] == terminal.message
    assert "on_cancelled hook failed" in caplog.text


# -- concurrency policies ------------------------------------------------------------


async def test_enqueue_runs_messages_in_order(autojump_clock) -> None:
    model = ScriptedModel(lambda request: text_turn("re: " + request.messages[-1].text, pause=1))
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            first = await rt.start_run("s", "one")
            second = await rt.start_run("s", "two")
            queued = await events_until_terminal(events, first.run_id)
            assert isinstance(check_run_events(queued), RunFinished)
            await second.wait()
        history = await check_settled(rt, model, "s")
        assert [m.text for m in history] == ["one", "re: one", "two", "re: two"]


async def test_a_queued_run_can_be_aborted_and_the_live_one_goes_on(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            first = await rt.start_run("s", "one")
            second = await rt.start_run("s", "two")
            third = await rt.start_run("s", "three")
            assert rt.abort(run_id=second.run_id).aborted
            cancelled = await second.wait()
            assert cancelled.restored_prompt == "two"
            assert first.phase == "running" and third.phase == "queued"
            assert isinstance(await first.wait(), RunFinished)
            assert isinstance(await third.wait(), RunFinished)
            seen = await events_until_terminal(events, second.run_id)
            assert [type(e) for e in seen] == [StreamOptions, RunQueued, RunCancelled]
        history = await check_settled(rt, model, "s")
        assert [m.text for m in history if m.role == "user"] == ["one", "three"]


async def test_a_run_queued_behind_an_aborted_queued_run_waits_for_the_live_one(
    autojump_clock,
) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model) as rt:
        first = await rt.start_run("s", "one")
        second = await rt.start_run("s", "two")
        third = await rt.start_run("s", "three")
        rt.abort(run_id=second.run_id)
        await second.wait()
        await trio.sleep(0.5)
        assert first.phase == "running" and third.phase == "queued"
        await third.wait()


async def test_reject_refuses_while_a_run_is_live(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model) as rt:
        first = await rt.start_run("s", "one", concurrency="reject")
        with pytest.raises(SessionBusy, match="busy"):
            await rt.start_run("s", "two", concurrency="reject")
        assert rt.live_runs("s") == [first]
        await first.wait()
        await check_settled(rt, model, "s")


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
async def test_interrupt_and_rollback_stop_the_live_run_for_the_new_one(
    autojump_clock, policy
) -> None:
    model = ScriptedModel(lambda request: text_turn("re: ", request.messages[-1].text, pause=1))
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            first = await rt.start_run("s", "one")
            await run_and_abort_when_text(events, first)
            second = await rt.start_run("s", "two", concurrency=policy)
            stopped = await first.wait()
            assert isinstance(stopped, RunCancelled) and stopped.reason == "interrupted"
            assert isinstance(await second.wait(), RunFinished)
        history = await check_settled(rt, model, "s")
        texts = [m.text for m in history]
        if policy == "interrupt":
            assert texts == ["one", "re: ", "two", "re: two"]
            assert history[1].meta["aborted"] is True
        else:
            assert stopped.restored_prompt == "one"
            assert texts == ["two", "re: two"]


async def run_and_abort_when_text(events, run):
    async for event in events:
        if isinstance(event, TextDelta) and event.run_id == run.run_id:
            return


async def test_session_abort_stops_live_and_queued_runs(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model) as rt:
        runs = [await rt.start_run("s", f"m{i}") for i in range(3)]
        other = await rt.start_run("t", "elsewhere")
        result = rt.abort(session_key="s", reason="stop-command")
        assert result.aborted and result.run_ids == tuple(r.run_id for r in runs)
        for run in runs:
            terminal = await run.wait()
            assert isinstance(terminal, RunCancelled) and terminal.reason == "stop-command"
        assert other.phase in ("queued", "running")
        assert isinstance(await other.wait(), RunFinished)
        await check_settled(rt, model, "s")


async def test_closing_the_runtime_stops_runs_with_reason_shutdown(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    store = MemoryStore()
    async with Runtime(model=model, store=store) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "q")
            await run_and_abort_when_text(events, run)
    terminal = await run.wait()
    assert isinstance(terminal, RunCancelled) and terminal.reason == "shutdown"
    history = await store.history("s")
    assert history[-1].meta["origin"] == "shutdown"
    assert (await store.get_run(run.run_id)).status == "cancelled"


async def test_an_outer_cancel_still_commits_the_partial(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT)
    store = MemoryStore()
    with trio.move_on_after(2.5):
        async with Runtime(model=model, store=store) as rt:
            run = await rt.start_run("s", "q")
            await trio.sleep_forever()
    terminal = run.terminal_event
    assert isinstance(terminal, RunCancelled) and terminal.reason == "shutdown"
    assert (await store.history("s"))[-1].text == "one two "


async def test_each_abort_checkpoint_is_logged_with_its_keys(autojump_clock, caplog) -> None:
    caplog.set_level("INFO", logger="runtime")
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model) as rt:
        with rt.subscribe("chat-9") as events:
            run = await rt.start_run("chat-9", "q")
            await run_and_abort_when(rt, run, events, TextDelta)
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime"]
    for step in ("abort requested", "scope exited, provider stream closed", "commit done"):
        line = next(line for line in lines if line.startswith(step))
        assert f"session=chat-9 run={run.run_id} reason=rpc" in line
    assert "ms=" in next(line for line in lines if line.startswith("commit done"))

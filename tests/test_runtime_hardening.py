"""Ways to break a stop, each pinned by the test that found it (issue 12, section 2).

Each test drives the public API of the runtime, with a real SQLite file where the store's
own behaviour is the point, and checks the invariants with ``tests/helpers.py``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from adapters.sqlite_store import SQLiteStore
from runtime import (
    AbortRefused,
    MemoryStore,
    Message,
    RunCancelled,
    RunExists,
    RunFailed,
    RunFinished,
    RunQueued,
    RunRecord,
    Runtime,
    RuntimeClosing,
    ScriptedModel,
    StreamOptions,
    TextBlock,
    TextChunk,
    TextDelta,
    Tool,
    ToolCallStarted,
    text_turn,
    tool_turn,
    validate_history,
)
from runtime._context import fit_context
from runtime._state import RunState, encode_fragment
from tests.helpers import check_settled, events_until_terminal, wait_for

SLOW_TEXT = text_turn("one ", "two ", "three ", "four ", pause=1)


class HookedStore:
    """A store that runs ``hooks[name](*args)`` around the inner store's method ``name``:
    before it (``before_NAME``) or after it (``after_NAME``), to make a fault happen at an
    exact point."""

    def __init__(self, inner: Any, **hooks: Callable[..., Awaitable[None]]) -> None:
        self.inner = inner
        self.hooks = hooks

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        before, after = self.hooks.get(f"before_{name}"), self.hooks.get(f"after_{name}")
        if before is None and after is None:
            return method

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                await before(*args, **kwargs)
            result = await method(*args, **kwargs)
            if after is not None:
                await after(*args, **kwargs)
            return result

        return hooked


# -- 1. hung sync tools never starve the store --------------------------------------


async def test_hung_sync_tools_do_not_starve_stop_commits(tmp_path) -> None:
    """40 runs stopped while each waits in a blocking tool: every stop commits its
    partial, nothing stays running, and another session starts at once. Before, the
    abandoned threads held every token of Trio's default limiter, which the SQLite store
    also used, and all 40 commits failed."""
    release = threading.Event()
    hang = Tool.from_sync("hang", lambda arguments: release.wait(60))
    turns = [tool_turn(("c1", "hang", {}), text="looking ")] * 40 + [text_turn("fine")]
    model = ScriptedModel.from_turns(*turns)
    try:
        async with SQLiteStore(tmp_path / "s.db") as store:
            async with Runtime(model=model, store=store, tools=[hang], commit_timeout=2) as rt:
                with trio.fail_after(30):
                    with rt.subscribe() as events:
                        runs = [await rt.start_run(f"s{i}", "go") for i in range(40)]
                        for run in runs:
                            await wait_for(events, ToolCallStarted, run.run_id)
                    for run in runs:
                        rt.abort(run_id=run.run_id)
                    terminals = [await run.wait() for run in runs]
                    assert {type(t) for t in terminals} == {RunCancelled}
                    assert all(t.message is not None for t in terminals)  # partial kept
                    assert [await store.running_runs()] == [[]]
                    other = await rt.start_run("other", "hello")
                    assert isinstance(await other.wait(), RunFinished)
                for i in range(40):
                    validate_history(await store.history(f"s{i}"))
    finally:
        release.set()


async def test_a_tool_that_ignores_cancellation_cannot_hold_the_stop(autojump_clock) -> None:
    """A shielded tool keeps running, but the run's terminal event comes within
    ``commit_timeout`` of the abort, with the call marked cancelled."""

    async def stubborn(arguments):
        with trio.CancelScope(shield=True):
            await trio.sleep(100)
        return "too late"

    model = ScriptedModel.from_turns(tool_turn(("c1", "stubborn", {})), text_turn("after"))
    tool = Tool("stubborn", stubborn)
    async with Runtime(model=model, tools=[tool], commit_timeout=4) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "go")
            await wait_for(events, ToolCallStarted, run.run_id)
            aborted_at = trio.current_time()
            rt.abort(run_id=run.run_id)
            terminal = await run.wait()
            assert trio.current_time() - aborted_at <= 4
            assert isinstance(terminal, RunCancelled)
            assert [r.status for r in terminal.receipt] == ["cancelled"]
        history = await rt.store.history("s")
        validate_history(history)
        assert "too late" not in json.dumps([m.text for m in history])


# -- 2. a failed stop commit, then the session goes on, then a restart --------------


async def settled(store: Any, run_id: str) -> RunRecord:
    """The run's final record, once written (the store has no event to wait on)."""
    for _ in range(1000):
        record = await store.get_run(run_id)
        if record is not None and record.status != "running":
            return record
        await trio.sleep(0.05)
    raise AssertionError(f"run {run_id} is still running in the store")


def failing_commits(run_ids: set[str]) -> Callable[..., Awaitable[None]]:
    async def fail(record, items, *, rollback):
        if record.run_id in run_ids:
            raise OSError("disk hiccup")

    return fail


async def test_a_failed_stop_commit_is_saved_later_without_breaking_history(tmp_path) -> None:
    failing: set[str] = set()
    model = ScriptedModel.from_turns(SLOW_TEXT, text_turn("second reply"))
    async with SQLiteStore(tmp_path / "s.db") as inner:
        store = HookedStore(inner, before_commit_run=failing_commits(failing))
        async with Runtime(model=model, store=store, checkpoint_interval=0.05) as rt:
            with trio.fail_after(30), rt.subscribe("s") as events:
                first = await rt.start_run("s", "first", run_id="first")
                await wait_for(events, TextDelta, "first")
                failing.add("first")
                rt.abort(run_id="first")
                terminal = await first.wait()
                assert isinstance(terminal, RunFailed) and terminal.error_kind == "store"
                assert "OSError" not in terminal.error_message  # words, not class names
                second = await rt.start_run("s", "second")
                assert isinstance(await second.wait(), RunFinished)
                failing.clear()  # the disk is back: the checkpoint task retries
                record = await settled(inner, "first")
        history = await inner.history("s")
        validate_history(history)
        assert [m.text for m in history] == ["first", "second", "second reply"]
        assert record.status == "cancelled" and record.set_aside  # kept, out of the way
        assert record.set_aside[0].text.startswith("one")


async def test_recovery_after_a_failed_commit_keeps_the_history_valid(tmp_path) -> None:
    """The process dies before the store recovers: on restart, the old run's partial is
    set aside rather than appended after the later turn."""
    db = tmp_path / "s.db"
    model = ScriptedModel.from_turns(SLOW_TEXT, text_turn("second reply"))
    async with SQLiteStore(db) as inner:
        store = HookedStore(inner, before_commit_run=failing_commits({"first"}))
        async with Runtime(model=model, store=store, checkpoint_interval=0.05) as rt:
            with trio.fail_after(30), rt.subscribe("s") as events:
                first = await rt.start_run("s", "first", run_id="first")
                await wait_for(events, TextDelta, "first")
                await trio.sleep(0.2)  # a checkpoint holds the partial
                rt.abort(run_id="first")
                assert isinstance(await first.wait(), RunFailed)
                second = await rt.start_run("s", "second")
                assert isinstance(await second.wait(), RunFinished)
        assert (await inner.get_run("first")).status == "running"  # as a crash leaves it
    async with SQLiteStore(db) as store:
        async with Runtime(model=ScriptedModel.from_turns(), store=store):
            pass
        history = await store.history("s")
        validate_history(history)
        assert [m.text for m in history] == ["first", "second", "second reply"]
        record = await store.get_run("first")
        assert record.status == "interrupted" and record.set_aside


async def test_an_on_cancelled_hook_cannot_break_the_history(autojump_clock) -> None:
    def two_assistants(run, items, context):
        return [*items, *items]  # two assistant messages in a row

    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with Runtime(model=model, on_cancelled=two_assistants) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "q")
            await wait_for(events, TextDelta, run.run_id)
            rt.abort(run_id=run.run_id)
            terminal = await run.wait()
        history = await check_settled(rt, model, "s")
        assert [m.role for m in history] == ["user", "assistant"]  # saved unhooked
        assert terminal.message == history[-1]


# -- 4. allow_cancel is kept ------------------------------------------------------


async def test_a_run_that_does_not_allow_cancel_refuses_aborts(autojump_clock) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT, SLOW_TEXT)
    async with Runtime(model=model) as rt:
        with rt.subscribe("s") as events:
            locked = await rt.start_run("s", "q", allow_cancel=False)
            queued = await rt.start_run("s", "next", allow_cancel=False)
            with pytest.raises(AbortRefused, match="allowCancel false"):
                rt.abort(run_id=locked.run_id)
            result = rt.abort(session_key="s")
            assert (result.aborted, result.refused) == (False, (locked.run_id, queued.run_id))
            interrupting = await rt.start_run("s", "now", concurrency="interrupt")
            assert isinstance(await locked.wait(), RunFinished)  # not interrupted
            seen = await events_until_terminal(events, queued.run_id)
            assert [type(e) for e in seen[:2]] == [StreamOptions, RunQueued]  # options first
            assert seen[0].allow_cancel is False
            assert isinstance(seen[-1], RunFinished)
            rt.abort(run_id=interrupting.run_id)


async def test_shutdown_and_timeouts_still_stop_a_run_that_does_not_allow_cancel(
    autojump_clock,
) -> None:
    model = ScriptedModel.from_turns(SLOW_TEXT, SLOW_TEXT)
    async with Runtime(model=model) as rt:
        timed = await rt.start_run("t", "q", allow_cancel=False, run_timeout=1.5)
        terminal = await timed.wait()
        assert isinstance(terminal, RunCancelled) and terminal.reason == "timeout"
        closing = await rt.start_run("s", "q", allow_cancel=False)
    terminal = await closing.wait()
    assert isinstance(terminal, RunCancelled) and terminal.reason == "shutdown"


# -- 5. shutdown admits no late run ------------------------------------------------


async def test_a_run_sent_during_shutdown_is_refused(autojump_clock) -> None:
    gate = trio.Event()

    async def slow_commit(record, items, *, rollback):
        await gate.wait()

    store = HookedStore(MemoryStore(), before_commit_run=slow_commit)
    outcomes: list[object] = []
    async with trio.open_nursery() as nursery:
        async with Runtime(model=ScriptedModel.from_turns(SLOW_TEXT), store=store) as rt:
            live = await rt.start_run("s", "q")

            async def send_late() -> None:
                await trio.sleep(1)  # the runtime is exiting, waiting on live's commit
                try:
                    outcomes.append(await rt.start_run("t", "late"))
                except RuntimeClosing as exc:
                    outcomes.append(exc)
                gate.set()

            nursery.start_soon(send_late)
        assert isinstance(live.terminal_event, RunCancelled)
    assert len(outcomes) == 1 and isinstance(outcomes[0], RuntimeClosing)
    assert "shutting down" in str(outcomes[0])


async def test_an_admission_that_straddles_shutdown_is_refused(autojump_clock) -> None:
    """The send is between its store reads when shutdown begins: it must not register a
    run that nobody will stop or announce."""
    reading, gate = trio.Event(), trio.Event()

    async def slow_settings(session_key):
        reading.set()
        await gate.wait()

    store = HookedStore(MemoryStore(), before_get_settings=slow_settings)
    outcomes: list[object] = []

    async def send(rt: Runtime) -> None:
        try:
            outcomes.append(await rt.start_run("s", "q"))
        except RuntimeClosing as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        async with Runtime(model=ScriptedModel.from_turns(SLOW_TEXT), store=store) as rt:
            events = rt.subscribe()
            nursery.start_soon(send, rt)
            await reading.wait()
        gate.set()  # the runtime has closed; the admission goes on
    assert [type(o) for o in outcomes] == [RuntimeClosing]
    assert events.receive_nowait() is None  # nothing was announced


# -- 6. one unreadable record does not stop the service -----------------------------


async def test_unreadable_checkpoints_are_closed_as_interrupted(tmp_path) -> None:
    """Three runs left running by a dead process: one with a good checkpoint, one whose
    checkpoint is of a shape this version cannot read, one whose record is corrupt. The
    runtime starts, closes all three as interrupted, and keeps the good one's partial."""
    db = tmp_path / "s.db"
    state = RunState("good")
    state.apply(TextChunk("partial answer"))
    good, _ = state.checkpoint_fragment()
    async with SQLiteStore(db) as store:
        for key in ("good", "old", "corrupt"):
            record = RunRecord(run_id=key, session_key=key, status="running", started_at=0.0)
            prompt = Message("user", (TextBlock("q"),), 0.0, {"run_id": key})
            await store.begin_run(record, prompt)
        await store.checkpoint_runs({"good": encode_fragment(good), "old": '{"shape": 1}'})
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("UPDATE runs SET body = 'not json' WHERE run_id = 'corrupt'")
    connection.close()
    async with SQLiteStore(db) as store:
        async with Runtime(model=ScriptedModel.from_turns(), store=store):
            pass
        for key in ("good", "old", "corrupt"):
            record = await store.get_run(key)
            assert record.status == "interrupted", key
            validate_history(await store.history(key))
        assert [m.text for m in await store.history("good")] == ["q", "partial answer"]
        assert [m.text for m in await store.history("old")] == ["q"]
        assert "could not be read" in (await store.get_run("corrupt")).error


# -- 7. rollback does not depend on store timing ----------------------------------


async def test_rollback_is_exact_when_the_abort_lands_after_the_prompt_was_written(
    autojump_clock,
) -> None:
    """An async driver's ``begin_run`` commits, then awaits: an abort that lands there
    hands the prompt back and leaves nothing of it in history."""
    written = trio.Event()

    async def after_write(record, prompt):
        written.set()
        await trio.sleep(1)

    store = HookedStore(MemoryStore(), after_begin_run=after_write)
    async with Runtime(model=ScriptedModel.from_turns(SLOW_TEXT), store=store) as rt:
        run = await rt.start_run("s", "question", stop_policy="keep_partial")
        await written.wait()
        assert rt.abort(run_id=run.run_id).aborted
        terminal = await run.wait()
        assert isinstance(terminal, RunCancelled)
        assert terminal.restored_prompt == "question"
        assert await store.history("s") == []  # handed back means not in history


# -- 8. what is sent to the model is bounded --------------------------------------


def exchange(i: int, size: int) -> list[Message]:
    return [
        Message("user", (TextBlock(f"q{i}"),), 0.0, {}),
        Message("assistant", (TextBlock("x" * size),), 0.0, {}),
    ]


def test_the_context_keeps_the_newest_whole_exchanges_that_fit() -> None:
    history = [m for i in range(10) for m in exchange(i, 100)]
    history.append(Message("user", (TextBlock("now"),), 0.0, {}))
    kept = fit_context(history, 350)
    assert [m.text for m in kept if m.role == "user"] == ["q7", "q8", "q9", "now"]  # 309 chars
    validate_history(kept)
    assert fit_context(history, None) == history
    assert fit_context(history, 0) == history[-1:]  # the prompt always goes
    assert fit_context(history[1:], None)[0].text == "q1"  # never an assistant first


async def test_a_long_session_sends_a_bounded_request() -> None:
    store = MemoryStore()
    model = ScriptedModel.from_turns(*[text_turn("y" * 1000)] * 30)
    async with Runtime(model=model, store=store, context_budget=5000) as rt:
        for i in range(30):
            await (await rt.start_run("s", f"q{i}")).wait()
    sizes = [sum(len(m.text) for m in request.messages) for request in model.requests]
    assert max(sizes) <= 5000 + 10
    assert model.requests[-1].messages[-1].text == "q29"
    validate_history(model.requests[-1].messages)


# -- 9. commit_timeout is the real bound ------------------------------------------


async def test_a_locked_database_cannot_stretch_the_stop_past_commit_timeout(tmp_path) -> None:
    db = tmp_path / "s.db"
    model = ScriptedModel.from_turns(SLOW_TEXT)
    async with SQLiteStore(db, busy_timeout=5) as store:
        async with Runtime(model=model, store=store, commit_timeout=1) as rt:
            with rt.subscribe("s") as events:
                run = await rt.start_run("s", "q")
                await wait_for(events, TextDelta, run.run_id)
                other = sqlite3.connect(db, isolation_level=None)
                other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
                try:
                    rt.abort(run_id=run.run_id)
                    with trio.fail_after(3.5):  # commit_timeout 1 s, not 1 + busy 5 s
                        terminal = await run.wait()
                finally:
                    other.execute("ROLLBACK")
                    other.close()
            assert isinstance(terminal, RunFailed) and terminal.error_kind == "store"
            with trio.fail_after(30):  # the lock is gone: the retry saves it
                await settled(store, run.run_id)
        history = await store.history("s")
        validate_history(history)
        assert [m.role for m in history] == ["user", "assistant"]


# -- loose ends -----------------------------------------------------------------


async def test_a_failing_begin_run_reports_a_store_error() -> None:
    async def broken(record, prompt):
        raise OSError("no room on the disk")

    store = HookedStore(MemoryStore(), before_begin_run=broken)
    async with Runtime(model=ScriptedModel.from_turns(SLOW_TEXT), store=store) as rt:
        terminal = await (await rt.start_run("s", "q")).wait()
    assert isinstance(terminal, RunFailed) and terminal.error_kind == "store"
    assert "save the prompt" in terminal.error_message and "no room" in terminal.error_message


async def test_a_hung_sync_tool_uses_up_its_own_threads_only() -> None:
    """With every thread of one blocking tool hung, another blocking tool still runs,
    and a call waiting for one of the hung tool's threads can be stopped. (With Trio's
    default limiter shared by all, the hung calls would hold every thread.)"""
    trio.to_thread.current_default_thread_limiter().total_tokens = 2  # this test's trio.run
    release = threading.Event()
    hang = Tool.from_sync("hang", lambda arguments: release.wait(60), max_threads=2)
    echo = Tool.from_sync("echo", lambda arguments: "echoed")
    calls = [(f"c{i}", "hang", {}) for i in range(3)]
    model = ScriptedModel.from_turns(
        tool_turn(*calls), tool_turn(("e1", "echo", {})), text_turn("done")
    )
    try:
        async with Runtime(model=model, tools=[hang, echo]) as rt:
            with trio.fail_after(30), rt.subscribe() as events:
                stuck = await rt.start_run("a", "go")
                for _ in calls:
                    await wait_for(events, ToolCallStarted, stuck.run_id)
                other = await rt.start_run("b", "go")
                assert isinstance(await other.wait(), RunFinished)
                rt.abort(run_id=stuck.run_id)
                terminal = await stuck.wait()
                assert [r.status for r in terminal.receipt] == ["cancelled"] * 3
    finally:
        release.set()


async def test_a_resend_while_a_failed_commit_waits_to_be_saved_starts_nothing(
    autojump_clock,
) -> None:
    """Found by the schedules: a run stopped while queued has no record until its commit
    lands; when that commit failed, a resend of its id started a second run."""
    store = HookedStore(MemoryStore(), before_commit_run=failing_commits({"queued"}))
    async with Runtime(model=ScriptedModel.from_turns(SLOW_TEXT), store=store) as rt:
        live = await rt.start_run("s", "first")
        queued = await rt.start_run("s", "second", run_id="queued")
        rt.abort(run_id="queued")
        terminal = await queued.wait()  # it never began: its prompt comes back all the same
        assert isinstance(terminal, RunCancelled) and terminal.restored_prompt == "second"
        with pytest.raises(RunExists):
            await rt.start_run("s", "second", run_id="queued")
        rt.abort(run_id=live.run_id)


async def test_a_run_stopped_while_its_prompt_was_being_saved_never_loses_it(
    autojump_clock,
) -> None:
    """Found by the --long restart schedules: a stop that lands while ``begin_run`` is
    writing the prompt, then a stop commit that fails, ended the run failed with its
    prompt neither stored nor handed back. Now it is handed back, and the rollback by
    run id is retried until it lands."""
    writing = trio.Event()

    async def slow_begin(record, prompt):
        writing.set()
        await trio.sleep(1)  # the abort lands here, before the prompt is written

    failing = {"r"}
    store = HookedStore(
        MemoryStore(), before_begin_run=slow_begin, before_commit_run=failing_commits(failing)
    )
    async with Runtime(model=ScriptedModel.from_turns(SLOW_TEXT), store=store) as rt:
        run = await rt.start_run("s", "question", run_id="r")
        await writing.wait()
        rt.abort(run_id="r")
        terminal = await run.wait()
        assert isinstance(terminal, RunCancelled) and terminal.restored_prompt == "question"
        failing.clear()
        assert (await settled(store, "r")).status == "cancelled"
        assert await store.history("s") == []


async def test_a_refused_send_whose_session_freed_meanwhile_is_admitted() -> None:
    """Found by the long two-gateway schedules: a send the `reject` policy was about to
    refuse looked its id up in the store, the session's run ended meanwhile, and the
    refusal read the emptied list of the session's runs (IndexError: "The run could not
    start"). The session is free by then: the send is admitted."""
    ended = trio.Event()

    async def late_lookup(run_id: str) -> None:
        if run_id == "second":
            await ended.wait()

    model = ScriptedModel.from_turns(SLOW_TEXT, text_turn("second reply"))
    store = HookedStore(MemoryStore(), before_get_run=late_lookup)
    async with Runtime(model=model, store=store) as rt, trio.open_nursery() as nursery:
        with trio.fail_after(30):
            first = await rt.start_run("s", "first", run_id="first")
            admitted: list[Any] = []

            async def send() -> None:
                admitted.append(
                    await rt.start_run("s", "second", run_id="second", concurrency="reject")
                )

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            rt.abort(run_id="first")
            await first.wait()
            ended.set()
            while not admitted:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert isinstance(await admitted[0].wait(), RunFinished)


async def test_a_run_saved_late_never_lands_after_the_next_prompt() -> None:
    """Found by the long two-gateway schedules (history with two assistant messages in a
    row): a failed commit saved later read the session's last message (its own prompt),
    the next run's prompt landed, and the late commit appended its reply after it. A
    session's prompts and late commits now go one at a time. Here the hooks force that
    order where the runtime allows it (each waits at most 1 s)."""
    tail_read, second_begun = trio.Event(), trio.Event()
    commits = 0

    async def before_commit_run(record: RunRecord, items: Any, *, rollback: bool) -> None:
        nonlocal commits
        if record.run_id == "first":
            commits += 1
            if commits == 1:
                raise OSError("disk hiccup")
            with trio.move_on_after(1):  # the late commit: after the next prompt, if it can
                await second_begun.wait()

    async def before_history(session_key: str, limit: int | None = None) -> None:
        if limit == 1:  # the late commit reads the session's last message
            tail_read.set()

    async def before_begin_run(record: RunRecord, prompt: Message) -> None:
        if record.run_id == "second":
            with trio.move_on_after(1):  # the next prompt: after that read, if it can
                await tail_read.wait()

    async def after_begin_run(record: RunRecord, prompt: Message) -> None:
        if record.run_id == "second":
            second_begun.set()

    model = ScriptedModel.from_turns(SLOW_TEXT, text_turn("second reply"))
    inner = MemoryStore()
    store = HookedStore(
        inner,
        before_commit_run=before_commit_run,
        before_history=before_history,
        before_begin_run=before_begin_run,
        after_begin_run=after_begin_run,
    )
    async with Runtime(model=model, store=store, checkpoint_interval=0.05) as rt:
        with trio.fail_after(30), rt.subscribe("s") as events:
            first = await rt.start_run("s", "first", run_id="first")
            second = await rt.start_run("s", "second", run_id="second", concurrency="enqueue")
            await wait_for(events, TextDelta, "first")
            rt.abort(run_id="first")
            assert isinstance(await first.wait(), RunFailed)  # its end is saved later
            assert isinstance(await second.wait(), RunFinished)
            await settled(inner, "first")
    history = await inner.history("s")
    validate_history(history)
    assert [m.text for m in history if m.role == "user"] == ["first", "second"]

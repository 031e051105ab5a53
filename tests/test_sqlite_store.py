"""The SQLite store on a real file: round trips, stop commits, checkpoints, crash recovery."""

from __future__ import annotations

import functools
import json
import signal
import sys
import textwrap

import pytest
import trio

from adapters.sqlite_store import SQLiteStore
from runtime import (
    Message,
    RunCancelled,
    RunFinished,
    RunRecord,
    Runtime,
    ScriptedModel,
    SessionSettings,
    TextBlock,
    TextDelta,
    ToolUseBlock,
    Usage,
    text_turn,
    validate_history,
)
from tests.helpers import check_settled, run_and_abort_when


async def test_round_trip_on_a_real_file(tmp_path) -> None:
    path = tmp_path / "store.db"
    prompt = Message("user", (TextBlock("hi"),), 1.0, {"run_id": "r1"})
    reply = Message(
        "assistant",
        (TextBlock("hello"), ToolUseBlock("c1", "t", {"a": [1, 2]})),
        2.0,
        {"run_id": "r1", "aborted": True, "origin": "rpc"},
    )
    record = RunRecord(run_id="r1", session_key="s", status="running", started_at=1.0)
    async with SQLiteStore(path) as store:
        await store.set_settings("s", SessionSettings("rollback", "reject"))
        await store.begin_run(record, prompt)
        await store.checkpoint_runs({"r1": '{"x": 1}', "unknown": "ignored"})
        assert (await store.get_run("r1")).checkpoint == '{"x": 1}'
        final = RunRecord(
            run_id="r1",
            session_key="s",
            status="cancelled",
            started_at=1.0,
            ended_at=2.0,
            stop_reason="rpc",
            usage=Usage(5, 7, True),
            scope_exited_ms=0.5,
        )
        await store.commit_run(final, [reply], rollback=False)
        await store.checkpoint_runs({"r1": "late"})  # ignored once committed
    async with SQLiteStore(path) as store:
        assert await store.history("s") == [prompt, reply]
        assert await store.history("s", limit=1) == [reply]
        assert await store.get_run("r1") == final
        assert await store.get_settings("s") == SessionSettings("rollback", "reject")
        assert await store.get_settings("other") == SessionSettings()
        assert await store.running_runs() == []
        assert await store.sessions() == ["s"]


async def test_rollback_removes_the_runs_messages_in_one_transaction(tmp_path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store:
        for run_id in ("r1", "r2"):
            record = RunRecord(run_id=run_id, session_key="s", status="running", started_at=0)
            await store.begin_run(
                record, Message("user", (TextBlock(run_id),), 0, {"run_id": run_id})
            )
        done = RunRecord(run_id="r2", session_key="s", status="cancelled", started_at=0)
        await store.commit_run(done, [], rollback=True)
        assert [m.text for m in await store.history("s")] == ["r1"]


async def test_a_stopped_run_commits_its_partial_to_sqlite(tmp_path) -> None:
    model = ScriptedModel.from_turns(text_turn("one ", "two ", "three", pause=0.2))
    async with SQLiteStore(tmp_path / "s.db") as store, Runtime(model=model, store=store) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "q")
            seen = await run_and_abort_when(rt, run, events, TextDelta)
        history = await check_settled(rt, model, "s")
        assert isinstance(seen[-1], RunCancelled)
        assert history[-1].text == "one " and history[-1].meta["aborted"] is True
        record = await store.get_run(run.run_id)
        assert (record.status, record.stop_reason, record.checkpoint) == ("cancelled", "rpc", None)
        assert record.scope_exited_ms is not None


async def test_streaming_text_is_checkpointed_incrementally(tmp_path) -> None:
    model = ScriptedModel.from_turns(text_turn(*[f"w{i} " for i in range(400)], pause=0.01))
    async with SQLiteStore(tmp_path / "s.db") as store:
        async with Runtime(model=model, store=store, checkpoint_interval=0.05) as rt:
            with trio.fail_after(30):
                run = await rt.start_run("s", "q")
                while True:
                    await trio.sleep(0.05)
                    record = await store.get_run(run.run_id)
                    if record.checkpoint and "w20" in record.checkpoint:
                        break
                # one fragment a tick, each holding only the text that is new since the
                # last: the bytes written per tick do not grow with the reply
                fragments = [json.loads(line) for line in record.checkpoint.splitlines()]
                assert len(fragments) > 1
                assert [f["text"].startswith("w0 ") for f in fragments].count(True) == 1
                assert run.text.startswith("".join(f["text"] for f in fragments))
                rt.abort(run_id=run.run_id)
                assert isinstance(await run.wait(), RunCancelled)


CHILD = textwrap.dedent(
    """
    import sys, trio
    from adapters.sqlite_store import SQLiteStore
    from runtime import Runtime, ScriptedModel, text_turn, TextDelta

    async def main(path):
        model = ScriptedModel.from_turns(text_turn(*[f"w{i} " for i in range(10000)], pause=0.01))
        async with SQLiteStore(path) as store:
            async with Runtime(model=model, store=store, checkpoint_interval=0.05) as rt:
                with rt.subscribe("s") as events:
                    await rt.start_run("s", "tell me everything", run_id="doomed")
                    count = 0
                    async for event in events:
                        count += isinstance(event, TextDelta)
                        if count == 30:
                            print("streaming", flush=True)

    trio.run(main, sys.argv[1])
    """
)


async def test_a_killed_process_leaves_an_interrupted_run_and_valid_history(tmp_path) -> None:
    path = tmp_path / "crash.db"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = functools.partial(
                trio.run_process, [sys.executable, "-c", CHILD, str(path)], stdout=-1, check=False
            )
            process = await nursery.start(child)
            buffered = b""
            while b"streaming" not in buffered:
                chunk = await process.stdout.receive_some()
                assert chunk, "the child exited before streaming"
                buffered += chunk
            await trio.sleep(0.3)  # a few checkpoints later
            process.send_signal(signal.SIGKILL)
        assert process.returncode == -signal.SIGKILL

        async with SQLiteStore(path) as store:
            assert [r.run_id for r in await store.running_runs()] == ["doomed"]
            model = ScriptedModel.from_turns(text_turn("fresh answer"))
            async with Runtime(model=model, store=store) as rt:
                record = await store.get_run("doomed")
                assert (record.status, record.stop_reason) == ("interrupted", "interrupted")
                history = await store.history("s")
                validate_history(history)
                partial = history[-1]
                assert partial.meta["origin"] == "interrupted" and partial.meta["aborted"] is True
                assert partial.text.startswith("w0 w1 w2 ") and len(partial.text.split()) >= 30
                run = await rt.start_run("s", "and now?")
                assert isinstance(await run.wait(), RunFinished)
                history = await check_settled(rt, model, "s")
                assert [m.text for m in history[-2:]] == ["and now?", "fresh answer"]
                sent = model.requests[0].messages
                assert sent[-1].text == "and now?" and sent[-2] == partial


@pytest.mark.parametrize("commit_timeout", [0.0, 0.00005, 0.0002, 0.001, 5.0])
async def test_the_terminal_event_tells_the_truth_when_the_commit_runs_out_of_time(
    tmp_path, commit_timeout
) -> None:
    """Whether the deadline lands before, during or after the write, the event matches
    what history holds: RunCancelled with the partial saved, or RunFailed without it."""
    model = ScriptedModel.from_turns(text_turn("kept ", "never", pause=0.2))
    async with SQLiteStore(tmp_path / "s.db") as store:
        async with Runtime(model=model, store=store, commit_timeout=commit_timeout) as rt:
            with rt.subscribe("s") as events, trio.fail_after(30):
                run = await rt.start_run("s", "q")
                seen = await run_and_abort_when(rt, run, events, TextDelta)
        history = await store.history("s")
        terminal = seen[-1]
        if isinstance(terminal, RunCancelled):
            assert history[-1].text == "kept "
        else:
            assert terminal.error_kind == "store" and "could not be saved" in terminal.error_message
            assert [m.role for m in history] == ["user"]

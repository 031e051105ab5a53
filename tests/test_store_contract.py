"""The Store contract: what every Store adapter must do, run on each (the SQLite file and
PostgreSQL). Round trips, stop commits, checkpoints, idempotency by run id, deadlines,
migrations and crash recovery. A backend-specific test goes in its own module."""

from __future__ import annotations

import functools
import json
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import attrs
import pytest
import trio

from adapters._migrations import SchemaTooNew, latest
from adapters.postgres_store import PostgresStore, PostgresStoreError
from adapters.sqlite_store import SQLiteStore, SQLiteStoreError
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
from tests.services import Postgres, postgres_fixture  # noqa: F401 (the fixture)


@attrs.frozen
class Backend:
    name: str
    db: str  # what --db takes: a file path or a postgresql:// URL
    make: Callable[..., Any]  # make(**options): a store on this database, not yet entered
    # holds the lock a write needs, from another connection, while the context lasts
    hold_write_lock: Callable[[], AbstractContextManager[None]]
    error: type[Exception]
    # sets the stored schema version (to test a database written by a newer release)
    set_version: Callable[[int], None]

    def open(self, **options: Any) -> Any:
        return self.make(**options)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "store.db"

        @contextmanager
        def hold_sqlite() -> Iterator[None]:
            import sqlite3

            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                other.execute("ROLLBACK")
                other.close()

        def set_sqlite_version(version: int) -> None:
            import sqlite3

            with sqlite3.connect(path) as other:
                other.execute("UPDATE schema_version SET version = ?", (version,))
            other.close()

        return Backend(
            "sqlite",
            str(path),
            lambda **options: SQLiteStore(path, **options),
            hold_sqlite,
            SQLiteStoreError,
            set_sqlite_version,
        )
    server: Postgres = request.getfixturevalue("postgres")
    url = server.create_database()

    @contextmanager
    def hold_postgres() -> Iterator[None]:
        import psycopg

        with psycopg.connect(url) as other:  # a transaction, rolled back on exit
            other.execute("LOCK TABLE runs, messages, sessions IN EXCLUSIVE MODE")
            yield
            other.rollback()

    def set_postgres_version(version: int) -> None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as other:
            other.execute("UPDATE schema_version SET version = %s", (version,))

    return Backend(
        "postgres",
        url,
        lambda **options: PostgresStore(url, **options),
        hold_postgres,
        PostgresStoreError,
        set_postgres_version,
    )


async def test_round_trip(backend: Backend) -> None:
    prompt = Message("user", (TextBlock("hi"),), 1.0, {"run_id": "r1"})
    reply = Message(
        "assistant",
        (TextBlock("hello"), ToolUseBlock("c1", "t", {"a": [1, 2]})),
        2.0,
        {"run_id": "r1", "aborted": True, "origin": "rpc"},
    )
    record = RunRecord(run_id="r1", session_key="s", status="running", started_at=1.0)
    async with backend.open() as store:
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
    async with backend.open() as store:
        assert await store.history("s") == [prompt, reply]
        assert await store.history("s", limit=1) == [reply]
        assert await store.get_run("r1") == final
        assert await store.get_settings("s") == SessionSettings("rollback", "reject")
        assert await store.get_settings("other") == SessionSettings()
        assert await store.running_runs() == []
        assert await store.sessions() == ["s"]


async def test_rollback_removes_the_runs_messages_in_one_transaction(backend: Backend) -> None:
    async with backend.open() as store:
        for run_id in ("r1", "r2"):
            record = RunRecord(run_id=run_id, session_key="s", status="running", started_at=0)
            await store.begin_run(
                record, Message("user", (TextBlock(run_id),), 0, {"run_id": run_id})
            )
        done = RunRecord(run_id="r2", session_key="s", status="cancelled", started_at=0)
        await store.commit_run(done, [], rollback=True)
        assert [m.text for m in await store.history("s")] == ["r1"]


async def test_a_stopped_run_commits_its_partial(backend: Backend) -> None:
    model = ScriptedModel.from_turns(text_turn("one ", "two ", "three", pause=0.2))
    async with backend.open() as store, Runtime(model=model, store=store) as rt:
        with rt.subscribe("s") as events:
            run = await rt.start_run("s", "q")
            seen = await run_and_abort_when(rt, run, events, TextDelta)
        history = await check_settled(rt, model, "s")
        assert isinstance(seen[-1], RunCancelled)
        assert history[-1].text == "one " and history[-1].meta["aborted"] is True
        record = await store.get_run(run.run_id)
        assert (record.status, record.stop_reason, record.checkpoint) == ("cancelled", "rpc", None)
        assert record.scope_exited_ms is not None


async def test_streaming_text_is_checkpointed_incrementally(backend: Backend) -> None:
    model = ScriptedModel.from_turns(text_turn(*[f"w{i} " for i in range(400)], pause=0.01))
    async with backend.open() as store:
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
    from adapters.stores import open_store
    from runtime import Runtime, ScriptedModel, text_turn, TextDelta

    async def main(path):
        model = ScriptedModel.from_turns(text_turn(*[f"w{i} " for i in range(10000)], pause=0.01))
        async with open_store(path) as store:
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


async def test_a_killed_process_leaves_an_interrupted_run_and_valid_history(
    backend: Backend,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = functools.partial(
                trio.run_process, [sys.executable, "-c", CHILD, backend.db], stdout=-1, check=False
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

        async with backend.open() as store:
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
    backend: Backend, commit_timeout: float
) -> None:
    """Whether the deadline lands before, during or after the write, the event matches
    what history holds: RunCancelled with the partial saved, or RunFailed without it."""
    model = ScriptedModel.from_turns(text_turn("kept ", "never", pause=0.2))
    async with backend.open() as store:
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


def _prompt(run_id: str, session_key: str = "s") -> tuple[RunRecord, Message]:
    record = RunRecord(run_id=run_id, session_key=session_key, status="running", started_at=1.0)
    return record, Message("user", (TextBlock(f"prompt {run_id}"),), 1.0, {"run_id": run_id})


def _final(run_id: str, session_key: str = "s") -> RunRecord:
    return RunRecord(
        run_id=run_id, session_key=session_key, status="finished", started_at=1.0, ended_at=2.0
    )


def _reply(run_id: str, text: str = "answer") -> Message:
    return Message("assistant", (TextBlock(text),), 2.0, {"run_id": run_id})


async def test_writes_are_idempotent_by_run_id(backend: Backend) -> None:
    async with backend.open() as store:
        record, prompt = _prompt("r1")
        await store.begin_run(record, prompt)
        await store.begin_run(record, prompt)  # a retry: no second prompt
        await store.commit_run(_final("r1"), [_reply("r1")], rollback=False)
        # a commit retried after an uncertain failure, even with other items: nothing
        await store.commit_run(_final("r1"), [_reply("r1", "again")], rollback=False)
        cancelled = attrs.evolve(_final("r1"), status="cancelled")
        await store.commit_run(cancelled, [], rollback=True)
        await store.begin_run(record, prompt)  # a resend after the end: nothing either
        assert [m.text for m in await store.history("s")] == ["prompt r1", "answer"]
        assert (await store.get_run("r1")).status == "finished"
        # a rollback of a run whose prompt was never written is no error, and writes
        # its record, so that a late begin_run of it writes nothing
        await store.commit_run(attrs.evolve(cancelled, run_id="r2"), [], rollback=True)
        await store.begin_run(*_prompt("r2"))
        assert [m.text for m in await store.history("s")] == ["prompt r1", "answer"]


async def test_checkpoints_of_many_runs_in_one_call(backend: Backend) -> None:
    async with backend.open() as store:
        for i in range(50):
            await store.begin_run(*_prompt(f"r{i}", f"s{i % 5}"))
        await store.commit_run(_final("r7", "s2"), [_reply("r7")], rollback=False)
        for tick in range(3):
            await store.checkpoint_runs({f"r{i}": f'{{"t": {tick}}}' for i in range(50)})
        running = {r.run_id: r for r in await store.running_runs()}
        assert len(running) == 49 and "r7" not in running
        expected = '{"t": 0}\n{"t": 1}\n{"t": 2}'
        assert all(r.checkpoint == expected for r in running.values())
        assert (await store.get_run("r7")).checkpoint is None
        await store.checkpoint_runs({})  # nothing to write is no error


async def test_two_stores_on_one_database_commit_a_run_once(backend: Backend) -> None:
    """Two processes closing the same run at once (its owner, and one that found it
    orphaned) leave one copy of its messages."""
    async with backend.open() as one, backend.open() as two:
        for i in range(20):
            await one.begin_run(*_prompt(f"r{i}"))
        async with trio.open_nursery() as nursery:
            for i in range(20):
                for store in (one, two):
                    nursery.start_soon(
                        functools.partial(
                            store.commit_run, _final(f"r{i}"), [_reply(f"r{i}")], rollback=False
                        )
                    )
        texts = [m.text for m in await two.history("s")]
        assert texts.count("answer") == 20 and len(texts) == 40
        assert await one.running_runs() == []


async def test_a_write_under_a_deadline_ends_by_it_and_says_it_failed(backend: Backend) -> None:
    async with backend.open() as store:
        await store.begin_run(*_prompt("r1"))
        with backend.hold_write_lock():
            with trio.fail_after(10):
                started = trio.current_time()
                with pytest.raises(backend.error, match=r"time it was given|locked by another"):
                    with trio.move_on_after(0.3):
                        await store.commit_run(_final("r1"), [_reply("r1")], rollback=False)
                elapsed = trio.current_time() - started
        assert 0.25 < elapsed < 2.0
        assert [m.text for m in await store.history("s")] == ["prompt r1"]
        assert (await store.get_run("r1")).status == "running"
        # the store serves the next call as usual
        await store.commit_run(_final("r1"), [_reply("r1")], rollback=False)
        assert [m.text for m in await store.history("s")] == ["prompt r1", "answer"]


async def test_a_cancel_while_waiting_writes_nothing(backend: Backend) -> None:
    async with backend.open() as store:
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.begin_run(*_prompt("r1"))
        assert await store.history("s") == []


async def test_the_schema_is_migrated_once_and_a_newer_one_is_refused(backend: Backend) -> None:
    async with backend.open() as store:
        await store.begin_run(*_prompt("r1"))
    async with backend.open() as store:  # reopened: migrated already, data kept
        assert [m.text for m in await store.history("s")] == ["prompt r1"]
    backend.set_version(latest(backend.name) + 1)  # type: ignore[arg-type]
    with pytest.raises(SchemaTooNew, match="newer trio-agent-runtime"):
        async with backend.open():
            pass


async def test_stores_opening_together_migrate_once(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(store.__aenter__)
    try:
        await stores[0].begin_run(*_prompt("r1"))
        assert [m.text for m in await stores[3].history("s")] == ["prompt r1"]
    finally:
        for store in stores:
            await store.__aexit__(None, None, None)

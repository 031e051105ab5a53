"""Faults at every edge, seen by a client of the real gateway (issue 7).

- Provider: a failed run ends in one ``chat`` ``error`` event. Its ``errorKind`` is
  OpenClaw's word where it has one (``rate_limit``, ``timeout``), else ``unknown``; the
  precise kind is always in ``errorDetail.providerErrorType``.
- Store (SQLite): a database locked by another program, a full disk (RLIMIT_FSIZE set on
  a ``trio-agent serve`` child with ``prlimit``: SQLite gets EFBIG, as on a full disk),
  and the file deleted under the server. The run fails with ``providerErrorType: store``
  and a sentence naming the fault.
- Client: a client that drops its TCP connection mid-run, and 1,000 connections that
  come and go. Afterwards open fds, Trio tasks, gateway connections, runtime runs and
  subscribers are back where they started.
- Process: ``trio-agent serve`` killed with SIGKILL mid-stream, then restarted on its file.

Every case checks that no run is left live, that what history held before the fault is
unchanged, and that the session takes its next message. The slow reader is covered in
``test_gateway_robustness.py``. Cost: 25 to 55 s on a busy 2-core machine, of which the
burst is 10 to 15 s and the two child-process tests 8 s.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import wrap_client_stream

from adapters.gateway import Gateway
from adapters.sim import SimServer
from adapters.sqlite_store import SQLiteStore
from runtime import validate_history
from runtime._state import RunState
from tests.conftest import IO_BOUND
from tests.gateway_client import Client, Frame, connect_params, open_client
from tests.gateway_stack import running_gateway, send
from tests.test_cli import PROCESS_BOUND, serving

QUICK = "Hi.\n#sim words=3 rate=1000"
ABORT_ON_DISCONNECT = "abort-on-disconnect"


async def converse(client: Client, session: str, key: str, message: str = QUICK) -> Frame:
    """Send a message; return the payload of its run's last ``chat`` event."""
    await client.ok("chat.send", send(session, message, key))
    last = await client.wait_event(
        lambda f: (
            f["event"] == "chat"
            and f["payload"]["runId"] == key
            and f["payload"]["state"] != "delta"
        )
    )
    return last["payload"]  # type: ignore[no-any-return]


async def settled_history(client: Client, session: str) -> list[Frame]:
    """The session's messages, once no run of any session is live or queued."""
    stats = await client.ok("runtime.stats")
    assert (stats["liveRuns"], stats["queuedRuns"]) == (0, 0), stats
    history = await client.ok("chat.history", {"sessionKey": session})
    assert history["liveRuns"] == []
    return history["messages"]  # type: ignore[no-any-return]


def delivered(client: Client, run_id: str) -> str:
    return "".join(
        f["payload"]["deltaText"]
        for f in client.events("chat", run_id)
        if f["payload"]["state"] == "delta"
    )


def text_of(message: Frame) -> str:
    return "".join(b["text"] for b in message["content"] if b["type"] == "text")


def check_store_error(payload: Frame, says: str) -> None:
    assert payload["state"] == "error", payload
    assert payload["errorKind"] == "unknown"
    assert payload["errorDetail"] == {"providerErrorType": "store"}
    assert says in payload["errorMessage"], payload["errorMessage"]
    assert "Traceback" not in payload["errorMessage"]


# -- provider -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "kind", "precise", "requests"),
    [
        # retried once (max_retries=1) before the headers, then reported
        pytest.param("#sim fail=429 retry_after=0.05", "rate_limit", "rate_limit", 2, id="429"),
        pytest.param("#sim fail=500", "unknown", "unavailable", 2, id="500"),
        pytest.param("#sim fail=529", "unknown", "overloaded", 2, id="529"),
        # after the third delta: never retried, the text so far is kept
        pytest.param("#sim fail=garbage rate=1000", "unknown", "bad_response", 1, id="bad-sse"),
        pytest.param("#sim fail=reset rate=1000", "unknown", "bad_response", 1, id="reset"),
        pytest.param("#sim words=50 rate=1000 pause_at=3:60", "timeout", "timeout", 1, id="stall"),
    ],
)
async def test_a_provider_fault_fails_the_run_with_its_kind(
    sim: SimServer, tmp_path: Path, directive: str, kind: str, precise: str, requests: int
) -> None:
    stack = running_gateway(tmp_path / "g.db", sim, read_timeout=2.0, max_retries=1)
    async with stack as (gateway, port), open_client(port) as client:
        with trio.fail_after(IO_BOUND):
            assert (await converse(client, "s", "before"))["state"] == "final"
            before = await settled_history(client, "s")
            sim.clear_connections()
            failed = await converse(client, "s", "fault", f"Go.\n{directive}")
            assert failed["state"] == "error", failed
            assert failed["errorKind"] == kind
            assert failed["errorDetail"] == {"providerErrorType": precise}
            assert (
                failed["errorMessage"].endswith(".") and "Traceback" not in failed["errorMessage"]
            )
            # our own kind in the runtime.failed extension, right after the error event
            extension = await client.wait_event(
                lambda f: f["event"] == "runtime.failed" and f["payload"]["runId"] == "fault"
            )
            assert extension["seq"] == client.events("chat", "fault")[-1]["seq"] + 1
            assert extension["payload"] | {"errorMessage": ""} == {
                "runId": "fault",
                "sessionKey": "s",
                "errorKind": precise,
                "wireErrorKind": kind,
                "errorMessage": "",
            }
            assert len(sim.connections()) == requests
            messages = await settled_history(client, "s")
            assert messages[: len(before)] == before
            added = messages[len(before) :]
            assert added[0]["role"] == "user" and directive in text_of(added[0])
            if requests == 1:  # mid-stream: the partial is kept, marked with the error
                assert [m["role"] for m in added] == ["user", "assistant"]
                assert text_of(added[1]) == delivered(client, "fault") != ""
                assert added[1]["errorKind"] == precise
            else:
                assert len(added) == 1
            assert (await converse(client, "s", "after"))["state"] == "final"
            validate_history(await gateway.runtime.store.history("s"))


async def test_chat_abort_stops_a_retry_backoff_at_once(sim: SimServer, tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "g.db", sim) as (_, port), open_client(port) as client:
        with trio.fail_after(IO_BOUND):
            await converse(client, "s", "before")
            before = await settled_history(client, "s")
            sim.clear_connections()
            await client.ok("chat.send", send("s", "Wait.\n#sim fail=429 retry_after=60", "wait"))
            [refused] = await sim.wait_closed(count=1)
            assert refused.status == 429
            await trio.sleep(0.2)  # into the 60 s backoff
            with trio.fail_after(15):  # well inside the backoff
                result = await client.ok("chat.abort", {"sessionKey": "s", "runId": "wait"})
                assert result == {"ok": True, "aborted": True, "runIds": ["wait"]}
                aborted = (await client.wait_chat("wait", "aborted"))["payload"]
            assert aborted["stopReason"] == "rpc" and "message" not in aborted
            assert len(sim.connections()) == 1  # the retry was never sent
            messages = await settled_history(client, "s")
            assert messages[: len(before)] == before
            assert [m["role"] for m in messages[len(before) :]] == ["user"]
            assert (await converse(client, "s", "after"))["state"] == "final"


# -- store ----------------------------------------------------------------------------------


@asynccontextmanager
async def write_lock_held(db: Path) -> AsyncIterator[None]:
    """Another program's connection, holding the database's write lock meanwhile."""
    connect = functools.partial(sqlite3.connect, db, check_same_thread=False, isolation_level=None)
    holder = await trio.to_thread.run_sync(connect)
    try:
        await trio.to_thread.run_sync(holder.execute, "BEGIN EXCLUSIVE")
        yield
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(holder.close)  # closing rolls back


async def test_a_locked_database_fails_the_run_and_the_server_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with running_gateway(db, busy_timeout=0.3) as (_, port), open_client(port) as client:
        with trio.fail_after(IO_BOUND):
            await converse(client, "s", "before")
            before = await settled_history(client, "s")
            await client.ok("chat.send", send("s", "Go.\n#sim words=30 rate=30", "locked"))
            await client.wait_chat("locked", "delta")
            async with write_lock_held(db):  # the run's checkpoints and commit wait 0.3 s, fail
                failed = (await client.wait_chat("locked", "error"))["payload"]
                check_store_error(failed, "is locked by another connection")
                assert (await client.ok("runtime.stats"))["liveRuns"] == 0
                reading = await client.ok("chat.history", {"sessionKey": "s"})  # WAL: reads go on
                assert reading["messages"][: len(before)] == before
            assert (await converse(client, "t", "other"))["state"] == "final"
            assert (await converse(client, "s", "after"))["state"] == "final"
            messages = await settled_history(client, "s")
            assert messages[: len(before)] == before


@pytest.mark.slow
async def test_a_full_disk_fails_the_run_and_history_survives(
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, open_client(served.port) as client:
            await converse(client, "s", "before")
            before = await settled_history(client, "s")
            # Writes go to the WAL, appended (it restarts only after 1,000 pages): let no
            # file grow past its end.
            limit = os.stat(f"{served.db}-wal").st_size
            pid = served.process.pid
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                failed = await converse(client, "s", "full", "Go.\n#sim words=200 rate=1000")
                check_store_error(failed, "the disk may be full")
                assert await settled_history(client, "s") == before
            finally:
                limits = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
            assert (await converse(client, "s", "after"))["state"] == "final"
            assert (await settled_history(client, "s"))[: len(before)] == before
    async with SQLiteStore(served.db) as store:
        history = await store.history("s")
        validate_history(history)
        assert [m.meta["run_id"] for m in history] == ["before"] * 2 + ["after"] * 2


async def test_a_deleted_database_file_fails_runs_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with running_gateway(db) as (_, port), open_client(port) as client:
        with trio.fail_after(IO_BOUND):
            await converse(client, "s", "before")
            before = await settled_history(client, "s")
            for suffix in ("", "-wal", "-shm"):  # rm g.db*
                os.unlink(f"{db}{suffix}")
            failed = await converse(client, "s", "gone")
            check_store_error(failed, "was deleted or replaced while the store had it open")
            assert await settled_history(client, "s") == before  # read from the open file
            check_store_error(await converse(client, "t", "other"), "was deleted")
            assert await settled_history(client, "t") == []
    assert not db.exists()  # and nothing was written to a new file meanwhile


# -- client ---------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@attrs.frozen
class Footprint:
    """What the gateway's process holds for its clients and runs."""

    fds: int
    tasks: int
    connections: int
    runs: int
    subscribers: int


def footprint(gateway: Gateway) -> Footprint:
    stats = gateway.runtime.statistics()
    return Footprint(
        open_fds(),
        trio.lowlevel.current_statistics().tasks_living,
        len(gateway.connections),
        len(gateway.runtime.live_runs()),
        stats.subscribers,
    )


async def check_back_to(gateway: Gateway, start: Footprint) -> None:
    """Wait (up to 20 s) for the footprint to return to ``start``: the server lets go of
    each connection in its own time."""
    for _ in range(400):
        if footprint(gateway) == start:
            break
        await trio.sleep(0.05)
    assert footprint(gateway) == start


async def come_and_go(port: int, how: int, *, caps: list[str] | None = None) -> None:
    """Open a connection and leave at once, politely or not, at one of four stages: 0 TCP
    only; 1 dropped after the challenge; 2 closed after hello-ok; 3 dropped after hello-ok.
    With ``caps``, send a message first and drop the connection at its first delta."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if how == 0:
        await stream.aclose()
        return
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
        await ws.get_message()  # connect.challenge
        if how >= 2:
            params = connect_params(caps=caps)
            await ws.send_message(
                json.dumps({"type": "req", "id": "c", "method": "connect", "params": params})
            )
            await ws.get_message()  # hello-ok; the run's events follow
        if caps is not None:
            request = {
                "type": "req",
                "id": "m",
                "method": "chat.send",
                "params": send("s", "Go.\n#sim words=60 rate=60", "dropped"),
            }
            await ws.send_message(json.dumps(request))
            while json.loads(await ws.get_message()).get("payload", {}).get("state") != "delta":
                pass
        if how % 2:  # drop the TCP connection without a close frame
            await stream.aclose()
        else:
            await ws.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("caps", [[], [ABORT_ON_DISCONNECT]], ids=["runs-on", "aborts"])
async def test_a_client_that_drops_mid_run_leaves_nothing_behind(
    tmp_path: Path, caps: list[str]
) -> None:
    async with running_gateway(tmp_path / "g.db") as (gateway, port), open_client(port) as watcher:
        with trio.fail_after(IO_BOUND):
            await converse(watcher, "s", "warm")  # the model connection is pooled from here
            start = footprint(gateway)
            await come_and_go(port, 3, caps=caps)
            if ABORT_ON_DISCONNECT in caps:
                ended = (await watcher.wait_chat("dropped", "aborted"))["payload"]
                assert ended["stopReason"] == "disconnect"
            else:
                ended = (await watcher.wait_chat("dropped", "final"))["payload"]
                assert len(text_of(ended["message"]).split()) == 60
            assert text_of(ended["message"]) == delivered(watcher, "dropped")
            messages = await settled_history(watcher, "s")
            assert messages[-1] == ended["message"]
            await converse(watcher, "s", "again")  # an aborted run's connection is not pooled
            await check_back_to(gateway, start)


@pytest.mark.slow
async def test_a_burst_of_a_thousand_clients_leaves_nothing_behind(tmp_path: Path) -> None:
    """About 5 to 15 ms per connection, client and server in this one process."""
    async with running_gateway(tmp_path / "g.db") as (gateway, port), open_client(port) as checker:
        with trio.fail_after(120):
            await converse(checker, "s", "warm")
            start = footprint(gateway)
            await checker.ok("chat.send", send("s", "Go.\n#sim words=2000 rate=20", "live"))
            await checker.wait_chat("live", "delta")  # the burst comes and goes mid-run
            at_once = trio.CapacityLimiter(200)  # 400 fds in this process at most

            async def one(how: int) -> None:
                async with at_once:
                    await come_and_go(port, how)

            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(one, i % 4)
            assert (await checker.ok("runtime.stats"))["liveRuns"] == 1
            await checker.ok("chat.abort", {"sessionKey": "s", "runId": "live"})
            await checker.wait_chat("live", "aborted")
            await converse(checker, "s", "again")  # the stopped run's connection left the pool
            await check_back_to(gateway, start)
            assert (await checker.ok("runtime.stats"))["connections"] == 1


# -- process --------------------------------------------------------------------------------


async def wait_checkpointed(db: Path, run_id: str, text: str) -> None:
    """Wait until the run's checkpoint in ``db`` (read as recovery reads it) holds
    ``text``."""
    async with SQLiteStore(db) as store:
        for _ in range(int(PROCESS_BOUND / 0.05)):
            record = await store.get_run(run_id)
            if record and record.checkpoint:
                if text in RunState.from_checkpoint(run_id, record.checkpoint).text:
                    return
            await trio.sleep(0.05)
    raise AssertionError(f"no checkpoint of run {run_id} holds {text!r}")


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_keeps_the_checkpointed_partial(
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served:
            async with open_client(served.port) as client:
                await converse(client, "s", "before")
                before = await settled_history(client, "s")
                await client.ok("chat.send", send("s", "Go.\n#sim words=2000 rate=50", "doomed"))
                await client.wait_event(
                    lambda f: (
                        f["event"] == "chat"
                        and f["payload"]["runId"] == "doomed"
                        and f["payload"]["seq"] >= 10
                    )
                )
                checkpointed = " ".join(delivered(client, "doomed").split()[:10])
                await wait_checkpointed(served.db, "doomed", checkpointed)
                served.process.send_signal(signal.SIGKILL)
                await client.closed.wait()
                seen = delivered(client, "doomed")
            assert await served.process.wait() == -signal.SIGKILL

        async with serving(tmp_path, env) as again, open_client(again.port) as client:
            messages = await settled_history(client, "s")
            assert messages[: len(before)] == before
            prompt, partial = messages[len(before) :]
            assert prompt["role"] == "user" and partial["role"] == "assistant"
            kept = text_of(partial)
            assert kept.startswith(checkpointed)
            assert seen.startswith(kept) or kept.startswith(seen)  # the same reply
            assert partial["openclawAbort"] == {
                "aborted": True,
                "origin": "interrupted",
                "runId": "doomed",
            }
            again_key = await client.ok("chat.send", send("s", QUICK, "doomed"))
            assert again_key["status"] == "ok"  # recorded: the key never starts a second run
            assert (await converse(client, "s", "after"))["state"] == "final"
    async with SQLiteStore(served.db) as store:
        record = await store.get_run("doomed")
        assert record is not None
        assert (record.status, record.stop_reason) == ("interrupted", "interrupted")
        history = await store.history("s")
        validate_history(history)
        assert [m.meta["run_id"] for m in history[-2:]] == ["after", "after"]

"""Several ``trio-agent serve`` processes sharing one PostgreSQL and one Redis: a Stop
sent to any of them stops the run where it lives, an abort that beats the start wins, a
process killed mid-stream has its run closed by another within 5 s, and one idempotency
key sent to two processes at once starts one run.

Each test starts its own Redis (a unix socket, nothing persisted) and its own database
on the session's private PostgreSQL, and its gateways; all are stopped when it ends.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from adapters.postgres_store import PostgresStore
from runtime import validate_history
from tests.gateway_client import Client, open_client
from tests.gateways import Gateway, gateway_process
from tests.helpers import deltas, final_text, rebuilt
from tests.services import (  # noqa: F401 (the fixtures)
    Postgres,
    Redis,
    postgres_fixture,
    redis_fixture,
)

SLOW = "Tell me.\n#sim words=2000 rate=40"
QUICK = "Hi.\n#sim words=5 rate=100"
BOUND = 90  # seconds: several Python processes start per test on a busy 2-core machine


@asynccontextmanager
async def gateways(
    env: dict[str, str], db: str, redis: Redis, count: int
) -> AsyncIterator[list[Gateway]]:
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(count):
            started.append(
                await stack.enter_async_context(
                    gateway_process(env, "--db", db, "--bus", redis.url)
                )
            )
        yield started


def untimed(value: object) -> object:
    """``value`` without "ts" and "timestamp": when each gateway wrote the frame."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("ts", "timestamp")}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def send(session: str, message: str, key: str) -> dict[str, str]:
    return {"sessionKey": session, "message": message, "idempotencyKey": key}


def delivered(client: Client, run_id: str) -> str:
    return "".join(
        f["payload"].get("deltaText", "")
        for f in client.events("chat", run_id)
        if f["payload"]["state"] == "delta"
    )


async def wait_deltas(client: Client, run_id: str, count: int) -> None:
    while len([f for f in client.events("chat", run_id) if f["payload"]["state"] == "delta"]) < (
        count
    ):
        await client.wait_event(lambda f: f["event"] == "chat")
        await trio.sleep(0.01)


async def test_a_stop_sent_to_b_stops_the_run_on_a(postgres: Postgres, redis: Redis, env) -> None:
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as on_b,
        ):
            assert (await on_a.ok("chat.send", send("s", SLOW, "r1")))["status"] == "started"
            await wait_deltas(on_a, "r1", 5)
            started = time.perf_counter()
            answer = await on_b.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
            answered_ms = (time.perf_counter() - started) * 1000
            assert answer == {"ok": True, "aborted": True, "runIds": ["r1"]}
            aborted = await on_a.wait_chat("r1", "aborted")  # the scope on A was cancelled
            assert aborted["payload"]["stopReason"] == "rpc"
            relayed = await on_b.wait_chat("r1", "aborted")  # and B's client is told
            assert relayed["payload"] == aborted["payload"]
            # a second abort, from either side, says it did nothing
            again = await on_b.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
            assert again["aborted"] is False
            # a run of another session named with this session: refused, as in one process
            assert (await on_a.ok("chat.send", send("t", SLOW, "r2")))["status"] == "started"
            await wait_deltas(on_a, "r2", 1)
            mismatch = await on_b.call("chat.abort", {"sessionKey": "s", "runId": "r2"})
            assert not mismatch["ok"] and "does not match" in mismatch["error"]["message"]
            # /stop sent to B stops the session's run on A
            stop = await on_b.ok("chat.send", send("t", "/stop", "stop-1"))
            assert stop["aborted"] is True and stop["runIds"] == ["r2"]
            await on_a.wait_chat("r2", "aborted")
            text = delivered(on_a, "r1")
    print(f"cross-process chat.abort answered in {answered_ms:.1f} ms")
    async with PostgresStore(db) as store:
        record = await store.get_run("r1")
        assert (record.status, record.stop_reason) == ("cancelled", "rpc")
        history = await store.history("s")
        validate_history(history)
        assert [m.role for m in history] == ["user", "assistant"]
        assert history[-1].meta["aborted"] is True and history[-1].text == text
        assert text  # the partial is in PostgreSQL, as streamed


async def test_an_abort_that_beats_the_start_wins(postgres: Postgres, redis: Redis, env) -> None:
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as on_b,
        ):
            # no process owns r1 yet: answered at once, and the tombstone is set
            answer = await on_b.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
            assert answer == {"ok": True, "aborted": False, "runIds": []}
            await on_a.ok("chat.send", send("s", SLOW, "r1"))
            aborted = await on_a.wait_chat("r1", "aborted")
            assert "message" not in aborted["payload"] or not delivered(on_a, "r1")
            # another id on the same session runs as usual
            await on_a.ok("chat.send", send("s", QUICK, "r2"))
            await on_a.wait_chat("r2", "final")
    async with PostgresStore(db) as store:
        assert (await store.get_run("r1")).status == "cancelled"
        history = await store.history("s")
        validate_history(history)
        assert [m.meta.get("run_id") for m in history] == ["r2", "r2"]  # r1 left nothing


async def test_a_killed_gateway_has_its_run_closed_by_another_within_5_s(
    postgres: Postgres, redis: Redis, env
) -> None:
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(b.port) as on_b,
        ):
            async with open_client(a.port) as on_a:
                await on_a.ok("chat.send", send("s", SLOW, "r1"))
                await wait_deltas(on_a, "r1", 20)
                await trio.sleep(0.6)  # a few checkpoints (every 0.25 s)
                text = delivered(on_a, "r1")
                a.process.send_signal(signal.SIGKILL)
                killed = time.perf_counter()
                await a.process.wait()
            async with PostgresStore(db) as store:
                while (await store.get_run("r1")).status == "running":  # noqa: ASYNC110
                    await trio.sleep(0.05)  # another process writes it: nothing to wait on
                noticed_s = time.perf_counter() - killed
                record = await store.get_run("r1")
                assert (record.status, record.stop_reason) == ("interrupted", "interrupted")
                history = await store.history("s")
                validate_history(history)
                partial = history[-1]
                assert partial.meta["origin"] == "interrupted" and partial.meta["aborted"]
                assert len(partial.text) > 20 and text.startswith(partial.text[:20])
            assert noticed_s < 5.0, f"the dead process was noticed after {noticed_s:.2f} s"
            # its run is owned by no one now: an abort says so at once
            answer = await on_b.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
            assert answer["aborted"] is False
            # the session goes on from B
            await on_b.ok("chat.send", send("s", QUICK, "r2"))
            await on_b.wait_chat("r2", "final")
            history = await on_b.ok("chat.history", {"sessionKey": "s"})
            assert [m["role"] for m in history["messages"]] == [
                "user",
                "assistant",
                "user",
                "assistant",
            ]
    print(f"dead gateway's run closed {noticed_s:.2f} s after SIGKILL")


async def test_one_idempotency_key_sent_to_two_gateways_starts_one_run(
    postgres: Postgres, redis: Redis, env
) -> None:
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as on_b,
        ):

            async def send_via(
                answers: dict[str, str], name: str, client: Client, i: int
            ) -> None:
                reply = await client.ok("chat.send", send(f"s{i}", SLOW, f"k{i}"))
                answers[name] = reply["status"]

            for i in range(10):
                answers: dict[str, str] = {}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_via, answers, "a", on_a, i)
                    nursery.start_soon(send_via, answers, "b", on_b, i)
                assert sorted(answers.values()) == ["in_flight", "started"], answers
                owner = on_a if answers["a"] == "started" else on_b
                await wait_deltas(owner, f"k{i}", 1)
                stop = await (on_b if owner is on_a else on_a).ok(
                    "chat.abort", {"sessionKey": f"s{i}", "runId": f"k{i}"}
                )
                assert stop["aborted"] is True
                await owner.wait_chat(f"k{i}", "aborted")
    async with PostgresStore(db) as store:
        for i in range(10):
            prompts = [m for m in await store.history(f"s{i}") if m.role == "user"]
            assert len(prompts) == 1


async def test_a_stop_after_redis_restarted_mid_run_still_stops_it(
    postgres: Postgres, redis: Redis, env
) -> None:
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as on_b,
        ):
            await on_a.ok("chat.send", send("s", SLOW, "r1"))
            await wait_deltas(on_a, "r1", 5)
            redis.stop()
            await trio.sleep(1.0)
            redis.start()  # empty, as after a restart without persistence
            await wait_deltas(on_a, "r1", len(delivered(on_a, "r1").split()) + 5)
            answer = await on_b.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
            # told the truth either way: if A's heartbeat had not owned the run again yet,
            # "false" now, and the tombstone stops it within a heartbeat
            await on_a.wait_chat("r1", "aborted")
            assert answer["aborted"] in (True, False)
            # a run started after the restart is stopped from B as usual
            await on_a.ok("chat.send", send("t", SLOW, "r2"))
            await wait_deltas(on_a, "r2", 1)
            again = await on_b.ok("chat.abort", {"sessionKey": "t", "runId": "r2"})
            assert again == {"ok": True, "aborted": True, "runIds": ["r2"]}
            await on_a.wait_chat("r2", "aborted")
    async with PostgresStore(db) as store:
        assert (await store.get_run("r1")).status == "cancelled"
        assert (await store.get_run("r2")).status == "cancelled"


async def test_a_client_of_b_follows_a_run_on_a(postgres: Postgres, redis: Redis, env) -> None:
    """Every chat and agent event of the run reaches B's client as A's client gets it:
    the same payloads, the run's seq without a gap."""
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as on_b,
        ):
            await on_a.ok("chat.send", send("s", "Tell me.\n#sim words=300 rate=400", "r1"))
            await on_a.wait_chat("r1", "final")
            final = await on_b.wait_chat("r1", "final")
            assert final["payload"]["message"]["content"][0]["text"].split()[0]
            await trio.sleep(0.2)  # anything that would follow the final, wrongly

            def payloads(client: Client) -> list[tuple[str, object]]:
                return [
                    (f["event"], untimed(f["payload"]))
                    for f in client.received
                    if f.get("type") == "event"
                    and f["event"] in ("chat", "agent")
                    and f["payload"].get("runId") == "r1"
                ]

            seen_a, seen_b = payloads(on_a), payloads(on_b)
            assert seen_b == seen_a
            seqs = [p["seq"] for kind, p in seen_b if kind == "chat"]  # type: ignore[index]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert delivered(on_b, "r1") == delivered(on_a, "r1")
            assert len(delivered(on_b, "r1").split()) == 300


async def test_a_client_that_reconnects_to_b_resumes_a_run_on_a(
    postgres: Postgres, redis: Redis, env
) -> None:
    """chat.history on B shows the run on A as it stands (inFlightRun, liveRuns, the
    queued input), a session followed from B starts from the run's text so far, and
    sessions.abort by key on B stops the run on A, with and without its queued inputs."""
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as page,
        ):
            await page.ok("sessions.messages.subscribe", {"key": "elsewhere"})  # not s
            await on_a.ok("chat.send", send("s", SLOW, "r1"))
            queued = send("s", QUICK, "r2") | {"queueMode": "followup"}
            await on_a.ok("chat.send", queued)
            await wait_deltas(on_a, "r1", 10)
            history = await page.ok("chat.history", {"sessionKey": "s"})
            in_flight = history["inFlightRun"]
            assert in_flight["runId"] == "r1" and len(in_flight["text"].split()) >= 10
            assert delivered(on_a, "r1").startswith(in_flight["text"])
            assert history["sessionInfo"] == {"hasActiveRun": True, "activeRunIds": ["r1"]}
            assert history["pendingInputs"]["total"] == 1
            assert history["pendingInputs"]["items"][0]["runId"] == "r2"
            live = [(r["runId"], r["phase"], r["prompt"]) for r in history["liveRuns"]]
            assert live == [("r1", "running", SLOW), ("r2", "queued", QUICK)]
            listed = await page.ok("sessions.list", {})
            assert {"key": "s", "status": "running"}.items() <= next(
                row for row in listed["sessions"] if row["key"] == "s"
            ).items()
            # followed from B from now on: its first delta there carries the text so far
            await page.ok("sessions.messages.subscribe", {"key": "s"})
            await page.wait_chat("r1", "delta")
            stopped = await page.ok("sessions.abort", {"key": "s"})
            assert stopped == {"ok": True, "aborted": True, "runIds": ["r1"]}
            await page.wait_chat("r1", "aborted")
            await page.wait_chat("r2", "final")  # the queued input went on, on A
            first = deltas(page.received, "r1")[0]
            assert final_text(first).startswith(in_flight["text"])
            kept = rebuilt(page.received, "r1")
            # a run and a queued input, both stopped from B with clearQueued
            await on_a.ok("chat.send", send("s", SLOW, "r3"))
            await on_a.ok("chat.send", send("s", QUICK, "r4") | {"queueMode": "followup"})
            await wait_deltas(on_a, "r3", 2)
            cleared = await page.ok("sessions.abort", {"key": "s", "clearQueued": True})
            assert sorted(cleared["runIds"]) == ["r3", "r4"] and cleared["aborted"] is True
            await page.wait_chat("r3", "aborted")
            await page.wait_chat("r4", "aborted")
            history = await page.ok("chat.history", {"sessionKey": "s"})
            assert "inFlightRun" not in history and history["liveRuns"] == []
    async with PostgresStore(db) as store:
        messages = await store.history("s")
        validate_history(messages)
        partial = next(m for m in messages if m.meta.get("run_id") == "r1" and m.role != "user")
        assert partial.text == kept  # what B's client showed is what was saved
        assert (await store.get_run("r4")).status == "cancelled"


async def test_a_message_sent_to_b_for_a_session_on_a_is_admitted_there(
    postgres: Postgres, redis: Redis, env
) -> None:
    """No sticky sessions: a send to B for a session whose run lives on A goes to A, which
    queues it or interrupts its run as the policy says; B's client follows it."""
    db = postgres.create_database()
    with trio.fail_after(BOUND):
        async with (
            gateways(env, db, redis, 2) as (a, b),
            open_client(a.port) as on_a,
            open_client(b.port) as on_b,
        ):
            await on_b.ok("sessions.messages.subscribe", {"key": "elsewhere"})  # not s
            await on_a.ok("chat.send", send("s", SLOW, "r1"))
            await wait_deltas(on_a, "r1", 2)
            followup = send("s", QUICK, "r2") | {"queueMode": "followup"}
            assert (await on_b.ok("chat.send", followup))["status"] == "started"
            again = await on_b.ok("chat.send", followup)  # the same idempotency key
            assert again["status"] in ("in_flight", "ok")
            history = await on_b.ok("chat.history", {"sessionKey": "s"})
            assert [r["runId"] for r in history["liveRuns"]] == ["r1", "r2"]  # on A
            await on_b.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
            final = await on_b.wait_chat("r2", "final")  # run on A, followed from B
            assert final_text(final["payload"]) == delivered(on_b, "r2")
            assert not on_b.events("chat", "r1")  # B's client follows r2, not the session
            # interrupt: A's run is stopped, the message sent to B starts there at once
            await on_a.ok("chat.send", send("s", SLOW, "r3"))
            await wait_deltas(on_a, "r3", 2)
            steer = send("s", QUICK, "r4") | {"queueMode": "interrupt"}
            assert (await on_b.ok("chat.send", steer))["status"] == "started"
            stopped = await on_a.wait_chat("r3", "aborted")
            assert stopped["payload"]["stopReason"] == "interrupted"
            await on_b.wait_chat("r4", "final")
            await on_a.wait_chat("r4", "final")
    async with PostgresStore(db) as store:
        messages = await store.history("s")
        validate_history(messages)
        runs = [m.meta["run_id"] for m in messages if m.role == "user"]
        assert runs == ["r1", "r2", "r3", "r4"]  # each once, in the order admitted
        for run_id in ("r2", "r4"):
            assert (await store.get_run(run_id)).status == "finished"

"""Under load (issue 13): session-scoped delivery, incremental frames, each event encoded
once, deltas merged only for a connection that cannot keep up, stops first.

Every frame these clients receive is checked against OpenClaw's schema (``open_client``).
Time bounds are generous guards against a hang, never timing claims.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from runtime import Event, RunCancelled, TextDelta
from runtime._bus import EventBus
from tests.gateway_client import Client, open_client, open_raw
from tests.gateway_stack import running_gateway, send
from tests.helpers import deltas, final_text, rebuilt

BOUND = 60


@pytest.fixture
async def stack(sim, tmp_path):
    async with running_gateway(tmp_path / "gateway.db", sim) as (gateway, port):
        yield gateway, port


def runs_seen(client: Client, name: str) -> set[str]:
    return {f["payload"]["runId"] for f in client.events(name)}


# -- session-scoped delivery ------------------------------------------------------------------


async def test_a_subscribed_connection_gets_its_sessions_and_its_own_runs_only(stack) -> None:
    gateway, port = stack
    quick = "Hi.\n#sim words=20 rate=400"
    with trio.fail_after(BOUND):
        async with (
            open_client(port) as mine,
            open_client(port) as operator,
            open_client(port) as other,
        ):
            methods = mine.hello["features"]["methods"]
            assert {"sessions.messages.subscribe", "sessions.messages.unsubscribe"} <= set(methods)
            assert await mine.ok("sessions.messages.subscribe", {"key": "mine"}) == {
                "subscribed": True,
                "key": "mine",
            }
            await other.ok("chat.send", send("mine", quick, "in-mine"))
            await other.ok("chat.send", send("elsewhere", quick, "not-mine"))
            await mine.ok("chat.send", send("third", quick, "started-by-me"))
            for run_id in ("in-mine", "not-mine", "started-by-me"):
                await operator.wait_chat(run_id, "final")
            await mine.wait_chat("in-mine", "final")
            await mine.wait_chat("started-by-me", "final")
            # a later run of the session it followed only for its own run: not followed
            await other.ok("chat.send", send("third", quick, "third-later"))
            await operator.wait_chat("third-later", "final")
            await other.ok("chat.send", send("mine", quick, "mine-last"))
            await mine.wait_chat("mine-last", "final")
            for name in ("chat", "agent"):
                assert runs_seen(mine, name) == {"in-mine", "started-by-me", "mine-last"}
                assert runs_seen(operator, name) >= {
                    "in-mine",
                    "not-mine",
                    "started-by-me",
                    "third-later",
                    "mine-last",
                }
            assert not any(
                f["payload"]["runId"] == "not-mine" for f in mine.events("runtime.stopped")
            )

            assert await mine.ok("sessions.messages.unsubscribe", {"key": "mine"}) == {
                "subscribed": False,
                "key": "mine",
            }
            await other.ok("chat.send", send("mine", quick, "after-unsubscribe"))
            await operator.wait_chat("after-unsubscribe", "final")
            await mine.ok("runtime.stats", {})  # a round trip after the run's last event
            assert "after-unsubscribe" not in runs_seen(mine, "chat")
            assert len(gateway.runtime._bus._by_run) == 0  # routes end with their runs


async def test_subscribing_mid_reply_starts_from_the_text_so_far(stack) -> None:
    _, port = stack
    with trio.fail_after(BOUND):
        async with open_client(port) as sender, open_client(port) as late:
            await late.ok("sessions.messages.subscribe", {"key": "elsewhere"})
            await sender.ok("chat.send", send("s", "Go.\n#sim words=400 rate=200", "run"))
            await sender.wait_event(
                lambda f: f["event"] == "chat" and f["payload"].get("seq", 0) >= 45
            )  # the run's seq: a few of its events (options, start) are not words
            await late.ok("sessions.messages.subscribe", {"key": "s"})
            final = (await late.wait_chat("run", "final"))["payload"]
            first = deltas(late.received, "run")[0]
            assert len(final_text(first).split()) > 40  # the snapshot: the text so far
            assert rebuilt(late.received, "run") == final_text(final)
            seqs = [d["seq"] for d in deltas(late.received, "run")]  # the run's own seq
            assert seqs == sorted(set(seqs)) and seqs[0] >= 45


async def test_following_a_session_again_restarts_from_its_text_so_far(stack) -> None:
    _, port = stack
    with trio.fail_after(BOUND):
        async with open_client(port) as sender, open_client(port) as page:
            await sender.ok("chat.send", send("s", "Go.\n#sim words=600 rate=300", "run"))
            await page.wait_chat("run", "delta")  # as an operator, from its start
            await page.ok("sessions.messages.subscribe", {"key": "other"})  # s: no longer
            await sender.wait_event(
                lambda f: f["event"] == "chat" and f["payload"].get("seq", 0) >= 105
            )  # the run's seq: a few of its events (options, start) are not words
            away = len(page.received)
            await page.ok("sessions.messages.subscribe", {"key": "s"})  # back, mid-reply
            final = (await page.wait_chat("run", "final"))["payload"]
    back = deltas(page.received[away:], "run")
    assert len(final_text(back[0]).split()) > 100  # the text so far, again
    assert final_text(back[0]) + "".join(d["deltaText"] for d in back[1:]) == final_text(final)
    seqs = [d["seq"] for d in deltas(page.received, "run")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # its per-run seq goes on


async def test_subscribe_refuses_a_bad_key_and_needs_the_read_scope(stack) -> None:
    _, port = stack
    with trio.fail_after(BOUND):
        async with open_client(port) as client:
            error = (await client.call("sessions.messages.subscribe", {}))["error"]
            assert error["code"] == "INVALID_REQUEST" and "key" in error["message"]
        async with open_client(port, scopes=["operator.write"]) as writer:
            error = (await writer.call("sessions.messages.subscribe", {"key": "s"}))["error"]
            assert error["code"] == "FORBIDDEN"


# -- incremental frames -------------------------------------------------------------------------


async def test_delta_frames_carry_only_the_new_text_and_rebuild_the_reply(stack) -> None:
    gateway, port = stack
    with trio.fail_after(BOUND):
        async with open_client(port) as client:
            await client.ok("sessions.messages.subscribe", {"key": "s"})
            await client.ok("chat.send", send("s", "Go.\n#sim words=2000 rate=2000", "long"))
            final = (await client.wait_chat("long", "final"))["payload"]
    text = final_text(final)
    assert len(text.split()) == 2000
    assert rebuilt(client.received, "long") == text
    chat = deltas(client.received, "long")
    assert "message" in chat[0] and all("message" not in d for d in chat[1:])
    agent = [
        f["payload"]["data"]
        for f in client.events("agent", "long")
        if f["payload"]["stream"] == "assistant"
    ]
    assert "text" in agent[0] and all("text" not in d for d in agent[1:])
    assert "".join(d["delta"] for d in agent) == text
    # O(new text): the biggest delta frame is a word's worth, not the reply's
    sizes = [
        len(json.dumps(f))
        for f in client.received
        if f.get("event") in ("chat", "agent")
        and f["payload"].get("state", "delta") == "delta"
        and f["payload"].get("stream") in (None, "assistant")
    ]
    assert max(sizes[4:]) < 400, max(sizes)


async def test_an_event_is_encoded_once_however_many_connections_get_it(stack) -> None:
    gateway, port = stack
    message = "Go.\n#sim words=100 rate=500"
    with trio.fail_after(BOUND):
        async with open_client(port) as one:
            before = gateway.frames.encoded
            await one.ok("chat.send", send("s", message, "alone"))
            await one.wait_chat("alone", "final")
            alone = gateway.frames.encoded - before
        async with trio.open_nursery() as nursery:
            clients: list[Client] = []

            async def join() -> None:
                async with open_client(port) as client:
                    clients.append(client)
                    await client.wait_chat("shared", "final")

            for _ in range(8):
                nursery.start_soon(join)
            while len(clients) < 8:  # noqa: ASYNC110 (the clients' handshakes)
                await trio.sleep(0.01)
            before = gateway.frames.encoded
            await clients[0].ok("chat.send", send("s", message, "shared"))
    shared = gateway.frames.encoded - before
    assert alone > 100  # one per event: options, start, 100 deltas, final
    assert shared <= alone + 2  # not eight times as many (merges may add one or two)


# -- coalescing ----------------------------------------------------------------------------------


async def test_a_connection_that_keeps_up_gets_every_delta_unmerged(stack) -> None:
    gateway, port = stack
    with trio.fail_after(BOUND):
        async with open_client(port) as client:
            await client.ok("chat.send", send("s", "Go.\n#sim words=300 rate=150", "steady"))
            final = (await client.wait_chat("steady", "final"))["payload"]
            (connection,) = gateway.connections
            assert connection._events is not None and connection._events.merged == 0
    assert len(deltas(client.received, "steady")) == 300  # one frame per word
    assert rebuilt(client.received, "steady") == final_text(final)


async def test_a_connection_that_cannot_keep_up_gets_merged_deltas_and_the_exact_text(
    stack,
) -> None:
    gateway, port = stack
    runs = [f"fast{n}" for n in range(4)]
    with trio.fail_after(120):
        async with open_raw(port) as (stalled, seen), open_client(port) as sender:
            conn_id = seen[-1]["payload"]["server"]["connId"]
            (connection,) = [c for c in gateway.connections if c.conn_id == conn_id]
            for run_id in runs:
                await sender.ok("chat.send", send(run_id, "Go.\n#sim words=4000 rate=4000", run_id))
            for run_id in runs:
                await sender.wait_chat(run_id, "final")
            assert connection._events is not None and connection._events.merged > 0
            ended: set[str] = set()
            while ended != set(runs):  # it reads again: everything, merged where it lagged
                frame = json.loads(await stalled.get_message())
                seen.append(frame)
                if frame.get("event") == "chat" and frame["payload"]["state"] == "final":
                    ended.add(frame["payload"]["runId"])
    for run_id in runs:
        final = next(
            f["payload"] for f in sender.events("chat", run_id) if f["payload"]["state"] == "final"
        )
        assert rebuilt(seen, run_id) == final_text(final)
    assert sum(len(deltas(seen, r)) for r in runs) < 4 * 4000  # fewer frames: merged


# -- stops first ---------------------------------------------------------------------------------


async def test_a_stops_reply_and_its_runs_end_overtake_other_runs_waiting_deltas(
    stack, monkeypatch
) -> None:
    gateway, port = stack
    published: list[Event] = []  # in the order the runtime published them
    publish = EventBus.publish
    monkeypatch.setattr(
        EventBus, "publish", lambda bus, event: (published.append(event), publish(bus, event))
    )
    with trio.fail_after(120):
        async with (
            open_raw(port, receive_buffer=4096) as (stalled, seen),
            open_client(port) as sender,
        ):
            conn_id = seen[-1]["payload"]["server"]["connId"]
            (connection,) = [c for c in gateway.connections if c.conn_id == conn_id]
            events = connection._events
            assert events is not None
            await sender.ok("chat.send", send("slow", "Go.\n#sim words=4000 rate=20", "mine"))
            await sender.wait_chat("mine", "delta")
            for n in range(4):
                reply = "Go.\n#sim words=4000 rate=1000"
                await sender.ok("chat.send", send(f"busy{n}", reply, f"busy{n}"))
            # its writes block and its events wait: deltas merge into those waiting
            while events.buffered_bytes < 8000:  # noqa: ASYNC110 (server state)
                await trio.sleep(0.02)
            stop = {"sessionKey": "slow", "runId": "mine"}
            await stalled.send_message(
                json.dumps({"type": "req", "id": "stop", "method": "chat.abort", "params": stop})
            )
            await sender.wait_chat("mine", "aborted")
            # the busy runs' text published before the stop's end was
            before = {f"busy{n}": 0 for n in range(4)}
            for event in published:
                if isinstance(event, RunCancelled):
                    break
                if isinstance(event, TextDelta) and event.run_id in before:
                    before[event.run_id] += len(event.text)
            frames: list[dict[str, Any]] = []
            while not any(
                f.get("event") == "chat" and f["payload"]["state"] == "aborted" for f in frames
            ):
                frames.append(json.loads(await stalled.get_message()))
            reply = next(f for f in frames if f.get("id") == "stop")
            assert reply["ok"] and reply["payload"]["aborted"]
            seen += frames
            # what the stalled connection had of the busy runs when the stop's end reached it:
            # less than was published before it (those deltas waited, and it overtook them)
            got = {
                run_id: sum(len(d["deltaText"]) for d in deltas(seen, run_id)) for run_id in before
            }
            assert sum(got.values()) < sum(before.values()), (got, before)
            # and its own run's events kept their order: deltas, then the end
            mine = [f["payload"] for f in seen if f.get("event") == "chat"]
            mine = [p for p in mine if p["runId"] == "mine"]
            assert mine[-1]["state"] == "aborted"
            seqs = [p["seq"] for p in mine]  # the run's own seq: in order, none twice
            assert seqs == sorted(set(seqs))

"""The gateway under hostile or careless clients, over real sockets.

The fuzz test starts a fresh gateway (sim, SQLite, runtime) for every Hypothesis example,
inside that example's own ``trio.run``: examples stay independent, so a crash is pinned
on the frames that caused it and shrinking stays deterministic. It costs about 50 ms per
example.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from adapters.gateway import Gateway
from tests.gateway_client import Frame, connect_params, open_client, open_raw
from tests.gateway_stack import running_gateway, send
from tests.openclaw_schema import frame_errors

QUICK = "Hi.\n#sim words=1 rate=1000"
ERROR_CODES = {"INVALID_REQUEST", "UNAVAILABLE", "FORBIDDEN"}
REFUSAL_CLOSES = {1007, 1008, 1009}  # invalid payload, policy violation, too big
PROBE = "robustness-probe"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, int]]:
    async with running_gateway(tmp_path / "gateway.db") as running:
        yield running


def chat_text(payload: dict[str, Any]) -> str:
    return "".join(b["text"] for b in payload["message"]["content"] if b["type"] == "text")


def assert_gap_free(frames: list[Frame]) -> None:
    seqs = [f["seq"] for f in frames if f.get("type") == "event"]
    assert seqs == list(range(len(seqs)))


# -- 1. generated frames ---------------------------------------------------------------

METHODS = [
    "chat.send",
    "chat.abort",
    "chat.history",
    "sessions.abort",
    "runtime.stats",
    "runtime.sessions.configure",
    "connect",
]
VALID_PARAMS: dict[str, dict[str, Any]] = {
    "chat.send": send("s", QUICK, "k1") | {"thinking": "off", "timeoutMs": 10_000},
    "chat.abort": {"sessionKey": "s", "runId": "k1"},
    "chat.history": {"sessionKey": "s", "limit": 5},
    "sessions.abort": {"key": "s", "runId": "k1", "clearQueued": True},
    "runtime.stats": {},
    "runtime.sessions.configure": {"sessionKey": "s", "stopPolicy": "rollback"},
    "connect": connect_params(),
}
FIELDS = sorted({field for params in VALID_PARAMS.values() for field in params})
DROP = object()

# Lone surrogates survive json.dumps as "\ud800" escapes and come back out of json.loads.
strings = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=10)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=8,
)
anything = (
    st.sampled_from(["s", "t", "k1", "k2", QUICK, "/stop", " ", "reject", "interrupt", "steer"])
    | st.integers(-1, 1001)
    | st.booleans()
    # values at the edges, which random generation rarely reaches on its own
    | st.sampled_from(["", "\x00", "x" * 300, -(2**63), 2**64, 10**400, 1e308, float("nan")])
    | strings
    | json_values
)
ids = st.sampled_from(["1", "a"]) | st.text(min_size=1, max_size=8)


def mutated(method: str) -> st.SearchStrategy[dict[str, Any]]:
    """The method's valid params, each field kept, dropped or replaced, plus a few more."""
    fields = {k: st.just(v) | st.just(DROP) | anything for k, v in VALID_PARAMS[method].items()}
    return st.builds(
        lambda kept, extra: {k: v for k, v in kept.items() if v is not DROP} | extra,
        st.fixed_dictionaries(fields),
        st.dictionaries(st.sampled_from(FIELDS) | strings, anything, max_size=2),
    )


requests = st.fixed_dictionaries(
    {"type": st.just("req"), "id": ids, "method": st.sampled_from(METHODS)}
).flatmap(lambda frame: mutated(frame["method"]).map(lambda params: frame | {"params": params}))
loose_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["req", "res", "event"]) | json_values,
        "id": ids | json_values,
        "method": st.sampled_from(METHODS) | json_values,
        "params": json_values,
    },
)
deep = st.integers(1, 3000).flatmap(
    lambda n: st.sampled_from(
        [
            "[" * n + "]" * n,
            '{"type":"req","id":"deep","method":"chat.history","params":' + "[" * n + "]" * n + "}",
        ]
    )
)
any_frame: st.SearchStrategy[str | bytes] = st.one_of(
    requests.map(json.dumps),
    requests.map(json.dumps),
    loose_objects.map(json.dumps),
    json_values.map(json.dumps),
    requests.map(json.dumps).flatmap(lambda t: st.integers(0, len(t)).map(lambda k: t[:k])),
    deep,
    st.text(max_size=40),
    st.binary(max_size=40),
)


async def exercise(db: Path, handshake: bool, sent: list[str | bytes]) -> None:
    """Send the frames, then a probe: it is answered, or the connection was refused."""
    with trio.fail_after(20):
        async with running_gateway(db) as (_, port):
            async with open_client(port, handshake=handshake) as client:
                probe = {"type": "req", "id": PROBE, "method": "runtime.stats"}
                try:
                    for frame in sent:
                        await client.send_raw(frame)
                    await client.send_raw(json.dumps(probe))
                    await client.response(PROBE)  # ok, or FORBIDDEN without operator.read
                except ConnectionClosed:
                    pass
                if not any(is_hello(f) for f in client.received):
                    await client.closed.wait()  # a first request that is not connect
                if client.closed.is_set():
                    assert client.ws.closed is not None
                    assert client.ws.closed.code in REFUSAL_CLOSES, client.ws.closed
                check_sent_frames(client.received)
            async with open_client(port) as fresh:
                await fresh.ok("runtime.stats")


def is_hello(frame: Frame) -> bool:
    return frame["type"] == "res" and frame["ok"] and frame["payload"].get("type") == "hello-ok"


def request(method: str, params: dict[str, Any]) -> str:
    return json.dumps({"type": "req", "id": "1", "method": method, "params": params})


def check_sent_frames(received: list[Frame]) -> None:
    assert [e for f in received for e in frame_errors(f)] == []
    for frame in received:
        if frame["type"] == "res" and not frame["ok"]:
            assert frame["error"]["code"] in ERROR_CODES, frame
            assert frame["error"]["message"].strip(), frame
    assert_gap_free(received)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(handshake=st.booleans(), sent=st.lists(any_frame, min_size=1, max_size=5))
# Cases the fuzz has found, pinned so that they run every time.
@example(handshake=False, sent=['{"type":"req","id":"1","method":""}'])
@example(handshake=True, sent=[request("chat.history", {"sessionKey": "\ud800"})])
@example(
    handshake=True, sent=[request("chat.send", send("s", QUICK, "k") | {"timeoutMs": 10**400})]
)
def test_generated_frames_never_break_the_gateway(
    tmp_path: Path, handshake: bool, sent: list[str | bytes]
) -> None:
    trio.run(exercise, tmp_path / f"{uuid.uuid4().hex}.db", handshake, sent)


# -- 2. a client that stops reading ----------------------------------------------------


async def test_a_client_that_stops_reading_slows_nobody(gateway) -> None:
    _, port = gateway
    with trio.fail_after(120):
        async with open_raw(port) as (slow, seen), open_client(port) as fast:
            await fast.ok("chat.send", send("s", "Go.\n#sim words=3000 rate=2000", "long"))
            final = (await fast.wait_chat("long", "final"))["payload"]
            deltas = [
                f["payload"]["deltaText"]
                for f in fast.events("chat", "long")
                if f["payload"]["state"] == "delta"
            ]
            text = chat_text(final)
            assert "".join(deltas) == text and len(text.split()) == 3000

            while not (seen[-1].get("event") == "chat" and seen[-1]["payload"]["state"] != "delta"):
                seen.append(json.loads(await slow.get_message()))
            assert_gap_free(seen)
            chat = [f["payload"] for f in seen if f.get("event") == "chat"]
            assert chat[-1]["state"] == "final" and chat_text(chat[-1]) == text
            assert text.startswith("".join(p["deltaText"] for p in chat[:-1]))
            assert [p["seq"] for p in chat] == sorted({p["seq"] for p in chat})


@pytest.mark.parametrize(
    ("bound", "max_bytes", "send_timeout"),
    [("bytes", 32 * 1024, 60.0), ("seconds", 4 * 1024 * 1024, 1.0)],
)
async def test_a_client_that_stays_behind_is_closed_with_1013_and_delays_no_stop(
    tmp_path: Path, bound: str, max_bytes: int, send_timeout: float
) -> None:
    async with running_gateway(tmp_path / "gateway.db") as (gateway, port):
        gateway.max_buffered_bytes, gateway.send_timeout = max_bytes, send_timeout
        with trio.fail_after(90):
            async with open_raw(port) as (stalled, seen), open_client(port) as other:
                assert seen[-1]["payload"]["policy"]["maxBufferedBytes"] == max_bytes
                conn_id = seen[-1]["payload"]["server"]["connId"]
                (connection,) = [c for c in gateway.connections if c.conn_id == conn_id]
                # enough frames to fill the socket buffers (deltas carry only the new text),
                # and enough text that the deltas merged while it waits pass max_bytes
                # started by a client that leaves: the runs go on, and only the stalled
                # connection (which never subscribes) is sent their events
                async with open_client(port) as filler:
                    await filler.ok("sessions.messages.subscribe", {"key": "filler"})
                    for n in range(1, 6):
                        reply = "Go.\n#sim words=4000 rate=2000"
                        await filler.ok("chat.send", send(f"long{n}", reply, f"long{n}"))
                await other.ok("sessions.messages.subscribe", {"key": "mine"})  # and its runs
                await other.ok("chat.send", send("long", "Go.\n#sim words=4000 rate=2000", "long"))
                await other.wait_event(
                    lambda f: (
                        f["event"] == "chat"
                        and f["payload"]["runId"] == "long"
                        and len(f["payload"].get("deltaText", "")) > 0
                        and f["payload"]["seq"] > 500
                    )
                )
                # meanwhile another client's stop goes through at once
                await other.ok("chat.send", send("mine", "Wait.\n#sim think=60", "mine"))
                with trio.fail_after(10):  # a guard against a hang, not a timing claim
                    result = await other.ok("chat.abort", {"sessionKey": "mine"})
                    assert result["runIds"] == ["mine"]
                    await other.wait_chat("mine", "aborted")
                while connection.behind is None:  # noqa: ASYNC110 (server state, no event)
                    await trio.sleep(0.05)
                assert (
                    "bytes of events" if bound == "bytes" else "to be sent"
                ) in connection.behind
                # it reads again: everything up to the close, then 1013 with the reason
                try:
                    while True:
                        seen.append(json.loads(await stalled.get_message()))
                except ConnectionClosed as closed:
                    assert closed.reason.code == 1013
                    assert "Reconnect and resume" in (closed.reason.reason or "")
                assert_gap_free(seen)
                await other.wait_chat("long", "final")
            # it reconnects, and resumes from the history
            async with open_client(port) as back:
                history = await back.ok("chat.history", {"sessionKey": "long"})
                assert history["liveRuns"] == []
                assert len(history["messages"][-1]["content"][0]["text"].split()) == 4000


# -- 3. a burst of 1,000 connections that leave: tests/test_faults.py --------------------


# -- 4. frames too big or too deep ---------------------------------------------------------


def padded_request(size: int) -> str:
    """A runtime.stats request of exactly ``size`` bytes (ASCII, so bytes == characters)."""
    frame = {"type": "req", "id": "big", "method": "runtime.stats", "params": {"pad": ""}}
    empty = len(json.dumps(frame))
    frame["params"]["pad"] = "x" * (size - empty)
    return json.dumps(frame)


async def test_a_frame_one_byte_over_max_payload_closes_with_1009(gateway) -> None:
    _, port = gateway
    with trio.fail_after(30):
        async with open_client(port) as client:
            limit = client.hello["policy"]["maxPayload"]
            await client.send_raw(padded_request(limit))
            assert (await client.response("big"))["ok"]  # the limit itself is allowed
            await client.send_raw(padded_request(limit + 1))
            await client.closed.wait()
            assert client.ws.closed.code == 1009
        async with open_client(port) as other:
            await other.ok("runtime.stats")


async def test_a_deeply_nested_frame_is_refused_and_the_server_goes_on(gateway) -> None:
    _, port = gateway
    nested = "[" * 1000 + "]" * 1000
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.send_raw(
                f'{{"type":"req","id":"deep","method":"chat.history","params":{nested}}}'
            )
            try:
                answer = await client.response("deep")
            except ConnectionClosed:
                assert client.ws.closed.code == 1007
            else:
                assert answer["error"]["code"] == "INVALID_REQUEST"
                await client.ok("runtime.stats")
        async with open_client(port) as other:
            await other.ok("runtime.stats")

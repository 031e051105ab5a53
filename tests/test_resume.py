"""Reconnect and resume: a client that left mid-reply picks the run up on a new connection.

The rule a client follows (docs/protocol.md, "Reconnect and resume"): connect, then read
``chat.history``; ``inFlightRun`` gives the live run's text so far and the per-run ``seq``
that text reflects; apply only the run's ``chat`` (or ``agent``) events with a higher
``seq``, whether they arrived before or after the answer. The property test draws where
the first client leaves (after some deltas, or during a tool call), how long the second
waits before reading history, and whether it then stops the run; the text it rebuilds
from ``deltaText`` alone (and from the ``agent`` stream's deltas alone) must be the text
the store holds for the run, with nothing missing or twice.

Cost: 300 examples in about a minute on two cores (``--long``: 10,000). Examples talk to
one long-lived stack (``tests.schedule_server``) over real sockets, each bounded by
``IO_BOUND``; no timing is asserted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import IO_BOUND
from tests.gateway_client import Client, Frame, open_client
from tests.gateway_stack import running_gateway
from tests.openclaw_schema import payload_errors
from tests.schedule_server import ScheduleServer, schedule_server

EXAMPLES = 300
LONG_EXAMPLES = 10_000
TERMINAL = ("final", "aborted", "error")


@attrs.frozen
class Resume:
    words: int
    rate: int
    tool: str | None  # a tool turn first: the sim calls this tool, then replies
    leave: tuple[Literal["delta", "tool"], int]  # A leaves after the nth delta, or in the tool
    read_after: int  # B reads history after this many events of the run reached it
    stop_after: int | None  # B stops the run after this many more deltas; None: never


@st.composite
def resumes(draw: st.DrawFn) -> Resume:
    words = draw(st.integers(40, 300))
    tool = draw(st.sampled_from((None, None, "fast", "slow")))
    if tool is not None and draw(st.booleans()):
        leave: tuple[Literal["delta", "tool"], int] = ("tool", 0)
    else:
        leave = ("delta", draw(st.integers(0, words)))
    return Resume(
        words,
        draw(st.sampled_from((1500, 4000, 8000))),
        tool,
        leave,
        draw(st.integers(0, 12)),
        draw(st.none() | st.integers(0, 30)),
    )


def of_run(run_id: str, *, event: str | None = None, state: str | None = None) -> Any:
    def matches(frame: Frame) -> bool:
        payload = frame["payload"]
        return (
            payload.get("runId") == run_id
            and (event is None or frame["event"] == event)
            and (state is None or payload.get("state") == state)
        )

    return matches


def is_end(run_id: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f["event"] == "chat" and of_run(run_id)(f) and f["payload"]["state"] in TERMINAL
    )


def nth(run_id: str, n: int, matches: Callable[[Frame], bool]) -> Callable[[Frame], bool]:
    """A predicate true at the nth frame that ``matches`` (or at the run's end)."""
    seen = 0

    def predicate(frame: Frame) -> bool:
        nonlocal seen
        if matches(frame):
            seen += 1
        return seen >= n or is_end(run_id)(frame)

    return predicate


def rebuilt(client: Client, run_id: str, base: str, after: int) -> tuple[str, str]:
    """The run's text from ``base`` plus the deltas with a higher seq: by the chat
    stream's ``deltaText`` and by the agent stream's ``data.delta``, each alone."""
    chat = [
        f["payload"]
        for f in client.events("chat", run_id)
        if f["payload"]["state"] == "delta" and f["payload"]["seq"] > after
    ]
    agent = [
        f["payload"]
        for f in client.events("agent", run_id)
        if f["payload"]["stream"] == "assistant" and f["payload"]["seq"] > after
    ]
    return (
        base + "".join(p["deltaText"] for p in chat),
        base + "".join(p["data"]["delta"] for p in agent),
    )


async def _is_live(server: ScheduleServer, run_id: str) -> bool:
    return server.runtime.get_run(run_id) is not None


async def _stored_text(server: ScheduleServer, session: str, run_id: str) -> str:
    history = await server.runtime.store.history(session)
    return "".join(
        m.text for m in history if m.role == "assistant" and m.meta.get("run_id") == run_id
    )


async def play(server: ScheduleServer, resume: Resume) -> None:
    session = f"resume-{uuid.uuid4().hex[:10]}"
    run_id = f"{session}-run"
    script = f"#sim words={resume.words} rate={resume.rate}"
    if resume.tool is not None:
        script += f" tool={resume.tool}"
    with trio.fail_after(IO_BOUND):
        async with open_client(server.port, caps=["tool-events"]) as first:
            params = {"sessionKey": session, "message": f"Go.\n{script}", "idempotencyKey": run_id}
            await first.ok("chat.send", params)
            kind, n = resume.leave
            if kind == "tool":
                tool = of_run(run_id, event="agent")
                await first.wait_event(
                    lambda f: (tool(f) and f["payload"]["stream"] == "tool") or is_end(run_id)(f)
                )
            elif n:
                await first.wait_event(nth(run_id, n, of_run(run_id, event="chat", state="delta")))
        async with open_client(server.port, caps=["tool-events"]) as second:
            # live once B is subscribed: then B sees its end (and events to wait for)
            if resume.read_after and await server.call_from(_is_live, server, run_id):
                await second.wait_event(nth(run_id, resume.read_after, of_run(run_id)))
            history = await second.ok("chat.history", {"sessionKey": session})
            in_flight = history.get("inFlightRun")
            info = history["sessionInfo"]
            if in_flight is None:  # it ended before the read: its result is in the messages
                assert info == {"hasActiveRun": False, "activeRunIds": []}
                base, after = "", 1 << 60
            else:
                assert in_flight["runId"] == run_id and info["activeRunIds"] == [run_id]
                base, after = in_flight["text"], in_flight["seq"]
            stopped = False
            if resume.stop_after is not None and in_flight is not None:
                later = of_run(run_id, event="chat", state="delta")
                await second.wait_event(
                    nth(
                        run_id,
                        resume.stop_after,
                        lambda f: later(f) and f["payload"]["seq"] > after,
                    )
                )
                answer = await second.ok("chat.abort", {"sessionKey": session, "runId": run_id})
                stopped = answer["aborted"]
            if in_flight is None:
                end = None
            else:
                end = (await second.wait_event(is_end(run_id)))["payload"]
                assert end["seq"] > after
            if end is None:
                pass
            elif stopped:  # the stop won: the resumed client gets its receipt too
                assert end["state"] == "aborted" and end["stopReason"] == "rpc"
                await second.wait_event(of_run(run_id, event="runtime.stopped"))
            else:
                assert end["state"] == "final", end
        stored = await server.call_from(_stored_text, server, session, run_id)
        if in_flight is None:  # what the client shows is the history it read
            replies = [m for m in history["messages"] if m["role"] == "assistant"]
            shown = "".join(b["text"] for m in replies for b in m["content"] if b["type"] == "text")
            assert shown == stored
            return
        chat_text, agent_text = rebuilt(second, run_id, base, after)
        assert chat_text == stored, (len(chat_text), len(stored))
        assert agent_text == stored
        if stopped and end is not None and end.get("message") is not None:  # the partial kept
            shown = "".join(b["text"] for b in end["message"]["content"] if b["type"] == "text")
            assert stored.endswith(shown) and chat_text.endswith(shown)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with schedule_server(tmp_path_factory.mktemp("resume") / "resume.db") as running:
        yield running


def test_a_resumed_client_rebuilds_exactly_the_stored_text(
    server: ScheduleServer, request: Any
) -> None:
    long = request.config.getoption("--long")

    @settings(
        max_examples=LONG_EXAMPLES if long else EXAMPLES,
        deadline=None,  # real sockets on a shared machine; IO_BOUND bounds each example
        derandomize=not long,
        database=None,
        print_blob=True,
        # no shrinking: over real sockets it takes minutes; the failing example is printed
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(resume=resumes())
    def check(resume: Resume) -> None:
        trio.run(play, server, resume)

    check()


def test_history_names_the_live_run_the_queued_one_and_a_cursor(server: ScheduleServer) -> None:
    trio.run(_history_names_the_live_run, server)


async def _history_names_the_live_run(server: ScheduleServer) -> None:
    session = f"names-{uuid.uuid4().hex[:10]}"

    def send(run: str, script: str) -> dict[str, Any]:
        return {"sessionKey": session, "message": f"{run}.\n{script}", "idempotencyKey": run}

    first, queued = f"{session}-1", f"{session}-2"
    with trio.fail_after(IO_BOUND):
        async with open_client(server.port) as client:
            await client.ok("chat.send", send(first, "#sim words=400 rate=200"))
            await client.ok("chat.send", send(queued, "#sim words=3 rate=5000"))
            await client.wait_chat(first, "delta")
            read = await client.ok("chat.history", {"sessionKey": session})
            in_flight = read["inFlightRun"]
            assert in_flight["runId"] == first and in_flight["text"]
            assert isinstance(in_flight["seq"], int) and in_flight["seq"] > 0
            assert read["sessionInfo"] == {"hasActiveRun": True, "activeRunIds": [first]}
            pending = read["pendingInputs"]
            assert pending["total"] == 1 and len(pending["items"]) == 1
            item = pending["items"][0]
            assert (item["id"], item["runId"], item["state"]) == (queued, queued, "queued")
            assert item["message"]["content"] == [
                {"type": "text", "text": f"{queued}.\n#sim words=3 rate=5000"}
            ]
            assert [r["runId"] for r in read["liveRuns"]] == [first, queued]  # ours, kept
            # the cursor form: nothing new yet, and the live state again
            delta = await client.ok(
                "chat.history", {"sessionKey": session, "cursor": read["deltaCursor"]}
            )
            assert payload_errors("ChatHistoryCursorResult", delta) == []
            assert delta["kind"] == "delta" and delta["messages"] == []
            assert delta["inFlightRun"]["runId"] == first
            assert delta["inFlightRun"]["seq"] >= in_flight["seq"]
            await client.ok("chat.abort", {"sessionKey": session, "runId": first})
            await client.wait_chat(queued, "final")
            after = await client.ok(
                "chat.history", {"sessionKey": session, "cursor": delta["deltaCursor"]}
            )
            assert payload_errors("ChatHistoryCursorResult", after) == []
            assert [m["role"] for m in after["messages"]] == ["assistant", "user", "assistant"]
            assert after["messages"][0]["openclawAbort"]["runId"] == first
            assert after["sessionInfo"] == {"hasActiveRun": False, "activeRunIds": []}
            assert "inFlightRun" not in after and after["pendingInputs"]["total"] == 0
            # a rollback removes the message the cursor names: the client must start again
            await client.ok(
                "runtime.sessions.configure", {"sessionKey": session, "stopPolicy": "rollback"}
            )
            third = f"{session}-3"
            await client.ok("chat.send", send(third, "#sim words=400 rate=200"))
            await client.wait_chat(third, "delta")
            named = await client.ok("chat.history", {"sessionKey": session})
            await client.ok("chat.abort", {"sessionKey": session, "runId": third})
            await client.wait_chat(third, "aborted")
            reset = await client.ok(
                "chat.history", {"sessionKey": session, "cursor": named["deltaCursor"]}
            )
            assert reset == {"kind": "reset"}
            bad = await client.call("chat.history", {"sessionKey": session, "cursor": "nope"})
            assert bad["error"]["code"] == "INVALID_REQUEST" and "cursor" in bad["error"]["message"]


def test_a_run_that_ran_out_of_turns_ends_with_stop_reason_budget(server: ScheduleServer) -> None:
    trio.run(_budget, server)


async def _budget(server: ScheduleServer) -> None:
    session = f"budget-{uuid.uuid4().hex[:10]}"
    run = f"{session}-run"
    script = "#sim tool=fast repeat=40 words=3 rate=5000"  # more tool turns than max_turns
    with trio.fail_after(IO_BOUND):
        async with open_client(server.port) as client:
            params = {"sessionKey": session, "message": f"Go.\n{script}", "idempotencyKey": run}
            await client.ok("chat.send", params)
            final = await client.wait_chat(run, "final")
            assert final["payload"]["stopReason"] == "budget"
            end = [
                f["payload"]["data"]
                for f in client.events("agent", run)
                if f["payload"]["data"].get("phase") == "end"
            ]
            assert end == [{"sessionKey": session, "phase": "end", "stopReason": "max_turns"}]


@attrs.define(eq=False)
class GatedSettings:
    """The SQLite store, except that reading the settings of session ``slow`` waits."""

    inner: Any
    gate: trio.Event = attrs.Factory(trio.Event)

    async def get_settings(self, session_key: str) -> Any:
        if session_key == "slow":
            await self.gate.wait()
        return await self.inner.get_settings(session_key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_cancel_frame_withdraws_a_queued_send_and_hands_its_prompt_back(
    tmp_path: Path,
) -> None:
    gated: list[GatedSettings] = []

    def wrap(store: Any) -> GatedSettings:
        gated.append(GatedSettings(store))
        return gated[0]

    async with running_gateway(tmp_path / "g.db", wrap_store=wrap) as (gateway, port):
        with trio.fail_after(IO_BOUND):
            async with open_client(port) as client:

                async def request(request_id: str, method: str, params: Any) -> None:
                    frame = {"type": "req", "id": request_id, "method": method, "params": params}
                    await client.send_raw(json.dumps(frame))

                def send(session: str, key: str) -> dict[str, Any]:
                    message = f"Hi {key}.\n#sim words=3 rate=1000"
                    return {"sessionKey": session, "message": message, "idempotencyKey": key}

                await request("a", "chat.send", send("slow", "held"))  # waits in admission
                await request("b", "chat.send", send("other", "queued"))  # waits behind it
                await client.send_raw(json.dumps({"type": "cancel", "id": "b"}))
                withdrawn = await client.response("b")
                assert withdrawn["ok"] is False
                assert withdrawn["error"]["code"] == "UNAVAILABLE"
                assert withdrawn["error"]["details"] == {
                    "code": "REQUEST_CANCELLED",
                    "restoredPrompt": send("other", "queued")["message"],
                }
                # the one being admitted is cancelled at its await: no run starts either
                await client.send_raw(json.dumps({"type": "cancel", "id": "a"}))
                cancelled = await client.response("a")
                assert (
                    cancelled["error"]["details"]["restoredPrompt"]
                    == send("slow", "held")["message"]
                )
                assert gateway.runtime.get_run("held") is None
                gated[0].gate.set()
                for key in ("held", "queued"):  # never started: the keys are unused
                    assert await gateway.runtime.store.get_run(key) is None
                # a cancel that crossed its answer, or names nothing, changes nothing
                await client.send_raw(json.dumps({"type": "cancel", "id": "a"}))
                await client.send_raw(json.dumps({"type": "cancel", "id": "never-sent"}))
                started = await client.ok("chat.send", send("other", "queued"))
                assert started == {"runId": "queued", "status": "started"}
                await client.wait_chat("queued", "final")

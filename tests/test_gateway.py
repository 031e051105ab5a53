"""The gateway over real sockets: simulated provider, runtime, SQLite, WebSocket clients."""

from __future__ import annotations

import json
import pathlib

import pytest
import trio

from adapters.gateway import Gateway, UnsafeBind, check_bind
from adapters.openai_compat import open_openai_compat
from adapters.sqlite_store import SQLiteStore
from runtime import Runtime, validate_history
from tests.gateway_client import Client, connect_params, open_client
from tests.gateway_stack import running_gateway, send
from tests.openclaw_schema import check_frames

THINK = "Hello?\n#sim think=60"
SLOW = "Tell me.\n#sim words=400 rate=50"
QUICK = "Hi.\n#sim words=5 rate=200"
TOKEN = "s3cret-token"


@pytest.fixture
async def stack(sim, tmp_path):
    """A gateway on a free port in front of a runtime on the sim and a SQLite file."""
    async with running_gateway(tmp_path / "gateway.db", sim) as (gateway, port):
        yield gateway, port, sim


async def test_handshake_then_a_reply_streams_to_its_final(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            hello = client.hello
            assert hello["type"] == "hello-ok" and hello["protocol"] == 4
            assert "runtime.stopped" in hello["features"]["events"]
            assert set(hello["auth"]["scopes"]) == {"operator.read", "operator.write"}
            started = await client.ok("chat.send", send("s", QUICK, "run-1"))
            assert started == {"runId": "run-1", "status": "started"}
            final = await client.wait_chat("run-1", "final")
            text = final["payload"]["message"]["content"][0]["text"]
            deltas = [
                f["payload"]
                for f in client.events("chat", "run-1")
                if f["payload"]["state"] == "delta"
            ]
            assert "".join(d["deltaText"] for d in deltas) == text
            # only the first delta carries the message so far: frames are O(new text)
            assert deltas[0]["message"]["content"][0]["text"] == deltas[0]["deltaText"]
            assert all("message" not in d for d in deltas[1:])
            seqs = [d["seq"] for d in deltas]  # the run's own seq: rising, shared by streams
            assert seqs == sorted(set(seqs)) and seqs[0] > 0
            history = await client.ok("chat.history", {"sessionKey": "s"})
            assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
            assert history["liveRuns"] == []


async def test_the_same_idempotency_key_never_starts_a_second_run(stack) -> None:
    gateway, port, sim = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            assert (await client.ok("chat.send", send("s", SLOW, "k1")))["status"] == "started"
            assert (await client.ok("chat.send", send("s", SLOW, "k1")))["status"] == "in_flight"
            await client.wait_chat("k1", "delta")
            await client.ok("chat.abort", {"sessionKey": "s", "runId": "k1"})
            await client.wait_chat("k1", "aborted")
            assert (await client.ok("chat.send", send("s", SLOW, "k1")))["status"] == "ok"
            assert len(sim.connections()) == 1  # one model request in all
            history = await client.ok("chat.history", {"sessionKey": "s"})
            assert [m["role"] for m in history["messages"]] == ["user", "assistant"]


async def test_a_resent_key_keeps_its_run_followed(stack) -> None:
    """A client that follows only other sessions and resends a live run's key (a retry
    after a lost answer) still receives that run's events to its end."""
    gateway, port, sim = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.ok("sessions.messages.subscribe", {"key": "elsewhere"})
            brief = "Go.\n#sim words=40 rate=100"
            assert (await client.ok("chat.send", send("s", brief, "k1")))["status"] == "started"
            await client.wait_chat("k1", "delta")
            assert (await client.ok("chat.send", send("s", brief, "k1")))["status"] == "in_flight"
            await client.wait_chat("k1", "final")


async def test_abort_while_the_model_is_silent(stack) -> None:
    gateway, port, sim = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.ok("chat.send", send("s", THINK, "quiet"))
            # the model request is out ("options" comes first now, before the request)
            while not sim.connections():  # noqa: ASYNC110 (the sim offers no event for it)
                await trio.sleep(0.01)
            result = await client.ok("chat.abort", {"sessionKey": "s", "runId": "quiet"})
            assert result == {"ok": True, "aborted": True, "runIds": ["quiet"]}
            aborted = await client.wait_chat("quiet", "aborted")
            assert aborted["payload"]["stopReason"] == "rpc"
            assert "message" not in aborted["payload"]  # nothing was said
            stopped = await client.wait_event(lambda f: f["event"] == "runtime.stopped")
            assert stopped["seq"] == aborted["seq"] + 1  # right after the aborted event
            assert stopped["payload"]["policy"] == "keep_partial"
            assert stopped["payload"]["receipt"] == []
            closed = await sim.wait_closed("/v1/chat/completions")
            assert closed[-1].closed_by == "client"
            again = await client.ok("chat.abort", {"sessionKey": "s", "runId": "quiet"})
            assert again == {"ok": True, "aborted": False, "runIds": []}
            history = await client.ok("chat.history", {"sessionKey": "s"})
            assert [m["role"] for m in history["messages"]] == ["user"]


async def test_abort_mid_text_keeps_the_partial_with_abort_metadata(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.ok("chat.send", send("s", SLOW, "mid"))
            await client.wait_event(
                lambda f: (
                    f["event"] == "chat"
                    and f["payload"]["state"] == "delta"
                    and f["payload"]["seq"] >= 3
                )
            )
            await client.ok("chat.abort", {"sessionKey": "s"})
            aborted = (await client.wait_chat("mid", "aborted"))["payload"]
            kept = aborted["message"]["content"][0]["text"]
            delivered = "".join(
                f["payload"]["deltaText"]
                for f in client.events("chat", "mid")
                if f["payload"]["state"] == "delta"
            )
            assert kept == delivered and kept
            history = await client.ok("chat.history", {"sessionKey": "s"})
            partial = history["messages"][-1]
            assert partial["content"][0]["text"] == kept
            assert partial["openclawAbort"] == {"aborted": True, "origin": "rpc", "runId": "mid"}
            validate_history(await gateway.runtime.store.history("s"))


async def test_rollback_returns_the_prompt_in_runtime_stopped(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            configured = await client.ok(
                "runtime.sessions.configure", {"sessionKey": "s", "stopPolicy": "rollback"}
            )
            assert configured["stopPolicy"] == "rollback"
            await client.ok("chat.send", send("s", SLOW, "rb"))
            await client.wait_chat("rb", "delta")
            await client.ok("chat.abort", {"sessionKey": "s", "runId": "rb"})
            await client.wait_chat("rb", "aborted")
            stopped = await client.wait_event(lambda f: f["event"] == "runtime.stopped")
            assert stopped["payload"]["restoredPrompt"] == SLOW
            assert stopped["payload"]["policy"] == "rollback"
            history = await client.ok("chat.history", {"sessionKey": "s"})
            assert history["messages"] == [] and history["settings"]["stopPolicy"] == "rollback"
            bad = await client.call(
                "runtime.sessions.configure", {"sessionKey": "s", "stopPolicy": "forget"}
            )
            assert bad["error"]["code"] == "INVALID_REQUEST"
            assert "Unknown stop policy 'forget'" in bad["error"]["message"]


async def test_a_stop_command_aborts_the_sessions_runs(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.ok("chat.send", send("s", THINK, "one"))
            await client.ok("chat.send", send("s", THINK, "two"))
            result = await client.ok("chat.send", send("s", "/stop", "three"))
            assert result == {"ok": True, "aborted": True, "runIds": ["one", "two"]}
            for run_id in ("one", "two"):
                aborted = await client.wait_chat(run_id, "aborted")
                assert aborted["payload"]["stopReason"] == "stop"  # OpenClaw's word for /stop


async def test_sessions_abort_keeps_queued_runs_unless_told(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.ok("chat.send", send("s", THINK, "live"))
            await client.ok("chat.send", send("s", QUICK, "queued"))
            result = await client.ok("sessions.abort", {"key": "s"})
            assert result["runIds"] == ["live"]
            await client.wait_chat("queued", "final")
            await client.ok("chat.send", send("s", THINK, "live2"))
            await client.ok("chat.send", send("s", QUICK, "queued2"))
            result = await client.ok("sessions.abort", {"key": "s", "clearQueued": True})
            assert result["runIds"] == ["live2", "queued2"]
            await client.wait_chat("queued2", "aborted")


def lifecycle(client: Client, run_id: str) -> list[dict]:
    return [
        f["payload"]["data"]
        for f in client.events("agent", run_id)
        if f["payload"]["stream"] == "lifecycle"
    ]


async def test_a_run_sent_with_allow_cancel_false_refuses_every_stop(stack) -> None:
    gateway, port, _ = stack
    keep = {"allowCancel": False}
    steady = "Tell me.\n#sim words=150 rate=50"
    with trio.fail_after(30):
        async with open_client(port) as client, open_client(port) as other:
            # the option is an extension method: chat.send's schema allows no extra field
            refused = await client.call("chat.send", send("s", SLOW, "x", **keep))
            assert refused["error"]["code"] == "INVALID_REQUEST"
            assert "runtime.chat.send" in refused["error"]["message"]
            started = await client.ok("runtime.chat.send", send("s", steady, "kept", **keep))
            assert started == {"runId": "kept", "status": "started"}
            await client.ok("runtime.chat.send", send("s", QUICK, "queued", **keep))
            await client.wait_chat("kept", "delta")
            # the options event comes first, for a queued run too
            assert lifecycle(client, "kept")[:2] == [
                {"sessionKey": "s", "phase": "options", "allowCancel": False},
                {"sessionKey": "s", "phase": "start"},
            ]
            await client.wait_event(
                lambda f: (
                    f["payload"].get("runId") == "queued"
                    and f["payload"].get("data", {}).get("phase") == "queued"
                )
            )
            assert lifecycle(client, "queued")[0]["phase"] == "options"
            assert lifecycle(client, "queued")[1]["phase"] == "queued"
            live = (await other.ok("chat.history", {"sessionKey": "s"}))["liveRuns"]
            assert [(r["runId"], r["allowCancel"]) for r in live] == [
                ("kept", False),
                ("queued", False),
            ]
            stops = [
                ("chat.abort", {"sessionKey": "s", "runId": "kept"}),
                ("chat.abort", {"sessionKey": "s"}),
                ("sessions.abort", {"runId": "kept"}),
                ("sessions.abort", {"key": "s"}),
                ("sessions.abort", {"key": "s", "clearQueued": True}),
                ("chat.send", send("s", "/stop", "stop-1")),
            ]
            for method, params in stops:
                error = (await other.call(method, params))["error"]
                assert error["code"] == "FORBIDDEN", (method, params)
                assert error["details"]["code"] == "ABORT_REFUSED"
                assert "allowCancel false" in error["message"]
                assert "kept" in error["details"]["runIds"]
            # a session abort that stops something lists what it left alone
            await client.ok("chat.send", send("s", QUICK, "plain"))  # queued, cancellable
            result = await other.ok("chat.abort", {"sessionKey": "s"})
            assert result == {
                "ok": True,
                "aborted": True,
                "runIds": ["plain"],
                "refusedRunIds": ["kept", "queued"],
            }
            await client.wait_chat("plain", "aborted")
            final = await client.wait_chat("kept", "final")  # it ran to its end
            assert len(final["payload"]["message"]["content"][0]["text"].split()) == 150
            await client.wait_chat("queued", "final")
        # with abort-on-disconnect, leaving does not stop such a run (nor break the gateway)
        async with open_client(port, caps=["abort-on-disconnect"]) as leaving:
            await leaving.ok("runtime.chat.send", send("s", QUICK, "left", **keep))
            await leaving.wait_chat("left", "delta")
        async with open_client(port) as back:
            history = await back.ok("chat.history", {"sessionKey": "s"})
            if history["liveRuns"]:
                await back.wait_chat("left", "final")
            assert "runtime.chat.send" in back.hello["features"]["methods"]


async def test_events_reach_every_connection_with_gap_free_seq(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as a, open_client(port) as b:
            await a.ok("chat.send", send("s", QUICK, "shared"))
            await a.wait_chat("shared", "final")
            await b.wait_chat("shared", "final")
            await trio.sleep(0.5)  # a few ticks too
            for client in (a, b):
                events = [f for f in client.received if f["type"] == "event"]
                assert [f["seq"] for f in events] == list(range(len(events)))
                assert any(f["event"] == "tick" for f in events)


async def test_a_client_that_leaves_does_not_stop_its_run(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.ok("chat.send", send("s", "Go.\n#sim words=30 rate=60", "left"))
            await client.wait_chat("left", "delta")
        async with open_client(port) as back:
            history = await back.ok("chat.history", {"sessionKey": "s"})
            live = history["liveRuns"]
            assert [r["runId"] for r in live] == ["left"] and live[0]["text"]
            final = await back.wait_chat("left", "final")
            full = final["payload"]["message"]["content"][0]["text"]
            first_delta = next(
                f["payload"]
                for f in back.events("chat", "left")
                if f["payload"]["state"] == "delta"
            )
            # the joiner's first delta carries the whole text so far, not just its own part
            assert full.startswith(first_delta["message"]["content"][0]["text"])
            assert len(first_delta["message"]["content"][0]["text"]) > len(first_delta["deltaText"])


async def test_abort_on_disconnect_is_a_connect_option(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as watcher:
            async with open_client(port, caps=["abort-on-disconnect"]) as client:
                await client.ok("chat.send", send("s", THINK, "mine"))
            aborted = await watcher.wait_chat("mine", "aborted")
            assert aborted["payload"]["stopReason"] == "disconnect"


async def test_shutdown_aborts_runs_and_closes_with_1001(sim, nursery, tmp_path) -> None:
    async with open_openai_compat(model="sim", base_url=sim.base_url + "/v1") as model:
        async with SQLiteStore(tmp_path / "g.db") as store, Runtime(model=model, store=store) as rt:
            gateway = Gateway(rt)
            done = trio.Event()

            async def serve(task_status):
                await gateway.serve("127.0.0.1", 0, task_status=task_status)
                done.set()

            port = await nursery.start(serve)
            with trio.fail_after(30):
                async with open_client(port) as client:
                    await client.ok("chat.send", send("s", SLOW, "bye"))
                    await client.wait_chat("bye", "delta")
                    gateway.shutdown()
                    await client.closed.wait()
                    aborted = client.events("chat", "bye")[-1]["payload"]
                    assert aborted["state"] == "aborted" and aborted["stopReason"] == "shutdown"
                    assert client.ws.closed.code == 1001
                await done.wait()
            history = await store.history("s")
            assert history[-1].meta["origin"] == "shutdown"


# -- bad input ---------------------------------------------------------------------------


async def test_bad_requests_get_errors_and_the_connection_survives(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            unknown = await client.call("chat.dance", {})
            assert unknown["error"]["code"] == "INVALID_REQUEST"
            assert "Unknown method 'chat.dance'" in unknown["error"]["message"]
            wrong = await client.call("chat.send", {"sessionKey": 5, "message": "x"})
            assert wrong["error"]["code"] == "INVALID_REQUEST"
            assert "params.sessionKey" in wrong["error"]["message"]
            assert "idempotencyKey" in wrong["error"]["message"]
            empty = await client.call("chat.send", send("s", "  ", "e1"))
            assert "message is empty" in empty["error"]["message"]
            other = await client.call("chat.send", send("mine", THINK, "theirs-run"))
            assert other["ok"]
            mismatch = await client.call(
                "chat.abort", {"sessionKey": "yours", "runId": "theirs-run"}
            )
            assert "runId does not match sessionKey" in mismatch["error"]["message"]
            await client.send_raw('{"type":"req","id":"broken", oops')
            answer = await client.response("broken")
            assert answer["error"]["code"] == "INVALID_REQUEST"
            history = await client.call("chat.history", {"sessionKey": "s", "limit": 5000})
            assert "limit" in history["error"]["message"]
            assert (await client.ok("runtime.stats"))["liveRuns"] == 1


async def test_a_frame_with_no_readable_id_closes_with_1007(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            await client.send_raw("this is not json")
            await client.closed.wait()
            assert client.ws.closed.code == 1007


async def test_the_first_request_must_be_connect(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port, handshake=False) as client:
            response = await client.call("chat.history", {"sessionKey": "s"})
            assert response["error"]["code"] == "INVALID_REQUEST"
            await client.closed.wait()
            assert client.ws.closed.code == 1008


async def test_an_oversized_frame_before_the_handshake_closes_with_1009(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port, handshake=False) as client:
            await client.send_raw(json.dumps({"pad": "x" * 70_000}))
            await client.closed.wait()
            assert client.ws.closed.code == 1009


async def test_token_auth_and_scopes(sim, nursery) -> None:
    async with open_openai_compat(model="sim", base_url=sim.base_url + "/v1") as model:
        async with Runtime(model=model) as rt:
            gateway = Gateway(rt, token=TOKEN)
            port = await nursery.start(gateway.serve, "127.0.0.1", 0)
            with trio.fail_after(30):
                async with open_client(port, handshake=False) as client:
                    denied = await client.call("connect", connect_params(token="wrong"))
                    assert denied["error"]["code"] == "FORBIDDEN"
                    assert denied["error"]["details"]["code"] == "AUTH_TOKEN_MISMATCH"
                    assert TOKEN not in json.dumps(denied)
                    await client.closed.wait()
                async with open_client(port, token=TOKEN, scopes=["operator.read"]) as reader:
                    refused = await reader.call("chat.send", send("s", QUICK, "nope"))
                    assert refused["error"]["code"] == "FORBIDDEN"
                    assert refused["error"]["details"]["missingScope"] == "operator.write"
                    assert (await reader.ok("chat.history", {"sessionKey": "s"}))["messages"] == []
                async with open_client(port, token=TOKEN, scopes=None) as admin:
                    assert "operator.write" in admin.hello["auth"]["scopes"]
            gateway.shutdown()


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "tok")
    with pytest.raises(UnsafeBind, match="without a token"):
        check_bind("0.0.0.0", None)


# -- the official OpenClaw client --------------------------------------------------------

DRIVE = pathlib.Path(__file__).resolve().parent / "node" / "drive.mjs"


async def drive(scenario: str, port: int, *args: str) -> tuple[int, list[dict]]:
    result = await trio.run_process(
        ["node", str(DRIVE), scenario, "--url", f"ws://127.0.0.1:{port}", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]
    return result.returncode, lines


async def test_the_official_client_sends_streams_aborts_and_reads_history(stack) -> None:
    gateway, port, sim = stack
    with trio.fail_after(60):
        code, lines = await drive("send-abort", port, "--session", "agent:main:main")
    assert code == 0, lines
    steps = {line["name"]: line["result"] for line in lines if line["kind"] == "step"}
    run_id = steps["chat.send"]["runId"]
    assert steps["chat.send"]["status"] == "started"
    assert steps["chat.abort"] == {"ok": True, "aborted": True, "runIds": [run_id]}
    frames = [line["frame"] for line in lines if line["kind"] == "event"]
    check_frames(frames)
    chat = [f["payload"] for f in frames if f["event"] == "chat"]
    assert sum(p["state"] == "delta" for p in chat) >= 3
    assert chat[-1]["state"] == "aborted" and chat[-1]["stopReason"] == "rpc"
    messages = steps["chat.history"]["messages"]
    assert messages[-1]["openclawAbort"]["runId"] == run_id
    assert (await sim.wait_closed())[-1].closed_by == "client"


async def test_the_official_client_sees_a_final_reply(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(60):
        code, lines = await drive("send-final", port)
    assert code == 0, lines
    frames = [line["frame"] for line in lines if line["kind"] == "event"]
    check_frames(frames)
    assert [f["payload"]["state"] for f in frames if f["event"] == "chat"][-1] == "final"


async def test_the_official_client_resumes_a_live_run_and_finishes_it(stack) -> None:
    """A client leaves mid-reply; the official client connects, reads inFlightRun and
    follows the run by deltaText alone, from the seq the text reflects, to its end."""
    gateway, port, _ = stack
    with trio.fail_after(60):
        async with open_client(port) as leaving:
            await leaving.ok("chat.send", send("resumed", "Go.\n#sim words=120 rate=60", "run-r"))
            await leaving.wait_event(
                lambda f: f["event"] == "chat" and f["payload"]["seq"] >= 8  # a few deltas in
            )
        code, lines = await drive("resume", port, "--session", "resumed", "--run", "run-r")
    assert code == 0, lines
    steps = {line["name"]: line["result"] for line in lines if line["kind"] == "step"}
    check_frames([line["frame"] for line in lines if line["kind"] == "event"])
    rebuilt = steps["rebuilt"]
    assert rebuilt["state"] == "final" and rebuilt["base"] and rebuilt["deltas"] > 0
    stored = steps["chat.history.after"]["messages"][-1]
    assert rebuilt["text"] == stored["content"][0]["text"]
    assert len(rebuilt["text"].split()) == 120


async def test_the_official_client_subscribed_rebuilds_the_reply_from_delta_text(stack) -> None:
    gateway, port, _ = stack
    message = "Go.\n#sim words=2000 rate=1000"
    with trio.fail_after(60):
        code, lines = await drive("send-final", port, "--subscribe", "--message", message)
    assert code == 0, lines
    steps = {line["name"]: line["result"] for line in lines if line["kind"] == "step"}
    assert steps["sessions.messages.subscribe"] == {"subscribed": True, "key": "agent:main:main"}
    frames = [line["frame"] for line in lines if line["kind"] == "event"]
    check_frames(frames)
    chat = [f["payload"] for f in frames if f["event"] == "chat"]
    final = chat[-1]
    assert final["state"] == "final"
    text = final["message"]["content"][0]["text"]
    assert len(text.split()) == 2000
    assert "".join(p["deltaText"] for p in chat[:-1]) == text  # deltaText alone
    assert all("message" not in p for p in chat[1:-1])
    assert steps["chat.history"]["messages"][-1]["content"][0]["text"] == text


async def test_the_official_client_stops_on_a_wrong_token(sim, nursery) -> None:
    async with open_openai_compat(model="sim", base_url=sim.base_url + "/v1") as model:
        async with Runtime(model=model) as rt:
            gateway = Gateway(rt, token=TOKEN)
            port = await nursery.start(gateway.serve, "127.0.0.1", 0)
            with trio.fail_after(60):
                code, lines = await drive("bad-token", port, "--token", "wrong")
            assert code == 0, lines
            rejected = next(line for line in lines if line.get("name") == "connect-rejected")
            assert rejected["result"]["details"]["code"] == "AUTH_TOKEN_MISMATCH"
            assert rejected["result"]["reconnectPaused"]
            gateway.shutdown()


async def test_connect_refuses_a_string_where_a_list_of_scopes_belongs(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port, handshake=False) as client:
            params = connect_params() | {"scopes": "operator.write"}
            refused = await client.call("connect", params)
            assert refused["error"]["code"] == "INVALID_REQUEST"
            assert "expected list[str]" in refused["error"]["message"]
            assert "params.scopes" in refused["error"]["message"]


async def test_a_send_during_the_runtimes_shutdown_gets_unavailable(stack) -> None:
    gateway, port, _ = stack
    with trio.fail_after(30):
        async with open_client(port) as client:
            gateway.runtime._closing = True  # as once Runtime.__aexit__ has begun
            try:
                error = (await client.call("chat.send", send("s", QUICK, "late")))["error"]
            finally:
                gateway.runtime._closing = False
            assert error["code"] == "UNAVAILABLE" and error["retryable"] is True
            assert error["message"].startswith("The server is shutting down")

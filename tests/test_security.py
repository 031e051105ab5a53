"""The gateway's security rules, over real sockets: token checks and their rate limit,
nothing before the handshake, scopes per method, one principal's sessions hidden from
another, hostile JSON, and secrets kept out of every output."""

from __future__ import annotations

import json
import logging
import pathlib
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from adapters.gateway import Gateway, check_bind
from adapters.gateway._auth import FailureLimiter, check_tokens, identify, read_token_file
from adapters.gateway._connection import _METHODS
from adapters.gateway._protocol import READ, WRITE
from tests.gateway_client import Client, connect_params, open_client
from tests.gateway_stack import running_gateway, send

TOKEN = "tok-SHARED-5d2c0f6e9a"
LIVE = "Go on.\n#sim words=50 rate=100 pause_at=3:30"  # live until aborted
QUICK = "Hi.\n#sim words=5 rate=200"


@asynccontextmanager
async def running(
    db: pathlib.Path, sim: Any, *, api_key: str | None = None, **gateway_options: Any
) -> AsyncIterator[tuple[Gateway, int]]:
    """``running_gateway``, its gateway given ``gateway_options`` before anyone connects."""
    async with running_gateway(db, sim, api_key=api_key) as (gateway, port):
        for name, value in gateway_options.items():
            setattr(gateway, name, value)  # attrs validates each
        yield gateway, port


async def refused_connect(port: int, token: str | None) -> tuple[dict[str, Any], Client]:
    """A connect that must fail: its error shape, and the client (closed by now)."""
    async with open_client(port, handshake=False) as client:
        response = await client.call("connect", connect_params(token=token))
        assert not response["ok"], response
        await client.closed.wait()
        assert client.ws.closed is not None and client.ws.closed.code == 1008
    return response["error"], client


# -- tokens: constant-time comparison, named principals, the failure limit ------------------


def test_tokens_are_compared_as_equal_length_digests_in_constant_time(monkeypatch) -> None:
    import adapters.gateway._auth as auth

    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    tokens = {"alice": "a" * 40, "bob": "b"}
    assert identify("b", TOKEN, tokens) == auth.Principal("bob")
    assert identify(TOKEN, TOKEN, tokens) == auth.Principal(None)
    assert identify("x" * 1000, TOKEN, tokens) is None
    # every candidate compared every time (no early exit), always 32 bytes against 32
    assert len(compared) == 9
    assert all(type(a) is bytes and len(a) == len(b) == 32 for a, b in compared)


def test_the_failure_limit_slides_and_its_table_is_bounded() -> None:
    now = [100.0]
    limiter = FailureLimiter(clock=lambda: now[0], max_addresses=50)
    for _ in range(4):
        limiter.record_failure("127.0.0.1")
        now[0] += 1
    assert limiter.retry_after("127.0.0.1") is None  # four failures: still allowed
    limiter.record_failure("127.0.0.1")
    assert limiter.retry_after("127.0.0.1") == pytest.approx(56.0)  # the first is 4 s old
    now[0] += 56
    assert limiter.retry_after("127.0.0.1") is None  # the first one has expired
    limiter.record_failure("127.0.0.1")
    assert limiter.retry_after("127.0.0.1") == pytest.approx(1.0)  # five within 59 s
    # IPv6: one /64 is one client; IPv4-mapped addresses count as the IPv4 address
    for host in range(5):
        limiter.record_failure(f"2001:db8::{host}")
    assert limiter.retry_after("2001:db8::ffff") is not None
    assert limiter.retry_after("2001:db8:0:1::1") is None
    for _ in range(5):
        limiter.record_failure("::ffff:10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is not None
    for host in range(10_000):  # a flood of addresses cannot grow the table
        limiter.record_failure(f"10.{host // 65536}.{host // 256 % 256}.{host % 256}")
    assert len(limiter) == 50
    now[0] += 61
    assert limiter.retry_after("10.0.39.15") is None and len(limiter) == 49  # expired, dropped


def test_token_names_and_files_are_checked_without_quoting_a_token(tmp_path) -> None:
    for bad in ({"a:b": "t1"}, {"": "t1"}, {"a": ""}, {"a": "t 1"}, {"a": "t1", "b": "t1"}):
        with pytest.raises(ValueError) as refused:
            check_tokens(bad)
        assert "t1" not in str(refused.value)
    with pytest.raises(ValueError, match="shared"):
        Gateway(None, token="t1", tokens={"alice": "t1"})  # type: ignore[arg-type]
    assert "t1" not in repr(Gateway(None, token="t1", tokens={"a": "t2"}))  # type: ignore[arg-type]
    good = tmp_path / "tokens"
    good.write_text("# who, then the token\nalice  tA1\n\nbob tB2\n")
    assert read_token_file(good) == {"alice": "tA1", "bob": "tB2"}
    bad = tmp_path / "bad"
    bad.write_text("alice tA1 extra\n")
    with pytest.raises(ValueError, match=r"bad:1: write one") as refused:
        read_token_file(bad)
    assert "tA1" not in str(refused.value)


def test_serve_reads_a_token_file_and_names_no_token_when_it_refuses(tmp_path, capsys) -> None:
    from adapters.cli import main

    tokens = tmp_path / "tokens"
    tokens.write_text("alice tA1\nbob tA1\n")
    for argv in (["--token-file", str(tokens)], ["--host", "0.0.0.0"]):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--port", "0", *argv])
        assert exit_.value.code == 2
    refusals = capsys.readouterr().err
    assert "'bob' is also another name's" in refusals and "tA1" not in refusals
    assert "without a token" in refusals
    check_bind("0.0.0.0", None, {"alice": "tA1"})  # named tokens are tokens


async def test_failed_tokens_lock_the_address_out_even_on_loopback(sim, tmp_path) -> None:
    now = [0.0]
    limiter = FailureLimiter(clock=lambda: now[0])
    with trio.fail_after(30):
        async with running(tmp_path / "db", sim, token=TOKEN, auth_failures=limiter) as (_, port):
            missing, _ = await refused_connect(port, None)  # no guess: not counted
            assert missing["details"]["code"] == "AUTH_TOKEN_MISSING"
            for guess in range(5):
                wrong, _ = await refused_connect(port, f"guess-{guess}")
                assert wrong["details"]["code"] == "AUTH_TOKEN_MISMATCH"
            limited, _ = await refused_connect(port, TOKEN)  # even the right token now
            assert limited["code"] == "FORBIDDEN" and limited["retryable"] is True
            assert limited["details"] == {"code": "AUTH_RATE_LIMITED"}
            assert limited["retryAfterMs"] == 60_000
            assert "too many failed authentication attempts" in limited["message"].lower()
            now[0] = 59.5
            assert (await refused_connect(port, TOKEN))[0]["retryAfterMs"] == 500
            now[0] = 60.0
            async with open_client(port, token=TOKEN) as client:
                await client.ok("runtime.stats")


# -- nothing before the handshake; scopes per method ----------------------------------------


def frame(method: str, params: Any = None, kind: str = "req") -> str:
    return json.dumps({"type": kind, "id": "x", "method": method, "params": params or {}})


async def test_nothing_but_the_handshake_before_auth(sim, tmp_path) -> None:
    firsts = [frame(m) for m in _METHODS] + [
        frame("connect", kind="res"),  # not a request
        frame("connect", kind="event"),
        '{"type":"req","method":"connect"}',  # no id to answer
        b"\x00binary",
    ]
    with trio.fail_after(60):
        async with running(tmp_path / "db", sim, token=TOKEN) as (_, port):
            async with open_client(port, token=TOKEN) as operator:
                await operator.ok("chat.send", send("s", LIVE, "busy"))  # events are flowing
                await operator.wait_chat("busy", "delta")
                for first in firsts:
                    async with open_client(port, handshake=False) as stranger:
                        await stranger.send_raw(first)
                        await stranger.closed.wait()
                        assert stranger.ws.closed.code in (1007, 1008), first
                    # the challenge, at most an error answer; never an event of the run
                    assert stranger.received[0]["event"] == "connect.challenge"
                    assert [f["type"] for f in stranger.received[1:]] in ([], ["res"]), first
                    assert all(not f.get("ok", False) for f in stranger.received[1:])
                # a wrong token: refused the same way, and nothing follows
                _, stranger = await refused_connect(port, "wrong")
                assert [f["type"] for f in stranger.received] == ["event", "res"]
                await operator.ok("chat.abort", {"sessionKey": "s"})
                await operator.wait_chat("busy", "aborted")


async def test_every_method_needs_its_scope(sim, tmp_path) -> None:
    with trio.fail_after(30):
        async with running(tmp_path / "db", sim, token=TOKEN) as (_, port):
            async with (
                open_client(port, token=TOKEN, scopes=[]) as nobody,
                open_client(port, token=TOKEN, scopes=[READ]) as reader,
                open_client(port, token=TOKEN, scopes=[WRITE]) as writer,
            ):
                for method, (needed, _) in _METHODS.items():
                    assert needed in (READ, WRITE), method
                    for client, granted in ((nobody, ()), (reader, (READ,)), (writer, (WRITE,))):
                        answer = await client.call(method, {})  # params {}: nothing is done
                        missing = answer.get("error", {}).get("details", {}).get("missingScope")
                        assert missing == (None if needed in granted else needed), (method, answer)
                # without operator.read, a connection receives no run events, even its own
                await writer.ok("chat.send", send("s", QUICK, "mine"))
                await reader.wait_chat("mine", "final")
                assert writer.events("chat") == [] and writer.events("agent") == []


# -- one principal cannot see or touch another's sessions ---------------------------------


async def test_a_principal_reaches_only_its_own_sessions(sim, tmp_path) -> None:
    tokens = {"alice": "tok-alice-0b1f", "bob": "tok-bob-77c3"}
    with trio.fail_after(60):
        served = running(tmp_path / "db", sim, token=TOKEN, tokens=tokens)
        async with served as (_, port):
            async with (
                open_client(port, token=tokens["alice"]) as alice,
                open_client(port, token=tokens["bob"]) as bob,
                open_client(port, token=TOKEN) as admin,
            ):
                await alice.ok("chat.send", send("alice:s", LIVE, "alice:run"))
                await alice.wait_chat("alice:run", "delta")
                await admin.wait_chat("alice:run", "delta")  # the shared token sees all

                refusals = [
                    ("chat.history", {"sessionKey": "alice:s"}),
                    ("chat.history", {"sessionKey": "alice:no-such-session"}),
                    ("chat.history", {"sessionKey": "s"}),
                    ("chat.abort", {"sessionKey": "alice:s"}),
                    ("chat.abort", {"sessionKey": "bob:s", "runId": "alice:run"}),
                    ("sessions.abort", {"key": "alice:s"}),
                    ("sessions.abort", {"runId": "alice:run"}),
                    ("chat.send", send("alice:s", "/stop", "bob:1")),
                    ("chat.send", send("bob:s", QUICK, "alice:run")),
                    ("runtime.sessions.configure", {"sessionKey": "alice:s"}),
                ]
                errors = [(await bob.call(m, p))["error"] for m, p in refusals]
                assert {e["code"] for e in errors} == {"FORBIDDEN"}
                assert {e["details"]["code"] for e in errors} == {"NOT_YOUR_SESSION"}
                # an existing session and a missing one are refused in the same words
                assert errors[0] == errors[1]

                stats = await bob.ok("runtime.stats")
                assert (stats["liveRuns"], stats["queuedRuns"], stats["connections"]) == (0, 0, 1)
                await bob.ok("chat.send", send("bob:s", QUICK, "bob:run"))
                await bob.wait_chat("bob:run", "final")
                listed = await bob.ok("sessions.list", {})
                assert [s["key"] for s in listed["sessions"]] == ["bob:s"]

                assert (await alice.ok("runtime.stats"))["liveRuns"] == 1  # bob stopped nothing
                await alice.ok("chat.abort", {"sessionKey": "alice:s"})
                await alice.wait_chat("alice:run", "aborted")
                everything = await admin.ok("sessions.list", {})
                assert {s["key"] for s in everything["sessions"]} == {"alice:s", "bob:s"}
            # bob received not one frame about alice's run; alice none about bob's
            assert "alice:" not in json.dumps(bob.received)
            assert "bob:" not in json.dumps(alice.received)
            assert admin.events("chat", "bob:run")


# -- hostile JSON ----------------------------------------------------------------------------


async def test_deep_or_huge_json_is_refused_without_much_memory(sim, tmp_path) -> None:
    head = '{"type":"req","id":"%s","method":"chat.history","params":'
    deep = head % "deep" + "[" * 500_000 + "]" * 500_000 + "}"  # 1 MB, under maxPayload
    huge_int = head % "int" + '{"sessionKey":"s","limit":' + "9" * 1_000_000 + "}}"
    huge_float = head % "float" + '{"sessionKey":"s","limit":1e999999}}'
    with trio.fail_after(60):
        async with running(tmp_path / "db", sim) as (_, port):
            async with open_client(port) as client:
                tracemalloc.start()
                try:
                    for text in (deep, huge_int, huge_float):
                        await client.send_raw(text)
                    answers = [await client.response(i) for i in ("deep", "int", "float")]
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                messages = [a["error"]["message"] for a in answers]
                assert messages[0] == "The frame nests too deeply."
                assert messages[1] == "The frame holds a number too long to read."
                assert "params.limit" in messages[2]
                await client.ok("runtime.stats")  # the connection goes on
            # The frames themselves are ~1 MB each in several copies (client, socket buffer,
            # server); building 500,000 nested lists would take over 30 MB more.
            assert peak < 24 * 2**20, f"peak {peak / 2**20:.1f} MiB"
            async with open_client(port, handshake=False) as early:  # before the handshake
                await early.send_raw("[" * 60_000)
                await early.closed.wait()
                assert early.ws.closed.code == 1007


# -- secrets never leave -----------------------------------------------------------------------

API_KEY = "sk-test-SECRET-2f9c41d7e0b84a6d"


async def serve_unauthorized(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A provider that refuses every request with 401 and quotes the key it was sent, long
    after a preamble, as a careless proxy does."""

    async def answer(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", "0")):
            body += await stream.receive_some()
        said = "Upstream refused the request. " * 9 + f"Bad key: {headers['authorization']}"
        payload = json.dumps({"error": {"message": said, "type": "invalid_request_error"}})
        await stream.send_all(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n{payload}".encode()
        )
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


def outputs(clients: list[Client], caplog: pytest.LogCaptureFixture, files: list[Any]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = [formatter.format(record) for record in caplog.records]
    read = [path.read_bytes().decode("latin-1") for path in files]
    return "\n".join([json.dumps(c.received) for c in clients] + logged + read)


async def secrets_in_a_session(
    provider: Any, db: pathlib.Path, caplog: pytest.LogCaptureFixture, messages: list[str]
) -> str:
    """Every output of a session with a known key and token: what clients received, the
    log, the SQLite files. Ends with a wrong token and chat.history."""
    clients = []
    async with running(db, provider, api_key=API_KEY, token=TOKEN) as (gateway, port):
        async with open_client(port, token=TOKEN) as client:
            clients.append(client)
            for number, message in enumerate(messages):
                await client.ok("chat.send", send("s", message, f"run-{number}"))
                await client.wait_event(
                    lambda f, n=number: (
                        f["event"] == "chat"
                        and f["payload"]["runId"] == f"run-{n}"
                        and f["payload"]["state"] in ("final", "error")
                    )
                )
            await client.ok("chat.history", {"sessionKey": "s"})
            await client.ok("runtime.stats")
        _, stranger = await refused_connect(port, API_KEY)  # a key pasted as the token
        clients.append(stranger)
        shown = repr(gateway) + repr(gateway.runtime)
    return shown + outputs(clients, caplog, sorted(db.parent.glob(db.name + "*")))


async def test_the_key_and_token_never_appear_in_any_output(sim, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    messages = [QUICK, "Fail.\n#sim fail=500", "Break.\n#sim fail=error_event"]
    with trio.fail_after(60):
        seen = await secrets_in_a_session(sim, tmp_path / "db", caplog, messages)
    # it all ran, and was captured: frames, log records, the database file
    for sign in ('"state": "error"', "AUTH_TOKEN_MISMATCH", "wrong token conn=", "SQLite format 3"):
        assert sign in seen
    for secret in (API_KEY, TOKEN, "sk-test-"):
        assert secret not in seen


async def test_a_provider_that_quotes_the_key_does_not_leak_it(tmp_path, caplog) -> None:
    # The key straddles the 300th character, where the adapter cuts the provider's words:
    # it leaked its first 14 characters until the cut came after the redaction.
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_unauthorized)
            provider = SimpleNamespace(base_url=f"http://127.0.0.1:{port}")  # as a SimServer
            seen = await secrets_in_a_session(provider, tmp_path / "db", caplog, [QUICK])
            nursery.cancel_scope.cancel()
    assert "Upstream refused" in seen  # the provider's words did arrive
    for secret in (API_KEY, TOKEN, "sk-test-"):
        assert secret not in seen


# -- DNS rebinding: without a token, only loopback names ---------------------------------------

UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def http_status(port: int, head: str) -> tuple[int, str]:
    """Send a request head; the response's status and its body (up to 4 KiB)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET / HTTP/1.1\r\n{head}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
        response, _, body = data.partition(b"\r\n\r\n")
        if response.startswith(b"HTTP/1.1 101"):
            return 101, ""
        while b"\n" not in body and (chunk := await stream.receive_some(4096)):
            body += chunk
        return int(response.split(b" ")[1]), body.decode()


async def test_a_tokenless_gateway_answers_only_loopback_names(sim, tmp_path) -> None:
    with trio.fail_after(30):
        async with running(tmp_path / "db", sim) as (gateway, port):
            evil = f"Host: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\n"
            status, body = await http_status(port, evil + UPGRADE)  # was 101, admin scopes
            assert status == 403
            assert "Host 'evil.example:" in body and "DNS rebinding" in body
            status, body = await http_status(port, f"Host: evil.example:{port}\r\n")  # the page
            assert status == 403 and "DNS rebinding" in body
            # a loopback Host with another site's Origin, or an Origin of scheme null
            for origin in ("http://evil.example", "null"):
                head = f"Host: localhost:{port}\r\nOrigin: {origin}\r\n"
                assert (await http_status(port, head + UPGRADE))[0] == 403, origin
            assert (await http_status(port, "Host: 127.0.0.1.evil.example\r\n"))[0] == 403
            for name in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
                page = await http_status(port, f"Host: {name}\r\n")
                assert page[0] == 200, name
                head = f"Host: {name}\r\nOrigin: http://{name}\r\n"
                assert (await http_status(port, head + UPGRADE))[0] == 101, name
            gateway.token = TOKEN  # with a token, the token decides
            assert (await http_status(port, evil + UPGRADE))[0] == 101


# -- before the handshake, the 64 KiB limit holds at the transport ------------------------------


async def read_frame(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    async def need(count: int) -> bytes:
        while len(buffer) < count:
            chunk = await stream.receive_some(65536)
            assert chunk, "the server closed TCP without a close frame"
            buffer.extend(chunk)
        taken = bytes(buffer[:count])
        del buffer[:count]
        return taken

    first, second = await need(2)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(await need(2), "big")
    elif size == 127:
        size = int.from_bytes(await need(8), "big")
    return first & 0x0F, await need(size)


async def test_a_frame_over_64_kib_before_the_handshake_is_refused_as_it_arrives(
    sim, tmp_path
) -> None:
    """The frame announces 1 MiB and sends 70,000 bytes of it: the transport closes with 1009
    at once, without waiting for (and buffering) the rest. Before, the gateway buffered up
    to 1 MiB and the client, never finishing its frame, was closed 10 s later with 1008."""
    with trio.fail_after(8):  # below the 10 s handshake timeout
        async with running(tmp_path / "db", sim) as (_, port):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(
                    f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{UPGRADE}\r\n".encode()
                )
                buffer = bytearray()
                while b"\r\n\r\n" not in buffer:
                    buffer.extend(await stream.receive_some(4096))
                head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                buffer = bytearray(rest)
                opcode, challenge = await read_frame(stream, buffer)
                assert opcode == 1 and b"connect.challenge" in challenge
                # a masked text frame of 2**20 bytes (mask 0: the payload goes as it is)
                header = bytes([0x81, 0x80 | 127]) + (2**20).to_bytes(8, "big") + bytes(4)
                await stream.send_all(header + b"x" * 70_000)
                opcode, payload = await read_frame(stream, buffer)
                assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1009

"""The ``trio-agent`` command, run as real processes against a real gateway."""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from adapters.chat_client import DEFAULT_SESSION
from adapters.gateway import UnsafeBind, check_bind
from adapters.sqlite_store import SQLiteStore
from runtime import validate_history
from tests.gateway_client import Client, open_client
from tests.helpers import MCP_SERVER, tagged_pids

CLI = [sys.executable, "-m", "adapters.cli"]
QUICK = "Hi.\n#sim words=5 rate=100"
THINK = "Hello?\n#sim think=60"
SLOW = "Tell me.\n#sim words=400 rate=50"
# Several Python processes start per test; generous on a busy 2-core machine.
PROCESS_BOUND = 60


async def test_trio_agent_sim_serves_until_ctrl_c() -> None:
    command = [*CLI, "sim", "--port", "0"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            start = functools.partial(trio.run_process, command, stdout=-1, check=False)
            process = await nursery.start(start)
            line = b""
            while b"\n" not in line:
                chunk = await process.stdout.receive_some()
                assert chunk, "trio-agent sim exited before printing its address"
                line += chunk
            url = next(w for w in line.decode().split() if w.startswith("http://"))
            async with httpx.AsyncClient() as client:
                response = await client.get(url + "/v1/_sim/connections")
            assert response.json() == []
            process.send_signal(signal.SIGINT)
        assert process.returncode == 0


# -- helpers ---------------------------------------------------------------------------


@attrs.frozen
class Served:
    process: trio.Process
    banner: str  # the first line printed
    url: str
    port: int
    db: Path


@asynccontextmanager
async def serving(tmp_path: Path, env: dict[str, str], *extra: str) -> AsyncIterator[Served]:
    """``trio-agent serve --port 0`` on a fresh database; SIGTERM on exit if still up."""
    db = tmp_path / "agent.db"
    command = [*CLI, "serve", "--port", "0", "--db", str(db), *extra]
    async with trio.open_nursery() as nursery:
        start = functools.partial(
            trio.run_process, command, stdout=subprocess.PIPE, check=False, env=env
        )
        process = await nursery.start(start)
        out = bytearray()
        await read_until(process.stdout, out, lambda seen: b"\n" in seen)
        banner = out.decode().splitlines()[0]
        url = next(w for w in banner.split() if w.startswith("ws://"))
        yield Served(process, banner, url, int(url.rsplit(":", 1)[1]), db)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)


async def read_until(
    stream: trio.abc.ReceiveStream, seen: bytearray, done: Callable[[bytearray], bool]
) -> None:
    while not done(seen):
        chunk = await stream.receive_some()
        assert chunk, f"the stream ended early after {bytes(seen)!r}"
        seen += chunk


async def read_rest(stream: trio.abc.ReceiveStream, seen: bytearray) -> None:
    while chunk := await stream.receive_some():
        seen += chunk


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, env=env
    )


@attrs.frozen
class Interrupted:
    returncode: int
    stdout: str
    stderr: str


async def start_chat(
    nursery: trio.Nursery, env: dict[str, str], url: str, *args: str
) -> trio.Process:
    """``trio-agent chat --url URL ARGS...`` as a child with its output piped."""
    start = functools.partial(
        trio.run_process,
        [*CLI, "chat", "--url", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
        env=env,
    )
    return await nursery.start(start)


async def chat_until(
    nursery: trio.Nursery,
    env: dict[str, str],
    served: Served,
    message: str,
    ready: Callable[[bytearray], bool] | None = None,
    watcher: Client | None = None,
    *,
    session: str = DEFAULT_SESSION,
) -> Interrupted:
    """Start ``chat``, wait until it is ``ready`` (its stdout so far) or until ``watcher``
    sees the run start, press Ctrl-C, and collect what it printed."""
    process = await start_chat(nursery, env, served.url, "--session", session, message)
    out, err = bytearray(), bytearray()
    if ready is not None:
        await read_until(process.stdout, out, ready)
    if watcher is not None:
        await watcher.wait_event(
            lambda f: f["event"] == "agent" and f["payload"]["data"].get("phase") == "start"
        )
    process.send_signal(signal.SIGINT)
    await read_rest(process.stdout, out)
    await read_rest(process.stderr, err)
    return Interrupted(await process.wait(), out.decode(), err.decode())


async def history_lines(env: dict[str, str], served: Served, *args: str) -> list[str]:
    result = await run_cli(env, "history", "--url", served.url, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().splitlines()


def some_words(seen: bytearray) -> bool:
    return seen.count(b" ") >= 3


# -- serve, chat, history --------------------------------------------------------------


async def test_serve_prints_its_address_and_chat_streams_a_reply(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served:
            assert served.port != 0
            assert served.banner.startswith(f"trio-agent gateway on ws://127.0.0.1:{served.port}")
            assert str(served.db) in served.banner
            result = await run_cli(env, "chat", "--url", served.url, QUICK)
            assert result.returncode == 0, result.stderr
            reply = result.stdout.decode()
            assert reply.endswith("\n") and len(reply.split()) == 5
            assert await history_lines(env, served) == [
                "user: Hi.\\n#sim words=5 rate=100",
                f"assistant: {reply.strip()}",
            ]
        assert served.process.returncode == 0


async def test_ctrl_c_while_the_model_is_silent_stops_the_run(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, trio.open_nursery() as nursery:
            async with open_client(served.port) as watcher:
                chat = await chat_until(nursery, env, served, THINK, watcher=watcher)
            assert chat.returncode == 130, chat.stderr
            assert chat.stdout == ""
            assert "[stopped: rpc]" in chat.stderr
            # the prompt is kept; nothing was said, so no assistant message
            assert await history_lines(env, served) == ["user: Hello?\\n#sim think=60"]


async def test_ctrl_c_mid_text_keeps_the_partial_marked_stopped(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, trio.open_nursery() as nursery:
            chat = await chat_until(nursery, env, served, SLOW, some_words)
            assert chat.returncode == 130, chat.stderr
            assert "[stopped: rpc] the partial reply above was kept" in chat.stderr
            printed = chat.stdout.strip()
            assert 3 <= len(printed.split()) < 400
            # what the terminal showed is exactly what was kept
            assert await history_lines(env, served) == [
                "user: Tell me.\\n#sim words=400 rate=50",
                f"assistant: {printed} [stopped]",
            ]


async def test_a_stop_under_rollback_prints_the_restored_prompt(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, trio.open_nursery() as nursery:
            async with open_client(served.port) as client:
                configure = {"sessionKey": "undo", "stopPolicy": "rollback"}
                await client.ok("runtime.sessions.configure", configure)
            chat = await chat_until(nursery, env, served, SLOW, some_words, session="undo")
            assert chat.returncode == 130, chat.stderr
            assert "rolled back; your message was:\n" + SLOW in chat.stderr
            assert await history_lines(env, served, "--session", "undo") == []


async def test_sigterm_during_a_run_shuts_down_and_keeps_the_partial(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, trio.open_nursery() as nursery:
            chat = await start_chat(nursery, env, served.url, SLOW)
            out, err = bytearray(), bytearray()
            await read_until(chat.stdout, out, some_words)
            sent_at = trio.current_time()
            served.process.send_signal(signal.SIGTERM)
            assert await served.process.wait() == 0
            assert trio.current_time() - sent_at < 5  # the promise; it takes far less
            await read_rest(chat.stdout, out)
            await read_rest(chat.stderr, err)
            assert await chat.wait() == 130
            assert "[stopped: shutdown] the partial reply above was kept" in err.decode()
        async with SQLiteStore(served.db) as store:
            messages = await store.history(DEFAULT_SESSION)
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[-1].meta["aborted"] and messages[-1].meta["origin"] == "shutdown"


async def test_sigterm_during_an_mcp_tool_call_tells_the_server_and_ends_it(
    tmp_path, env
) -> None:
    """``serve --mcp``: the tool is listed; SIGTERM mid-call stops the run (the server is
    told, reason shutdown), then the server process goes too."""
    log = tmp_path / "mcp.log"
    tag = f"cli-mcp-{tmp_path.name}"
    command = f"{sys.executable} {MCP_SERVER} --log {log} --tag {tag}"
    research = 'Go.\n#sim tool=slow rate=500 args={"seconds": 60}'
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env, "--mcp", f"tests={command}") as served:
            assert tagged_pids(tag) != []
            async with open_client(served.port, caps=["tool-events"]) as client:
                assert "runtime.tool:slow" in client.hello["features"]["capabilities"]
                send = {"sessionKey": "s", "message": research, "idempotencyKey": "r1"}
                await client.ok("chat.send", send)
                await client.wait_event(
                    lambda f: f["event"] == "agent"
                    and f["payload"]["data"].get("phase") == "progress"
                )
                served.process.send_signal(signal.SIGTERM)
                assert await served.process.wait() == 0
        assert tagged_pids(tag) == []
        notices = [line for line in log.read_text().splitlines() if "cancel-notification" in line]
        assert len(notices) == 1 and '"reason": "shutdown"' in notices[0]
        async with SQLiteStore(served.db) as store:
            messages = await store.history("s")
        validate_history(messages)
        assert [m.role for m in messages] == ["user", "assistant", "tool"]


async def test_an_mcp_server_that_cannot_start_stops_serve_with_a_sentence(
    tmp_path, env
) -> None:
    with trio.fail_after(PROCESS_BOUND):
        result = await run_cli(
            env, "serve", "--port", "0", "--db", str(tmp_path / "x.db"),
            "--mcp", f"broken={tmp_path / 'no-such-program'} --flag",
        )
    assert result.returncode == 2
    assert result.stdout == b""
    assert "The MCP server 'broken' did not start" in result.stderr.decode()
    bad = await run_cli(env, "serve", "--mcp", "no-equals-sign")
    assert bad.returncode == 2 and "write NAME=COMMAND or NAME=URL" in bad.stderr.decode()


async def test_a_token_from_the_environment_guards_the_gateway(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        guarded = env | {"TRIO_AGENT_TOKEN": "s3cret"}
        async with serving(tmp_path, guarded) as served:
            assert "s3cret" not in served.banner
            url = served.url
            refused = await run_cli(env, "chat", "--url", url, QUICK)
            assert refused.returncode == 1
            assert "needs a token" in refused.stderr.decode()
            result = await run_cli(guarded, "chat", "--url", url, QUICK)
            assert result.returncode == 0, result.stderr


# -- refusals --------------------------------------------------------------------------


async def test_serve_on_all_interfaces_without_a_token_refuses(tmp_path, env) -> None:
    with pytest.raises(UnsafeBind) as refusal:
        check_bind("0.0.0.0", None)
    with trio.fail_after(PROCESS_BOUND):
        result = await run_cli(
            env, "serve", "--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "x.db")
        )
    assert result.returncode == 2
    assert result.stdout == b""  # no address: nothing was listening
    assert str(refusal.value) in result.stderr.decode()
    assert not (tmp_path / "x.db").exists()


async def test_chat_without_a_gateway_says_how_to_start_one(env) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(PROCESS_BOUND):
        result = await run_cli(env, "chat", "--url", f"ws://127.0.0.1:{port}", "hello")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"trio-agent: no gateway at ws://127.0.0.1:{port}: start one with `trio-agent serve`\n"
    )


async def test_a_real_provider_needs_a_model_name(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        result = await run_cli(
            env, "serve", "--provider", "anthropic", "--port", "0", "--db", str(tmp_path / "x.db")
        )
    assert result.returncode == 2
    assert "--provider anthropic needs --model" in result.stderr.decode()

"""Each example runs, against the simulated provider, and does what it says."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import trio

from tests.gateway_client import open_client
from tests.test_cli import PROCESS_BOUND, read_rest, read_until, serving, some_words

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
PYTHON = [sys.executable, "-W", "error"]  # warnings are errors in the examples too
WS_CLIENT = [*PYTHON, str(EXAMPLES / "ws_client.py")]


def run_example(name: str, *args: str) -> str:
    """Run an example to its end and return what it printed. It must exit 0 and say
    nothing on stderr: under ``-W error`` an unclosed socket or stream would show there."""
    result = subprocess.run(
        [*PYTHON, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


@pytest.mark.parametrize("flags", [[], ["--anthropic"]])
def test_embed_in_service_stops_text_and_a_tool(flags, tmp_path) -> None:
    db = tmp_path / "demo.db"
    out = run_example("embed_in_service.py", "--db", str(db), *flags)
    assert out.count("stopped: reason=rpc policy=keep_partial") == 2
    assert "provider saw the connection closed by the client" in out
    assert "tool lookup (call_sim0001" in out or "tool lookup (toolu_" in out
    assert ": cancelled" in out
    history = out.split("3. The history")[1].split("\n")[1:]
    roles = [line.split()[0] for line in history if line.strip()]
    assert roles == ["user", "assistant", "user", "assistant", "tool"]
    assert db.exists()


def test_subprocess_bot_kills_its_tool_process_on_stop() -> None:
    out = run_example("subprocess_bot.py")
    pid = int(re.search(r"tool started: sleep 30 as pid (\d+)", out).group(1))
    assert f"pid {pid} exists before the stop: True" in out
    assert "receipt: tool shell (call_sim0001): cancelled" in out
    assert f"pid {pid} exists after the stop: False" in out
    assert "the tool result the model will see: 'Not completed: the run was stopped" in out
    # Independently: a process left behind would now be an orphan (or an unreaped
    # zombie), and signal 0 would find it.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_tool_loop_bot_is_stopped_by_each_budget() -> None:
    out = run_example("tool_loop_bot.py")
    turns, tools = out.split("2. max_tool_calls=3")
    assert "terminal event: RunFinished, stop_reason=max_turns" in turns
    assert "tool calls that ran: 4" in turns
    assert "terminal event: RunFinished, stop_reason=max_tool_calls" in tools
    assert "tool calls that ran: 3" in tools
    assert "result for call_sim0004 error: \"Not run: the run's tool-call budget" in tools
    for section in (turns, tools):
        # every call in the printed history has its result, right after it
        calls = re.findall(r"assistant calls step \((\w+)\)\n  tool      result for (\w+)", section)
        assert (
            [c for c, _ in calls]
            == [r for _, r in calls]
            == [f"call_sim000{n}" for n in range(1, 5)]
        )
        assert "history valid: 4 tool calls, 4 results" in section


# -- ws_client.py, against `trio-agent serve` -----------------------------------------


async def start_ws_client(nursery: trio.Nursery, url: str, *args: str) -> trio.Process:
    start = functools.partial(
        trio.run_process,
        [*WS_CLIENT, "--url", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
    )
    return await nursery.start(start)


async def test_ws_client_streams_a_reply_to_its_final(tmp_path, env) -> None:
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, trio.open_nursery() as nursery:
            client = await start_ws_client(
                nursery, served.url, "--session", "s", "Hi.\n#sim words=6 rate=100"
            )
            out, err = bytearray(), bytearray()
            await read_rest(client.stdout, out)
            await read_rest(client.stderr, err)
            assert await client.wait() == 0, err
            async with open_client(served.port) as watcher:
                history = await watcher.ok("chat.history", {"sessionKey": "s"})
        reply = history["messages"][-1]["content"][0]["text"]
        assert len(reply.split()) == 6
        assert out.decode() == reply + "\n"


@pytest.mark.parametrize("when", ["thinking", "mid-text"])
async def test_ws_client_ctrl_c_stops_the_run_and_reports_what_was_kept(
    tmp_path, env, when
) -> None:
    message = (
        "Tell me.\n#sim think=30" if when == "thinking" else "Tell me.\n#sim words=400 rate=50"
    )
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env) as served, trio.open_nursery() as nursery:
            async with open_client(served.port) as watcher:
                client = await start_ws_client(nursery, served.url, "--session", "s", message)
                out, err = bytearray(), bytearray()
                if when == "mid-text":
                    await read_until(client.stdout, out, some_words)
                else:
                    await watcher.wait_event(
                        lambda f: (
                            f["event"] == "agent" and f["payload"]["data"].get("phase") == "start"
                        )
                    )
                client.send_signal(signal.SIGINT)
                await read_rest(client.stdout, out)
                await read_rest(client.stderr, err)
                assert await client.wait() == 130, err
                history = await watcher.ok("chat.history", {"sessionKey": "s"})
                assert history["liveRuns"] == []
    messages = history["messages"]
    printed = out.decode()
    if when == "thinking":
        assert printed == ""
        assert err.decode() == "[stopped: rpc] no reply kept\n"
        assert [m["role"] for m in messages] == ["user"]  # nothing was said
        return
    kept = printed.removesuffix("\n")
    assert 3 <= len(kept.split()) < 400
    assert err.decode() == f"[stopped: rpc] the {len(kept)} characters above kept\n"
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["content"] == [{"type": "text", "text": kept}]
    assert messages[-1]["openclawAbort"]["aborted"] is True


async def test_the_research_mcp_server_demo_from_the_readme(tmp_path, env) -> None:
    """The README's one-line demo: serve with the example MCP server, ask, Stop mid-tool;
    then a short research runs to its end."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    demo = 'trio-agent serve --mcp research="python examples/research_mcp_server.py"'
    assert demo in readme
    assert '#sim tool=research args={"topic": "rivers"}' in readme
    server = f"research={sys.executable} {EXAMPLES / 'research_mcp_server.py'}"
    ask = 'Research rivers for me.\n#sim tool=research args={"topic": "rivers"}'
    short = 'Quickly.\n#sim tool=research args={"topic": "lakes", "seconds": 1}'
    with trio.fail_after(PROCESS_BOUND):
        async with serving(tmp_path, env, "--mcp", server) as served:
            async with open_client(served.port, caps=["tool-events"]) as client:
                assert client.hello["features"]["capabilities"] == ["runtime.tool:research"]
                send = {"sessionKey": "demo", "message": ask, "idempotencyKey": "r1"}
                await client.ok("chat.send", send)
                progress = await client.wait_event(
                    lambda f: f["event"] == "agent"
                    and f["payload"]["data"].get("phase") == "progress"
                )
                assert progress["payload"]["data"]["message"] == "Reading the question (1/20)"
                await client.ok("chat.abort", {"sessionKey": "demo", "runId": "r1"})
                stopped = await client.wait_event(lambda f: f["event"] == "runtime.stopped")
                [receipt] = stopped["payload"]["receipt"]
                assert receipt["status"] == "cancelled"
                assert "sent to MCP server 'research'" in receipt["cancelDelivered"]
                send = {"sessionKey": "demo", "message": short, "idempotencyKey": "r2"}
                await client.ok("chat.send", send)
                await client.wait_chat("r2", "final")
                history = await client.ok("chat.history", {"sessionKey": "demo"})
            results = [m for m in history["messages"] if m["role"] == "toolResult"]
            assert results[0]["content"][0]["text"].startswith("Not completed:")
            assert results[1]["content"][0]["text"].startswith("Research on lakes:")

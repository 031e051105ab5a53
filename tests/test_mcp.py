"""MCP tools (``adapters/mcp.py``) against real MCP server processes (``tests/mcp_server.py``).

Each test starts its own server, over stdio or streamable HTTP, with a log file where the
server writes what it saw; the runtime runs on a scripted model. Time is bounded only by
generous ``fail_after`` guards, never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.mcp import (
    HttpServer,
    MCPTools,
    ServerSpec,
    StdioServer,
    open_mcp_tools,
    parse_server,
)
from runtime import (
    Event,
    RunCancelled,
    RunFinished,
    Runtime,
    ScriptedModel,
    Subscription,
    ToolCallProgress,
    ToolCallStarted,
    text_turn,
    tool_turn,
    validate_history,
)
from tests.gateway_client import open_client
from tests.gateway_stack import running_gateway, send
from tests.helpers import MCP_SERVER, check_receipt, events_until_terminal, tagged_pids

# The SDK's streamable HTTP client returns out of ``async for`` over an SSE stream once
# the reply is in (after closing the response), leaving httpx2's generators to the
# garbage collector: Trio finalizes them but warns, asyncio finalizes them silently.
# Exactly those warnings are expected; any other ResourceWarning still fails a test.
HTTPX2_GENERATORS = [
    "ignore:Async generator 'httpx2.:ResourceWarning",
    "ignore:Async generator 'httpcore2.:ResourceWarning",
]
pytestmark = [pytest.mark.filterwarnings(f) for f in HTTPX2_GENERATORS]

SERVER = MCP_SERVER
BOUND = 30.0  # generous: the machine may be busy
COMMIT_BOUND = 2.0  # the runtime's commit_timeout in these tests


def read_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def wait_log(
    log: Path, test: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The server's log once ``test`` holds for it (polled: the server is another process)."""
    while not test(entries := read_log(log)):  # noqa: ASYNC110
        await trio.sleep(0.02)
    return entries


class Servers:
    """Server processes for one test: a tag to find them, and a log of what they saw."""

    def __init__(self, tmp: Path) -> None:
        self.tag = f"mcp-test-{uuid.uuid4().hex}"
        self.log = tmp / "server.log"
        self.http: list[subprocess.Popen[bytes]] = []

    def args(self, *flags: str) -> tuple[str, ...]:
        return (sys.executable, str(SERVER), "--log", str(self.log), "--tag", self.tag, *flags)

    def stdio(self, *flags: str, name: str = "tests") -> StdioServer:
        return StdioServer(name, self.args(*flags))

    def start_http(self, *flags: str, name: str = "tests") -> HttpServer:
        process = subprocess.Popen([*self.args("--http", *flags)], stdout=subprocess.PIPE)
        self.http.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("URL "), line
        return HttpServer(name, line.split()[1])

    def stop_http(self) -> None:
        for process in self.http:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:  # a server blocked in ``hang``
                    process.kill()
                    process.wait(timeout=BOUND)
            assert process.stdout is not None
            process.stdout.close()


@pytest.fixture
def servers(tmp_path: Path) -> Any:
    made = Servers(tmp_path)
    yield made
    made.stop_http()
    for pid in tagged_pids(made.tag):  # a test that failed may leave one; never leak it
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(params=["stdio", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def spec_for(servers: Servers, transport: str, *flags: str) -> ServerSpec:
    return servers.stdio(*flags) if transport == "stdio" else servers.start_http(*flags)


@asynccontextmanager
async def agent(
    spec: ServerSpec, model: ScriptedModel, **options: Any
) -> AsyncIterator[tuple[Runtime, MCPTools]]:
    async with open_mcp_tools([spec], **options) as mcp:
        async with Runtime(model=model, tools=mcp.tools, commit_timeout=COMMIT_BOUND) as rt:
            yield rt, mcp


async def collect_until(
    events: Subscription, run_id: str, kind: type, seen: list[Event]
) -> Event:
    """Append the run's events to ``seen`` until one of ``kind`` arrives; return it."""
    async for event in events:
        if event.run_id == run_id:
            seen.append(event)
            if isinstance(event, kind):
                return event
    raise AssertionError(f"no {kind.__name__} arrived")


def started_ids(entries: list[dict[str, Any]], tool: str) -> list[str]:
    return [e["requestId"] for e in entries if e["event"] == "started" and e["tool"] == tool]


# -- tools, schemas, a call ------------------------------------------------------------


async def test_the_servers_tools_become_runtime_tools_and_a_call_returns_its_text(
    servers: Servers, transport: str
) -> None:
    model = ScriptedModel.from_turns(
        tool_turn(("c1", "echo", {"text": "hello"})), text_turn("done")
    )
    with trio.fail_after(BOUND):
        async with agent(spec_for(servers, transport), model) as (rt, mcp):
            tools = {tool.name: tool for tool in mcp.tools}
            assert set(tools) == {"slow", "echo", "hang", "crash"}
            assert tools["echo"].parameters["required"] == ["text"]
            assert "Answer at once" in tools["echo"].description
            run = await rt.start_run("s", "say hello")
            terminal = await run.wait()
            assert isinstance(terminal, RunFinished)
            # the model saw the schemas, and the second request carries the result
            assert {spec.name for spec in model.requests[0].tools} == set(tools)
            history = await rt.store.history("s")
            validate_history(history)
            results = [b for m in history if m.role == "tool" for b in m.content]
            assert [(b.content, b.is_error) for b in results] == [("echo: hello", False)]


# -- a stop reaches the server ---------------------------------------------------------


async def test_a_stop_mid_call_tells_the_server_which_cancels_its_handler(
    servers: Servers, transport: str
) -> None:
    model = ScriptedModel.from_turns(
        tool_turn(("c1", "slow", {"seconds": 60})),
        tool_turn(("c2", "echo", {"text": "still here"})),
        text_turn("done"),
    )
    with trio.fail_after(BOUND):
        async with agent(spec_for(servers, transport), model) as (rt, mcp):
            with rt.subscribe("s") as events:
                run = await rt.start_run("s", "research")
                seen: list[Event] = []
                await collect_until(events, run.run_id, ToolCallProgress, seen)  # it runs
                assert rt.abort(run_id=run.run_id).aborted
                seen += await events_until_terminal(events, run.run_id)
            terminal = seen[-1]
            assert isinstance(terminal, RunCancelled)
            check_receipt(seen)
            [receipt] = terminal.receipt
            assert receipt.status == "cancelled"
            [request_id] = started_ids(read_log(servers.log), "slow")
            assert receipt.cancel_delivered is not None
            assert f"request {request_id}" in receipt.cancel_delivered
            # the server got the notification for that request, with the stop's reason,
            # and its handler was cancelled (the SDK cancels it, then shows the
            # notification to the server's middleware)
            entries = await wait_log(servers.log, lambda es: len(es) >= 3)
            assert sorted(entries, key=lambda e: e["event"]) == [
                {"event": "cancel-notification", "requestId": request_id, "reason": "rpc"},
                {"event": "handler-cancelled", "requestId": request_id},
                {"event": "started", "tool": "slow", "requestId": request_id},
            ]
            validate_history(await rt.store.history("s"))
            # ... by the notification, not by a closing connection: the same server
            # process serves the next run
            second = await rt.start_run("s", "again")
            assert isinstance(await second.wait(), RunFinished)
            assert mcp.servers[0].starts == 1
            assert started_ids(read_log(servers.log), "echo") != []


async def test_a_stop_during_two_parallel_calls_tells_the_server_about_each(
    servers: Servers, transport: str
) -> None:
    model = ScriptedModel.from_turns(
        tool_turn(("c1", "slow", {"seconds": 60, "text": "a"}), ("c2", "slow", {"seconds": 60}))
    )
    with trio.fail_after(BOUND):
        async with agent(spec_for(servers, transport), model) as (rt, mcp):
            with rt.subscribe("s") as events:
                run = await rt.start_run("s", "research twice")
                await wait_log(servers.log, lambda es: len(started_ids(es, "slow")) == 2)
                assert rt.abort(run_id=run.run_id, reason="stop-command").aborted
                seen = await events_until_terminal(events, run.run_id)
            terminal = seen[-1]
            assert isinstance(terminal, RunCancelled)
            check_receipt(seen)
            requests = set(started_ids(read_log(servers.log), "slow"))
            delivered = {}
            for receipt in terminal.receipt:
                assert receipt.status == "cancelled" and receipt.cancel_delivered is not None
                request = receipt.cancel_delivered.split("(request ")[1].split(",")[0]
                delivered[receipt.tool_call_id] = request
            assert set(delivered.values()) == requests
            entries = await wait_log(
                servers.log, lambda es: sum(e["event"] == "handler-cancelled" for e in es) == 2
            )
            notices = {
                (e["requestId"], e["reason"])
                for e in entries
                if e["event"] == "cancel-notification"
            }
            assert notices == {(request, "stop-command") for request in requests}
            validate_history(await rt.store.history("s"))


@pytest.mark.parametrize("policy", ["keep_partial", "rollback"])
async def test_a_stop_as_the_call_returns_keeps_the_result_with_its_call_or_neither(
    servers: Servers, policy: str
) -> None:
    """The abort lands at a spread of moments around the reply's arrival; whichever side
    wins, the call and its result go to history together, or neither does."""
    outcomes = set()
    with trio.fail_after(BOUND * 2):
        model = ScriptedModel(
            lambda request: tool_turn(("c1", "slow", {"seconds": 0.1, "text": "result"}))
            if request.messages[-1].role == "user"
            else text_turn("done")
        )
        async with agent(servers.stdio(), model) as (rt, mcp):
            for attempt in range(16):
                session = f"s{attempt}"
                with rt.subscribe(session) as events:
                    run = await rt.start_run(session, "quick research", stop_policy=policy)
                    seen: list[Event] = []
                    await collect_until(events, run.run_id, ToolCallStarted, seen)
                    await trio.sleep(0.06 + attempt * 0.01)  # 0.06 to 0.21 s after the start
                    rt.abort(run_id=run.run_id)
                    seen += await events_until_terminal(events, run.run_id)
                check_receipt(seen)
                history = await rt.store.history(session)
                validate_history(history)
                terminal = seen[-1]
                results = [b for m in history if m.role == "tool" for b in m.content]
                calls = [b for m in history if m.role == "assistant" for b in m.content]
                if isinstance(terminal, RunFinished):
                    outcomes.add("finished")
                    assert [r.content for r in results] == ["slow done: result"]
                    continue
                assert isinstance(terminal, RunCancelled)
                [receipt] = terminal.receipt
                outcomes.add(receipt.status)
                if policy == "rollback":
                    assert history == []
                elif receipt.status == "finished":
                    assert [r.content for r in results] == ["slow done: result"]
                    assert any(getattr(b, "id", None) == "c1" for b in calls)
                else:
                    assert receipt.status == "cancelled"
                    assert [r.is_error for r in results] == [True]
                    assert results[0].content.startswith("Not completed:")
    assert "cancelled" in outcomes, outcomes  # the spread reached both sides of the reply
    assert outcomes - {"cancelled"}, outcomes


async def test_a_server_that_hangs_and_ignores_the_stop_does_not_delay_it(
    servers: Servers, transport: str
) -> None:
    model = ScriptedModel.from_turns(tool_turn(("c1", "hang", {"seconds": 40})))
    with trio.fail_after(BOUND):
        async with agent(spec_for(servers, transport), model) as (rt, mcp):
            with rt.subscribe("s") as events:
                run = await rt.start_run("s", "hang")
                await wait_log(servers.log, lambda es: started_ids(es, "hang") != [])
                assert rt.abort(run_id=run.run_id).aborted
                # well inside the commit bound, and far less than the server's 40 s
                with trio.fail_after(COMMIT_BOUND):
                    seen = await events_until_terminal(events, run.run_id)
            terminal = seen[-1]
            assert isinstance(terminal, RunCancelled)
            assert [r.status for r in terminal.receipt] == ["cancelled"]
            validate_history(await rt.store.history("s"))


async def test_a_reply_that_arrives_after_the_stop_is_dropped_and_logged(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="adapters.mcp")
    model = ScriptedModel.from_turns(tool_turn(("c1", "hang", {"seconds": 1.5})))
    with trio.fail_after(BOUND):
        async with agent(servers.stdio(), model) as (rt, mcp):
            run = await rt.start_run("s", "hang a little")
            await wait_log(servers.log, lambda es: started_ids(es, "hang") != [])
            assert rt.abort(run_id=run.run_id).aborted
            terminal = await run.wait()
            assert isinstance(terminal, RunCancelled)
            # the server wakes, never having read the cancellation, and answers anyway
            await wait_log(servers.log, lambda es: any(e["event"] == "finished" for e in es))
            while mcp.servers[0].late_replies == 0:  # noqa: ASYNC110
                await trio.sleep(0.02)
            [request_id] = started_ids(read_log(servers.log), "hang")
            assert f"answered request {request_id} after it was cancelled" in caplog.text
            history = await rt.store.history("s")
            validate_history(history)
            results = [b.content for m in history if m.role == "tool" for b in m.content]
            assert len(results) == 1 and results[0].startswith("Not completed:")
            assert "hang done" not in json.dumps([str(m) for m in history])


async def test_a_tool_timeout_ends_the_call_as_an_error_and_tells_the_server(
    servers: Servers, transport: str
) -> None:
    model = ScriptedModel.from_turns(
        tool_turn(("c1", "slow", {"seconds": 60})), text_turn("it timed out")
    )
    with trio.fail_after(BOUND):
        async with agent(
            spec_for(servers, transport), model, tool_timeouts={"slow": 0.5}
        ) as (rt, mcp):
            run = await rt.start_run("s", "research")
            assert isinstance(await run.wait(), RunFinished)
            history = await rt.store.history("s")
            validate_history(history)
            [result] = [b for m in history if m.role == "tool" for b in m.content]
            assert result.is_error
            assert "did not answer within 0.5 s" in result.content
            assert "was told to cancel" in result.content
            [request_id] = started_ids(read_log(servers.log), "slow")
            entries = await wait_log(
                servers.log, lambda es: any(e["event"] == "handler-cancelled" for e in es)
            )
            notice = {"event": "cancel-notification", "requestId": request_id, "reason": "timeout"}
            assert notice in entries


async def test_a_server_that_dies_mid_call_gives_a_tool_error_and_is_started_again(
    servers: Servers,
) -> None:
    model = ScriptedModel.from_turns(
        tool_turn(("c1", "crash", {})),
        text_turn("the tool failed"),
        tool_turn(("c2", "echo", {"text": "back"})),
        text_turn("done"),
    )
    with trio.fail_after(BOUND):
        async with agent(servers.stdio(), model) as (rt, mcp):
            [first_pid] = tagged_pids(servers.tag)
            run = await rt.start_run("s", "crash it")
            assert isinstance(await run.wait(), RunFinished)  # a tool error, not a hang
            history = await rt.store.history("s")
            [result] = [b for m in history if m.role == "tool" for b in m.content]
            assert result.is_error and "went away during the call" in result.content
            second = await rt.start_run("s", "again")  # waits for the restart
            assert isinstance(await second.wait(), RunFinished)
            history = await rt.store.history("s")
            validate_history(history)
            results = [b.content for m in history if m.role == "tool" for b in m.content]
            assert results[-1] == "echo: back"
            assert mcp.servers[0].starts == 2
            assert first_pid not in tagged_pids(servers.tag)
            assert len(tagged_pids(servers.tag)) == 1


async def test_an_http_server_that_dies_mid_call_gives_a_tool_error(servers: Servers) -> None:
    """A URL is not ours to start again; the call in flight still ends as a tool error,
    and later calls say the server is gone instead of hanging."""
    model = ScriptedModel.from_turns(tool_turn(("c1", "crash", {})), text_turn("it failed"))
    with trio.fail_after(BOUND):
        async with agent(servers.start_http(), model) as (rt, mcp):
            run = await rt.start_run("s", "crash it")
            assert isinstance(await run.wait(), RunFinished)
            history = await rt.store.history("s")
            validate_history(history)
            [result] = [b for m in history if m.role == "tool" for b in m.content]
            assert result.is_error and "went away during the call" in result.content


@pytest.mark.parametrize("flags", [(), ("--ignore-sigterm",)], ids=["plain", "ignores-sigterm"])
async def test_shutdown_leaves_no_server_process_behind(
    servers: Servers, flags: tuple[str, ...]
) -> None:
    """Even with a call in flight on a server that blocks and (in one case) ignores
    SIGTERM: the runtime's shutdown stops the run, then the server is ended."""
    model = ScriptedModel.from_turns(tool_turn(("c1", "hang", {"seconds": 40})))
    with trio.fail_after(BOUND):
        async with agent(servers.stdio(*flags), model) as (rt, mcp):
            assert len(tagged_pids(servers.tag)) == 1
            run = await rt.start_run("s", "hang")
            await wait_log(servers.log, lambda es: started_ids(es, "hang") != [])
        terminal = run.terminal_event
        assert isinstance(terminal, RunCancelled) and terminal.reason == "shutdown"
        assert tagged_pids(servers.tag) == []


def test_mcp_options_name_a_command_or_a_url() -> None:
    assert parse_server("research=python examples/research_mcp_server.py --slow 'a b'") == (
        StdioServer("research", ("python", "examples/research_mcp_server.py", "--slow", "a b"))
    )
    assert parse_server("web=http://127.0.0.1:8000/mcp") == HttpServer(
        "web", "http://127.0.0.1:8000/mcp"
    )
    for bad in ("research", "=python x", "research=", "x=python 'unclosed"):
        with pytest.raises(ValueError):
            parse_server(bad)


# -- over the gateway ------------------------------------------------------------------


def tool_frames(client: Any, run_id: str) -> list[dict[str, Any]]:
    return [
        f["payload"]["data"]
        for f in client.events("agent", run_id)
        if f["payload"]["stream"] == "tool"
    ]


async def test_over_the_gateway_stop_cancels_the_tool_call_and_the_next_turn_works(
    servers: Servers, transport: str, sim: Any, tmp_path: Path
) -> None:
    research = 'Research rivers.\n#sim tool=slow rate=500 args={"seconds": 60, "text": "rivers"}'
    with trio.fail_after(BOUND):
        async with open_mcp_tools([spec_for(servers, transport)]) as mcp:
            async with running_gateway(tmp_path / "g.db", sim, tools=mcp.tools) as (_, port):
                async with open_client(port, caps=["tool-events"]) as client:
                    capabilities = client.hello["features"]["capabilities"]
                    assert set(capabilities) == {
                        f"runtime.tool:{name}" for name in ("slow", "echo", "hang", "crash")
                    }
                    await client.ok("chat.send", send("s", research, "r1"))
                    await client.wait_event(
                        lambda f: f["event"] == "agent"
                        and f["payload"]["data"].get("phase") == "progress"
                    )
                    aborted = await client.ok("chat.abort", {"sessionKey": "s", "runId": "r1"})
                    assert aborted == {"ok": True, "aborted": True, "runIds": ["r1"]}
                    await client.wait_chat("r1", "aborted")
                    stopped = await client.wait_event(lambda f: f["event"] == "runtime.stopped")
                    [receipt] = stopped["payload"]["receipt"]
                    [request_id] = started_ids(read_log(servers.log), "slow")
                    assert receipt["status"] == "cancelled" and receipt["name"] == "slow"
                    assert f"request {request_id}" in receipt["cancelDelivered"]
                    frames = tool_frames(client, "r1")
                    assert frames[0]["phase"] == "start"
                    assert frames[0]["arguments"] == {"seconds": 60, "text": "rivers"}
                    progress = [f for f in frames if f["phase"] == "progress"]
                    assert progress and progress[0]["total"] == 600
                    assert progress[0]["message"].startswith("step ")
                    assert not any(f["phase"] == "result" for f in frames)
                    await wait_log(
                        servers.log,
                        lambda es: {"event": "cancel-notification", "requestId": request_id,
                                    "reason": "rpc"} in es,
                    )
                    # the history is valid for the next turn, which runs a tool to its end
                    echo = 'Again.\n#sim tool=echo rate=500 args={"text": "fine"}'
                    await client.ok("chat.send", send("s", echo, "r2"))
                    final = await client.wait_chat("r2", "final")
                    assert final["payload"]["stopReason"] == "end_turn"
                    assert [f["phase"] for f in tool_frames(client, "r2")] == ["start", "result"]
                    history = await client.ok("chat.history", {"sessionKey": "s"})
                    roles = [m["role"] for m in history["messages"]]
                    assert roles == [
                        "user", "assistant", "toolResult",
                        "user", "assistant", "toolResult", "assistant",
                    ]
                    results = [
                        m["content"][0] for m in history["messages"] if m["role"] == "toolResult"
                    ]
                    assert results[0]["text"].startswith("Not completed:")
                    assert results[1]["text"] == "echo: fine"

"""Stop during a tool call: from ``chat.abort`` to the tool's work being told to stop.

Four processes: the simulated provider, the gateway (``python -m benchmarks.mcp_stop``:
a Runtime with an in-process tool and the tools of two MCP servers, on a MemoryStore), an
MCP server over stdio (the gateway's child) and one over streamable HTTP (ours), both
``benchmarks/mcp_server.py``, and this one, the measuring client. Each trial starts a run
whose simulated model calls one tool with 60 s of work, waits until the work has begun
(the tool's own record), lets it settle, sends ``chat.abort`` and stamps the time. The
tools stamp when they learn of the stop: the in-process tool when its task is cancelled,
an MCP server when ``notifications/cancelled`` reaches it. All stamps are
``time.monotonic()``, one clock for every process on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import attrs
import trio

from ._gateway import Client, gateway_process, open_client, tune_gc
from ._gateway import _until_told_to_stop as until_told_to_stop
from ._process import first_line
from ._report import Plot, Section, Series, Summary, ms
from .provider_close import sim_process

SERVER: Final = pathlib.Path(__file__).with_name("mcp_server.py")
KINDS: Final = {  # what the trial's tool is -> its name
    "in-process tool": "local_work",
    "MCP over stdio": "stdio_work",
    "MCP over streamable HTTP": "http_work",
}
LOGS: Final = {"local_work": "local.jsonl", "stdio_work": "stdio.jsonl", "http_work": "http.jsonl"}
SETTLE: Final = 0.05  # after the work began
WARMUP: Final = 2
TRIAL_BOUND: Final = 30.0
POLL: Final = 0.002  # reading the tools' records; the times are theirs, not ours


# -- the gateway's process ------------------------------------------------------------


async def _serve(sim_url: str, logs: pathlib.Path, http_url: str) -> None:
    from adapters.gateway import Gateway
    from adapters.mcp import HttpServer, ServerSpec, StdioServer, open_mcp_tools
    from adapters.openai_compat import open_openai_compat
    from runtime import Runtime, Tool

    local_log = (logs / LOGS["local_work"]).open("a", encoding="utf-8")

    def record(**fields: Any) -> None:
        local_log.write(json.dumps({**fields, "t": time.monotonic()}) + "\n")
        local_log.flush()

    async def local_work(arguments: Mapping[str, Any]) -> str:
        record(event="started", tag=arguments["tag"])
        try:
            await trio.sleep(arguments["seconds"])
        except trio.Cancelled:
            record(event="cancel", tag=arguments["tag"])
            raise
        return "worked"

    stdio = (sys.executable, str(SERVER), "--log", str(logs / LOGS["stdio_work"]))
    servers: list[ServerSpec] = [
        StdioServer("stdio", (*stdio, "--prefix", "stdio")),
        HttpServer("http", http_url),
    ]
    local = Tool("local_work", local_work, "Work for `seconds`.")
    async with open_openai_compat(model="sim", base_url=sim_url + "/v1", api_key="") as model:
        async with open_mcp_tools(servers) as mcp:
            async with Runtime(model=model, tools=[local, *mcp.tools]) as runtime:
                async with trio.open_nursery() as nursery:
                    gateway = Gateway(runtime)
                    port = await nursery.start(gateway.serve, "127.0.0.1", 0)
                    tune_gc("freeze+threshold")
                    print(f"gateway on ws://127.0.0.1:{port}", flush=True)
                    await until_told_to_stop()
                    gateway.shutdown()


@contextlib.asynccontextmanager
async def http_server(logs: pathlib.Path) -> AsyncIterator[str]:
    """The streamable HTTP MCP server as our child; yield its URL."""
    log = str(logs / LOGS["http_work"])
    command = [sys.executable, str(SERVER), "--log", log, "--prefix", "http", "--http"]
    async with trio.open_nursery() as nursery:
        start = functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        process: trio.Process = await nursery.start(start)
        try:
            yield (await first_line(process, "MCP server")).split()[1]
        finally:
            process.terminate()


# -- the measuring side ---------------------------------------------------------------


@attrs.define
class Records:
    """One tool's JSON lines, read as they grow."""

    path: pathlib.Path
    seen: list[dict[str, Any]] = attrs.Factory(list)
    _offset: int = 0

    async def wait(self, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            for record in self.seen:
                if test(record):
                    return record
            if self.path.exists():
                with self.path.open("rb") as file:
                    file.seek(self._offset)
                    data = file.read()
                complete = data[: data.rfind(b"\n") + 1]
                self._offset += len(complete)
                self.seen += [json.loads(line) for line in complete.splitlines()]
            await trio.sleep(POLL)


async def trial(client: Client, records: Records, tool: str, name: str) -> tuple[float, float]:
    """One stop: (ms until the tool's work learned of it, ms until the aborted event)."""
    session = f"trial-{name}"
    arguments = json.dumps({"seconds": 60, "tag": name})
    message = f"Work.\n#sim tool={tool} rate=1000 args={arguments}"
    client.watched.add(name)
    try:
        with trio.fail_after(TRIAL_BOUND):
            await client.call(
                "chat.send", {"sessionKey": session, "message": message, "idempotencyKey": name}
            )
            began = await records.wait(lambda r: r["event"] == "started" and r["tag"] == name)
            await trio.sleep(SETTLE)
            asked = time.monotonic()
            answer, _ = await client.call("chat.abort", {"sessionKey": session, "runId": name})
            aborted = await client.wait((name, "aborted"))
            if "requestId" in began:  # an MCP server: its notification names the request
                told = await records.wait(
                    lambda r: r["event"] == "cancel" and r["requestId"] == began["requestId"]
                )
            else:
                told = await records.wait(lambda r: r["event"] == "cancel" and r["tag"] == name)
    finally:
        client.watched.discard(name)
    if answer != {"ok": True, "aborted": True, "runIds": [name]}:
        raise RuntimeError(f"chat.abort did not abort {name}: {answer}")
    return (told["t"] - asked) * 1000, (aborted - asked) * 1000


@attrs.frozen
class Result:
    kind: str
    told: Summary
    aborted: Summary


async def measure(trials: int) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="mcp-stop-") as tmp:
        logs = pathlib.Path(tmp)
        async with sim_process() as sim_url, http_server(logs) as http_url:
            command = [sys.executable, "-m", "benchmarks.mcp_stop", "--serve"]
            command += ["--sim-url", sim_url, "--logs", str(logs), "--http-url", http_url]
            async with gateway_process(sim_url, command=command) as gateway:
                async with open_client(gateway.port) as client:
                    for kind, tool in KINDS.items():
                        records = Records(logs / LOGS[tool])
                        for index in range(WARMUP):
                            await trial(client, records, tool, f"warmup-{tool}-{index}")
                        timings = [
                            await trial(client, records, tool, f"{tool}-{index}")
                            for index in range(trials)
                        ]
                        told, aborted = zip(*timings, strict=True)
                        results.append(Result(kind, Summary.of(told), Summary.of(aborted)))
    return results


async def run(quick: bool) -> Section:
    results = await measure(3 if quick else 200)
    rows = tuple(
        (
            r.kind,
            str(r.told.trials),
            ms(r.told.median),
            ms(r.told.p99),
            ms(r.told.max),
            ms(r.aborted.median),
            ms(r.aborted.p99),
        )
        for r in results
    )
    plot = Plot(
        "the tool",
        "ms from chat.abort",
        tuple(
            Series(
                f"work told, {stat}",
                tuple(r.kind for r in results),
                tuple(getattr(r.told, stat) for r in results),
            )
            for stat in ("median", "p99")
        ),
        kind="bar",
    )
    notes = (
        "From a WebSocket client's `chat.abort` to the tool's work learning of the stop, "
        "while the run's one tool call has been working for 50 ms: for the in-process tool "
        "(an async function in the gateway's process), when its task sees `Cancelled`; for "
        "an MCP server (`benchmarks/mcp_server.py`, the SDK's `MCPServer`, on asyncio), when "
        "its middleware sees the `notifications/cancelled` that `adapters/mcp.py` sends for "
        "the call's request id. The stdio server is the gateway's child; the HTTP one is "
        "reached over 127.0.0.1. The last two columns are `chat.abort` to the `aborted` "
        "event at the client: the stop commit waits for the notification to be handed to "
        "the transport (bounded by 0.5 s), never for the server's reply. Gateway, simulated "
        f"provider, MCP servers and client are separate processes; {WARMUP} untimed trials "
        "first for each tool."
    )
    return Section(
        "Stop during a tool call (`chat.abort` → the tool's work told to stop)",
        (
            "tool",
            "trials",
            "to work told, median ms",
            "p99 ms",
            "max ms",
            "to aborted event, median ms",
            "p99 ms",
        ),
        rows,
        notes,
        plot,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mcp_stop")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--sim-url", required=True)
    parser.add_argument("--logs", type=pathlib.Path, required=True)
    parser.add_argument("--http-url", required=True)
    args = parser.parse_args()
    trio.run(_serve, args.sim_url, args.logs, args.http_url)

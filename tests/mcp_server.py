"""An MCP server for the tests, written with the SDK's server API (``MCPServer``).

``python tests/mcp_server.py --log FILE [--http] [--ignore-sigterm] [--tag TAG]``

Over stdio by default. With ``--http`` it serves streamable HTTP on a free port of
127.0.0.1 and prints ``URL http://127.0.0.1:PORT/mcp`` as its first stdout line.
``--tag`` only marks the command line, so a test can find the process in the process
table. What the server saw goes to ``--log`` as JSON lines, flushed at once:

- ``{"event": "started", "tool", "requestId"}`` when a call begins;
- ``{"event": "cancel-notification", "requestId", "reason"}`` for each
  ``notifications/cancelled`` that reaches the server (seen by a middleware);
- ``{"event": "handler-cancelled", "requestId"}`` when a handler is cancelled (by a
  ``notifications/cancelled`` for its request, or by the server shutting down);
- ``{"event": "finished", "tool", "requestId"}`` when a handler returns.

Tools: ``slow`` (sleeps, reporting progress, honors cancellation), ``echo``, ``hang``
(blocks the whole server with ``time.sleep``: it cannot even read a cancellation, and
answers when it wakes up) and ``crash`` (the process exits mid-call).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer

LOG: Any = None


def record(**fields: Any) -> None:
    LOG.write(json.dumps(fields) + "\n")
    LOG.flush()


class CancelLog:
    """Middleware: every inbound ``notifications/cancelled``, as the server received it."""

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method == "notifications/cancelled":
            params = dict(ctx.params or {})
            record(
                event="cancel-notification",
                requestId=params.get("requestId"),
                reason=params.get("reason"),
            )
        return await call_next(ctx)


server = MCPServer("tests", middleware=[CancelLog()], log_level="WARNING")


@server.tool(description="Research slowly: sleeps `seconds`, reporting progress every 0.1 s.")
async def slow(seconds: float, ctx: Context, text: str = "") -> str:
    record(event="started", tool="slow", requestId=ctx.request_id)
    steps = max(1, round(seconds * 10))
    try:
        for step in range(steps):
            await ctx.report_progress(step, steps, f"step {step} of {steps}")
            await anyio.sleep(seconds / steps)
    except anyio.get_cancelled_exc_class():
        record(event="handler-cancelled", requestId=ctx.request_id)
        raise
    record(event="finished", tool="slow", requestId=ctx.request_id)
    return f"slow done: {text}"


@server.tool(description="Answer at once with the text.")
async def echo(text: str, ctx: Context) -> str:
    record(event="started", tool="echo", requestId=ctx.request_id)
    record(event="finished", tool="echo", requestId=ctx.request_id)
    return f"echo: {text}"


@server.tool(description="Block the whole server for `seconds`, then answer anyway.")
async def hang(seconds: float, ctx: Context) -> str:
    record(event="started", tool="hang", requestId=ctx.request_id)
    time.sleep(seconds)  # noqa: ASYNC251 (on purpose: the loop cannot see a cancellation)
    record(event="finished", tool="hang", requestId=ctx.request_id)
    return "hang done"


@server.tool(description="Exit the server process in the middle of the call.")
async def crash(ctx: Context) -> str:
    record(event="started", tool="crash", requestId=ctx.request_id)
    await anyio.sleep(0.2)
    os._exit(3)


def main() -> None:
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    LOG = open(args.log, "a", encoding="utf-8")
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not args.http:
        server.run("stdio")
        return
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until uvicorn accepts them
    port = sock.getsockname()[1]
    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"URL http://127.0.0.1:{port}/mcp", flush=True)
    anyio.run(uvicorn.Server(config).serve, [sock])


if __name__ == "__main__":
    sys.exit(main())

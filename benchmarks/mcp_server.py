"""The MCP server the ``mcp_stop`` benchmark stops: one tool, ``PREFIX_work``, that works
for ``seconds`` and honors cancellation.

``python benchmarks/mcp_server.py --log FILE --prefix NAME [--http]``: over stdio, or with
``--http`` over streamable HTTP on a free port of 127.0.0.1 (its first stdout line is
``URL http://127.0.0.1:PORT/mcp``). It appends JSON lines to FILE, each stamped with
``time.monotonic()`` (one clock for every process on the machine): ``started`` when a
call begins (with its ``tag`` argument and request id) and ``cancel`` when a
``notifications/cancelled`` arrives (seen by a middleware, as the server received it).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer

LOG: Any = None


def record(**fields: Any) -> None:
    LOG.write(json.dumps({**fields, "t": time.monotonic()}) + "\n")
    LOG.flush()


class StampCancels:
    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method == "notifications/cancelled":
            params = dict(ctx.params or {})
            record(event="cancel", requestId=params.get("requestId"), reason=params.get("reason"))
        return await call_next(ctx)


server = MCPServer("bench", middleware=[StampCancels()], log_level="WARNING")


async def work(seconds: float, tag: str, ctx: Context) -> str:
    record(event="started", tag=tag, requestId=ctx.request_id)
    await anyio.sleep(seconds)
    return "worked"


def main() -> None:
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--http", action="store_true")
    args = parser.parse_args()
    LOG = open(args.log, "a", encoding="utf-8")
    server.add_tool(work, name=f"{args.prefix}_work", description="Work for `seconds`.")
    if not args.http:
        server.run("stdio")
        return
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    app = server.streamable_http_app(host="127.0.0.1")
    print(f"URL http://127.0.0.1:{sock.getsockname()[1]}/mcp", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve, [sock])


if __name__ == "__main__":
    main()

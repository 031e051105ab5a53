"""A small MCP server with one slow tool, for trying Stop on a tool call.

``research`` takes a while (20 s by default), reports progress every second, and honors
cancellation: when the client sends ``notifications/cancelled`` (trio-agent does on
Stop), the SDK cancels the handler, which says so on stderr and stops working.

Serve the gateway with it, no API key needed (the simulated model calls the tool)::

    trio-agent serve --mcp research="python examples/research_mcp_server.py"

then, on the chat page, send::

    Research rivers for me.
    #sim tool=research args={"topic": "rivers"}

and press Stop while the tool runs. Over streamable HTTP instead of stdio:
``python examples/research_mcp_server.py --http 8765`` and
``--mcp research=http://127.0.0.1:8765/mcp``.
"""

from __future__ import annotations

import argparse
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("research")

STEPS = (
    "Reading the question",
    "Searching sources",
    "Reading sources",
    "Comparing findings",
    "Writing the summary",
)


@server.tool(description="Research a topic slowly, reporting progress; returns a summary.")
async def research(topic: str, ctx: Context, seconds: float = 20.0) -> str:
    """``seconds`` of work in one-second steps, with progress after each."""
    total = max(1, round(seconds))
    try:
        for done in range(total):
            stage = STEPS[done * len(STEPS) // total]
            await ctx.report_progress(done, total, f"{stage} ({done + 1}/{total})")
            await anyio.sleep(seconds / total)
    except anyio.get_cancelled_exc_class():
        print(f"research on {topic!r}: cancelled by the client, stopping", file=sys.stderr)
        raise
    return (
        f"Research on {topic}: three sources agree on the main points; "
        "one disagrees on the dates."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP")
    args = parser.parse_args()
    if args.http is None:
        server.run("stdio")
    else:
        anyio.run(lambda: server.run_streamable_http_async(host="127.0.0.1", port=args.http))


if __name__ == "__main__":
    main()

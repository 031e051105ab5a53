"""Embed the runtime in a Python service: a model, a store, a tool; start runs, stop them.

Runs against the embedded simulated provider (a real HTTP server on 127.0.0.1), so it
needs no API key:

    python examples/embed_in_service.py                 # OpenAI-compatible adapter
    python examples/embed_in_service.py --anthropic     # the Anthropic SDK adapter

It stops one run while the model streams text and one while a tool runs, and prints each
stop receipt and what the provider saw.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import trio

from adapters.anthropic import open_anthropic
from adapters.openai_compat import open_openai_compat
from adapters.sim import SimServer, serve_sim
from adapters.sqlite_store import SQLiteStore
from runtime import (
    RunCancelled,
    Runtime,
    TerminalEvent,
    TextDelta,
    Tool,
    ToolCallStarted,
    is_terminal,
)


async def lookup(arguments):
    """A slow tool: it would take 30 s, so stopping the run cancels it in flight."""
    await trio.sleep(30)
    return f"found {arguments.get('text')!r}"


def show(terminal: TerminalEvent, sim: SimServer) -> None:
    if not isinstance(terminal, RunCancelled):
        print(f"  the run ended before the stop: {terminal}")
        return
    print(f"  stopped: reason={terminal.reason} policy={terminal.policy}")
    kept = terminal.message.text if terminal.message else ""
    print(f"  partial reply kept: {kept!r}")
    for receipt in terminal.receipt:
        print(f"  tool {receipt.name} ({receipt.tool_call_id}): {receipt.status}")
    usage = terminal.usage
    estimate = " (estimated)" if usage.estimated else ""
    print(f"  usage so far: input={usage.input_tokens} output={usage.output_tokens}{estimate}")
    timings = terminal.timings
    print(
        f"  abort -> scope exited {timings.scope_exited_ms:.2f} ms, "
        f"committed {timings.committed_ms:.2f} ms"
    )
    last = sim.connections()[-1]
    print(f"  provider saw the connection closed by the {last.closed_by}")


async def main(use_anthropic: bool, db: Path) -> None:
    async with trio.open_nursery() as nursery:
        sim: SimServer = await nursery.start(serve_sim)
        if use_anthropic:
            opened = open_anthropic(model="sim", api_key="not-needed", base_url=sim.base_url)
        else:
            opened = open_openai_compat(model="sim", base_url=sim.base_url + "/v1")
        tools = [Tool("lookup", lookup, "Look something up (slowly).")]
        async with opened as model, SQLiteStore(db) as store:
            async with Runtime(model=model, store=store, tools=tools) as rt:
                with rt.subscribe("demo") as events:
                    print("1. Stop while the model streams text")
                    run = await rt.start_run("demo", "Tell me a story.\n#sim words=200 rate=40")
                    deltas = 0
                    async for event in events:
                        if event.run_id != run.run_id:
                            continue
                        deltas += isinstance(event, TextDelta)
                        if deltas == 10 or is_terminal(event):
                            rt.abort(run_id=run.run_id)
                            break
                    show(await run.wait(), sim)

                    print("2. Stop while a tool runs")
                    run = await rt.start_run("demo", "Look it up.\n#sim tool=lookup")
                    async for event in events:
                        if event.run_id != run.run_id:
                            continue
                        if isinstance(event, ToolCallStarted) or is_terminal(event):
                            rt.abort(run_id=run.run_id)
                            break
                    show(await run.wait(), sim)

                print("3. The history the next model request will see")
                for message in await store.history("demo"):
                    kinds = ", ".join(type(b).__name__ for b in message.content)
                    flag = " [stopped]" if message.meta.get("aborted") else ""
                    print(f"  {message.role:9} {kinds}{flag}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anthropic", action="store_true", help="use the Anthropic adapter")
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        db = args.db or Path(stack.enter_context(tempfile.TemporaryDirectory())) / "demo.db"
        trio.run(main, args.anthropic, db)

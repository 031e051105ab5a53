"""A bot whose model never stops calling tools, and the budgets that stop it anyway.

Runs against the embedded simulated provider, so it needs no API key:

    python examples/tool_loop_bot.py

The model asks for the `step` tool turn after turn (`#sim tool=step repeat=1000`). Two
runtimes show the two budgets: `max_turns` (model turns per run) and `max_tool_calls`
(tool calls per run). Either way the run finishes (`RunFinished`, not an error) with the
budget's name as its stop reason, and the history it leaves is valid input for the next
request: every tool call has its result (a call over the tool budget is answered "Not
run"), which `validate_history` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from adapters.openai_compat import open_openai_compat
from adapters.sim import serve_sim
from runtime import (
    Message,
    RunFinished,
    Runtime,
    TextBlock,
    Tool,
    ToolCallFinished,
    ToolResultBlock,
    ToolUseBlock,
    is_terminal,
    validate_history,
)

PROMPT = "Keep going.\n#sim tool=step repeat=1000"


async def step(arguments: Mapping[str, Any]) -> str:
    return f"did step {arguments.get('text', '')!r}; call me again"


TOOLS = [Tool("step", step, "Do one step of the job.")]


async def loop_until_budget(rt: Runtime, session: str) -> None:
    with rt.subscribe(session) as events:
        run = await rt.start_run(session, PROMPT)
        ran = 0
        async for event in events:
            if isinstance(event, ToolCallFinished):
                ran += 1
            if is_terminal(event):
                break
    terminal = await run.wait()
    assert isinstance(terminal, RunFinished), terminal
    print(f"  terminal event: {type(terminal).__name__}, stop_reason={terminal.stop_reason}")
    print(f"  tool calls that ran: {ran}")
    history = await rt.store.history(session)
    for message in history:
        print(f"  {message.role:9} {describe(message)}")
    validate_history(history)  # raises InvalidHistory if a call had no result
    calls = sum(len(m.tool_uses()) for m in history)
    results = sum(isinstance(b, ToolResultBlock) for m in history for b in m.content)
    print(f"  history valid: {calls} tool calls, {results} results")


def describe(message: Message) -> str:
    parts = []
    for block in message.content:
        if isinstance(block, TextBlock):
            parts.append(repr(block.text))
        elif isinstance(block, ToolUseBlock):
            parts.append(f"calls {block.name} ({block.id})")
        elif isinstance(block, ToolResultBlock):
            error = " error" if block.is_error else ""
            parts.append(f"result for {block.tool_call_id}{error}: {block.content!r}")
    return ", ".join(parts)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(serve_sim)
        async with open_openai_compat(model="sim", base_url=sim.base_url + "/v1") as model:
            print("1. max_turns=4: the fourth model turn is the last")
            async with Runtime(model=model, tools=TOOLS, max_turns=4) as rt:
                await loop_until_budget(rt, "turns")
            print("2. max_tool_calls=3: the fourth call is answered, not run")
            async with Runtime(model=model, tools=TOOLS, max_tool_calls=3) as rt:
                await loop_until_budget(rt, "tools")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)

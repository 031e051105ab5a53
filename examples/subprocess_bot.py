"""A bot whose tool runs a real subprocess; stopping the run kills the subprocess.

Runs against the embedded simulated provider, so it needs no API key:

    python examples/subprocess_bot.py

The model calls the `shell` tool, which runs `sleep 30` under `trio.run_process`. While
it sleeps, the run is aborted: Trio cancels the tool, `run_process` kills the process and
reaps it before the tool returns, and only then does the run commit its stop. The bot
prints the stop receipt (the tool `cancelled`: it was running, its side effects unknown)
and checks that the pid no longer exists.

How the process is killed: `trio.run_process`'s default sends SIGTERM and, if the process
ignores it, waits 5 s before SIGKILL. The stop commit waits for that, so we pass our own
`deliver_cancel`: SIGTERM (a chance to clean up), SIGKILL after a 1 s grace. The command
runs in its own process group and both signals go to the whole group, so the children
of a shell pipeline get them too (a plain SIGTERM to `sh` leaves them running).
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Mapping
from typing import Any

import trio

from adapters.openai_compat import open_openai_compat
from adapters.sim import serve_sim
from runtime import RunCancelled, Runtime, Tool, ToolResultBlock

COMMAND = ["sleep", "30"]
GRACE = 1.0  # seconds between SIGTERM and SIGKILL


async def kill_group(process: trio.Process) -> None:
    """``deliver_cancel`` for run_process: SIGTERM the group, SIGKILL it after GRACE."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        await trio.sleep(GRACE)  # run_process cancels this once the process has exited
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


class Shell:
    """The tool: runs COMMAND and says which pid it started (``spawned`` fires then)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.spawned = trio.Event()

    async def __call__(self, arguments: Mapping[str, Any]) -> str:
        run = functools.partial(
            trio.run_process,
            COMMAND,
            check=False,
            start_new_session=True,  # its own process group, for kill_group
            deliver_cancel=kill_group,
        )
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(run)
            self.pid = process.pid
            self.spawned.set()
            await process.wait()
        return f"exit status {process.returncode}"


def exists(pid: int) -> bool:
    """Whether ``pid`` names a process (a zombie counts: it has not been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def main() -> None:
    shell = Shell()
    tools = [Tool("shell", shell, f"Run `{' '.join(COMMAND)}`.")]
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(serve_sim)
        async with open_openai_compat(model="sim", base_url=sim.base_url + "/v1") as model:
            async with Runtime(model=model, tools=tools) as rt:
                run = await rt.start_run("ops", "Run the job.\n#sim tool=shell")
                with trio.fail_after(10):
                    await shell.spawned.wait()
                assert shell.pid is not None
                print(f"tool started: {' '.join(COMMAND)} as pid {shell.pid}")
                print(f"pid {shell.pid} exists before the stop: {exists(shell.pid)}")
                rt.abort(run_id=run.run_id)
                terminal = await run.wait()
                assert isinstance(terminal, RunCancelled), terminal
                print(f"stopped: reason={terminal.reason}")
                for receipt in terminal.receipt:
                    print(
                        f"receipt: tool {receipt.name} ({receipt.tool_call_id}): {receipt.status}"
                    )
                print(f"abort -> committed in {terminal.timings.committed_ms:.0f} ms")
                print(f"pid {shell.pid} exists after the stop: {exists(shell.pid)}")
                history = await rt.store.history("ops")
                answer = history[-1].content[0]
                assert isinstance(answer, ToolResultBlock), history
                print(f"the tool result the model will see: {answer.content!r}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)

"""Child processes the benchmarks run (the simulated provider, the gateway)."""

from __future__ import annotations

import trio


async def first_line(process: trio.Process, what: str) -> str:
    """The child's first line of output: where our servers say they listen."""
    assert process.stdout is not None
    buffered = b""
    while b"\n" not in buffered:
        chunk = await process.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"the {what} exited before it was ready")
        buffered += chunk
    return buffered.decode().split("\n", 1)[0]

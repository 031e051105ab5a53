"""``trio-agent serve`` processes for the tests that run several of them: started with
``--port 0``, their banner read for the port, SIGKILLed on exit if still up (a test that
wants a graceful stop sends SIGTERM and waits first)."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

CLI = [sys.executable, "-m", "adapters.cli"]


@attrs.frozen
class Gateway:
    process: trio.Process
    banner: str
    port: int


@asynccontextmanager
async def gateway_process(env: dict[str, str], *args: str) -> AsyncIterator[Gateway]:
    """``trio-agent serve --port 0 ARGS...``; its stderr (the log) goes to the test's."""
    command = [*CLI, "serve", "--port", "0", *args]
    async with trio.open_nursery() as nursery:
        start = functools.partial(
            trio.run_process, command, stdout=subprocess.PIPE, check=False, env=env
        )
        process: trio.Process = await nursery.start(start)
        try:
            out = b""
            while b"\n" not in out:
                chunk = await process.stdout.receive_some()  # type: ignore[union-attr]
                assert chunk, f"trio-agent serve exited before its banner: {out!r}"
                out += chunk
            banner = out.decode().splitlines()[0]
            url = next(w for w in banner.split() if w.startswith("ws://"))
            yield Gateway(process, banner, int(url.rsplit(":", 1)[1]))
        finally:
            if process.returncode is None:
                process.kill()

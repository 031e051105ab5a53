"""The ``trio-agent`` command."""

from __future__ import annotations

import functools
import signal
import sys

import httpx
import trio


async def test_trio_agent_sim_serves_until_ctrl_c() -> None:
    command = [sys.executable, "-m", "adapters.cli", "sim", "--port", "0"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            start = functools.partial(trio.run_process, command, stdout=-1, check=False)
            process = await nursery.start(start)
            line = b""
            while b"\n" not in line:
                chunk = await process.stdout.receive_some()
                assert chunk, "trio-agent sim exited before printing its address"
                line += chunk
            url = next(w for w in line.decode().split() if w.startswith("http://"))
            async with httpx.AsyncClient() as client:
                response = await client.get(url + "/v1/_sim/connections")
            assert response.json() == []
            process.send_signal(signal.SIGINT)
        assert process.returncode == 0

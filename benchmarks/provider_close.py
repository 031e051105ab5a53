"""Provider close latency: from ``abort`` to the provider seeing the connection closed.

The simulated provider runs in its own process (``trio-agent sim``) and stamps each
close with ``time.monotonic()``, which is one clock for every process on the machine.
Each trial starts a run on ``#sim think=60`` (the model silent after the headers, the
hard case for a cooperative stop), waits until the response headers were sent, aborts,
and reads the close time the provider recorded.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import trio

from adapters.anthropic import open_anthropic
from adapters.gemini import open_gemini
from adapters.openai_compat import open_openai_compat
from adapters.openai_responses import open_openai_responses
from runtime import Model, Runtime

from ._process import first_line
from ._report import Section, Summary, ms

OpenModel = Callable[[str], AbstractAsyncContextManager[Model]]

ADAPTERS: dict[str, tuple[str, OpenModel]] = {
    "anthropic (SDK)": (
        "/v1/messages",
        lambda url: open_anthropic(model="sim", api_key="bench", base_url=url),
    ),
    "openai-compatible (httpx)": (
        "/v1/chat/completions",
        lambda url: open_openai_compat(model="sim", base_url=url + "/v1"),
    ),
    "openai-responses (httpx)": (
        "/v1/responses",
        lambda url: open_openai_responses(model="sim", base_url=url + "/v1", api_key="bench"),
    ),
    "gemini (httpx)": (
        "/v1beta/models/sim:streamGenerateContent",
        lambda url: open_gemini(model="sim", api_key="bench", base_url=url),
    ),
}


@contextlib.asynccontextmanager
async def sim_process() -> AsyncIterator[str]:
    """Run the simulated provider in a child process; yield its base URL."""
    command = [sys.executable, "-m", "adapters.sim", "--port", "0"]
    async with trio.open_nursery() as nursery:
        start = functools.partial(trio.run_process, command, stdout=-1, check=False)
        process: trio.Process = await nursery.start(start)
        line = await first_line(process, "simulated provider")
        url = next(w for w in line.split() if w.startswith("http://"))
        try:
            yield url
        finally:
            process.terminate()


async def _records(probe: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    response = await probe.get(url + "/v1/_sim/connections")
    return list(response.json())


async def _poll(probe: httpx.AsyncClient, url: str, ready: Callable[[dict[str, Any]], bool]):
    while True:
        for record in reversed(await _records(probe, url)):
            if ready(record):
                return record
        await trio.sleep(0.002)


def _closed(record_id: int) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["id"] == record_id and r["closed_at"] is not None


async def measure(name: str, trials: int, url: str) -> Summary:
    path, open_model = ADAPTERS[name]
    latencies: list[float] = []
    async with httpx.AsyncClient() as probe, open_model(url) as model:
        async with Runtime(model=model) as rt:
            for trial in range(trials):
                await probe.delete(url + "/v1/_sim/connections")
                run = await rt.start_run(f"close-{trial}", "#sim think=60")
                record = await _poll(probe, url, lambda r: r["path"] == path and r["status"] == 200)
                await trio.sleep(0.01)  # the headers are on the client's side by now
                asked = time.monotonic()
                rt.abort(run_id=run.run_id)
                await run.wait()
                closed = await _poll(probe, url, _closed(record["id"]))
                if closed["closed_by"] != "client":
                    raise RuntimeError(f"{name}: the provider closed the stream, not the client")
                latencies.append((closed["closed_at"] - asked) * 1000)
    return Summary.of(latencies)


async def run(quick: bool) -> Section:
    trials = 10 if quick else 200
    rows = []
    async with sim_process() as url:
        for name in ADAPTERS:
            summary = await measure(name, trials, url)
            rows.append(
                (name, ms(summary.median), ms(summary.p99), ms(summary.max), str(summary.trials))
            )
    return Section(
        "Provider close latency (abort → provider sees the connection closed)",
        ("adapter", "median ms", "p99 ms", "max ms", "trials"),
        tuple(rows),
        "The provider is silent (`#sim think=60`) and runs in its own process; it stamps "
        "the close itself. Target: p99 under 10 ms.",
    )

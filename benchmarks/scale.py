"""Scale: what an idle connection and a live run cost the gateway, and how long stopping a
session of many runs takes.

The sim and the gateway run in their own processes (``_gateway.gateway_process``); this
one opens the WebSocket connections and reads the gateway's resident memory from /proc.
Memory: the RSS growth from opening N idle connections, then from starting N silent runs
(``#sim think=60``, each in its own session, each holding its provider request open),
divided by N. Abort: one session holds K runs (one running, the rest queued behind it, as
a session's runs are); one ``chat.abort`` for the session, timed to the last ``aborted``
event at the client.
"""

from __future__ import annotations

import contextlib
import time
from typing import Final

import trio

from ._gateway import Client, gateway_process, open_client
from ._report import Plot, Section, Series, Summary, ms
from .provider_close import sim_process

SILENT: Final = "Wait for it.\n#sim think=60"
SETTLE: Final = 0.5  # seconds for the gateway's heap to settle before reading its RSS
BOUND: Final = 300.0  # seconds for one measurement; longer is a hang


async def memory_per_connection(connections: int) -> float:
    """Bytes of gateway RSS per idle WebSocket connection."""
    async with sim_process() as url, gateway_process(url) as gateway:
        async with contextlib.AsyncExitStack() as stack:
            await trio.sleep(SETTLE)
            base = gateway.rss_bytes()
            for _ in range(connections):
                await stack.enter_async_context(open_client(gateway.port))
            await trio.sleep(SETTLE)
            return (gateway.rss_bytes() - base) / connections


async def memory_per_run(runs: int) -> float:
    """Bytes of gateway RSS per live run (silent, its provider request open). A gateway
    of its own: every connection gets every run's events, so no idle connections here."""
    async with sim_process() as url, gateway_process(url) as gateway:
        async with open_client(gateway.port) as client:
            await trio.sleep(SETTLE)
            base = gateway.rss_bytes()
            names = [f"live-{index}" for index in range(runs)]
            client.watched.update(names)
            for name in names:
                params = {"sessionKey": name, "message": SILENT, "idempotencyKey": name}
                await client.call("chat.send", params)
            for name in names:
                await client.wait((name, "start"))
            await trio.sleep(SETTLE)
            return (gateway.rss_bytes() - base) / runs


async def abort_session(client: Client, session: str, runs: int) -> float:
    """Milliseconds from ``chat.abort`` for a session of ``runs`` runs to the last ``aborted``."""
    names = [f"{session}-{index}" for index in range(runs)]
    client.watched.update(names)
    for name in names:
        await client.call(
            "chat.send", {"sessionKey": session, "message": SILENT, "idempotencyKey": name}
        )
    await client.wait((names[0], "start"))
    await trio.sleep(0.05)  # the running one's request is out and silent
    asked = time.monotonic()
    answer, _ = await client.call("chat.abort", {"sessionKey": session})
    if len(answer["runIds"]) != runs:
        raise RuntimeError(f"chat.abort stopped {len(answer['runIds'])} of {runs} runs")
    last = max([await client.wait((name, "aborted")) for name in names])
    client.watched.difference_update(names)
    return (last - asked) * 1000


async def run(quick: bool) -> Section:
    runs = 20 if quick else 1000
    plan = {1: 3, 10: 3} if quick else {1: 50, 10: 50, 100: 20, 1000: 5}
    with trio.fail_after(BOUND):
        per_connection = await memory_per_connection(runs)
        per_run = await memory_per_run(runs)
        aborts = {}
        async with sim_process() as url, gateway_process(url) as gateway:
            async with open_client(gateway.port) as client:
                for size, trials in plan.items():
                    aborts[size] = Summary.of(
                        [await abort_session(client, f"s{size}-{t}", size) for t in range(trials)]
                    )
    rows = [
        (
            f"gateway memory per idle connection, at {runs}",
            f"{per_connection / 1024:.1f} KiB",
            "",
            "",
            "1",
        ),
        (f"gateway memory per live run, at {runs}", f"{per_run / 1024:.1f} KiB", "", "", "1"),
    ]
    rows += [
        (f"abort a session of {size} runs, ms", ms(s.median), ms(s.p99), ms(s.max), str(s.trials))
        for size, s in aborts.items()
    ]
    notes = (
        "The gateway (Runtime on the OpenAI-compatible adapter, MemoryStore) and the "
        "simulated provider run in their own processes. Memory is the growth of the "
        f"gateway's resident set (/proc) after opening {runs} idle WebSocket connections, "
        f"and, in a second gateway with one connection, after starting {runs} silent runs "
        "(`#sim think=60`, one per session, each with its provider request open), divided "
        "by the count: allocator slack included, one sample each. The abort is one "
        "`chat.abort` naming a session that holds the runs (one running, the rest queued "
        "behind it), timed from the request to the last `aborted` event at the client."
    )
    plot = Plot(
        "runs in the session",
        "ms to the last aborted event",
        (
            Series("median", tuple(aborts), tuple(s.median for s in aborts.values())),
            Series("max", tuple(aborts), tuple(s.max for s in aborts.values())),
        ),
        log_x=True,
        log_y=True,
    )
    return Section(
        "Scale: memory per connection and per run; aborting a session of many runs",
        ("measure", "median (or value)", "p99", "max", "trials"),
        tuple(rows),
        notes,
        plot,
    )

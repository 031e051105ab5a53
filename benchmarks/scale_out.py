"""Scale-out: a Stop across processes, the stop commit on PostgreSQL, and SQLite's store
calls at 200 runs a second (checkpoints in one statement per tick).

Two ``trio-agent serve`` processes (each with its in-process simulated provider) share a
private PostgreSQL and a private Redis (unix sockets, started for the run, as in the
tests). A run is started on A; a client of B sends ``chat.abort`` and the time to the
``aborted`` chat event *at B's client* (relayed from A through Redis) is measured, next
to the same stop sent and received on A alone. Then a Runtime in this process commits
stopped runs' partials to PostgreSQL, stamped by the runtime itself (``RunCancelled``
timings), as the stop_commit benchmark does on SQLite.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from typing import Any, Final

import attrs
import trio

from adapters.postgres_store import PostgresStore
from adapters.sqlite_store import SQLiteStore
from runtime import (
    Runtime,
    ScriptedModel,
    text_turn,
)

from ._gateway import Client, gateway_process, open_client
from ._report import Section, Summary, ms
from .stop_commit import stop_timings

SLOW: Final = "Tell me.\n#sim words=5000 rate=200"
WORDS: Final = (100, 1000)


def serve_command(db: str, bus: str, *more: str) -> list[str]:
    """``trio-agent serve`` on any free port, sharing ``db`` and ``bus``; ``more`` options."""
    return [
        sys.executable, "-m", "adapters.cli", "serve", "--port", "0", "--db", db, "--bus", bus,
        "--log-level", "WARNING", *more,
    ]  # fmt: skip


async def stop_latency(a: Client, b: Client, stopper: Client, trials: int) -> Summary:
    """ms from chat.abort sent by ``stopper`` to the aborted event at ``stopper``."""
    samples = []
    for trial in range(trials):
        run_id, session = f"{id(stopper)}-{trial}", f"bench-{id(stopper)}-{trial}"
        for client in (a, b):
            client.watched.add(run_id)
        params = {"sessionKey": session, "message": SLOW, "idempotencyKey": run_id}
        await a.call("chat.send", params)
        await stopper.wait((run_id, "start"))
        await trio.sleep(0.05)  # streaming
        sent = time.monotonic()
        answer, _ = await stopper.call("chat.abort", {"sessionKey": session, "runId": run_id})
        if not answer["aborted"]:
            raise RuntimeError(f"run {run_id} was not aborted: {answer}")
        samples.append((await stopper.wait((run_id, "aborted")) - sent) * 1000)
        other = b if stopper is a else a
        await other.wait((run_id, "aborted"))
    return Summary.of(samples)


async def commit_latency(url: str, words: int, trials: int) -> Summary:
    async with PostgresStore(url) as store:
        commits, _ = await stop_timings(store, words, trials)
    return commits


@attrs.define(eq=False)
class _Timed:
    """A store whose every call is timed, waiting for the store's turn included."""

    inner: Any
    samples: dict[str, list[float]] = attrs.field(factory=dict)

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.inner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                elapsed = (time.perf_counter() - started) * 1000
                self.samples.setdefault(name, []).append(elapsed)

        return timed


async def sqlite_at_rate(rate: int, seconds: float) -> list[tuple[str, Summary]]:
    """SQLite store calls while ``rate`` short runs (20 words, 0.2 s) start per second."""
    with tempfile.TemporaryDirectory() as folder:
        async with SQLiteStore(pathlib.Path(folder) / "bench.db") as inner:
            store = _Timed(inner)
            model = ScriptedModel.from_turns(text_turn(*["w "] * 20, pause=0.01))
            async with Runtime(model=model, store=store) as runtime:  # type: ignore[arg-type]
                runs = []
                start = trio.current_time()
                for index in range(int(rate * seconds)):
                    await trio.sleep_until(start + index / rate)
                    runs.append(await runtime.start_run(f"rate-{index}", "Go."))
                for run in runs:
                    await run.wait()
    every = [x for xs in store.samples.values() for x in xs]
    return [
        (f"SQLite at {rate} runs/s: {name}", Summary.of(store.samples[name]))
        for name in ("begin_run", "checkpoint_runs", "commit_run")
    ] + [(f"SQLite at {rate} runs/s: every store call", Summary.of(every))]


async def measure(fsync: bool, trials: int) -> list[tuple[str, Summary]]:
    from tests.services import postgres_server, redis_server  # the tests' private servers

    with postgres_server(fsync=fsync) as postgres, redis_server() as redis:
        db = postgres.create_database()
        command = serve_command(db, redis.url)
        async with AsyncExitStack() as stack:
            ports = [
                (await stack.enter_async_context(gateway_process("", command=command))).port
                for _ in range(2)
            ]
            a = await stack.enter_async_context(open_client(ports[0]))
            b = await stack.enter_async_context(open_client(ports[1]))
            same = await stop_latency(a, b, a, trials)
            cross = await stop_latency(a, b, b, trials)
        commits = [
            (f"PostgreSQL stop commit, {words} words", await commit_latency(db, words, trials))
            for words in WORDS
        ]
    return [("stop, client and run on A", same), ("stop, client on B, run on A", cross), *commits]


async def run(quick: bool) -> Section:
    trials = 10 if quick else 200
    rows = [
        (f"{what} (fsync {'on' if fsync else 'off'})", str(s.trials), ms(s.median), ms(s.p99),
         ms(s.max))
        for fsync in (True, False)
        for what, s in await measure(fsync, trials)
    ]  # fmt: skip
    rows += [
        (what, str(s.trials), ms(s.median), ms(s.p99), ms(s.max))
        for what, s in await sqlite_at_rate(200, 1 if quick else 10)
    ]
    notes = (
        "Two trio-agent serve processes on one PostgreSQL and one Redis (unix sockets, "
        "private servers started for the run; PostgreSQL's data on this machine's disk, "
        "with fsync on, then off to show what is the disk's), each with its simulated "
        "provider in-process. A stop: chat.abort sent by a client to the time that client "
        "receives the run's aborted chat event, which follows the stop commit to "
        "PostgreSQL; across processes the abort travels B → Redis → A and the event A → "
        "Redis → B. The commit rows: a Runtime in the benchmark's process stops runs that "
        "streamed N words and commits the partial to PostgreSQL in one transaction (the "
        "runtime's own stamps, scope exit to commit end). The SQLite rows: a Runtime on a "
        "SQLite file starts 200 short runs a second (20 words over 0.2 s each) for 10 s; "
        "each store call is timed from its call to its return, so the wait for the store's "
        "connection (its lock) is inside; checkpoints of all running runs go in one "
        "statement per tick."
    )
    return Section(
        "Scale-out: a stop across processes, the stop commit on PostgreSQL, SQLite at 200 "
        "runs/s",
        ("what", "trials", "median ms", "p99 ms", "max ms"),
        tuple(rows),
        notes,
    )

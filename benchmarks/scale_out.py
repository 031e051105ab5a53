"""Scale-out: a Stop across processes, and the stop commit on PostgreSQL.

Two ``trio-agent serve`` processes (each with its in-process simulated provider) share a
private PostgreSQL and a private Redis (unix sockets, started for the run, as in the
tests). A run is started on A; a client of B sends ``chat.abort`` and the time to the
``aborted`` chat event *at B's client* (relayed from A through Redis) is measured, next
to the same stop sent and received on A alone. Then a Runtime in this process commits
stopped runs' partials to PostgreSQL, stamped by the runtime itself (``RunCancelled``
timings), as the stop_commit benchmark does on SQLite.
"""

from __future__ import annotations

import sys
import time
from contextlib import AsyncExitStack
from typing import Final

import trio

from adapters.postgres_store import PostgresStore
from runtime import Pause, RunCancelled, Runtime, ScriptedModel, TextChunk, TextDelta

from ._gateway import Client, gateway_process, open_client
from ._report import Section, Summary, ms

SLOW: Final = "Tell me.\n#sim words=5000 rate=200"
WORDS: Final = (100, 1000)


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
    turn: list[TextChunk | Pause] = [TextChunk(f"w{index} ") for index in range(words)]
    turn.append(Pause(3600))
    commits = []
    async with PostgresStore(url) as store:
        async with Runtime(model=ScriptedModel.from_turns(turn), store=store) as runtime:
            for trial in range(trials):
                session = f"commit-{words}-{trial}"
                with trio.fail_after(30), runtime.subscribe(session) as events:
                    run = await runtime.start_run(session, "Go.")
                    streamed = 0
                    async for event in events:
                        streamed += isinstance(event, TextDelta)
                        if streamed >= words:
                            break
                    await trio.sleep(0.02)
                    runtime.abort(run_id=run.run_id)
                    event = await run.wait()
                if not isinstance(event, RunCancelled) or event.timings is None:
                    raise RuntimeError(f"the run ended {type(event).__name__}, not cancelled")
                commits.append(event.timings.committed_ms - event.timings.scope_exited_ms)
    return Summary.of(commits)


async def measure(fsync: bool, trials: int) -> list[tuple[str, Summary]]:
    from tests.services import postgres_server, redis_server  # the tests' private servers

    with postgres_server(fsync=fsync) as postgres, redis_server() as redis:
        db = postgres.create_database()
        command = [
            sys.executable, "-m", "adapters.cli", "serve", "--port", "0", "--db", db,
            "--bus", redis.url, "--log-level", "WARNING",
        ]  # fmt: skip
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
    notes = (
        "Two trio-agent serve processes on one PostgreSQL and one Redis (unix sockets, "
        "private servers started for the run; PostgreSQL's data on this machine's disk, "
        "with fsync on, then off to show what is the disk's), each with its simulated "
        "provider in-process. A stop: chat.abort sent by a client to the time that client "
        "receives the run's aborted chat event, which follows the stop commit to "
        "PostgreSQL; across processes the abort travels B → Redis → A and the event A → "
        "Redis → B. The commit rows: a Runtime in the benchmark's process stops runs that "
        "streamed N words and commits the partial to PostgreSQL in one transaction (the "
        "runtime's own stamps, scope exit to commit end)."
    )
    return Section(
        "Scale-out: a stop across processes, and the stop commit on PostgreSQL",
        ("what", "trials", "median ms", "p99 ms", "max ms"),
        tuple(rows),
        notes,
    )

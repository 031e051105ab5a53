"""Stop commit: how long the shielded commit of a stopped run takes, on SQLite.

The runtime stamps each stop itself (``RunCancelled.timings``: the abort to the scope's
exit, and to the end of the commit), so the commit's own time is the difference; no
second clock is involved. The model is scripted (``ScriptedModel``): it streams a partial
of N words, then falls silent, and the run is aborted in the silence. The store is a
SQLite file (WAL, one kept connection, writes in a thread), with MemoryStore beside it.
"""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
from collections.abc import AsyncIterator
from typing import Final

import trio

from adapters.sqlite_store import SQLiteStore
from runtime import (
    MemoryStore,
    Pause,
    RunCancelled,
    Runtime,
    ScriptedModel,
    Store,
    TextChunk,
    TextDelta,
)

from ._report import Plot, Section, Series, Summary, ms

WORDS: Final = (0, 100, 1000)  # words streamed before the stop


@contextlib.asynccontextmanager
async def open_store(kind: str) -> AsyncIterator[Store]:
    if kind == "MemoryStore":
        yield MemoryStore()
        return
    with tempfile.TemporaryDirectory() as folder:
        async with SQLiteStore(pathlib.Path(folder) / "bench.db") as store:
            yield store


async def measure(kind: str, words: int, trials: int) -> tuple[Summary, Summary]:
    """(commit ms, abort-to-committed ms) over ``trials`` stops of a ``words``-word partial."""
    async with open_store(kind) as store:
        return await stop_timings(store, words, trials)


async def stop_timings(store: Store, words: int, trials: int) -> tuple[Summary, Summary]:
    """``measure`` on a store already open (the scale_out benchmark's PostgreSQL too)."""
    turn: list[TextChunk | Pause] = [TextChunk(f"w{index} ") for index in range(words)]
    turn.append(Pause(3600))
    commits, totals = [], []
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
                await trio.sleep(0.02)  # in the pause, the prompt stored
                runtime.abort(run_id=run.run_id)
                event = await run.wait()
            if not isinstance(event, RunCancelled):
                raise RuntimeError(f"the run ended {type(event).__name__}, not cancelled")
            commits.append(event.timings.committed_ms - event.timings.scope_exited_ms)
            totals.append(event.timings.committed_ms)
    return Summary.of(commits), Summary.of(totals)


async def run(quick: bool) -> Section:
    trials = 10 if quick else 300
    results = {
        (kind, words): await measure(kind, words, trials)
        for kind in ("SQLite file", "MemoryStore")
        for words in WORDS
    }
    rows = tuple(
        (
            kind,
            str(words),
            str(commit.trials),
            ms(commit.median),
            ms(commit.p99),
            ms(commit.max),
            ms(total.median),
            ms(total.p99),
        )
        for (kind, words), (commit, total) in results.items()
    )
    notes = (
        "A Runtime in this process on a scripted model that streams N words and falls "
        "silent; each run is aborted in the silence. The commit is the shielded write of "
        "the partial reply, the run record and the history repair, in one transaction: the "
        "runtime's own stamps, from the run's scope exit to the commit's end. The last two "
        "columns run from the abort request to the commit's end."
    )
    plot = Plot(
        "words streamed before the stop",
        "commit ms",
        tuple(
            Series(
                f"{kind} {stat}",
                tuple(str(w) for w in WORDS),
                tuple(getattr(results[kind, w][0], stat) for w in WORDS),
            )
            for kind in ("SQLite file", "MemoryStore")
            for stat in ("median", "p99")
        ),
        kind="bar",
    )
    return Section(
        "Stop commit (the shielded write of a stopped run)",
        (
            "store",
            "words streamed",
            "trials",
            "commit median ms",
            "commit p99 ms",
            "commit max ms",
            "abort → committed median ms",
            "abort → committed p99 ms",
        ),
        rows,
        notes,
        plot,
    )

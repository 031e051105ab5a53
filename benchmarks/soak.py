"""Soak: minutes of mixed traffic, watching the serving process for growth. Flat is the goal.

``python -m benchmarks soak``, or alone ``python -m benchmarks.soak [--minutes M] [--runs
N]``. The simulated provider runs in one child process; the gateway in another (``python
-m benchmarks.soak --serve``: Runtime on the OpenAI-compatible adapter, a SQLite file
store, an async and a threaded tool). This process keeps about N runs live over several
WebSocket connections: mixed ``#sim`` scripts (text at various rates, silent thinking,
tool calls, provider errors), aborts at random instants (by run, by session, ``/stop``,
an interrupting send, a run timeout), sends right behind aborts, and sender connections
that leave and come back, some with ``abort-on-disconnect``. Sessions are replaced every
few runs, as a bot's would be.

Every sample interval it reads the gateway's RSS and open fds from /proc, its live and
queued runs and connections from ``runtime.stats``, and the SQLite file's size. One
observer connection sees every run's events and counts each run's terminal chat events:
a run with none or two, or a request left unanswered, is a violation seen from outside.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import attrs
import trio

from ._gateway import (
    CONNECT,
    Client,
    GatewayProcess,
    _until_told_to_stop,
    gateway_process,
    open_client,
)
from ._report import PLOTS, Plot, Section, Series, draw
from .provider_close import sim_process

# (weight, #sim line). Runs spend much of their life silent, in a tool or failing, so 200
# live runs stream a few hundred deltas per second.
SCRIPTS: Final = (
    (3.0, "#sim words=30 rate=5"),
    (2.0, "#sim words=16 rate=2"),
    (1.0, "#sim words=60 rate=20"),
    (1.0, "#sim words=20 rate=5 pause_at=5:4"),
    (3.0, "#sim think=6 words=10 rate=5"),
    (2.0, "#sim tool=lookup words=10 rate=5"),
    (1.0, "#sim tool=compute words=10 rate=5"),
    (0.5, "#sim fail=500"),
    (0.5, "#sim fail=error_event words=20 rate=5"),
    (0.3, "#sim fail=reset words=20 rate=5"),
    (0.3, "#sim fail=429 retry_after=0.5"),
)
ABORT: Final = 0.35  # of runs are stopped at a random instant within ABORT_WITHIN
ABORT_WITHIN: Final = 4.0  # seconds after chat.send's answer
INTERRUPT: Final = 0.05  # of runs are stopped by the next send (queueMode "interrupt")
SEND_BEHIND: Final = 0.5  # of stopped runs are followed at once by a send to their session
TIMEOUT: Final = 0.05  # of runs carry a timeoutMs of 0.5 to 3 s
SESSION_RUNS: Final = 6  # runs per session before the slot moves to a new one
ANSWER_BOUND: Final = 30.0  # seconds; a request unanswered by then is a violation
RUN_BOUND: Final = 120.0  # seconds a slot waits for its run's end (the longest is ~10)
DRAIN_BOUND: Final = 60.0  # seconds for the last runs to end once sending stops
TERMINAL: Final = ("final", "aborted", "error")


@attrs.frozen
class Plan:
    seconds: float
    runs: int  # slots: each keeps one run live (two, briefly, after a stop)
    connections: int  # sender connections (plus one observer)
    interval: float  # seconds between samples
    lifetime: tuple[float, float]  # a sender connection's life before it leaves, seconds

    @property
    def warmup(self) -> float:
        """Samples before this are left out of the slopes: caches and pools fill first."""
        return self.seconds / 5


FULL: Final = Plan(600.0, 200, 8, 10.0, (30.0, 120.0))
QUICK: Final = Plan(20.0, 40, 4, 1.0, (4.0, 10.0))


# -- the gateway's process ------------------------------------------------------------


async def _serve(sim_url: str, db: pathlib.Path) -> None:
    from adapters.gateway import Gateway
    from adapters.openai_compat import open_openai_compat
    from adapters.sqlite_store import SQLiteStore
    from runtime import Runtime, Tool

    async def lookup(arguments: Mapping[str, Any]) -> str:
        await trio.sleep(random.uniform(0.2, 2.0))
        return f"found {len(str(arguments.get('text', '')))} characters"

    def compute(arguments: Mapping[str, Any]) -> str:
        time.sleep(random.uniform(0.05, 0.5))
        return "computed"

    tools = [Tool("lookup", lookup, "Look up (async)."), Tool.from_sync("compute", compute)]
    async with open_openai_compat(model="sim", base_url=sim_url + "/v1", api_key="") as model:
        async with SQLiteStore(db) as store, Runtime(model=model, store=store, tools=tools) as rt:
            async with trio.open_nursery() as nursery:
                gateway = Gateway(rt)
                port = await nursery.start(gateway.serve, "127.0.0.1", 0)
                print(f"gateway on ws://127.0.0.1:{port}", flush=True)
                await _until_told_to_stop()
                gateway.shutdown()


def serving_process(sim_url: str, db: pathlib.Path) -> AbstractAsyncContextManager[GatewayProcess]:
    """The gateway serving ``_serve``: the soak needs the SQLite store and the tools."""
    command = [sys.executable, "-m", "benchmarks.soak", "--serve", "--sim-url", sim_url]
    return gateway_process(sim_url, command=[*command, "--db", str(db)])


# -- what the client side sees --------------------------------------------------------


@attrs.define(eq=False)
class Track:
    """One run, from before its chat.send to its terminal chat events."""

    started: bool = False  # chat.send answered "started"
    terminals: int = 0
    ended: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class Ledger:
    """Every run the senders started, and what went wrong where a client can see it."""

    runs: dict[str, Track] = attrs.Factory(dict)
    ends: collections.Counter[str] = attrs.Factory(collections.Counter)  # by chat state
    violations: collections.Counter[str] = attrs.Factory(collections.Counter)
    examples: list[str] = attrs.Factory(list)  # the first few, for whoever investigates
    reconnects: int = 0
    _ids: itertools.count[int] = attrs.Factory(itertools.count)

    def new_key(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def new_run(self) -> str:
        run_id = self.new_key("run")
        self.runs[run_id] = Track()
        return run_id

    def ended(self, run_id: str, state: str) -> None:
        track = self.runs.setdefault(run_id, Track())
        track.terminals += 1
        if track.terminals == 1:
            self.ends[state] += 1
            track.ended.set()
        else:
            self.violate("two terminal events", f"{run_id}: {state} after an earlier one")

    def violate(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")

    def started(self) -> int:
        return sum(track.started for track in self.runs.values())

    async def request(
        self, client: Client, method: str, params: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The answer's payload, or None after counting a violation. A sender's leaving
        does not cut a request short: a lost answer is then ours, not the gateway's."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + ANSWER_BOUND):
            try:
                payload, _ = await client.call(method, params)
            except RuntimeError as error:  # an error answer to a well-formed request
                self.violate("error answers", str(error))
                return None
            return payload
        self.violate("unanswered requests", f"{method} {params}")
        return None


@attrs.define(eq=False)
class Observer(Client):
    """The connection that reads every run's chat events and counts the terminal ones."""

    ledger: Ledger | None = None

    def _dispatch(self, frame: dict[str, Any], now: float) -> None:
        if frame["type"] == "event" and frame["event"] == "chat":
            payload = frame["payload"]
            if payload["state"] in TERMINAL:
                assert self.ledger is not None
                self.ledger.ended(payload["runId"], payload["state"])
            return
        super()._dispatch(frame, now)


def sender_params(index: int) -> dict[str, Any]:
    """Sender 0 reads all events (with tool events), like a UI; the others only write,
    half of them with ``abort-on-disconnect``, like bots. Sender 1 is such a bot that never
    leaves, so what a connection keeps per run would show. (Each reader costs the gateway
    a copy of every event: with more, it saturates a shared core before 200 runs.)"""
    if index == 0:
        return {**CONNECT, "caps": ["tool-events"]}
    caps = ["abort-on-disconnect"] if index % 2 else []
    return {**CONNECT, "scopes": ["operator.write"], "caps": caps}


# -- the senders ----------------------------------------------------------------------


async def drive(client: Client, ledger: Ledger, rng: random.Random) -> None:
    """One slot: keep one run live in a session, stopping some of them, until cancelled."""
    weights, lines = zip(*SCRIPTS, strict=True)
    session, runs_here, interrupt = ledger.new_key("session"), 0, False
    await trio.sleep(rng.uniform(0, 1))  # spread the first sends
    while True:
        if runs_here == SESSION_RUNS:
            session, runs_here = ledger.new_key("session"), 0
        runs_here += 1
        run_id = ledger.new_run()
        script = rng.choices(lines, weights)[0]
        send: dict[str, Any] = {
            "sessionKey": session,
            "message": f"Soak {run_id}.\n{script}",
            "idempotencyKey": run_id,
        }
        if interrupt:
            send["queueMode"] = "interrupt"
        if rng.random() < TIMEOUT:
            send["timeoutMs"] = rng.randint(500, 3000)
        answer = await ledger.request(client, "chat.send", send)
        if answer is None:
            continue
        if answer != {"runId": run_id, "status": "started"}:
            ledger.violate("send not started", f"{run_id}: {answer}")
            continue
        track = ledger.runs[run_id]
        track.started = True
        roll = rng.random()
        interrupt = ABORT <= roll < ABORT + INTERRUPT
        if roll < ABORT + INTERRUPT:
            with trio.move_on_after(rng.uniform(0, ABORT_WITHIN)):
                await track.ended.wait()
            if roll < ABORT:
                await stop(client, ledger, rng, session, run_id)
            if interrupt or rng.random() < SEND_BEHIND:
                continue
        with trio.move_on_after(RUN_BOUND):
            await track.ended.wait()
        await trio.sleep(rng.uniform(0, 0.5))


async def stop(
    client: Client, ledger: Ledger, rng: random.Random, session: str, run_id: str
) -> None:
    """Abort the run (it may have ended meanwhile) the ways a client can."""
    how = rng.random()
    if how < 0.7:
        await ledger.request(client, "chat.abort", {"sessionKey": session, "runId": run_id})
    elif how < 0.85:
        await ledger.request(client, "chat.abort", {"sessionKey": session})
    else:
        key = ledger.new_key("stop")
        params = {"sessionKey": session, "message": "/stop", "idempotencyKey": key}
        await ledger.request(client, "chat.send", params)


async def sender(
    port: int, index: int, slots: int, plan: Plan, ledger: Ledger, until: float
) -> None:
    """One connection's slots until it leaves at a random instant; then it comes back."""
    rng = random.Random(index)
    while trio.current_time() < until:
        lifetime = plan.seconds if index == 1 else rng.uniform(*plan.lifetime)
        leave = min(until, trio.current_time() + lifetime)
        async with open_client(port, sender_params(index)) as client:
            with trio.move_on_at(leave):
                async with trio.open_nursery() as nursery:
                    for _ in range(slots):
                        nursery.start_soon(drive, client, ledger, rng)
        ledger.reconnects += trio.current_time() < until


# -- the samples ----------------------------------------------------------------------


@attrs.frozen
class Sample:
    seconds: float
    rss_mib: float
    fds: int
    live: int
    queued: int
    connections: int
    db_mib: float
    started: int
    ends: Mapping[str, int]  # runs by their first terminal chat state


async def take_sample(
    observer: Client, ledger: Ledger, gateway: GatewayProcess, db: pathlib.Path, began: float
) -> Sample:
    fds = len(os.listdir(f"/proc/{gateway.pid}/fd"))
    stats = await ledger.request(observer, "runtime.stats", {}) or {}
    db_bytes = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))  # with -wal, -shm
    return Sample(
        trio.current_time() - began,
        gateway.rss_bytes() / 2**20,
        fds,
        stats.get("liveRuns", -1),
        stats.get("queuedRuns", -1),
        stats.get("connections", -1),
        db_bytes / 2**20,
        ledger.started(),
        dict(ledger.ends),
    )


@attrs.frozen
class Result:
    plan: Plan
    samples: tuple[Sample, ...]  # under load, every plan.interval
    drained: Sample  # once the last runs have ended
    ledger: Ledger


async def soak(plan: Plan) -> Result:
    ledger = Ledger()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        db = pathlib.Path(folder) / "soak.db"
        async with sim_process() as sim_url, serving_process(sim_url, db) as gateway:
            observer_of = functools.partial(Observer, ledger=ledger)
            async with open_client(gateway.port, CONNECT, observer_of) as observer:
                began = trio.current_time()
                until = began + plan.seconds
                async with trio.open_nursery() as nursery:
                    for index in range(plan.connections):
                        slots = len(range(index, plan.runs, plan.connections))
                        nursery.start_soon(sender, gateway.port, index, slots, plan, ledger, until)
                    for tick in itertools.count():
                        await trio.sleep_until(began + tick * plan.interval)
                        if trio.current_time() > until:
                            break
                        samples.append(await take_sample(observer, ledger, gateway, db, began))
                with trio.move_on_after(DRAIN_BOUND):
                    for track in list(ledger.runs.values()):
                        if track.started:
                            await track.ended.wait()
                drained = await take_sample(observer, ledger, gateway, db, began)
    for run_id, track in ledger.runs.items():
        if track.started and not track.terminals:
            ledger.violate("runs without a terminal event", run_id)
    return Result(plan, tuple(samples), drained, ledger)


# -- the report -----------------------------------------------------------------------


def slope_per_minute(samples: tuple[Sample, ...], value: Callable[[Sample], float]) -> float:
    if len(samples) < 2:
        return 0.0
    minutes = [s.seconds / 60 for s in samples]
    return statistics.linear_regression(minutes, [value(s) for s in samples]).slope


def section(result: Result) -> Section:
    plan, ledger, drained = result.plan, result.ledger, result.drained
    loaded = tuple(s for s in result.samples if s.seconds >= plan.warmup)
    first, last = result.samples[0], result.samples[-1]
    rss_slope = slope_per_minute(loaded, lambda s: s.rss_mib)
    fd_slope = slope_per_minute(loaded, lambda s: s.fds - s.live)
    rss_mean = statistics.fmean(s.rss_mib for s in loaded) if loaded else last.rss_mib
    flat = abs(rss_slope) < rss_mean / 100
    live_mean = statistics.fmean(s.live for s in result.samples[1:] or result.samples)
    violations = sum(ledger.violations.values())
    named = ", ".join(f"{n} {k}" for k, n in sorted(ledger.violations.items())) or "none"
    notes = (
        f"{plan.seconds / 60:g} min aiming at {plan.runs} live runs over {plan.connections} "
        f"sender connections (they left and came back {ledger.reconnects} times; one never "
        "leaves) and one observer; the gateway (SQLite file store, an async and a threaded "
        "tool) and the simulated provider in child processes. Scripts mix text at 2 to 20 "
        "words/s, silent thinking, tool calls and provider errors; "
        f"{ABORT:.0%} of runs are aborted within {ABORT_WITHIN:g} s (by run, by session or "
        f"`/stop`), {INTERRUPT:.0%} interrupted by the next send, {TIMEOUT:.0%} carry a short "
        f"timeout; half the stopped runs are followed at once by a send to their session. "
        f"Sampled every {plan.interval:g} s; slopes are fitted after a {plan.warmup:g} s "
        "warm-up. The last row is taken once every run has ended.\n\n"
        f"- Runs: {drained.started} started ({drained.started / plan.seconds:.1f}/s); "
        f"{drained.ends.get('final', 0)} finished, {drained.ends.get('aborted', 0)} aborted, "
        f"{drained.ends.get('error', 0)} failed.\n"
        f"- Registry (live runs): mean {live_mean:.0f}, max "
        f"{max(s.live for s in result.samples)}; after drain {drained.live} (queued "
        f"{drained.queued}). The senders keep fewer than {plan.runs} live while their "
        "requests wait for answers.\n"
        f"- RSS: first {first.rss_mib:.1f} MiB, last {last.rss_mib:.1f}, max "
        f"{max(s.rss_mib for s in result.samples):.1f}, after drain {drained.rss_mib:.1f}; "
        f"slope after warm-up {rss_slope:+.2f} MiB/min.\n"
        f"- Open fds: first {first.fds}, last {last.fds}, max "
        f"{max(s.fds for s in result.samples)}, after drain {drained.fds}. They follow the "
        "live runs (one provider connection each); fds beyond the live runs: slope after "
        f"warm-up {fd_slope:+.2f}/min (idle pooled connections, up to 100, count too).\n"
        f"- Violations seen by the clients: {violations} ({named}).\n"
        f"- Verdict: {'flat' if flat else 'GROWING'} (flat: the RSS slope after warm-up is "
        "under 1 % of the mean RSS per minute)."
    )
    samples = (*result.samples, drained)
    labels = [f"{s.seconds:.0f}" for s in result.samples] + ["drained"]
    rows = tuple(
        (
            label,
            f"{s.rss_mib:.1f}",
            str(s.fds),
            str(s.live),
            str(s.queued),
            str(s.connections),
            f"{s.db_mib:.1f}",
            str(s.started),
            str(s.ends.get("final", 0)),
            str(s.ends.get("aborted", 0)),
            str(s.ends.get("error", 0)),
        )
        for label, s in zip(labels, samples, strict=True)
    )
    columns = (
        "t s",
        "RSS MiB",
        "open fds",
        "live runs",
        "queued",
        "connections",
        "SQLite MiB",
        "started",
        "finished",
        "aborted",
        "failed",
    )
    minutes = tuple(s.seconds / 60 for s in samples)
    plot = Plot(
        "minutes (the last point: every run ended)",
        "MiB or count",
        (
            Series("gateway RSS, MiB", minutes, tuple(s.rss_mib for s in samples)),
            Series("open fds", minutes, tuple(float(s.fds) for s in samples)),
            Series("live runs (registry)", minutes, tuple(float(s.live) for s in samples)),
            Series("SQLite file + WAL, MiB", minutes, tuple(s.db_mib for s in samples)),
        ),
    )
    return Section("Soak: memory, fds and registry under churn", columns, rows, notes, plot)


async def run(quick: bool, *, plan: Plan | None = None) -> Section:
    result = await soak(plan or (QUICK if quick else FULL))
    for example in result.ledger.examples:
        print(f"soak violation: {example}", file=sys.stderr)
    return section(result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.seconds:g} s, fewer runs")
    parser.add_argument("--minutes", type=float, help=f"default {FULL.seconds / 60:g}")
    parser.add_argument("--runs", type=int, help=f"concurrent runs, default {FULL.runs}")
    parser.add_argument(
        "--report",
        type=pathlib.Path,
        help=f"also write the section here; the plot goes to {PLOTS}/ beside it (default: "
        "beside BENCHMARKS.md, where `python -m benchmarks soak` puts it)",
    )
    parser.add_argument("--serve", action="store_true", help="be the gateway's process")
    parser.add_argument("--sim-url")
    parser.add_argument("--db", type=pathlib.Path)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve, args.sim_url, args.db)
        sys.exit()
    chosen = QUICK if args.quick else FULL
    if args.minutes is not None:
        chosen = attrs.evolve(chosen, seconds=args.minutes * 60)
    if args.runs is not None:
        chosen = attrs.evolve(chosen, runs=args.runs, connections=max(2, args.runs // 25))
    done = trio.run(functools.partial(run, args.quick, plan=chosen))
    folder = (
        pathlib.Path(__file__).resolve().parent.parent
        if args.report is None
        else args.report.parent
    )
    link = f"{PLOTS}/soak.png"
    assert done.plot is not None
    draw(done.plot, done.title, folder / link)
    print(done.markdown(link))
    if args.report is not None:
        args.report.write_text(done.markdown(link))
    print(f"wrote {folder / link}" + ("" if args.report is None else f" and {args.report}"))

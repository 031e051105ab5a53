"""Property test: random schedules of sends and aborts over two runtimes that share one
PostgreSQL store and one Redis bus, as two gateway processes do.

Hypothesis draws steps; the ops of a step go out at once (so a send races an abort, two
sends of one idempotency key race on the two processes, an abort races a run's end) and
steps are a short random delay apart. Each send goes to process A or B; each abort, to
either, names a run (of its session or not) or a whole session. After every example:

- one idempotency key started at most one run, on one process, and left one prompt;
- a session's runs lived on one process at a time (a send to the other is refused), so
  every session's history is valid;
- every run ended with exactly one terminal event, seen once by the subscribers of its
  own process and once (relayed) by those of the other;
- an abort that said it stopped a run: that run was cancelled; a run that finished was
  claimed by no abort (invariant 5);
- the store holds no running record and every session's history is valid;
- Redis holds no owner key of these runs.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.postgres_store import PostgresStore
from adapters.redis_bus import RedisAbortBus
from runtime import (
    AbortResult,
    Event,
    ModelRequest,
    RunCancelled,
    RunExists,
    RunFinished,
    RunSessionMismatch,
    Runtime,
    ScriptedModel,
    SessionBusy,
    TerminalEvent,
    is_terminal,
    text_turn,
    validate_history,
)
from tests.services import (  # noqa: F401 (the fixtures)
    Postgres,
    Redis,
    postgres_fixture,
    redis_fixture,
)

SESSIONS = ("s0", "s1")


@attrs.frozen
class Send:
    process: int
    session: str
    key: int
    words: int
    pause: float


@attrs.frozen
class Abort:
    process: int
    session: str
    key: int | None  # None: the whole session


Op = Send | Abort

ops = st.one_of(
    st.builds(
        Send,
        st.integers(0, 1),
        st.sampled_from(SESSIONS),
        st.integers(0, 3),
        st.integers(0, 40),
        st.sampled_from([0.0, 0.001, 0.005]),
    ),
    st.builds(Abort, st.integers(0, 1), st.sampled_from(SESSIONS), st.none() | st.integers(0, 3)),
)
schedules = st.lists(
    st.tuples(st.lists(ops, min_size=1, max_size=3), st.sampled_from([0.0, 0.005, 0.03])),
    min_size=1,
    max_size=5,
)


def model() -> ScriptedModel:
    """Streams what the prompt asks for: "words N pause P"."""

    def handler(request: ModelRequest) -> list[Any]:
        _, words, _, pause = request.messages[-1].text.split()
        return text_turn(*["w "] * int(words), pause=float(pause)) if int(words) else (
            text_turn("")
        )

    return ScriptedModel(handler)


@pytest.fixture(scope="module")
def database(postgres: Postgres) -> str:
    return postgres.create_database()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=schedules)
async def test_no_schedule_over_two_processes_breaks_an_invariant(
    database: str, redis: Redis, schedule: list[tuple[list[Op], float]]
) -> None:
    prefix = uuid.uuid4().hex[:8]  # the examples share the database and Redis

    def run_id(key: int) -> str:
        return f"{prefix}-k{key}"

    def session(name: str) -> str:
        return f"{prefix}-{name}"

    started: dict[str, list[int]] = defaultdict(list)  # run id -> processes that started it
    handles: dict[str, Any] = {}
    claims: list[AbortResult] = []
    seen: list[list[Event]] = [[], []]
    buses = [RedisAbortBus(redis.url, heartbeat=0.2, alive_for=1.0) for _ in range(2)]
    with trio.fail_after(60):
        async with (
            PostgresStore(database, pool_size=2) as store,
            Runtime(model=model(), store=store, abort_bus=buses[0]) as a,
            Runtime(model=model(), store=store, abort_bus=buses[1]) as b,
        ):
            runtimes = (a, b)

            async def watch(index: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with runtimes[index].subscribe() as events:
                    task_status.started()
                    async for event in events:
                        if event.run_id.startswith(prefix):
                            seen[index].append(event)

            async def do(op: Op) -> None:
                rt = runtimes[op.process]
                if isinstance(op, Send):
                    prompt = f"words {op.words} pause {op.pause}"
                    try:
                        run = await rt.start_run(session(op.session), prompt, run_id(op.key))
                    except (RunExists, SessionBusy):  # the session's runs live on the other
                        return
                    started[run.run_id].append(op.process)
                    handles[run.run_id] = run
                else:
                    try:
                        claims.append(
                            await rt.abort_anywhere(
                                None if op.key is None else run_id(op.key), session(op.session)
                            )
                        )
                    except RunSessionMismatch:
                        pass

            async with trio.open_nursery() as watchers:
                for index in (0, 1):
                    await watchers.start(watch, index)
                for step, delay in schedule:
                    async with trio.open_nursery() as nursery:
                        for op in step:
                            nursery.start_soon(do, op)
                    await trio.sleep(delay)
                terminals: dict[str, TerminalEvent] = {}
                for rid, run in handles.items():
                    terminals[rid] = await run.wait()
                # the relayed terminal events reach the other process too
                while any(  # noqa: ASYNC110 (another task and process: polled)
                    sum(1 for e in seen[i] if is_terminal(e)) < len(handles) for i in (0, 1)
                ):
                    await trio.sleep(0.01)
                await trio.sleep(0.05)  # anything that would come after, wrongly
                watchers.cancel_scope.cancel()

            # one run per key, on one process
            assert all(len(processes) == 1 for processes in started.values()), started
            # exactly one terminal event per run, on each process's subscribers
            for index in (0, 1):
                ends = [e.run_id for e in seen[index] if is_terminal(e)]
                assert sorted(ends) == sorted(handles), (index, ends)
            # abort claims agree with how each run ended
            claimed = {rid for claim in claims for rid in claim.run_ids}
            for rid in claimed:
                assert isinstance(terminals[rid], RunCancelled), (rid, terminals[rid])
            for rid, terminal in terminals.items():
                if isinstance(terminal, RunFinished):
                    assert rid not in claimed
            # the store
            for name in SESSIONS:
                history = await store.history(session(name))
                validate_history(history)
                prompts = [m.meta.get("run_id") for m in history if m.role == "user"]
                assert len(prompts) == len(set(prompts)), prompts
            for rid in handles:
                record = await store.get_run(rid)
                assert record is not None and record.status != "running", record
            # Redis: no owner key of these runs once their ends are released
            owners = [f"{buses[0].prefix}owner:{rid}" for rid in handles]
            with trio.fail_after(5):
                while owners and await buses[0]._client.exists(owners):  # noqa: ASYNC110
                    await trio.sleep(0.02)

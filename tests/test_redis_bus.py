"""The Redis abort bus with two runtimes in one process sharing one store: the races of
claims, tombstones and replies, fast; test_scale_out.py runs the same across processes."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio

from adapters.redis_bus import RedisAbortBus, RedisBusError
from runtime import (
    AbortResult,
    MemoryStore,
    Run,
    RunCancelled,
    RunExists,
    RunRecord,
    Runtime,
    ScriptedModel,
    SessionBusy,
    SessionElsewhere,
    Store,
    TextDelta,
    text_turn,
    validate_history,
)
from tests.services import Redis, redis_fixture  # noqa: F401 (the fixture)


@pytest.fixture
def coredis_garbage() -> Iterator[None]:
    """coredis 6.9 leaves the anyio memory streams of a connection that failed to open for
    the garbage collector (ResourceWarning "Unclosed MemoryObjectSendStream"): not ours to
    close. Collected here, after the test's trio.run, under the test's warning filter, not
    in a later test."""
    yield
    gc.collect()


def slow_model() -> ScriptedModel:
    return ScriptedModel.from_turns(*[text_turn(*["w "] * 2000, pause=0.01)] * 4)


@asynccontextmanager
async def runtime(store: Store, redis: Redis, **bus: float) -> AsyncIterator[Runtime]:
    async with Runtime(
        model=slow_model(), store=store, abort_bus=RedisAbortBus(redis.url, **bus)
    ) as rt:
        yield rt


async def first_delta(rt: Runtime, run_id: str) -> None:
    with rt.subscribe() as events:
        if (run := rt.get_run(run_id)) is not None and run.text:
            return
        async for event in events:
            if isinstance(event, TextDelta) and event.run_id == run_id:
                return


async def test_an_abort_reaches_the_owner_and_tells_the_truth(redis: Redis) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis) as a, runtime(store, redis) as b:
            run = await a.start_run("s", "q", "r1")
            await first_delta(a, "r1")
            result = await b.abort_anywhere("r1", "s")
            assert (result.aborted, result.run_ids) == (True, ("r1",))
            assert isinstance(await run.wait(), RunCancelled)
            # finished now: no owner, answered without asking anyone
            assert (await b.abort_anywhere("r1", "s")).aborted is False
            # a session-wide abort stops the session's runs on every process
            one = await a.start_run("t", "q", "r2")
            two = await b.start_run("u", "q", "r3")
            await first_delta(a, "r2")
            result = await b.abort_anywhere(session_key="t")
            assert result.run_ids == ("r2",)
            assert isinstance(await one.wait(), RunCancelled)
            assert two.phase == "running"
            b.abort("r3")
            await two.wait()


async def test_a_claimed_id_is_not_started_twice(redis: Redis) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis) as a, runtime(store, redis) as b:
            started: list[str] = []
            refused: list[str] = []

            async def start(rt: Runtime, name: str) -> None:
                try:
                    await rt.start_run("s", "q", "same")
                except RunExists as exists:
                    assert exists.live
                    refused.append(name)
                else:
                    started.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start, a, "a")
                nursery.start_soon(start, b, "b")
            assert len(started) == 1 and len(refused) == 1
            owner = a if started == ["a"] else b
            assert (await owner.abort_anywhere("same", "s")).aborted


class SlowClaim:
    """A RedisAbortBus whose claim, once it landed, waits for ``gate`` before returning."""

    def __init__(self, inner: RedisAbortBus) -> None:
        self.inner, self.gate = inner, trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def claim(self, run_id: str, session_key: str) -> bool:
        claimed = await self.inner.claim(run_id, session_key)
        await self.gate.wait()
        return claimed


async def aborts_while_claimed(
    bus: SlowClaim, start: Callable[[], Awaitable[None]], aborter: Runtime, count: int
) -> list[AbortResult]:
    """``start`` claims r1 through ``bus``, held at its gate; once the claim is set,
    ``count`` aborts of r1 sent by ``aborter`` reach its owner and wait there for the
    claim's outcome; then the gate opens. Their results."""
    results: list[AbortResult] = []

    async def abort() -> None:
        results.append(await aborter.abort_anywhere("r1", "s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        while not await redis_has(bus.inner, "owner:r1"):  # noqa: ASYNC110
            await trio.sleep(0.01)
        for _ in range(count):
            nursery.start_soon(abort)
        await trio.sleep(0.3)  # they reach the owner, and wait there for the claim
        assert results == []
        bus.gate.set()
    return results


async def test_an_abort_while_the_run_is_being_claimed_still_wins(redis: Redis) -> None:
    """The abort reads the owner after the claim set it, and reaches the owner before
    its start_run registered the run: it is answered once the claim is decided, and the
    run is stopped as it registers. Of two such aborts one says it stopped the run (the
    long two-gateway schedules found both saying so)."""
    store = MemoryStore()
    bus = SlowClaim(RedisAbortBus(redis.url))
    with trio.fail_after(30):
        async with (
            Runtime(model=slow_model(), store=store, abort_bus=bus) as a,
            runtime(store, redis) as b,
        ):
            runs = []

            async def start() -> None:
                runs.append(await a.start_run("s", "q", "r1"))

            results = await aborts_while_claimed(bus, start, b, 2)
            assert sorted(r.aborted for r in results) == [False, True]
            assert isinstance(await runs[0].wait(), RunCancelled)
            assert runs[0].text == ""


async def test_an_abort_while_an_id_that_ran_is_claimed_says_false(redis: Redis) -> None:
    """Found by the long two-gateway schedules: a resend of a finished run's id claims
    it before finding its record (so that no two processes start it); an abort that
    came meanwhile said it stopped the run, which had finished."""
    store = MemoryStore()
    bus = SlowClaim(RedisAbortBus(redis.url))
    bus.gate.set()
    with trio.fail_after(30):
        async with (
            Runtime(model=ScriptedModel.from_turns(text_turn("done")), store=store,
                    abort_bus=bus) as a,
            runtime(store, redis) as b,
        ):  # fmt: skip
            await (await a.start_run("s", "q", "r1")).wait()
            while await redis_has(bus.inner, "owner:r1"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            bus.gate = trio.Event()

            async def resend() -> None:
                with pytest.raises(RunExists):
                    await a.start_run("s", "q", "r1")

            results = await aborts_while_claimed(bus, resend, b, 1)
            assert [r.aborted for r in results] == [False]
            assert (await store.get_run("r1")).status == "finished"


async def test_a_send_the_reject_policy_refuses_takes_no_claim(redis: Redis) -> None:
    """Found by the two-gateway stop schedules: a send that the reject policy refused
    claimed its id first, and the same id sent to another process meanwhile was answered
    "in_flight" (RunExists) for a run that never ran."""
    store = MemoryStore()
    bus = SlowClaim(RedisAbortBus(redis.url))
    bus.gate.set()
    with trio.fail_after(30):
        async with (
            Runtime(model=slow_model(), store=store, abort_bus=bus) as a,
            runtime(store, redis) as b,
        ):
            await a.start_run("s", "q", "r1")
            bus.gate = trio.Event()  # from now on a claim that landed waits here
            refused = trio.Event()

            async def send_to_a() -> None:
                with pytest.raises(SessionBusy):
                    await a.start_run("s", "q", "r2", concurrency="reject")
                refused.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_to_a)
                while not refused.is_set() and not await redis_has(bus.inner, "owner:r2"):  # noqa: ASYNC110
                    await trio.sleep(0.01)
                with pytest.raises(SessionElsewhere):  # no run r2, anywhere
                    await b.start_run("s", "q", "r2")
                bus.gate.set()


async def redis_has(bus: RedisAbortBus, key: str) -> bool:
    return bool(await bus._client.exists([bus.prefix + key]))


class FailingCommits:
    """A MemoryStore whose commits of the runs in ``failing`` fail, as on a disk hiccup."""

    def __init__(self, *failing: str) -> None:
        self.inner, self.failing = MemoryStore(), set(failing)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit_run(self, record: RunRecord, items: Any, *, rollback: bool) -> None:
        if record.run_id in self.failing:
            raise OSError("a disk hiccup (injected)")
        await self.inner.commit_run(record, items, rollback=rollback)


async def test_a_run_whose_end_is_not_saved_yet_keeps_its_id(redis: Redis) -> None:
    """Found by the two-gateway stop schedules: a run stopped before it began, whose
    commit failed, gave up its claim at once; with neither a record nor an owner, a resend
    of its id to another process started a second run. It is owned until its end is
    written."""
    store = FailingCommits("r1")
    with trio.fail_after(30):
        async with runtime(store, redis) as a, runtime(store, redis) as b:
            run = await a.start_run("s", "q", "r1")
            a.abort("r1")  # before it began: nothing of it is stored, and its end fails
            assert isinstance(await run.wait(), RunCancelled)
            assert await store.get_run("r1") is None
            # a later run's release lands after any release queued before it
            other = await a.start_run("t", "q", "r2")
            a.abort("r2")
            await other.wait()
            while await redis_has(a.abort_bus, "owner:r2"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            with pytest.raises(RunExists):
                await b.start_run("s", "q", "r1")
            store.failing.clear()  # the next checkpoint tick saves it
            while await store.get_run("r1") is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
            with pytest.raises(RunExists):
                await b.start_run("s", "q", "r1")


async def test_a_starting_process_leaves_a_live_processs_runs_alone(redis: Redis) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis) as a:
            run = await a.start_run("s", "q", "r1")
            await first_delta(a, "r1")
            # a run left by a dead process (no owner at all): the newcomer closes it
            dead = RunRecord(run_id="old", session_key="o", status="running", started_at=0)
            await store.begin_run(dead, _prompt("old"))
            async with runtime(store, redis) as b:
                assert (await store.get_run("old")).status == "interrupted"
                assert (await store.get_run("r1")).status == "running"
                assert run.phase == "running"
                assert (await b.abort_anywhere("r1", "s")).aborted
            assert isinstance(await run.wait(), RunCancelled)


async def test_a_dead_process_is_noticed_and_its_runs_closed(redis: Redis) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis, heartbeat=0.2, alive_for=0.6) as b:
            a_bus = RedisAbortBus(redis.url, heartbeat=0.2, alive_for=0.6)
            async with Runtime(model=slow_model(), store=store, abort_bus=a_bus) as a:
                run = await a.start_run("s", "q", "r1")
                await first_delta(a, "r1")
                await trio.sleep(0.5)  # a checkpoint or two
                # its heartbeat stops, as if the process had died (or hung for too long)
                a_bus._tasks.cancel()
                stopped = trio.current_time()
                while (await store.get_run("r1")).status == "running":  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert trio.current_time() - stopped < 0.6 + 0.2 + 1.0
                history = await store.history("s")
                assert history[-1].meta["origin"] == "interrupted" and history[-1].text
                # the "dead" process's own commit, when it comes, finds the run closed
                a.abort("r1")
                await run.wait()
            assert [m.role for m in await store.history("s")] == ["user", "assistant"]
            assert (await store.get_run("r1")).status == "interrupted"
            later = await b.start_run("s", "again", "r2")
            b.abort("r2")
            await later.wait()


def _prompt(run_id: str):  # type: ignore[no-untyped-def]
    from runtime import Message, TextBlock

    return Message("user", (TextBlock("q"),), 0, {"run_id": run_id})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_redis_unreachable_is_one_sentence(tmp_path, coredis_garbage) -> None:
    bus = RedisAbortBus(f"unix://{tmp_path}/none.sock")
    model = ScriptedModel.from_turns(text_turn("x"))
    with trio.fail_after(30), pytest.raises(BaseException) as caught:
        async with Runtime(model=model, abort_bus=bus):
            pass
    error = caught.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, RedisBusError) and "could not be reached" in str(error)
    del caught, error


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_after_a_redis_restart_the_owner_is_found_again(
    redis: Redis, coredis_garbage: None
) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with (
            runtime(store, redis, heartbeat=0.2) as a,
            runtime(store, redis, heartbeat=0.2) as b,
        ):
            first = await a.start_run("s", "q", "r1")
            second = await a.start_run("t", "q", "r2")
            await first_delta(a, "r1")
            redis.stop()
            # what other processes run is unknown meanwhile, and reads go on without it
            assert await b.live_runs_anywhere("s") == []
            assert await b.abort_bus.held_elsewhere(["s"]) == set()
            await trio.sleep(0.5)  # heartbeats fail meanwhile; the runs go on
            redis.start()  # empty: every key is gone
            # an abort before A's heartbeat came back: no owner, but the tombstone stays
            early = await b.abort_anywhere("r2", "t")
            assert isinstance(await second.wait(), RunCancelled)  # the heartbeat found it
            assert early.aborted in (True, False)  # whichever came first, the run stopped
            # and once the heartbeat came back, the owner answers
            result = await b.abort_anywhere("r1", "s")
            assert (result.aborted, result.run_ids) == (True, ("r1",))
            assert isinstance(await first.wait(), RunCancelled)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_process_stops_while_its_subscriptions_reconnect(
    redis: Redis, coredis_garbage: None, caplog: pytest.LogCaptureFixture
) -> None:
    """coredis 6.9 leaves a subscription that is between reconnect attempts running
    forever when it is closed: the process must stop all the same, and promptly."""
    store = MemoryStore()
    with trio.fail_after(15):
        async with runtime(store, redis, heartbeat=0.2) as a:
            run = await a.start_run("s", "q", "r1")
            await first_delta(a, "r1")
            redis.stop()
            await trio.sleep(0.5)  # both subscriptions are reconnecting meanwhile
            a.abort("r1")
            assert isinstance(await run.wait(), RunCancelled)
            stopping = trio.current_time()
        assert trio.current_time() - stopping < 10  # not the guard's 15
    assert [m.role for m in await store.history("s")] == ["user", "assistant"]
    assert "this process could not be forgotten by Redis" in caplog.text


async def test_a_sessions_runs_live_on_one_process_at_a_time(redis: Redis) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis) as a, runtime(store, redis) as b:
            run = await a.start_run("s", "q", "r1")
            with pytest.raises(SessionElsewhere, match="on another gateway process"):
                await b.start_run("s", "q", "r2")
            assert await store.get_run("r2") is None  # nothing of it was written
            queued = await a.start_run("s", "q", "r3")  # the holder queues it as usual
            await b.start_run("t", "q", "r4")  # another session is free
            b.abort("r4")
            a.abort(session_key="s")
            await run.wait()
            await queued.wait()
            with trio.fail_after(5):  # released once its last run there ended
                while True:
                    try:
                        later = await b.start_run("s", "q", "r5")
                    except SessionElsewhere:
                        await trio.sleep(0.01)
                    else:
                        break
            b.abort("r5")
            assert isinstance(await later.wait(), RunCancelled)
            history = await store.history("s")
            validate_history(history)
            prompts = [m.meta["run_id"] for m in history if m.role == "user"]
            assert prompts == [r for r in ("r1", "r3", "r5") if r in prompts]


async def test_a_sessions_live_runs_are_read_from_the_process_that_holds_it(
    redis: Redis,
) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis) as a, runtime(store, redis) as b:
            assert await b.live_runs_anywhere("s") == []  # held by no one: nobody asked
            run = await a.start_run("s", "question", "r1")
            await a.start_run("s", "later", "r2")
            await first_delta(a, "r1")
            here = [r.snapshot() for r in a.live_runs("s")]
            there = await b.live_runs_anywhere("s")
            assert [(r.run_id, r.phase, r.prompt) for r in there] == [
                ("r1", "running", "question"),
                ("r2", "queued", "later"),
            ]
            # read a moment after A's: the same run, further on (or as far)
            assert there[0].seq >= here[0].seq and there[0].text.startswith(here[0].text)
            assert there[0].accepted_at == here[0].accepted_at
            assert await b.abort_bus.held_elsewhere(["s", "t"]) == {"s"}
            assert await a.abort_bus.held_elsewhere(["s", "t"]) == set()  # its own
            a.abort(session_key="s")
            await run.wait()
            with trio.fail_after(5):  # released once its last run there ended
                while await b.live_runs_anywhere("s"):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert await b.abort_bus.held_elsewhere(["s"]) == set()


async def test_a_process_receives_only_the_sessions_its_subscribers_follow(
    redis: Redis,
) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with runtime(store, redis) as a, runtime(store, redis) as b:
            client = b.abort_bus._client
            channel = f"{b.abort_bus.prefix}events:"

            async def subscribers() -> tuple[dict[str, int], int]:
                counts = await client.pubsub_numsub(channel + "s", channel + "t")
                return {k.removeprefix(channel): v for k, v in counts.items()}, (
                    await client.pubsub_numpat()
                )

            async def settled(numsub: dict[str, int], numpat: int) -> None:
                while await subscribers() != (numsub, numpat):  # noqa: ASYNC110
                    await trio.sleep(0.01)

            async def streaming(rt: Runtime, run_id: str) -> None:
                """The run has said something (read without subscribing: a subscription
                to every session would change what the process relays)."""
                while not rt.get_run(run_id).text:  # noqa: ASYNC110
                    await trio.sleep(0.01)

            await settled({"s": 0, "t": 0}, 0)  # nobody follows anything yet
            with b.subscribe("t") as on_t:
                await settled({"s": 0, "t": 1}, 0)
                await b.live_runs_anywhere("t")  # returns once t's events reach b
                one = await a.start_run("s", "q", "r1")
                two = await a.start_run("t", "q", "r2")
                await streaming(a, "r2")
                with b.subscribe() as everything:  # one that follows every session
                    await settled({"s": 0, "t": 1}, 1)  # the pattern, t's channel 5 s
                    await streaming(a, "r1")
                    await settled({"s": 0, "t": 0}, 1)  # then the pattern alone: no copies
                a.abort("r1")
                await settled({"s": 0, "t": 1}, 0)  # back to t's channel alone
                a.abort("r2")
                await one.wait()
                await two.wait()
                seen = []
                async for event in on_t:
                    seen.append(event)
                    if isinstance(event, RunCancelled):
                        break
            assert {e.run_id for e in seen} == {"r2"}  # s was never relayed to it
            seqs = [e.seq for e in seen]  # each event once, through both subscriptions
            assert seqs == sorted(set(seqs))
            assert everything.follows_everything
            await settled({"s": 0, "t": 0}, 0)


async def test_connections_following_everything_a_moment_leave_the_channels_be(
    redis: Redis,
) -> None:
    """Seen in the throughput benchmark: a gateway connection follows every session until
    it subscribes to one, and clients connecting one after another had the process drop
    every session channel for the pattern and take it again, for each of them (hundreds
    of commands, and Redis's acknowledgements late under load)."""
    store = MemoryStore()

    async def unsubscribes() -> int:
        stats = await b.abort_bus._client.info("commandstats")
        return int(stats.get("cmdstat_unsubscribe", {}).get("calls", 0))

    with trio.fail_after(30), contextlib.ExitStack() as later:
        async with (
            runtime(store, redis) as a,
            runtime(store, redis, channels_under_pattern=60) as b,
        ):
            bus = b.abort_bus
            with b.subscribe("t") as on_t:
                await b.live_runs_anywhere("t")  # returns once t's channel is subscribed
                assert bus._relaying == {"t"} and not bus._relaying_all
                before = await unsubscribes()
                for _ in range(10):  # ten connections, each subscribing to a session soon
                    with b.subscribe():
                        await b.live_runs_anywhere("t")  # returns once the pattern is, too
                        assert bus._relaying == {"t"} and bus._relaying_all
                assert await unsubscribes() == before  # t's channel stayed
                with b.subscribe():  # the pattern and t's channel: each event comes twice
                    run = await a.start_run("t", "q", "r1")
                    await first_delta(a, "r1")
                    a.abort("r1")
                    await run.wait()
                    seqs = []
                    async for event in on_t:
                        seqs.append(event.seq)
                        if isinstance(event, RunCancelled):
                            break
                    assert bus._relaying == {"t"} and bus._relaying_all  # both, all along
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # once each, in order
            later.enter_context(b.subscribe())  # b leaves while it relays everything
            await b.live_runs_anywhere("t")
        # nothing b declared is left (the others would publish to it forever): it stops
        # following before it is forgotten
        async with runtime(store, redis) as c:
            prefix, client = c.abort_bus.prefix, c.abort_bus._client
            assert await client.smembers(prefix + "followers-all") == set()
            assert await client.smembers(prefix + "followers:t") == set()
            assert await client.exists([prefix + "follows:" + bus.process_id]) == 0


async def test_an_id_another_process_ran_meanwhile_is_not_started_again(redis: Redis) -> None:
    """Found by the two-process schedules: B read no record of r1 (A's run, stopped
    before it began, writes its record only at its end), A then ended r1 and released
    it, and B claimed r1 and ran it a second time. The id is now claimed before it is
    looked up in the store; here B's lookup answers only after A released r1."""
    store = MemoryStore()
    released = trio.Event()

    class LateLookup:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def get_run(self, run_id: str) -> RunRecord | None:
            record = await store.get_run(run_id)
            await released.wait()
            return record

    with trio.fail_after(30):
        async with (
            runtime(store, redis) as a,
            runtime(LateLookup(), redis) as b,
        ):
            run = await a.start_run("s", "q", "r1")
            a.abort("r1")  # before it began: no record of it until its end is written
            async with trio.open_nursery() as nursery:

                async def resend() -> None:
                    with pytest.raises(RunExists):
                        await b.start_run("s", "q", "r1")

                nursery.start_soon(resend)
                await run.wait()
                while await redis_has(a.abort_bus, "owner:r1"):  # noqa: ASYNC110
                    await trio.sleep(0.01)
                released.set()
            assert b.get_run("r1") is None
            assert (await store.get_run("r1")).status == "cancelled"


async def test_a_process_publishes_only_what_another_process_relays(redis: Redis) -> None:
    """A's clients follow A's own runs: nothing goes through Redis (the echo it would
    read back was most of the relay's cost). Once B relays the session, A publishes."""
    store = MemoryStore()
    with trio.fail_after(30):
        async with (
            runtime(store, redis) as a,
            runtime(store, redis) as b,
            coredis.Redis.from_url(redis.url, decode_responses=True) as raw,
            raw.pubsub(channels=[f"{a.abort_bus.prefix}events:s"]) as listener,
        ):
            heard: list[Any] = []

            async def listen() -> None:
                while True:
                    message = await listener.get_message(ignore_subscribe_messages=True)
                    if message is not None:
                        heard.append(message)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                with a.subscribe("s"):
                    await a.live_runs_anywhere("s")  # A relays s itself now
                    run = await a.start_run("s", "q", "r1")
                    await first_delta(a, "r1")
                    a.abort("r1")
                    await run.wait()
                    await trio.sleep(0.2)  # anything published would have arrived
                    assert heard == []  # no other process relays s: A published nothing
                    with b.subscribe("s") as on_b:
                        await b.live_runs_anywhere("s")  # B relays s from now on
                        run = await a.start_run("s", "q", "r2")
                        async for event in on_b:
                            if isinstance(event, RunCancelled):
                                break
                            if isinstance(event, TextDelta):
                                a.abort("r2")
                    await run.wait()
                    assert heard and all('"r2"' in m["data"] for m in heard)
                nursery.cancel_scope.cancel()


async def test_a_send_refused_under_reject_never_answers_a_resend_in_flight(
    redis: Redis,
) -> None:
    """Found by the long two-gateway schedules: two sends for one session on B under
    `reject`, x and y; x passed the check and claimed its id, y was admitted meanwhile, and
    x was then refused. While x's id was claimed, its resend to A was answered
    `in_flight`, for a run that never ran: the message was lost. A session's admissions
    now go one at a time, so a refused send never claims its id."""
    store = MemoryStore()
    resent = trio.Event()

    class LateLookup:  # x's lookup, after the claim, waits for A's resend (at most 1 s)
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def get_run(self, run_id: str) -> RunRecord | None:
            if run_id == "x":
                with trio.move_on_after(1):
                    await resent.wait()
            return await store.get_run(run_id)

    results: dict[str, Any] = {}

    async def send(rt: Runtime, run_id: str, name: str) -> None:
        try:
            results[name] = await rt.start_run("s", "q", run_id, concurrency="reject")
        except (SessionBusy, RunExists) as exc:
            results[name] = exc

    with trio.fail_after(30):
        async with (
            runtime(store, redis) as a,
            runtime(LateLookup(), redis) as b,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(send, b, "x", "x")
            while not await redis_has(b.abort_bus, "owner:x"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            nursery.start_soon(send, b, "y", "y")
            with trio.move_on_after(0.3):  # y is admitted meanwhile, or waits for x
                while "y" not in results:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await send(a, "x", "x resent")  # while x's id is claimed
            resent.set()
            while not {"x", "y"} <= results.keys():  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert isinstance(results["x resent"], RunExists) and results["x resent"].live
            assert isinstance(results["x"], Run), results  # so the in_flight was true
            assert isinstance(results["y"], SessionBusy)
            b.abort(session_key="s")
            await results["x"].wait()

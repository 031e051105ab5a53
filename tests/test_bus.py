"""Subscriber buffers: bounded in bytes, deltas merged when full in O(new text), terminal
events never dropped; a subscriber past its byte bound is told, not silently cut."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from runtime import (
    RunFinished,
    RunStarted,
    Runtime,
    ScriptedModel,
    SubscriptionOverflow,
    TextDelta,
    ThinkingChunk,
    Tool,
    ToolCallFinished,
    Usage,
    text_turn,
    tool_turn,
)
from runtime._bus import EVENT_OVERHEAD, EventBus, Subscription
from tests.helpers import drain


def delta(run: str, seq: int, text: str, session: str = "s") -> TextDelta:
    return TextDelta(run_id=run, session_key=session, seq=seq, text=text)


def test_a_full_buffer_merges_deltas_and_keeps_the_text_whole() -> None:
    bus = EventBus()
    with bus.subscribe("s", capacity=3) as events:
        for i in range(100):
            bus.publish(delta("r", i, f"{i},"))
        buffered = drain(events)
    assert len(buffered) == 3
    assert "".join(e.text for e in buffered) == "".join(f"{i}," for i in range(100))
    assert buffered[-1].seq == 99  # a merged delta keeps the later seq
    assert events.merged == 97


def test_merging_never_crosses_a_tool_event_of_the_same_run() -> None:
    bus = EventBus()
    tool = ToolCallFinished(
        run_id="r", session_key="s", seq=1, tool_call_id="c", name="t", is_error=False, result=""
    )
    with bus.subscribe("s", capacity=1) as events:
        bus.publish(delta("r", 0, "before "))
        bus.publish(tool)
        bus.publish(delta("r", 2, "after"))
        bus.publish(delta("r", 3, "!"))
        buffered = drain(events)
    assert [type(e).__name__ for e in buffered] == ["TextDelta", "ToolCallFinished", "TextDelta"]
    assert [getattr(e, "text", None) for e in buffered] == ["before ", None, "after!"]


def test_a_sealed_buffer_merges_nothing_across_the_seal() -> None:
    """A reader that took a run's snapshot (text up to seq 1) must not get a delta that
    holds text from before it under a later seq: seal() closes the merges at that point."""
    bus = EventBus()
    with bus.subscribe("s", capacity=1) as events, bus.subscribe("s", capacity=1) as unsealed:
        bus.publish(delta("r", 0, "before "))
        bus.publish(delta("r", 1, "snap "))  # merged into seq 0's entry: the buffer is full
        events.seal()
        bus.publish(delta("r", 2, "after"))
        bus.publish(delta("r", 3, "!"))
        sealed = drain(events)
        merged = drain(unsealed)
    assert [(e.seq, e.text) for e in sealed] == [(1, "before snap "), (3, "after!")]
    assert [(e.seq, e.text) for e in merged] == [(3, "before snap after!")]


def test_subscribers_see_only_their_session_and_unsubscribe_on_exit() -> None:
    bus = EventBus()
    with bus.subscribe("a") as a, bus.subscribe() as everything:
        bus.publish(delta("r1", 0, "x", session="a"))
        bus.publish(delta("r2", 0, "y", session="b"))
        assert [e.text for e in drain(a)] == ["x"]
        assert [e.text for e in drain(everything)] == ["x", "y"]
        assert len(bus) == 2
    assert len(bus) == 0


async def test_a_subscriber_that_never_reads_does_not_slow_a_run_or_lose_its_end() -> None:
    chunks = [f"w{i} " for i in range(2000)]
    model = ScriptedModel.from_turns(
        [ThinkingChunk("hmm"), *tool_turn(("c1", "t", {}))], text_turn(*chunks)
    )

    async def t(arguments):
        return "ok"

    async with Runtime(model=model, tools=[Tool("t", t)], subscriber_capacity=8) as rt:
        with rt.subscribe("s") as slow, rt.subscribe("s") as other:
            with trio.fail_after(30):
                run = await rt.start_run("s", "q")
                await run.wait()
            buffered = drain(slow)
            assert len(buffered) < 30
            assert isinstance(buffered[-1], RunFinished)
            text = "".join(e.text for e in buffered if isinstance(e, TextDelta))
            assert text == "".join(chunks)
            assert len(drain(other)) == len(buffered)


async def test_a_closed_subscription_ends_iteration() -> None:
    bus = EventBus()
    events = bus.subscribe("s")
    bus.publish(delta("r", 0, "last"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.lowlevel.checkpoint)
        events.close()
    assert [e.text async for e in events] == ["last"]


async def test_an_80000_delta_reply_into_a_stalled_subscription_merges_in_linear_time() -> None:
    """Each merge appends a piece; the text is joined once, on delivery. The old merge
    copied the whole merged text on every publish: about 16 GB of copying here."""
    bus = EventBus()
    words = [f"w{i} " for i in range(80_000)]
    with bus.subscribe("s", capacity=8) as stalled:
        with trio.fail_after(10):  # generous: this takes well under a second
            for seq, word in enumerate(words):
                bus.publish(delta("r", seq, word))
                if seq % 1000 == 0:
                    await trio.lowlevel.checkpoint()  # where a deadline can land
            assert not stalled.overflowed
            buffered = drain(stalled)
    assert len(buffered) == 8
    assert "".join(e.text for e in buffered) == "".join(words)  # exact, in order
    assert buffered[-1].seq == 79_999
    assert stalled.merged == 80_000 - 8
    assert stalled.buffered_bytes == 0


async def test_a_subscription_past_its_byte_bound_overflows_after_a_whole_prefix() -> None:
    bus = EventBus()
    started = [
        RunStarted(run_id=f"r{i}", session_key="s", seq=0, prompt="p" * 100) for i in range(100)
    ]
    ended = RunFinished(
        run_id="r0", session_key="s", seq=1, stop_reason="end_turn", message=None, usage=Usage()
    )
    with bus.subscribe("s", max_bytes=4096) as stalled, bus.subscribe("s") as reader:
        bus.publish(started[0])
        bus.publish(ended)  # a terminal event inside the bound is kept, whatever follows
        for event in started[1:]:  # non-delta events never merge: they count in full
            bus.publish(event)
        assert stalled.overflowed and len(bus) == 1  # no longer buffered for
        assert not reader.overflowed and len(drain(reader)) == 101
        assert stalled.buffered_bytes <= 4096 + EVENT_OVERHEAD + len(repr(started[-1]))
        kept = []
        with pytest.raises(SubscriptionOverflow, match="subscribe again"):
            with trio.fail_after(5):
                async for event in stalled:  # the prefix first, then the overflow
                    kept.append(event)
        assert kept[:2] == [started[0], ended] and kept[2:] == started[1 : len(kept) - 1]
        assert 10 < len(kept) < 100
        await stalled.wait_overflowed()


# -- routing by session and run ------------------------------------------------------------


def finished(run: str, seq: int, session: str = "s") -> RunFinished:
    return RunFinished(
        run_id=run,
        session_key=session,
        seq=seq,
        stop_reason="end_turn",
        message=None,
        usage=Usage(),
    )


def test_a_publish_touches_only_the_followers_of_its_session_and_run(monkeypatch) -> None:
    pushed: list[Subscription] = []
    push = Subscription._push
    monkeypatch.setattr(
        Subscription, "_push", lambda self, e, size: (pushed.append(self), push(self, e, size))
    )
    bus = EventBus()
    others = [bus.subscribe(f"other{i}") for i in range(1000)]
    with bus.subscribe("a") as a, bus.subscribe() as everything, bus.subscribe("b") as b:
        b.follow_run("r1")  # a run of session a that b follows (say, b started it)
        bus.publish(delta("r1", 0, "x", session="a"))
        assert sorted(map(id, pushed)) == sorted(map(id, [a, everything, b]))
        pushed.clear()
        bus.publish(delta("r2", 0, "y", session="a"))  # b does not follow r2
        assert sorted(map(id, pushed)) == sorted(map(id, [a, everything]))
        pushed.clear()
        a.follow_run("r1")  # a follows both r1 and its session: still one copy
        bus.publish(finished("r1", 1, session="a"))
        assert sorted(map(id, pushed)) == sorted(map(id, [a, everything, b]))
        # r1's end went ahead of r2's waiting delta (stops first), behind r1's own delta
        assert [(e.run_id, e.seq) for e in drain(a)] == [("r1", 0), ("r1", 1), ("r2", 0)]
        assert [type(e).__name__ for e in drain(b)] == ["TextDelta", "RunFinished"]
        assert b.runs == frozenset()  # a run is followed until its terminal event
        pushed.clear()
        bus.publish(delta("r1", 2, "late", session="a"))  # no such thing, but: routed by session
        assert b not in pushed
    for other in others:
        assert drain(other) == []
        other.close()
    assert len(bus) == 0 and not bus._by_session and not bus._by_run and not bus._everything


def test_following_a_session_narrows_and_unfollowing_drops_what_waits() -> None:
    bus = EventBus()
    with bus.subscribe() as events:
        assert events.follows_everything
        bus.publish(delta("r1", 0, "a0", session="a"))
        bus.publish(delta("r2", 0, "b0", session="b"))
        bus.publish(delta("r3", 0, "c0", session="c"))
        events.follow_run("r3")
        events.follow_session("a")  # narrowed: b's waiting event is dropped, c's r3 kept
        assert not events.follows_everything and events.sessions == {"a"}
        bus.publish(delta("r2", 1, "b1", session="b"))
        bus.publish(delta("r1", 1, "a1", session="a"))
        assert [e.text for e in drain(events)] == ["a0", "c0", "a1"]
        bus.publish(delta("r1", 2, "a2", session="a"))
        bus.publish(delta("r3", 1, "c1", session="c"))
        events.unfollow_session("a")  # a's waiting event goes; the followed run stays
        bus.publish(delta("r1", 3, "a3", session="a"))
        assert [e.text for e in drain(events)] == ["c1"]


# -- stops first ------------------------------------------------------------------------------


def test_a_terminal_event_overtakes_other_runs_waiting_events_but_never_its_own() -> None:
    bus = EventBus()
    with bus.subscribe("s") as events:
        bus.publish(delta("a", 0, "a0 "))
        for i in range(5):
            bus.publish(delta("b", i, f"b{i} "))
        bus.publish(delta("a", 1, "a1 "))
        bus.publish(delta("b", 5, "b5 "))
        bus.publish(finished("a", 2))  # a's own events first, in order, then its end
        bus.publish(delta("b", 6, "b6 "))
        order = [(e.run_id, e.seq) for e in drain(events)]
    assert order == [("a", 0), ("a", 1), ("a", 2)] + [("b", i) for i in range(7)]


def test_a_terminal_event_goes_first_after_merged_deltas_of_its_run() -> None:
    bus = EventBus()
    with bus.subscribe("s", capacity=4) as events:
        for i in range(100):  # merged: the buffer holds 4 entries
            bus.publish(delta("b", i, "b "))
            bus.publish(delta("a", i, "a "))
        bus.publish(finished("a", 100))
        buffered = drain(events)
    assert isinstance(buffered[0], TextDelta) and buffered[0].run_id == "a"
    assert "".join(e.text for e in buffered if e.run_id == "a" and isinstance(e, TextDelta)) == (
        "a " * 100
    )
    ends = [i for i, e in enumerate(buffered) if isinstance(e, RunFinished)]
    firsts_of_b = [i for i, e in enumerate(buffered) if e.run_id == "b"]
    assert ends[0] < firsts_of_b[0]  # a's end overtook b's waiting deltas
    assert "".join(e.text for e in buffered if e.run_id == "b") == "b " * 100


async def test_an_iteration_survives_its_waiting_events_being_dropped_meanwhile(
    monkeypatch,
) -> None:
    """Found by the load benchmark: a connection that subscribed (dropping the other
    sessions' waiting events) while its sender was between the wait and the take."""
    bus = EventBus()
    with bus.subscribe() as events:
        bus.publish(delta("r2", 0, "other session", session="b"))
        checkpoint = trio.lowlevel.checkpoint

        async def narrowed_meanwhile() -> None:
            events.follow_session("a")  # drops b's waiting event
            await checkpoint()

        monkeypatch.setattr(trio.lowlevel, "checkpoint", narrowed_meanwhile)
        got = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                got.append(await events.__anext__())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()  # parked again: nothing buffered
            monkeypatch.setattr(trio.lowlevel, "checkpoint", checkpoint)
            bus.publish(delta("r1", 0, "mine", session="a"))
    assert [e.text for e in got] == ["mine"]

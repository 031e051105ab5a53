"""Subscriber buffers: bounded in bytes, deltas merged when full in O(new text), terminal
events never dropped; a subscriber past its byte bound is told, not silently cut."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel

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
from runtime._bus import EVENT_OVERHEAD, EventBus
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

"""One converter for every event: round trips, strict types, readable errors."""

from __future__ import annotations

import json

import cattrs
import pytest

from runtime import (
    Event,
    Message,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunQueued,
    RunStarted,
    StopTimings,
    StreamOptions,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCallFinished,
    ToolCallStarted,
    ToolReceipt,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    converter,
)

IDS = {"run_id": "r", "session_key": "s", "seq": 3}
PARTIAL = Message(
    "assistant",
    (ThinkingBlock("hmm"), TextBlock("Hel"), ToolUseBlock("c1", "t", {"q": [1]})),
    1.5,
    {"run_id": "r", "aborted": True, "origin": "rpc"},
)
EVENTS = [
    RunQueued(**IDS, prompt="hi", behind="r0"),
    RunStarted(**IDS, prompt="hi"),
    StreamOptions(**IDS, allow_cancel=True),
    TextDelta(**IDS, text="Hel"),
    ThinkingDelta(**IDS, text="hmm"),
    ToolCallStarted(**IDS, tool_call_id="c1", name="t", arguments={"q": [1]}),
    ToolCallFinished(**IDS, tool_call_id="c1", name="t", is_error=False, result="ok"),
    RunFinished(**IDS, stop_reason="end_turn", message=PARTIAL, usage=Usage(1, 2)),
    RunCancelled(
        **IDS,
        reason="rpc",
        policy="rollback",
        message=None,
        receipt=(ToolReceipt("c1", "t", "cancelled"),),
        usage=Usage(1, 2, True),
        timings=StopTimings(0.5, 1.25),
        restored_prompt="hi",
    ),
    RunFailed(**IDS, error_kind="rate_limit", error_message="Slow down."),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_json(event) -> None:
    wire = json.loads(json.dumps(converter.unstructure(event, Event)))
    assert wire["type"] and wire["run_id"] == "r" and wire["seq"] == 3
    assert converter.structure(wire, Event) == event


def test_the_tags_are_distinct() -> None:
    tags = [converter.unstructure(e, Event)["type"] for e in EVENTS]
    assert len(set(tags)) == len(tags)


def test_a_tool_result_block_round_trips_inside_a_message() -> None:
    message = Message("tool", (ToolResultBlock("c1", "boom", True),), 2.0, {"run_id": "r"})
    assert converter.structure(converter.unstructure(message), Message) == message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"seq": "3"}, "invalid value for type, expected int @ $.seq"),
        ({"text": 5}, "invalid value for type, expected str @ $.text"),
        ({"run_id": None}, "@ $.run_id"),
        ({"surprise": 1}, "extra fields found (surprise) @ $"),
    ],
)
def test_wrong_types_are_refused_with_the_field_named(change, expected) -> None:
    wire = {**converter.unstructure(EVENTS[3], Event), **change}
    with pytest.raises(Exception) as caught:
        converter.structure(wire, Event)
    messages = cattrs.transform_error(caught.value)
    assert any(expected in m for m in messages), messages

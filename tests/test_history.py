"""What counts as valid history (invariant 2), and what a stop leaves."""

from __future__ import annotations

import pytest

from runtime import (
    InvalidHistory,
    Message,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    validate_history,
)
from runtime._model import TextChunk, ThinkingChunk, ToolCallArgs, ToolCallBegin, ToolCallEnd
from runtime._state import RunState


def user(text="hi"):
    return Message("user", (TextBlock(text),))


def assistant(*blocks):
    return Message("assistant", blocks)


def results(*ids):
    return Message("tool", tuple(ToolResultBlock(i, "r") for i in ids))


CALL = ToolUseBlock("c1", "t", {})


@pytest.mark.parametrize(
    "history",
    [
        [user()],
        [user(), assistant(TextBlock("a"))],
        [user(), assistant(CALL), results("c1"), assistant(TextBlock("done"))],
        [user(), assistant(CALL), results("c1"), user("next")],
        [user(), user("again")],
        [user(), assistant(ThinkingBlock("hmm"))],
    ],
)
def test_valid_histories(history) -> None:
    validate_history(history)


@pytest.mark.parametrize(
    ("history", "fragment"),
    [
        ([assistant(TextBlock("a"))], "must start with a user message"),
        ([user(), assistant(TextBlock("  "))], "assistant message is empty"),
        ([user(), assistant()], "assistant message is empty"),
        ([user(), assistant(TextBlock("a")), assistant(TextBlock("b"))], "two assistant messages"),
        ([user(), assistant(CALL)], "have no result at the end"),
        ([user(), assistant(CALL), user("x")], "have no result before it"),
        ([user(), assistant(CALL), results("c2")], "do not match"),
        ([user(), results("c1")], "answers no tool call"),
        ([user(), assistant(CALL, CALL), results("c1", "c1")], "used twice"),
        ([Message("user", ())], "user message is empty"),
    ],
)
def test_invalid_histories_name_the_problem(history, fragment) -> None:
    with pytest.raises(InvalidHistory, match=fragment):
        validate_history(history)


def stop_after(*events):
    state = RunState("r")
    for event in events:
        state.apply(event)
    items, receipt = state.close({"aborted": True})
    validate_history([user(), *items])
    return items, receipt


def test_close_with_nothing_said_adds_nothing() -> None:
    assert stop_after() == ([], ())


def test_close_mid_text_keeps_text_and_thinking() -> None:
    items, _ = stop_after(ThinkingChunk("let me see"), TextChunk("The ans"))
    assert items[0].content == (ThinkingBlock("let me see"), TextBlock("The ans"))
    assert items[0].meta == {"run_id": "r", "aborted": True}


def test_close_answers_every_complete_call_and_drops_the_cut_one() -> None:
    items, receipt = stop_after(
        ToolCallBegin("c1", "a"),
        ToolCallArgs("c1", "{}"),
        ToolCallEnd("c1", {}),
        ToolCallBegin("c2", "b"),
        ToolCallArgs("c2", '{"x": '),
    )
    assert [b.id for b in items[0].tool_uses()] == ["c1"]
    assert [b.tool_call_id for b in items[1].content] == ["c1"]
    assert "stopped before this tool started" in items[1].content[0].content
    assert [(r.tool_call_id, r.status) for r in receipt] == [
        ("c1", "not_started"),
        ("c2", "not_started"),
    ]


def test_close_of_whitespace_only_text_adds_no_empty_message() -> None:
    assert stop_after(TextChunk("   ")) == ([], ())

"""Run events: what subscribers see of a run, as one tagged union with one converter.

Every event carries ``run_id``, ``session_key`` and ``seq``, counted per run from 0.
Each run emits exactly one terminal event (``RunFinished``, ``RunCancelled`` or
``RunFailed``) and nothing after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import cattrs
from cattrs.preconf.json import make_converter
from cattrs.strategies import configure_tagged_union

from ._history import Block, Message, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock
from ._model import ErrorKind

StopPolicy = Literal["keep_partial", "rollback"]
ConcurrencyPolicy = Literal["enqueue", "reject", "interrupt", "rollback"]
ToolStatus = Literal["finished", "cancelled", "not_started"]
# why a run failed: the model's error kinds, and ``store`` when its result was not saved
FailureKind = ErrorKind | Literal["store"]

STOP_POLICIES: tuple[StopPolicy, ...] = ("keep_partial", "rollback")
CONCURRENCY_POLICIES: tuple[ConcurrencyPolicy, ...] = ("enqueue", "reject", "interrupt", "rollback")


@attrs.frozen
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    # True when output_tokens was counted here because the provider never said.
    estimated: bool = False


@attrs.frozen
class ToolReceipt:
    """What became of one tool call when the run stopped. ``cancelled`` means it was
    running: its side effects are unknown."""

    tool_call_id: str
    name: str
    status: ToolStatus
    # For a cancelled call: how the tool passed the stop on to whatever did the work, in
    # its own words (an MCP server sent ``notifications/cancelled``, say). None: nobody
    # was told, or the tool has no one to tell.
    cancel_delivered: str | None = None


@attrs.frozen
class StopTimings:
    """Milliseconds from the abort request to the scope's exit and to the commit."""

    scope_exited_ms: float
    committed_ms: float


@attrs.frozen(kw_only=True)
class RunStarted:
    run_id: str
    session_key: str
    seq: int
    prompt: str


@attrs.frozen(kw_only=True)
class RunQueued:
    """The run waits behind a live run of its session."""

    run_id: str
    session_key: str
    seq: int
    prompt: str
    behind: str  # the run_id it waits for


@attrs.frozen(kw_only=True)
class StreamOptions:
    """Sent right after RunStarted: whether a UI should offer Stop for this run."""

    run_id: str
    session_key: str
    seq: int
    allow_cancel: bool


@attrs.frozen(kw_only=True)
class TextDelta:
    run_id: str
    session_key: str
    seq: int
    text: str


@attrs.frozen(kw_only=True)
class ThinkingDelta:
    run_id: str
    session_key: str
    seq: int
    text: str


@attrs.frozen(kw_only=True)
class ToolCallStarted:
    run_id: str
    session_key: str
    seq: int
    tool_call_id: str
    name: str
    arguments: Mapping[str, Any]


@attrs.frozen(kw_only=True)
class ToolCallFinished:
    run_id: str
    session_key: str
    seq: int
    tool_call_id: str
    name: str
    is_error: bool
    result: str


@attrs.frozen(kw_only=True)
class ToolCallProgress:
    """A running tool said how far it got (an MCP server's progress notification, say).
    ``total`` is None when the tool does not know it; ``message`` is its own words."""

    run_id: str
    session_key: str
    seq: int
    tool_call_id: str
    name: str
    progress: float
    total: float | None = None
    message: str | None = None


@attrs.frozen(kw_only=True)
class RunFinished:
    run_id: str
    session_key: str
    seq: int
    stop_reason: str  # the model's (end_turn, max_tokens, ...) or a budget's (max_turns, ...)
    message: Message | None
    usage: Usage


@attrs.frozen(kw_only=True)
class RunCancelled:
    """The run was stopped. Sent after the stop commit, so history already holds what it
    says: ``message`` is the partial reply as kept (None when nothing was said or the
    policy rolled it back); ``restored_prompt`` is the prompt that left history (rollback,
    or a run stopped while queued)."""

    run_id: str
    session_key: str
    seq: int
    reason: str
    policy: StopPolicy
    message: Message | None
    receipt: tuple[ToolReceipt, ...]
    usage: Usage
    timings: StopTimings
    restored_prompt: str | None = None


@attrs.frozen(kw_only=True)
class RunFailed:
    run_id: str
    session_key: str
    seq: int
    error_kind: FailureKind
    error_message: str


Event = (
    RunQueued
    | RunStarted
    | StreamOptions
    | TextDelta
    | ThinkingDelta
    | ToolCallStarted
    | ToolCallProgress
    | ToolCallFinished
    | RunFinished
    | RunCancelled
    | RunFailed
)
TerminalEvent = RunFinished | RunCancelled | RunFailed
TERMINAL_EVENTS = (RunFinished, RunCancelled, RunFailed)

EVENT_TAGS: dict[type, str] = {
    RunQueued: "run.queued",
    RunStarted: "run.started",
    StreamOptions: "run.stream_options",
    TextDelta: "text.delta",
    ThinkingDelta: "thinking.delta",
    ToolCallStarted: "tool.started",
    ToolCallProgress: "tool.progress",
    ToolCallFinished: "tool.finished",
    RunFinished: "run.finished",
    RunCancelled: "run.cancelled",
    RunFailed: "run.failed",
}


def is_terminal(event: Event) -> bool:
    return isinstance(event, TERMINAL_EVENTS)


def _make_converter() -> cattrs.Converter:
    converter = make_converter(forbid_extra_keys=True)

    def strict(kind: type) -> Any:
        def structure(value: Any, _: type) -> Any:
            # The default hooks coerce (5 -> "5"); a wire value of the wrong type is an error.
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            return value

        return structure

    for kind in (str, int, bool, float):
        converter.register_structure_hook(kind, strict(kind))
    configure_tagged_union(
        Block,
        converter,
        tag_name="type",
        tag_generator={
            TextBlock: "text",
            ThinkingBlock: "thinking",
            ToolUseBlock: "tool_use",
            ToolResultBlock: "tool_result",
        }.__getitem__,
    )
    configure_tagged_union(Event, converter, tag_name="type", tag_generator=EVENT_TAGS.__getitem__)
    return converter


converter: cattrs.Converter = _make_converter()
"""The one converter for events, messages and checkpoints (JSON-ready values)."""

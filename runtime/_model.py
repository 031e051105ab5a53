"""The Model port: one model turn, streamed as typed model events inside ``async with``.

An adapter implements ``Model.stream(request)``, an async context manager that yields an
async iterator of ``ModelEvent``. The context manager owns the provider connection:
leaving it, normally or by cancellation, closes that connection at once. The runtime
consumes the iterator with no awaits of its own between events, so a cancel always lands
on the adapter's socket read, never in the runtime's bookkeeping.

Failures are raised as ``ModelError`` with a ``kind`` the runtime and the gateway branch
on; adapters map their provider's errors to it at one boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import attrs

from ._history import Message

ErrorKind = Literal[
    "refusal",
    "timeout",
    "rate_limit",
    "overloaded",
    "context_length",
    "bad_response",
    "unavailable",
    "unknown",
]


@attrs.frozen
class ToolSpec:
    """What the model is told about a tool."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON schema object


@attrs.frozen
class ModelRequest:
    messages: Sequence[Message]
    tools: Sequence[ToolSpec] = ()
    system: str | None = None
    thinking: bool = False
    max_tokens: int = 4096


# -- model events ---------------------------------------------------------------------


@attrs.frozen
class TextChunk:
    text: str


@attrs.frozen
class ThinkingChunk:
    text: str
    signature: str | None = None  # sent once, when the provider signs the thinking block


@attrs.frozen
class ToolCallBegin:
    id: str
    name: str


@attrs.frozen
class ToolCallArgs:
    """A fragment of the tool call's JSON arguments, in order."""

    id: str
    fragment: str


@attrs.frozen
class ToolCallEnd:
    """The arguments are complete; ``arguments`` is their parsed value."""

    id: str
    arguments: Mapping[str, Any]


@attrs.frozen
class UsageReport:
    """Token counts so far. Later reports replace earlier ones field by field (None keeps
    the earlier value), since providers send input tokens first and output tokens last."""

    input_tokens: int | None = None
    output_tokens: int | None = None


@attrs.frozen
class TurnEnd:
    """The model ended its turn. ``stop_reason``: ``end_turn``, ``tool_use``,
    ``max_tokens``, ``stop_sequence``, or the provider's own word."""

    stop_reason: str


ModelEvent = (
    TextChunk | ThinkingChunk | ToolCallBegin | ToolCallArgs | ToolCallEnd | UsageReport | TurnEnd
)


class ModelError(Exception):
    """A model turn failed. ``kind`` says how; the message is a full sentence that never
    contains a secret."""

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.retry_after = retry_after


class Model(Protocol):
    """Streams one model turn. See the module docstring for the contract."""

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]: ...

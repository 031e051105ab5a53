"""History items: the provider-neutral messages a session is made of.

A message is a role and a tuple of content blocks, close to Anthropic's shape because it
is the richest; adapters translate to and from each provider. ``validate_history`` states
what "valid input for the next model request" means (invariant 2), so tests and the stop
commit check the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

Role = Literal["user", "assistant", "tool"]


@attrs.frozen
class TextBlock:
    text: str


@attrs.frozen
class ThinkingBlock:
    """Model reasoning. ``signature`` is the provider's proof of origin, when it gave one;
    a thinking block cut short by a stop has none and adapters must not send it back."""

    text: str
    signature: str | None = None


@attrs.frozen
class ToolUseBlock:
    id: str
    name: str
    arguments: Mapping[str, Any]


@attrs.frozen
class ToolResultBlock:
    tool_call_id: str
    content: str
    is_error: bool = False


Block = TextBlock | ThinkingBlock | ToolUseBlock | ToolResultBlock


@attrs.frozen
class Message:
    """One history item.

    ``meta`` carries what is not content: the ``run_id`` that produced it, abort
    metadata on a partial reply (``{"aborted": True, "origin": ..., "run_id": ...}``),
    ``hidden`` for notes the model sees but a transcript does not show.
    """

    role: Role
    content: tuple[Block, ...]
    timestamp: float = 0.0
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def text(self) -> str:
        """The concatenated text blocks."""
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    def tool_uses(self) -> tuple[ToolUseBlock, ...]:
        return tuple(b for b in self.content if isinstance(b, ToolUseBlock))


class InvalidHistory(ValueError):
    """The history would be rejected by a provider; the message says where."""


def validate_history(messages: Sequence[Message]) -> None:
    """Raise InvalidHistory unless ``messages`` is valid input for a model request.

    The rule: the first message is from the user; no assistant message is empty; no two
    assistant messages are adjacent; every tool call is answered by the tool message
    right after it, with exactly one result per call, and no result answers nothing.
    Consecutive user messages are allowed (adapters merge them where a provider needs
    strict alternation).
    """
    open_calls: set[str] | None = None
    previous: Role | None = None
    for index, message in enumerate(messages):
        where = f"message {index} ({message.role})"
        if index == 0 and message.role != "user":
            raise InvalidHistory(f"{where}: history must start with a user message.")
        if open_calls is not None and message.role != "tool":
            raise InvalidHistory(
                f"{where}: tool calls {sorted(open_calls)} have no result before it."
            )
        if message.role == "assistant":
            if previous == "assistant":
                raise InvalidHistory(f"{where}: two assistant messages in a row.")
            if not any(has_content(b) for b in message.content):
                raise InvalidHistory(f"{where}: the assistant message is empty.")
            if any(isinstance(b, ToolResultBlock) for b in message.content):
                raise InvalidHistory(f"{where}: an assistant message holds a tool result.")
            calls = [b.id for b in message.tool_uses()]
            if len(set(calls)) != len(calls):
                raise InvalidHistory(f"{where}: a tool call id is used twice.")
            open_calls = set(calls) or None
        elif message.role == "tool":
            if open_calls is None:
                raise InvalidHistory(f"{where}: a tool result answers no tool call.")
            results = [b for b in message.content if isinstance(b, ToolResultBlock)]
            if len(results) != len(message.content):
                raise InvalidHistory(f"{where}: a tool message holds something else.")
            answered = [r.tool_call_id for r in results]
            if sorted(answered) != sorted(open_calls):
                raise InvalidHistory(
                    f"{where}: results for {sorted(answered)} do not match the calls "
                    f"{sorted(open_calls)}."
                )
            open_calls = None
        elif message.role == "user":
            if not message.content or not any(has_content(b) for b in message.content):
                raise InvalidHistory(f"{where}: the user message is empty.")
            if any(not isinstance(b, TextBlock) for b in message.content):
                raise InvalidHistory(f"{where}: a user message holds something but text.")
        previous = message.role
    if open_calls is not None:
        raise InvalidHistory(f"tool calls {sorted(open_calls)} have no result at the end.")


def has_content(block: Block) -> bool:
    """Whether a block says anything: blank text or thinking does not."""
    if isinstance(block, TextBlock | ThinkingBlock):
        return bool(block.text.strip())
    return True

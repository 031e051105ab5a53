"""What of a session's history is sent to the model: the newest whole exchanges that fit.

A long session must not end in ``context_length`` forever, and reading and decoding its
whole history at every run start costs the event loop time that grows with the session.
So a run reads at most ``MAX_HISTORY_READ`` messages, then keeps the newest *exchanges*
(a user message and everything after it up to the next user message) whose size fits
the budget. Cutting only at user messages keeps the result valid history: no tool result
without its call, no assistant message first. The newest exchange, which holds the
run's own prompt, is always kept, even when it alone is over the budget.

Sizes are counted in characters of text, thinking, tool arguments and tool results, a
provider-neutral stand-in for tokens (about four characters a token in English).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ._history import Message, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock

MAX_HISTORY_READ = 2000


def fit_context(history: Sequence[Message], budget: int | None) -> list[Message]:
    """The newest whole exchanges of ``history`` whose total size is within ``budget``
    characters (all of them when None), always at least the last one."""
    starts = [i for i, message in enumerate(history) if message.role == "user"]
    if not starts:
        return []
    keep = starts[-1]
    if budget is not None:
        size = sum(message_size(m) for m in history[keep:])
        for start, end in zip(reversed(starts[:-1]), reversed(starts[1:]), strict=True):
            size += sum(message_size(m) for m in history[start:end])
            if size > budget:
                break
            keep = start
    else:
        keep = starts[0]
    return list(history[keep:])


def message_size(message: Message) -> int:
    """A message's size in characters, as counted against the context budget."""
    total = 0
    for block in message.content:
        if isinstance(block, TextBlock | ThinkingBlock):
            total += len(block.text)
        elif isinstance(block, ToolUseBlock):
            total += len(block.name) + len(json.dumps(block.arguments))
        elif isinstance(block, ToolResultBlock):
            total += len(block.content)
    return total

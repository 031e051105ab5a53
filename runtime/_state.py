"""A run's progress, recorded synchronously as model events arrive.

``RunState`` is plain data: the agent loop updates it with no awaits (so a cancel never
lands half-way through an update), and ``close`` turns it into the history items a stop
commits. The checkpoint task saves it incrementally: ``checkpoint_fragment`` returns only
what changed since the last saved fragment (new messages, new text), so the bytes written
per tick stay O(new output) however long the reply. Crash recovery replays the fragments
(``from_checkpoint``) and calls the same ``close``, so a run stopped by ``chat.abort`` and
a run stopped by a dead process leave history in the same valid shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ._events import ToolReceipt, Usage, converter
from ._history import (
    Block,
    Message,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    has_content,
)
from ._model import (
    ModelEvent,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallEnd,
    TurnEnd,
    UsageReport,
)

CallState = Literal["streaming", "ready", "running", "done"]

CANCELLED_RESULT = (
    "Not completed: the run was stopped while this tool was running, so its side effects "
    "are unknown."
)
NOT_STARTED_RESULT = "Not run: the run was stopped before this tool started."
BUDGET_RESULT = "Not run: the run's tool-call budget is exhausted."

# A rough count for runs whose provider never reported output tokens.
_CHARS_PER_TOKEN = 4


@attrs.define
class PendingCall:
    """A tool call of the current turn, from its first argument byte to its result."""

    id: str
    name: str
    arguments_json: str = ""
    arguments: Mapping[str, Any] | None = None
    state: CallState = "streaming"
    result: str | None = None
    is_error: bool = False
    cancel_delivered: str | None = None  # see ToolReceipt.cancel_delivered


@attrs.define
class RunState:
    run_id: str
    # Messages this run completed (after its prompt): assistant turns and tool results.
    items: list[Message] = attrs.Factory(list)
    text: str = ""
    thinking: str = ""
    thinking_signature: str | None = None
    calls: list[PendingCall] = attrs.Factory(list)
    turn_stop_reason: str | None = None
    receipts: list[ToolReceipt] = attrs.Factory(list)
    # usage: totals of finished turns, and what the current turn reported so far
    input_tokens: int | None = None
    output_tokens: int | None = None
    turn_input: int | None = None
    turn_output: int | None = None
    turn_chars: int = 0
    estimated: bool = False
    version: int = 0  # bumped on every change, so the checkpoint task skips idle ticks
    turns: int = 0
    tool_calls: int = 0
    # how much of items, text, thinking and receipts the saved fragments hold, and of
    # which turn (text and thinking start again at each turn)
    saved: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    def apply(self, event: ModelEvent) -> None:
        """Record one model event. Synchronous on purpose: see the module docstring."""
        self.version += 1
        match event:
            case TextChunk(text):
                self.text += text
                self.turn_chars += len(text)
            case ThinkingChunk(text, signature):
                self.thinking += text
                self.turn_chars += len(text)
                if signature is not None:
                    self.thinking_signature = signature
            case ToolCallBegin(call_id, name):
                self.calls.append(PendingCall(call_id, name))
            case ToolCallArgs(call_id, fragment):
                self._call(call_id).arguments_json += fragment
                self.turn_chars += len(fragment)
            case ToolCallEnd(call_id, arguments):
                call = self._call(call_id)
                call.arguments = dict(arguments)
                call.state = "ready"
            case UsageReport(input_tokens, output_tokens):
                if input_tokens is not None:
                    self.turn_input = input_tokens
                if output_tokens is not None:
                    self.turn_output = output_tokens
            case TurnEnd(stop_reason):
                self.turn_stop_reason = stop_reason

    def end_turn(self) -> list[PendingCall]:
        """The model ended its turn: keep its message, return the calls to run."""
        message = self._turn_message(meta={})
        if message is not None:
            self.items.append(message)
        self._settle_usage()
        self.turns += 1
        self.text, self.thinking, self.thinking_signature = "", "", None
        self.calls = [c for c in self.calls if c.state == "ready"]
        return list(self.calls)

    def end_tool_round(self) -> None:
        """Every call of the turn has a result: add the tool message."""
        self.version += 1
        self.items.append(self._tool_message(self.calls))
        self.receipts.extend(self._receipt(c) for c in self.calls)
        self.calls = []

    def close(self, meta: Mapping[str, Any]) -> tuple[list[Message], tuple[ToolReceipt, ...]]:
        """Everything the run produced, as valid history, and the fate of each tool call.

        The partial assistant message (text and thinking delivered so far, tool calls whose
        arguments were complete) carries ``meta``. Every complete tool call gets a result:
        its real one, or a synthesized one saying it was cancelled or never started. A
        call whose arguments were cut off is dropped from history (it never ran) and
        listed as not started.
        """
        items = list(self.items)
        # After end_turn the turn's message is the last item (its tool round is under way);
        # before it, the turn is open even if all it said was complete tool calls.
        if items and items[-1].role == "assistant":
            items[-1] = attrs.evolve(items[-1], meta={**items[-1].meta, **meta})
        elif (message := self._turn_message(meta=meta)) is not None:
            items.append(message)
        answered = [c for c in self.calls if c.arguments is not None]
        if answered:
            items.append(self._tool_message(answered))
        receipts = (*self.receipts, *(self._receipt(c) for c in self.calls))
        return items, receipts

    def checkpoint_fragment(self) -> tuple[dict[str, Any], tuple[int, int, int, int, int]]:
        """What changed since the last saved fragment, and the marks to pass to
        ``fragment_saved`` once it is written. Cheap and synchronous: the fragment holds
        references (messages and strings are immutable; calls are copied), and
        ``encode_fragment`` turns it into JSON off the event loop."""
        items, text, thinking, turn, receipts = self.saved
        if turn != self.turns:
            text = thinking = 0
        fragment = {
            "turn": self.turns,
            "items": self.items[items:],
            "text": self.text[text:],
            "thinking": self.thinking[thinking:],
            "signature": self.thinking_signature,
            "calls": [attrs.evolve(c) for c in self.calls],
            "receipts": self.receipts[receipts:],
            "usage": [
                self.input_tokens,
                self.output_tokens,
                self.turn_input,
                self.turn_output,
                self.turn_chars,
                self.estimated,
            ],
            "tool_calls": self.tool_calls,
        }
        marks = (
            len(self.items),
            len(self.text),
            len(self.thinking),
            self.turns,
            len(self.receipts),
        )
        return fragment, marks

    def fragment_saved(self, marks: tuple[int, int, int, int, int]) -> None:
        self.saved = marks

    @classmethod
    def from_checkpoint(cls, run_id: str, checkpoint: str) -> RunState:
        """Replay saved fragments (one JSON document a line). Raises ValueError (or a
        cattrs error) for a checkpoint it cannot read. A line that holds a whole
        ``RunState`` (the format before fragments) is read as it is."""
        state = cls(run_id)
        for line in checkpoint.splitlines():
            doc = json.loads(line)
            if "run_id" in doc:
                state = converter.structure(doc, RunState)
                continue
            if doc["turn"] != state.turns:
                state.text = state.thinking = ""
                state.turns = doc["turn"]
            state.items.extend(converter.structure(doc["items"], list[Message]))
            state.text += doc["text"]
            state.thinking += doc["thinking"]
            state.thinking_signature = doc["signature"]
            state.calls = converter.structure(doc["calls"], list[PendingCall])
            state.receipts.extend(converter.structure(doc["receipts"], list[ToolReceipt]))
            (
                state.input_tokens,
                state.output_tokens,
                state.turn_input,
                state.turn_output,
                state.turn_chars,
                state.estimated,
            ) = doc["usage"]
            state.tool_calls = doc["tool_calls"]
        return state

    def reply_text(self) -> str:
        """The text of every turn so far: what subscribers have been sent as text deltas."""
        done = "".join(m.text for m in self.items if m.role == "assistant")
        return done + self.text

    def usage(self) -> Usage:
        """Usage so far, the current turn included; output estimated where never reported."""
        output = self.turn_output
        estimated = self.estimated
        if output is None and self.turn_chars:
            output, estimated = -(-self.turn_chars // _CHARS_PER_TOKEN), True
        return Usage(
            input_tokens=_add(self.input_tokens, self.turn_input),
            output_tokens=_add(self.output_tokens, output),
            estimated=estimated,
        )

    def _settle_usage(self) -> None:
        settled = self.usage()
        self.input_tokens, self.output_tokens = settled.input_tokens, settled.output_tokens
        self.estimated = settled.estimated
        self.turn_input = self.turn_output = None
        self.turn_chars = 0

    def _call(self, call_id: str) -> PendingCall:
        for call in self.calls:
            if call.id == call_id:
                return call
        raise ValueError(f"The model sent arguments for an unknown tool call {call_id!r}.")

    def _turn_message(self, meta: Mapping[str, Any]) -> Message | None:
        blocks: list[Block] = []
        if self.thinking:
            blocks.append(ThinkingBlock(self.thinking, self.thinking_signature))
        if self.text:
            blocks.append(TextBlock(self.text))
        blocks.extend(
            ToolUseBlock(c.id, c.name, c.arguments) for c in self.calls if c.arguments is not None
        )
        if not any(has_content(b) for b in blocks):
            return None
        return Message("assistant", tuple(blocks), time.time(), {"run_id": self.run_id, **meta})

    def _tool_message(self, calls: list[PendingCall]) -> Message:
        results = tuple(
            ToolResultBlock(c.id, c.result, c.is_error)
            if c.result is not None
            else ToolResultBlock(
                c.id, CANCELLED_RESULT if c.state == "running" else NOT_STARTED_RESULT, True
            )
            for c in calls
        )
        return Message("tool", results, time.time(), {"run_id": self.run_id})

    @staticmethod
    def _receipt(call: PendingCall) -> ToolReceipt:
        status = {"done": "finished", "running": "cancelled"}.get(call.state, "not_started")
        delivered = call.cancel_delivered if status == "cancelled" else None
        return ToolReceipt(call.id, call.name, status, delivered)  # type: ignore[arg-type]


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


def encode_fragment(fragment: Mapping[str, Any]) -> str:
    """One fragment as one line of JSON. Run it in a thread: a tool result may be large."""
    doc = {
        **fragment,
        "items": converter.unstructure(fragment["items"], list[Message]),
        "calls": converter.unstructure(fragment["calls"], list[PendingCall]),
        "receipts": converter.unstructure(fragment["receipts"], list[ToolReceipt]),
    }
    return json.dumps(doc, separators=(",", ":"))

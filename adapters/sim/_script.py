"""One simulated reply as a list of wire-neutral steps, and the seam to the wire formats.

The reply is decided in full before the first byte goes out: a list of content steps with
``Silence`` steps between them. The server walks the list, sleeping on ``Silence`` and
rendering every other step through the request's wire format. Keeping timing and content
out of the formats means clients of every dialect see exactly the same reply, with
the same pauses, so a benchmark can compare them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, Protocol

import attrs

from ._directives import Directive
from ._text import THINKING_WORDS, reply_words

DEFAULT_WORDS: Final = 150  # the no-directive reply
SHORT_REPLY_WORDS: Final = 12  # the reply after the tool results are in
TOOL_ARG_WORDS: Final = 4  # words in the tool call's {"text": ...} argument
TOOL_ARG_FRAGMENT: Final = 8  # characters per streamed arguments fragment
FAULT_AFTER_DELTAS: Final = 3  # fail=reset|garbage|error_event strikes after this many deltas
SIGNATURE: Final = "c2ltLXNpZ25hdHVyZQ=="  # base64 of "sim-signature"; opaque to clients

StopReason = Literal["end_turn", "tool_use", "max_tokens", "refusal"]


class RequestError(ValueError):
    """The request body is not one the sim can answer (HTTP 400)."""


@attrs.frozen
class Facts:
    """What the sim needs to know about one request, whatever its wire format."""

    user_text: str  # the last user text message, where the directive lives
    thinking: bool  # the request enabled thinking / reasoning
    tool_results: tuple[str | None, ...]  # per result after that message: its tool's name
    max_tokens: int | None
    input_tokens: int

    def results_for(self, tool: str) -> int:
        """Results answering ``tool``; a result whose call is not in the history counts."""
        return sum(1 for name in self.tool_results if name is None or name == tool)


# -- steps ----------------------------------------------------------------------------


@attrs.frozen
class Silence:
    """Send nothing for ``seconds``: not a byte, not a ping."""

    seconds: float


@attrs.frozen
class Begin:
    input_tokens: int


@attrs.frozen
class ThinkingDelta:
    text: str


@attrs.frozen
class ThinkingSignature:
    signature: str


@attrs.frozen
class TextDelta:
    text: str


@attrs.frozen
class ToolCallBegin:
    number: int  # 1 for the first call after the user's message; formats build ids from it
    name: str


@attrs.frozen
class ToolArgsDelta:
    fragment: str


@attrs.frozen
class ToolCallEnd:
    """The call's arguments are complete; a pause follows before the reply finishes."""


@attrs.frozen
class Finish:
    stop_reason: StopReason
    output_tokens: int


@attrs.frozen
class Garbage:
    """A malformed event; the reply then goes on as if nothing happened."""


@attrs.frozen
class ErrorEvent:
    """A mid-stream provider error (overloaded); the response then ends cleanly."""


@attrs.frozen
class Abort:
    """Drop the connection without finishing the response (fail=reset)."""


Step = (
    Silence
    | Begin
    | ThinkingDelta
    | ThinkingSignature
    | TextDelta
    | ToolCallBegin
    | ToolArgsDelta
    | ToolCallEnd
    | Finish
    | Garbage
    | ErrorEvent
    | Abort
)
_DELTAS: Final = (ThinkingDelta, TextDelta, ToolArgsDelta)


class Renderer(Protocol):
    """Turns steps into one response's bytes; stateful (block indices and the like)."""

    def render(self, step: Step) -> bytes: ...


class WireFormat(Protocol):
    """One provider's dialect: how to read a request, stream a reply, and word an error."""

    def parse(self, body: Mapping[str, Any]) -> Facts: ...

    def renderer(self, body: Mapping[str, Any], response_id: int) -> Renderer: ...

    def error_body(self, status: int, message: str) -> bytes: ...


# -- the script -----------------------------------------------------------------------


def build_script(directive: Directive, facts: Facts) -> list[Step]:
    """The whole reply ``directive`` asks for, given what the request contains."""
    steps: list[Step] = []
    if directive.think > 0:
        steps.append(Silence(directive.think))
    steps.append(Begin(facts.input_tokens))
    gap = Silence(1.0 / directive.rate)
    deltas = 0

    def emit(step: Step) -> None:
        nonlocal deltas
        if deltas:
            steps.append(gap)
        steps.append(step)
        deltas += 1

    if facts.thinking:
        for index, word in enumerate(THINKING_WORDS):
            emit(ThinkingDelta(word if index == len(THINKING_WORDS) - 1 else word + " "))
        steps.append(ThinkingSignature(SIGNATURE))

    limit = directive.max_tokens if directive.max_tokens is not None else facts.max_tokens
    done = facts.results_for(directive.tool) if directive.tool else 0
    if directive.tool is not None and done < directive.repeat:
        steps.append(ToolCallBegin(done + 1, directive.tool))
        arguments = json.dumps(
            directive.args
            if directive.args is not None
            else {"text": " ".join(reply_words(TOOL_ARG_WORDS, start=done * TOOL_ARG_WORDS))}
        )
        fragments = [
            arguments[start : start + TOOL_ARG_FRAGMENT]
            for start in range(0, len(arguments), TOOL_ARG_FRAGMENT)
        ]
        for fragment in fragments[:limit]:
            emit(ToolArgsDelta(fragment))
        if limit is not None and limit < len(fragments):
            steps += [gap, Finish("max_tokens", deltas)]  # cut off mid arguments
        else:
            steps += [ToolCallEnd(), gap, Finish("tool_use", deltas)]
    else:
        count = directive.words
        if count is None:
            count = SHORT_REPLY_WORDS if directive.tool is not None else DEFAULT_WORDS
        stop: StopReason = "end_turn"
        if limit is not None and count > limit:
            count, stop = limit, "max_tokens"
        words = reply_words(count)
        pause_after, pause = directive.pause_at or (-1, 0.0)
        if pause_after == 0:
            steps.append(Silence(pause))
        for number, word in enumerate(words, start=1):
            emit(TextDelta(word if number == len(words) else word + " "))
            if number == pause_after:
                steps.append(Silence(pause))
        steps.append(Finish(stop, deltas))

    if directive.fail == "garbage":
        steps = _inject(steps, Garbage(), terminal=False)
    elif directive.fail == "reset":
        steps = _inject(steps, Abort(), terminal=True)
    elif directive.fail == "error_event":
        steps = _inject(steps, ErrorEvent(), terminal=True)
    elif directive.fail == "refusal":
        steps = _inject(steps, Finish("refusal", FAULT_AFTER_DELTAS), terminal=True)
    return steps


def _inject(steps: Sequence[Step], fault: Step, *, terminal: bool) -> list[Step]:
    """``fault`` after the FAULT_AFTER_DELTAS-th delta, or before ``Finish`` if the reply is
    shorter; a terminal fault ends the script."""
    position, seen = len(steps), 0
    for index, step in enumerate(steps):
        if isinstance(step, Finish):
            position = index
            break
        if isinstance(step, _DELTAS):
            seen += 1
            if seen == FAULT_AFTER_DELTAS:
                position = index + 1
                break
    head = [*steps[:position], fault]
    return head if terminal else [*head, *steps[position:]]

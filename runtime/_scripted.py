"""An in-memory Model for unit tests of the core and for embedding demos.

Like httpx's ``MockTransport``, it takes a handler: a function from the request to the
steps of one turn. A step is a model event, a ``Pause`` (the model falls silent), or a
``ModelError`` to raise. It counts open streams, so a test can check that every stream
a run opened was closed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, final

import attrs
import trio

from ._model import (
    ModelError,
    ModelEvent,
    ModelRequest,
    TextChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallEnd,
    TurnEnd,
    UsageReport,
)


@attrs.frozen
class Pause:
    seconds: float


Step = ModelEvent | Pause | ModelError
Handler = Callable[[ModelRequest], Sequence[Step]]


@final
@attrs.define(eq=False)
class ScriptedModel:
    handler: Handler
    requests: list[ModelRequest] = attrs.field(factory=list, init=False)
    open_streams: int = attrs.field(default=0, init=False)

    @classmethod
    def from_turns(cls, *turns: Sequence[Step]) -> ScriptedModel:
        """A model that plays ``turns`` in order, one per request, then repeats the last."""
        played: list[int] = [0]

        def handler(_: ModelRequest) -> Sequence[Step]:
            index = min(played[0], len(turns) - 1)
            played[0] += 1
            return turns[index]

        return cls(handler)

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        self.open_streams += 1
        try:
            await trio.lowlevel.checkpoint()  # like a real connect: a place to be stopped
            self.requests.append(request)
            yield _Steps(list(self.handler(request)))
        finally:
            self.open_streams -= 1


@final
@attrs.define(eq=False)
class _Steps:
    """An iterator class, not an async generator, so a cancel leaves nothing unclosed."""

    _steps: list[Step]
    _index: int = 0

    def __aiter__(self) -> _Steps:
        return self

    async def __anext__(self) -> ModelEvent:
        while self._index < len(self._steps):
            step = self._steps[self._index]
            self._index += 1
            if isinstance(step, Pause):
                await trio.sleep(step.seconds)
            elif isinstance(step, ModelError):
                raise step
            else:
                await trio.lowlevel.checkpoint()
                return step
        raise StopAsyncIteration


def text_turn(*chunks: str, usage: UsageReport | None = None, pause: float = 0) -> list[Step]:
    """A turn that says ``chunks`` (with an optional pause between them) and ends."""
    steps: list[Step] = [usage or UsageReport(input_tokens=10)]
    for chunk in chunks:
        if pause:
            steps.append(Pause(pause))
        steps.append(TextChunk(chunk))
    steps += [UsageReport(output_tokens=len(chunks)), TurnEnd("end_turn")]
    return steps


def tool_turn(*calls: tuple[str, str, Mapping[str, Any]], text: str = "") -> list[Step]:
    """A turn that asks for tool calls ``(id, name, arguments)``."""
    steps: list[Step] = [UsageReport(input_tokens=10)]
    if text:
        steps.append(TextChunk(text))
    for call_id, name, arguments in calls:
        encoded = json.dumps(arguments)
        half = len(encoded) // 2
        steps += [
            ToolCallBegin(call_id, name),
            ToolCallArgs(call_id, encoded[:half]),
            ToolCallArgs(call_id, encoded[half:]),
            ToolCallEnd(call_id, arguments),
        ]
    steps.append(TurnEnd("tool_use"))
    return steps

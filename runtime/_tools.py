"""Tools: named async callables with a JSON schema, run inside the run's cancel scope."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, final

import attrs
import trio

from ._model import ToolSpec

ToolFn = Callable[[Mapping[str, Any]], Awaitable[Any]]


@final
@attrs.frozen
class Tool:
    """A tool the model may call. ``fn`` receives the parsed arguments and returns a
    string or a JSON-serialisable value. It runs in the run's nursery, so a stop cancels
    it at its next checkpoint; an exception becomes an error result the model sees."""

    name: str
    fn: ToolFn
    description: str = ""
    parameters: Mapping[str, Any] = attrs.field(factory=lambda: {"type": "object"})

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    @classmethod
    def from_sync(
        cls,
        name: str,
        fn: Callable[[Mapping[str, Any]], Any],
        description: str = "",
        parameters: Mapping[str, Any] | None = None,
        *,
        max_threads: int = 8,
    ) -> Tool:
        """A tool whose body is blocking code, run in a worker thread.

        A stop does not wait for the thread: it is abandoned (``abandon_on_cancel``) and
        its eventual result discarded, so the run still ends at once. An abandoned thread
        keeps its limiter token until its code returns, so each such tool has a limiter
        of its own, ``max_threads`` wide: calls that hang use up that tool's threads only,
        never the store's or another tool's, and a call waiting for a thread can be
        stopped like any other await.
        """
        limiter = trio.CapacityLimiter(max_threads)

        async def run_in_thread(arguments: Mapping[str, Any]) -> Any:
            return await trio.to_thread.run_sync(
                functools.partial(fn, arguments), abandon_on_cancel=True, limiter=limiter
            )

        return cls(name, run_in_thread, description, parameters or {"type": "object"})


async def call_tool(tool: Tool | None, name: str, arguments: Mapping[str, Any]) -> tuple[str, bool]:
    """Run one tool call and return ``(content, is_error)``. Cancellation propagates."""
    if tool is None:
        return f"There is no tool named {name!r}.", True
    try:
        result = await tool.fn(arguments)
    except Exception as exc:  # a tool's failure is the model's to see, not a crash
        return f"The tool raised {type(exc).__name__}: {exc}", True
    if isinstance(result, str):
        return result, False
    try:
        return json.dumps(result), False
    except (TypeError, ValueError) as exc:
        return f"The tool returned a value that is not JSON: {exc}", True

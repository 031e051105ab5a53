"""Tools: named async callables with a JSON schema, run inside the run's cancel scope."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, final

import attrs
import trio

from ._model import ToolSpec
from ._state import PendingCall

ToolFn = Callable[[Mapping[str, Any]], Awaitable[Any]]
# progress, total (None: unknown), message (None: none)
ProgressHook = Callable[[float, "float | None", "str | None"], None]

# A chatty tool cannot flood the subscribers: one progress event per call per interval.
PROGRESS_INTERVAL: Final = 0.1

logger = logging.getLogger("runtime.tools")

_current_call: ContextVar[ToolCall | None] = ContextVar("runtime_tool_call", default=None)


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


@final
@attrs.define(eq=False)
class ToolCall:
    """The call a tool is serving, for a tool that has more to say than its result.

    Inside ``Tool.fn``, ``current_tool_call()`` returns it (None outside a run's tool
    call). Both methods are synchronous and may be called from any task of the run's
    Trio thread while the call lasts; after the call has ended they do nothing, so a
    late progress report never follows the run's terminal event.
    """

    id: str
    name: str
    _pending: PendingCall
    _on_progress: ProgressHook | None = None
    _open: bool = True
    _last_progress: float = -PROGRESS_INTERVAL

    def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Tell the run's subscribers how far the tool got (a ``ToolCallProgress``)."""
        if not self._open:
            logger.debug("progress after tool call %s ended: dropped", self.id)
            return
        now = trio.current_time()
        if self._on_progress is None or now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        self._on_progress(progress, total, message)

    def note_cancel_delivered(self, detail: str) -> None:
        """Say that the stop was passed on to whatever did the work (a server was told to
        cancel). Call it while the cancelled call unwinds; the run's stop receipt then
        carries ``detail`` for this call."""
        if self._open:
            self._pending.cancel_delivered = detail


def current_tool_call() -> ToolCall | None:
    """The tool call the calling code serves, or None outside one."""
    return _current_call.get()


async def call_tool(
    tool: Tool | None, call: PendingCall, on_progress: ProgressHook | None = None
) -> tuple[str, bool]:
    """Run one tool call and return ``(content, is_error)``. Cancellation propagates."""
    if tool is None:
        return f"There is no tool named {call.name!r}.", True
    assert call.arguments is not None
    context = ToolCall(call.id, call.name, call, on_progress)
    token = _current_call.set(context)
    try:
        result = await tool.fn(call.arguments)
    except Exception as exc:  # a tool's failure is the model's to see, not a crash
        return f"The tool raised {type(exc).__name__}: {exc}", True
    finally:
        context._open = False
        _current_call.reset(token)
    if isinstance(result, str):
        return result, False
    try:
        return json.dumps(result), False
    except (TypeError, ValueError) as exc:
        return f"The tool returned a value that is not JSON: {exc}", True

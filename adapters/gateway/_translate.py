"""Runtime events and history, as OpenClaw ``chat`` / ``agent`` payloads.

Each event is encoded once (``FrameCache``) for every connection that receives it; one
``EventView`` per connection picks the form of each delta. A delta frame carries only the
new text (``deltaText``; ``data.delta`` on the ``agent`` stream), except the first delta a
connection sees of a run, which also carries the text so far (``message``; ``data.text``),
so a client can start from it and rebuild the rest from deltas alone. The ``seq`` of a
``chat`` or ``agent`` frame is the runtime event's own per-run ``seq``, the same on every
connection, so a client that read ``chat.history``'s ``inFlightRun`` (text and the ``seq``
it reflects) applies exactly the frames with a higher one; a stream's ``seq`` rises with
gaps where an event has no frame on it. What OpenClaw's schemas have no field for (the
stop receipt, the policy, the restored prompt, timings) goes in the ``runtime.stopped``
extension event, sent right after the run's ``aborted`` chat event; a failure's own kind
goes in ``runtime.failed``, right after its ``error`` chat event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, final

import attrs

from runtime import (
    Event,
    Message,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunQueued,
    RunSnapshot,
    RunStarted,
    StreamOptions,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCallFinished,
    ToolCallProgress,
    ToolCallStarted,
    ToolReceipt,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

STOPPED_EVENT: Final = "runtime.stopped"
FAILED_EVENT: Final = "runtime.failed"
OPENCLAW_ERROR_KINDS: Final = frozenset({"refusal", "timeout", "rate_limit", "context_length"})
# a stop's reason on the wire (chat ``aborted`` stopReason) where it differs from ours:
# OpenClaw says ``stop`` for a /stop command (its history's ``origin`` keeps stop-command)
WIRE_STOP_REASONS: Final = {"stop-command": "stop"}
# a run that finished because a budget of ours ran out (chat ``final`` stopReason
# ``budget``; the budget's name stays in the agent lifecycle ``end`` event's data)
BUDGET_STOP_REASONS: Final = frozenset({"max_turns", "max_tool_calls"})


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def now_ms() -> int:
    """Wall-clock milliseconds, as the protocol's timestamps are."""
    return _ms(time.time())


def wire_usage(usage: Usage) -> dict[str, Any]:
    wire: dict[str, Any] = {}
    if usage.input_tokens is not None:
        wire["input"] = usage.input_tokens
    if usage.output_tokens is not None:
        wire["output"] = usage.output_tokens
    if usage.estimated:
        wire["estimated"] = True
    return wire


def wire_message(message: Message) -> dict[str, Any]:
    """A history message as OpenClaw shows one: ``{role, content, timestamp}``."""
    content: list[dict[str, Any]] = []
    role = "toolResult" if message.role == "tool" else message.role
    for block in message.content:
        if isinstance(block, TextBlock):
            content.append({"type": "text", "text": block.text})
        elif isinstance(block, ThinkingBlock):
            content.append({"type": "thinking", "thinking": block.text})
        elif isinstance(block, ToolUseBlock):
            content.append(
                {
                    "type": "toolCall",
                    "id": block.id,
                    "name": block.name,
                    "arguments": dict(block.arguments),
                }
            )
        elif isinstance(block, ToolResultBlock):
            content.append(
                {
                    "type": "toolResult",
                    "toolCallId": block.tool_call_id,
                    "text": block.content,
                    "isError": block.is_error,
                }
            )
    wire: dict[str, Any] = {"role": role, "content": content, "timestamp": _ms(message.timestamp)}
    meta = message.meta
    if meta.get("aborted"):
        wire["openclawAbort"] = {
            "aborted": True,
            "origin": meta.get("origin", "rpc"),
            "runId": meta.get("run_id"),
        }
    if "error" in meta:
        wire["errorKind"] = meta["error"]
    return wire


def visible(messages: list[Message]) -> list[dict[str, Any]]:
    """History for a transcript: hidden notes for the model are left out."""
    return [wire_message(m) for m in messages if not m.meta.get("hidden")]


def _assistant(text: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "timestamp": now_ms(),
    }


def wire_stop_reason(reason: str) -> str:
    """A stop's reason as the chat ``aborted`` event's ``stopReason`` says it."""
    return WIRE_STOP_REASONS.get(reason, reason)


def wire_error_kind(kind: str) -> str:
    """Our failure kind as OpenClaw's ``errorKind`` enum names it."""
    return kind if kind in OPENCLAW_ERROR_KINDS else "unknown"


def dumps(value: Any) -> str:
    """The gateway's JSON encoder (compact, ASCII; see BENCHMARKS.md for why stdlib)."""
    return _encode(value)


_encode = json.JSONEncoder(separators=(",", ":")).encode


@final
class Part:
    """One frame's payload, encoded once, split around its per-run ``seq``: the payload is
    ``head + str(seq) + tail`` (``tail`` None: the payload has no per-run seq, ``head`` is
    all of it). ``stream`` says which per-run counter numbers it: ``chat`` or ``agent``."""

    __slots__ = ("head", "name", "stream", "tail")

    def __init__(self, name: str, stream: str | None, head: str, tail: str | None) -> None:
        self.name = name
        self.stream = stream
        self.head = head
        self.tail = tail


def _chat_part(run_id: str, session_key: str, fields: dict[str, Any]) -> Part:
    head = f'{{"runId":{_encode(run_id)},"sessionKey":{_encode(session_key)},"seq":'
    return Part("chat", "chat", head, "," + _encode(fields)[1:])


def _agent_part(run_id: str, session_key: str, stream: str, data: Mapping[str, Any]) -> Part:
    rest = {"stream": stream, "ts": now_ms(), "data": {"sessionKey": session_key, **data}}
    return Part("agent", "agent", f'{{"runId":{_encode(run_id)},"seq":', "," + _encode(rest)[1:])


@final
class Encoded:
    """The frames of one runtime event, encoded once for every connection that gets it.

    A text or thinking delta has two forms: ``rest`` (only the new text, what a connection
    gets once it has the run's text) and ``first`` (with the cumulative snapshot, for a
    connection that saw the run from its start and meets its first delta now). A
    connection that joined mid-run has its own first frame (``EventView``)."""

    __slots__ = ("_first", "event", "rest", "tool")

    def __init__(self, event: Event) -> None:
        self.event = event
        self._first: list[Part] | None = None
        self.tool = isinstance(event, ToolCallStarted | ToolCallProgress | ToolCallFinished)
        self.rest = _encode_event(event)

    def first(self) -> list[Part]:
        if self._first is None:
            event = self.event
            assert isinstance(event, TextDelta | ThinkingDelta)
            self._first = _first_delta(event, event.text)
        return self._first


def _first_delta(event: TextDelta | ThinkingDelta, text_so_far: str) -> list[Part]:
    """The first delta a connection sees of a run: with the text so far (``message`` on the
    chat frame, ``data.text`` on the agent frame), so it can start from it."""
    run_id, key, new = event.run_id, event.session_key, event.text
    if isinstance(event, ThinkingDelta):
        return [_agent_part(run_id, key, "thinking", {"text": text_so_far, "delta": new})]
    return [
        _chat_part(
            run_id, key, {"state": "delta", "message": _assistant(text_so_far), "deltaText": new}
        ),
        _agent_part(run_id, key, "assistant", {"text": text_so_far, "delta": new}),
    ]


def _encode_event(event: Event) -> list[Part]:
    run_id, key = event.run_id, event.session_key
    if isinstance(event, TextDelta):
        return [
            _chat_part(run_id, key, {"state": "delta", "deltaText": event.text}),
            _agent_part(run_id, key, "assistant", {"delta": event.text}),
        ]
    if isinstance(event, ThinkingDelta):
        return [_agent_part(run_id, key, "thinking", {"delta": event.text})]
    if isinstance(event, RunQueued):
        return [_agent_part(run_id, key, "lifecycle", {"phase": "queued", "behind": event.behind})]
    if isinstance(event, RunStarted):
        return [_agent_part(run_id, key, "lifecycle", {"phase": "start"})]
    if isinstance(event, StreamOptions):
        data = {"phase": "options", "allowCancel": event.allow_cancel}
        return [_agent_part(run_id, key, "lifecycle", data)]
    if isinstance(event, ToolCallStarted | ToolCallProgress | ToolCallFinished):
        tool: dict[str, Any] = {"name": event.name, "toolCallId": event.tool_call_id}
        if isinstance(event, ToolCallStarted):
            tool |= {"phase": "start", "arguments": dict(event.arguments)}
        elif isinstance(event, ToolCallProgress):
            tool |= {"phase": "progress", "progress": event.progress}
            if event.total is not None:
                tool["total"] = event.total
            if event.message is not None:
                tool["message"] = event.message
        else:
            tool |= {"phase": "result", "isError": event.is_error, "result": event.result}
        return [_agent_part(run_id, key, "tool", tool)]
    if isinstance(event, RunFinished):
        reason = event.stop_reason
        final: dict[str, Any] = {
            "state": "final",
            "stopReason": "budget" if reason in BUDGET_STOP_REASONS else reason,
            "usage": wire_usage(event.usage),
        }
        if event.message is not None:
            final["message"] = wire_message(event.message)
        return [
            _agent_part(run_id, key, "lifecycle", {"phase": "end", "stopReason": reason}),
            _chat_part(run_id, key, final),
        ]
    if isinstance(event, RunCancelled):
        aborted: dict[str, Any] = {"state": "aborted", "stopReason": wire_stop_reason(event.reason)}
        if event.message is not None:
            aborted["message"] = wire_message(event.message)
        return [
            _agent_part(run_id, key, "lifecycle", {"phase": "end", "aborted": True}),
            _chat_part(run_id, key, aborted),
            Part(STOPPED_EVENT, None, _encode(stopped_payload(event)), None),
        ]
    if isinstance(event, RunFailed):
        error = {
            "state": "error",
            "errorMessage": event.error_message,
            "errorKind": wire_error_kind(event.error_kind),
            "errorDetail": {"providerErrorType": event.error_kind},
        }
        return [
            _agent_part(
                run_id, key, "lifecycle", {"phase": "error", "errorKind": event.error_kind}
            ),
            _chat_part(run_id, key, error),
            Part(FAILED_EVENT, None, _encode(failed_payload(event)), None),
        ]
    raise TypeError(f"No frames for the event {type(event).__name__}.")


@final
@attrs.define(eq=False)
class FrameCache:
    """Each event's frames, encoded once for all the connections that receive it.

    Keyed by the event object (the bus hands the same object to every subscriber; a delta
    merged for a lagging connection is a new object, encoded for it alone). The entry pins
    its event, so an id is never reused while cached; the oldest entries go past
    ``size``, and an event read after that is encoded again."""

    size: int = 4096
    _entries: dict[int, Encoded] = attrs.field(factory=dict, init=False)
    encoded: int = attrs.field(default=0, init=False)  # events encoded, for tests and stats

    def get(self, event: Event) -> Encoded:
        entry = self._entries.get(id(event))
        if entry is not None and entry.event is event:
            return entry
        entry = self._entries[id(event)] = Encoded(event)
        self.encoded += 1
        if len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]
        return entry


@attrs.define
class _RunView:
    session_key: str
    # the text (and thinking) so far, kept only until the connection got its first delta
    text: str = ""
    thinking: str = ""
    text_sent: bool = False
    thinking_sent: bool = False
    seen: int = -1  # the seq of the last event the text holds: those up to it are dropped


@final
@attrs.define(eq=False)
class EventView:
    """The frames one connection receives for the runtime's events: shared encodings
    (``FrameCache``) numbered with this connection's per-run ``seq``."""

    tool_events: bool = False
    cache: FrameCache = attrs.field(factory=FrameCache)
    _runs: dict[str, _RunView] = attrs.field(factory=dict, init=False)

    def seed(self, runs: list[RunSnapshot], *, refresh: bool = False) -> None:
        """Start from the live runs' text so far (call when subscribing, after the
        subscription follows them: the events it then receives that the snapshots hold
        already, by their ``seq``, are dropped). Runs already in the view are left as they
        are, unless ``refresh``: then their next delta carries the text so far again (for
        runs followed anew)."""
        for run in runs:
            view = self._runs.get(run.run_id)
            if view is None:
                self._runs[run.run_id] = _RunView(run.session_key, text=run.text, seen=run.seq)
            elif refresh:
                view.text, view.text_sent, view.seen = run.text, False, run.seq
                view.thinking, view.thinking_sent = "", False

    def forget(self, keep: Callable[[str, str], bool]) -> None:
        """Drop the runs for which ``keep(run_id, session_key)`` is false."""
        for run_id, view in list(self._runs.items()):
            if not keep(run_id, view.session_key):
                del self._runs[run_id]

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._runs

    def frames(self, event: Event) -> Iterator[tuple[str, str]]:
        """(event name, payload JSON) for each frame this connection gets for ``event``."""
        run_id = event.run_id
        view = self._runs.get(run_id)
        if view is None:
            view = self._runs[run_id] = _RunView(event.session_key)
        elif event.seq <= view.seen:
            return
        encoded = self.cache.get(event)
        parts = encoded.rest
        if isinstance(event, TextDelta):
            if not view.text_sent:
                view.text_sent = True
                parts = (
                    encoded.first()
                    if not view.text
                    else _first_delta(event, view.text + event.text)
                )
                view.text = ""
        elif isinstance(event, ThinkingDelta):
            if not view.thinking_sent:
                view.thinking_sent = True
                parts = (
                    encoded.first()
                    if not view.thinking
                    else _first_delta(event, view.thinking + event.text)
                )
                view.thinking = ""
        elif encoded.tool and not self.tool_events:
            return
        elif isinstance(event, RunFinished | RunCancelled | RunFailed):
            del self._runs[run_id]
        for part in parts:
            if part.stream is None:
                yield part.name, part.head
            else:
                yield part.name, f"{part.head}{event.seq}{part.tail}"


def _wire_receipt(receipt: ToolReceipt) -> dict[str, Any]:
    wire = {"toolCallId": receipt.tool_call_id, "name": receipt.name, "status": receipt.status}
    if receipt.cancel_delivered is not None:
        wire["cancelDelivered"] = receipt.cancel_delivered
    return wire


def failed_payload(event: RunFailed) -> dict[str, Any]:
    """The ``runtime.failed`` extension: the failure's own kind (``store``, ``overloaded``,
    ...), where the chat ``error`` event says only OpenClaw's coarser ``errorKind``."""
    return {
        "runId": event.run_id,
        "sessionKey": event.session_key,
        "errorKind": event.error_kind,
        "wireErrorKind": wire_error_kind(event.error_kind),
        "errorMessage": event.error_message,
    }


def stopped_payload(event: RunCancelled) -> dict[str, Any]:
    """The ``runtime.stopped`` extension: what a stop did, beyond OpenClaw's ``aborted``."""
    return {
        "runId": event.run_id,
        "sessionKey": event.session_key,
        "reason": event.reason,
        "policy": event.policy,
        "receipt": [_wire_receipt(r) for r in event.receipt],
        "restoredPrompt": event.restored_prompt,
        "usage": wire_usage(event.usage),
        "timings": {
            "scopeExitedMs": event.timings.scope_exited_ms,
            "committedMs": event.timings.committed_ms,
        },
        "partialKept": event.message is not None,
    }

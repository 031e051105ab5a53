"""Runtime events and history, as OpenClaw ``chat`` / ``agent`` payloads.

One ``EventView`` per connection turns the runtime's events into the frames that
connection receives. It keeps each live run's text so far, because an OpenClaw ``delta``
carries the whole message. The ``seq`` of a ``chat`` or ``agent`` frame is the runtime
event's own per-run ``seq``, the same on every connection, so a client that read
``chat.history``'s ``inFlightRun`` (text and the ``seq`` it reflects) applies exactly the
frames with a higher one; a stream's ``seq`` rises with gaps where an event has no frame
on it. What OpenClaw's schemas have no field for (the stop receipt, the policy, the
restored prompt, timings) goes in the ``runtime.stopped`` extension event, sent right
after the run's ``aborted`` chat event; a failure's own kind goes in ``runtime.failed``,
right after its ``error`` chat event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, final

import attrs

from runtime import (
    Event,
    Message,
    Run,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunQueued,
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

Frame = tuple[str, dict[str, Any]]  # (event name, payload)


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


@attrs.define
class _RunView:
    session_key: str
    text: str = ""
    thinking: str = ""
    seq: int = 0  # the runtime event being translated: every frame of it carries its seq


@final
@attrs.define(eq=False)
class EventView:
    """The frames one connection receives for the runtime's events."""

    tool_events: bool = False
    _runs: dict[str, _RunView] = attrs.field(factory=dict, init=False)

    def seed(self, runs: list[Run]) -> None:
        """Start from the live runs' text so far (call when subscribing, with no await
        between the two, so the snapshot and the events after it line up exactly)."""
        for run in runs:
            self._runs[run.run_id] = _RunView(run.session_key, text=run.text)

    def frames(self, event: Event) -> Iterator[Frame]:
        view = self._runs.get(event.run_id)
        if view is None:
            view = self._runs[event.run_id] = _RunView(event.session_key)
        view.seq = event.seq
        run_id = event.run_id
        if isinstance(event, RunQueued):
            yield self._agent(
                view, run_id, "lifecycle", {"phase": "queued", "behind": event.behind}
            )
        elif isinstance(event, RunStarted):
            yield self._agent(view, run_id, "lifecycle", {"phase": "start"})
        elif isinstance(event, StreamOptions):
            yield self._agent(
                view, run_id, "lifecycle", {"phase": "options", "allowCancel": event.allow_cancel}
            )
        elif isinstance(event, TextDelta):
            view.text += event.text
            yield self._chat(
                view, run_id, state="delta", message=_assistant(view.text), deltaText=event.text
            )
            yield self._agent(view, run_id, "assistant", {"text": view.text, "delta": event.text})
        elif isinstance(event, ThinkingDelta):
            view.thinking += event.text
            yield self._agent(
                view, run_id, "thinking", {"text": view.thinking, "delta": event.text}
            )
        elif isinstance(event, ToolCallStarted | ToolCallProgress | ToolCallFinished):
            if self.tool_events:
                data: dict[str, Any] = {"name": event.name, "toolCallId": event.tool_call_id}
                if isinstance(event, ToolCallStarted):
                    data |= {"phase": "start", "arguments": dict(event.arguments)}
                elif isinstance(event, ToolCallProgress):
                    data |= {"phase": "progress", "progress": event.progress}
                    if event.total is not None:
                        data["total"] = event.total
                    if event.message is not None:
                        data["message"] = event.message
                else:
                    data |= {"phase": "result", "isError": event.is_error, "result": event.result}
                yield self._agent(view, run_id, "tool", data)
        else:
            del self._runs[run_id]
            yield from self._terminal(view, event)

    def _terminal(self, view: _RunView, event: Event) -> Iterator[Frame]:
        run_id = event.run_id
        if isinstance(event, RunFinished):
            reason = event.stop_reason
            yield self._agent(view, run_id, "lifecycle", {"phase": "end", "stopReason": reason})
            final: dict[str, Any] = {
                "stopReason": "budget" if reason in BUDGET_STOP_REASONS else reason,
                "usage": wire_usage(event.usage),
            }
            if event.message is not None:
                final["message"] = wire_message(event.message)
            yield self._chat(view, run_id, state="final", **final)
        elif isinstance(event, RunCancelled):
            yield self._agent(view, run_id, "lifecycle", {"phase": "end", "aborted": True})
            aborted: dict[str, Any] = {"stopReason": wire_stop_reason(event.reason)}
            if event.message is not None:
                aborted["message"] = wire_message(event.message)
            yield self._chat(view, run_id, state="aborted", **aborted)
            yield STOPPED_EVENT, stopped_payload(event)
        elif isinstance(event, RunFailed):
            yield self._agent(
                view, run_id, "lifecycle", {"phase": "error", "errorKind": event.error_kind}
            )
            yield self._chat(
                view,
                run_id,
                state="error",
                errorMessage=event.error_message,
                errorKind=wire_error_kind(event.error_kind),
                errorDetail={"providerErrorType": event.error_kind},
            )
            yield FAILED_EVENT, failed_payload(event)

    def _chat(self, view: _RunView, run_id: str, **fields: Any) -> Frame:
        payload = {"runId": run_id, "sessionKey": view.session_key, "seq": view.seq}
        return "chat", payload | fields

    def _agent(self, view: _RunView, run_id: str, stream: str, data: Mapping[str, Any]) -> Frame:
        return "agent", {
            "runId": run_id,
            "seq": view.seq,
            "stream": stream,
            "ts": now_ms(),
            "data": {"sessionKey": view.session_key, **data},
        }


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

"""The OpenAI Responses API streaming dialect (``POST /v1/responses``).

Every event is ``event: TYPE`` plus ``data: {"type": TYPE, "sequence_number": N, ...}``,
as OpenAI sends them, and there is no ``[DONE]``: the stream ends after the terminal
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut the reply).
Output items are opened with ``response.output_item.added`` and closed with their
``.done`` events as the kind of delta changes: a ``reasoning`` item carries the summary
deltas (when the request asked for ``reasoning``), a ``message`` item the text deltas, a
``function_call`` item the streamed arguments. ``fail=error_event`` sends
``response.failed``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Final

from ._openai_format import error_body, message_text, tool_call_id
from ._script import (
    Abort,
    Begin,
    ErrorEvent,
    Facts,
    Finish,
    Garbage,
    RequestError,
    Silence,
    Step,
    TextDelta,
    ThinkingDelta,
    ThinkingSignature,
    ToolArgsDelta,
    ToolCallBegin,
    ToolCallEnd,
)

PATH: Final = "/v1/responses"


class ResponsesRenderer:
    """Renders steps as Responses API events, one output item per kind of delta."""

    def __init__(self, model: str, response_id: int) -> None:
        self._model = model
        self._id = f"resp_sim{response_id:06d}"
        self._created = int(time.time())
        self._sequence = 0
        self._input_tokens = 0
        self._output: list[dict[str, Any]] = []  # the items done so far
        self._item: dict[str, Any] | None = None  # the open item
        self._text = ""  # the open item's text (summary, message text or arguments)

    def render(self, step: Step) -> bytes:
        match step:
            case Begin(input_tokens=input_tokens):
                self._input_tokens = input_tokens
                return self._event(
                    "response.created", response=self._response("in_progress")
                ) + self._event("response.in_progress", response=self._response("in_progress"))
            case ThinkingDelta(text=text):
                return self._open("reasoning", summary=[]) + self._delta(
                    "response.reasoning_summary_text.delta", text, summary_index=0
                )
            case TextDelta(text=text):
                return self._open("message", role="assistant", content=[]) + self._delta(
                    "response.output_text.delta", text, content_index=0, logprobs=[]
                )
            case ToolCallBegin(number=number, name=name):
                return self._close() + self._open(
                    "function_call", call_id=tool_call_id(number), name=name, arguments=""
                )
            case ToolArgsDelta(fragment=fragment):
                return self._delta("response.function_call_arguments.delta", fragment)
            case ToolCallEnd():
                return self._close()
            case Finish(stop_reason=stop_reason, output_tokens=output_tokens):
                usage = {
                    "input_tokens": self._input_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": output_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self._input_tokens + output_tokens,
                }
                # An item the limit cut off is "incomplete", as the API marks it.
                closed = self._close("incomplete" if stop_reason == "max_tokens" else "completed")
                if stop_reason in ("max_tokens", "refusal"):
                    why = "max_output_tokens" if stop_reason == "max_tokens" else "content_filter"
                    cut = {"reason": why}
                    response = self._response("incomplete", usage=usage, incomplete_details=cut)
                    return closed + self._event("response.incomplete", response=response)
                response = self._response("completed", usage=usage)
                return closed + self._event("response.completed", response=response)
            case Garbage():
                return b"event: response.output_text.delta\ndata: {not json\n\n"
            case ErrorEvent():
                error = {"code": "server_error", "message": "The server is overloaded (simulated)."}
                response = self._response("failed", error=error)
                return self._event("response.failed", response=response)
            case ThinkingSignature() | Silence() | Abort():
                return b""

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "model": self._model,
            "output": list(self._output),
            "usage": None,
            "error": None,
            "incomplete_details": None,
            **fields,
        }

    def _open(self, kind: str, **fields: Any) -> bytes:
        """Open an item of ``kind`` unless one is open already."""
        if self._item is not None and self._item["type"] == kind:
            return b""
        closed = self._close()
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        item_id = f"{prefix}_sim{self._sequence:06d}"
        self._item = {"id": item_id, "type": kind, "status": "in_progress", **fields}
        self._text = ""
        added = self._event(
            "response.output_item.added", output_index=self._index(), item=self._item
        )
        if kind == "reasoning":
            added += self._event(
                "response.reasoning_summary_part.added",
                **self._where(),
                summary_index=0,
                part=_part(kind, ""),
            )
        elif kind == "message":
            added += self._event(
                "response.content_part.added",
                **self._where(),
                content_index=0,
                part=_part(kind, ""),
            )
        return closed + added

    def _delta(self, kind: str, text: str, **fields: Any) -> bytes:
        self._text += text
        return self._event(kind, **self._where(), delta=text, **fields)

    def _close(self, status: str = "completed") -> bytes:
        """The done events of the open item, which joins the response's output."""
        item = self._item
        if item is None:
            return b""
        where, text, data = self._where(), self._text, b""
        part = _part(item["type"], text)
        if item["type"] == "reasoning":
            data += self._event(
                "response.reasoning_summary_text.done", **where, summary_index=0, text=text
            )
            data += self._event(
                "response.reasoning_summary_part.done", **where, summary_index=0, part=part
            )
            done = {**item, "summary": [part]}
        elif item["type"] == "message":
            data += self._event("response.output_text.done", **where, content_index=0, text=text)
            data += self._event("response.content_part.done", **where, content_index=0, part=part)
            done = {**item, "content": [part]}
        else:
            data += self._event("response.function_call_arguments.done", **where, arguments=text)
            done = {**item, "arguments": text}
        done["status"] = status
        data += self._event("response.output_item.done", output_index=self._index(), item=done)
        self._output.append(done)
        self._item = None
        return data

    def _index(self) -> int:
        return len(self._output)

    def _where(self) -> dict[str, Any]:
        assert self._item is not None
        return {"item_id": self._item["id"], "output_index": self._index()}


def _part(kind: str, text: str) -> dict[str, Any]:
    """The content part of a reasoning or message item."""
    if kind == "reasoning":
        return {"type": "summary_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


class ResponsesFormat:
    """Reads a Responses API request and words errors the way OpenAI does."""

    def parse(self, body: Mapping[str, Any]) -> Facts:
        if body.get("stream") is not True:
            raise RequestError("The sim only streams; send the request with stream: true.")
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list):
            raise RequestError("input: expected a string or a list of input items.")
        names: dict[str, str] = {}  # call_id -> function name, over the whole input
        last_user, user_text = -1, ""
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise RequestError(f"input.{index}: expected an object.")
            if item.get("type") == "function_call":
                names[str(item.get("call_id"))] = str(item.get("name"))
            elif item.get("role") == "user":
                last_user, user_text = index, message_text(item.get("content"))
        results = tuple(
            names.get(str(item.get("call_id")))
            for item in items[last_user + 1 :]
            if item.get("type") == "function_call_output"
        )
        max_tokens = body.get("max_output_tokens")
        return Facts(
            user_text=user_text,
            thinking=isinstance(body.get("reasoning"), Mapping),
            tool_results=results,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            input_tokens=max(1, len(json.dumps(items)) // 4),
        )

    def renderer(self, body: Mapping[str, Any], response_id: int) -> ResponsesRenderer:
        return ResponsesRenderer(str(body.get("model", "sim")), response_id)

    def error_body(self, status: int, message: str) -> bytes:
        return error_body(status, message)

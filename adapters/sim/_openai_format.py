"""The OpenAI chat completions streaming dialect (``POST /v1/chat/completions``).

Each event is a ``data: {chat.completion.chunk}`` line and the stream ends with
``data: [DONE]``. Thinking goes out as ``delta.reasoning_content`` (the field
OpenAI-compatible reasoning servers use); a tool call opens with its index, id, type and
name, then streams ``function.arguments`` fragments. With
``stream_options: {include_usage: true}`` every chunk has ``usage: null`` and a last chunk
with no choices carries the counts, as OpenAI does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Final

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

PATH: Final = "/v1/chat/completions"

_FINISH_REASONS: Final = {
    "end_turn": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "refusal": "content_filter",
}
_ERRORS: Final = {  # status -> (type, code)
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    529: ("server_error", "overloaded"),
}


def _data(payload: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def tool_call_id(number: int) -> str:
    return f"call_sim{number:04d}"


class OpenAIRenderer:
    """Renders steps as chat completion chunks."""

    def __init__(self, model: str, response_id: int, *, include_usage: bool) -> None:
        self._model = model
        self._id = f"chatcmpl-sim{response_id:06d}"
        self._created = int(time.time())
        self._include_usage = include_usage
        self._input_tokens = 0
        self._tool_index = -1

    def render(self, step: Step) -> bytes:
        match step:
            case Begin(input_tokens=input_tokens):
                self._input_tokens = input_tokens
                return self._chunk({"role": "assistant", "content": ""})
            case ThinkingDelta(text=text):
                return self._chunk({"reasoning_content": text})
            case TextDelta(text=text):
                return self._chunk({"content": text})
            case ToolCallBegin(number=number, name=name):
                self._tool_index += 1
                call = {
                    "index": self._tool_index,
                    "id": tool_call_id(number),
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            case ToolArgsDelta(fragment=fragment):
                call = {"index": self._tool_index, "function": {"arguments": fragment}}
                return self._chunk({"tool_calls": [call]})
            case Finish(stop_reason=stop_reason, output_tokens=output_tokens):
                data = self._chunk({}, finish_reason=_FINISH_REASONS[stop_reason])
                if self._include_usage:
                    usage = {
                        "prompt_tokens": self._input_tokens,
                        "completion_tokens": output_tokens,
                        "total_tokens": self._input_tokens + output_tokens,
                    }
                    data += _data({**self._envelope(), "choices": [], "usage": usage})
                return data + b"data: [DONE]\n\n"
            case Garbage():
                return b"data: {not json\n\n"
            case ErrorEvent():
                error = {
                    "message": "Overloaded (simulated).",
                    "type": "server_error",
                    "param": None,
                    "code": "overloaded",
                }
                return _data({"error": error})
            case ThinkingSignature() | ToolCallEnd() | Silence() | Abort():
                return b""

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
        }

    def _chunk(self, delta: Mapping[str, Any], *, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = {**self._envelope(), "choices": [choice]}
        if self._include_usage:
            payload["usage"] = None
        return _data(payload)


class OpenAIFormat:
    """Reads a chat completions request and words errors the way OpenAI does."""

    def parse(self, body: Mapping[str, Any]) -> Facts:
        if body.get("stream") is not True:
            raise RequestError("The sim only streams; send the request with stream: true.")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise RequestError("messages: expected a list of messages.")
        names: dict[str, str] = {}  # tool call id -> function name, over the whole history
        last_user, user_text = -1, ""
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise RequestError(f"messages.{index}: expected an object.")
            if message.get("role") == "assistant":
                for call in message.get("tool_calls") or ():
                    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
                        names[str(call.get("id"))] = str(call["function"].get("name"))
            elif message.get("role") == "user":
                last_user, user_text = index, message_text(message.get("content"))
        results = tuple(
            names.get(str(message.get("tool_call_id")))
            for message in messages[last_user + 1 :]
            if message.get("role") == "tool"
        )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return Facts(
            user_text=user_text,
            thinking=body.get("reasoning_effort") is not None
            or isinstance(body.get("reasoning"), Mapping),
            tool_results=results,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            input_tokens=max(1, len(json.dumps(messages)) // 4),
        )

    def renderer(self, body: Mapping[str, Any], response_id: int) -> OpenAIRenderer:
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        return OpenAIRenderer(
            str(body.get("model", "sim")), response_id, include_usage=include_usage
        )

    def error_body(self, status: int, message: str) -> bytes:
        return error_body(status, message)


def error_body(status: int, message: str) -> bytes:
    """An error worded the way OpenAI words it (chat completions and Responses alike)."""
    kind, code = _ERRORS.get(status, ("server_error", None))
    error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def message_text(content: Any) -> str:
    """A user message's text: a string, or the text parts of a list of parts (``text`` in
    chat completions, ``input_text`` in the Responses API)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") in ("text", "input_text")
        )
    return ""

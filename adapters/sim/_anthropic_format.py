"""The Anthropic Messages API streaming dialect (``POST /v1/messages``).

Field names follow the ``anthropic`` SDK's types and its ``MessageStream`` accumulator:
``message_start`` carries a whole ``Message`` with empty content; each content block is
opened by ``content_block_start``, grown by typed deltas and closed by
``content_block_stop``; ``message_delta`` carries the stop reason and the output tokens.
The SDK ignores events without an ``event:`` name, so every event here has one, including
the malformed one of ``fail=garbage``.
"""

from __future__ import annotations

import json
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

PATH: Final = "/v1/messages"

_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def tool_use_id(number: int) -> str:
    return f"toolu_sim{number:04d}"


class AnthropicRenderer:
    """Renders steps as Anthropic SSE events, opening and closing content blocks as the
    kind of delta changes."""

    def __init__(self, model: str, response_id: int) -> None:
        self._model = model
        self._message_id = f"msg_sim{response_id:06d}"
        self._index = -1
        self._open: str | None = None  # the open block's type

    def render(self, step: Step) -> bytes:
        match step:
            case Begin(input_tokens=input_tokens):
                message: dict[str, Any] = {
                    "id": self._message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": self._model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                }
                return _event("message_start", {"type": "message_start", "message": message}) + (
                    _event("ping", {"type": "ping"})
                )
            case ThinkingDelta(text=text):
                return self._block("thinking", {"thinking": "", "signature": ""}) + self._delta(
                    {"type": "thinking_delta", "thinking": text}
                )
            case ThinkingSignature(signature=signature):
                return self._block("thinking", {"thinking": "", "signature": ""}) + self._delta(
                    {"type": "signature_delta", "signature": signature}
                )
            case TextDelta(text=text):
                return self._block("text", {"text": ""}) + self._delta(
                    {"type": "text_delta", "text": text}
                )
            case ToolCallBegin(number=number, name=name):
                return self._close() + self._start(
                    "tool_use", {"id": tool_use_id(number), "name": name, "input": {}}
                )
            case ToolArgsDelta(fragment=fragment):
                return self._delta({"type": "input_json_delta", "partial_json": fragment})
            case ToolCallEnd():
                return self._close()
            case Finish(stop_reason=stop_reason, output_tokens=output_tokens):
                delta = {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                }
                return (
                    self._close()
                    + _event("message_delta", delta)
                    + _event("message_stop", {"type": "message_stop"})
                )
            case Garbage():
                return b"event: content_block_delta\ndata: {not json\n\n"
            case ErrorEvent():
                error = {"type": "overloaded_error", "message": "Overloaded (simulated)."}
                return _event("error", {"type": "error", "error": error})
            case Silence() | Abort():
                return b""

    def _block(self, kind: str, fields: Mapping[str, Any]) -> bytes:
        """Open a block of ``kind`` unless one is open already."""
        if self._open == kind:
            return b""
        return self._close() + self._start(kind, fields)

    def _start(self, kind: str, fields: Mapping[str, Any]) -> bytes:
        self._index += 1
        self._open = kind
        block = {"type": kind, **fields}
        return _event(
            "content_block_start",
            {"type": "content_block_start", "index": self._index, "content_block": block},
        )

    def _delta(self, delta: Mapping[str, Any]) -> bytes:
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self._index, "delta": delta},
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self._index})


class AnthropicFormat:
    """Reads a Messages API request and words errors the way the API does."""

    def parse(self, body: Mapping[str, Any]) -> Facts:
        if body.get("stream") is not True:
            raise RequestError("The sim only streams; send the request with stream: true.")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise RequestError("messages: expected a list of messages.")
        names: dict[str, str] = {}  # tool_use id -> tool name, over the whole history
        last_text, user_text = -1, ""
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise RequestError(f"messages.{index}: expected an object.")
            blocks = _blocks(message.get("content"))
            if message.get("role") == "assistant":
                for block in blocks:
                    if block.get("type") == "tool_use":
                        names[str(block.get("id"))] = str(block.get("name"))
            elif message.get("role") == "user":
                texts = [str(b.get("text", "")) for b in blocks if b.get("type") == "text"]
                if texts:
                    last_text, user_text = index, "\n".join(texts)
        results: list[str | None] = []
        for message in messages[max(last_text, 0) :]:
            if message.get("role") == "user":
                for block in _blocks(message.get("content")):
                    if block.get("type") == "tool_result":
                        results.append(names.get(str(block.get("tool_use_id"))))
        thinking = body.get("thinking")
        max_tokens = body.get("max_tokens")
        return Facts(
            user_text=user_text,
            thinking=isinstance(thinking, Mapping) and thinking.get("type") != "disabled",
            tool_results=tuple(results),
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            input_tokens=_estimate_tokens(body),
        )

    def renderer(self, body: Mapping[str, Any], response_id: int) -> AnthropicRenderer:
        return AnthropicRenderer(str(body.get("model", "sim")), response_id)

    def error_body(self, status: int, message: str) -> bytes:
        error = {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}
        return json.dumps({"type": "error", "error": error}).encode()


def _blocks(content: Any) -> list[Mapping[str, Any]]:
    """A message's content as blocks: a plain string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [block for block in content if isinstance(block, Mapping)]
    return []


def _estimate_tokens(body: Mapping[str, Any]) -> int:
    """A deterministic stand-in for a tokenizer: about four characters a token."""
    return max(1, len(json.dumps(body.get("messages", []))) // 4)

"""Google's Gemini API streaming dialect (``POST /v1beta/models/MODEL:streamGenerateContent``,
``?alt=sse``).

Each event is ``data: {GenerateContentResponse}`` carrying the next parts of
``candidates[0].content`` and the prompt's ``usageMetadata``; there is no ``[DONE]``. The
last event has ``finishReason`` (STOP, also after a function call, or MAX_TOKENS) and the
output token count. Thinking goes out as ``thought: true`` parts when the request set
``thinkingConfig.includeThoughts``; the signature rides on the next part, as Gemini's
``thoughtSignature``.

Gemini sends a function call whole, never in fragments, so the argument fragments of the
script are not rendered: their pauses are the silence while the model writes the call,
which goes out whole (without an ``id``, as the Gemini API sends it) once its arguments
are complete, a pause before the finishing event.
``fail=error_event`` sends Gemini's in-stream error object (503, UNAVAILABLE).
"""

from __future__ import annotations

import json
import re
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

PATH_PATTERN: Final = re.compile(r"/v1beta/models/[^/:]+:streamGenerateContent")

_FINISH_REASONS: Final = {
    "end_turn": "STOP",
    "tool_use": "STOP",
    "max_tokens": "MAX_TOKENS",
    "refusal": "SAFETY",
}
_STATUSES: Final = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    529: "UNAVAILABLE",  # Gemini has no 529; the sim sends it when asked
}


def _data(payload: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class GeminiRenderer:
    """Renders steps as GenerateContentResponse chunks."""

    def __init__(self, response_id: int) -> None:
        self._id = f"sim{response_id:06d}"
        self._input_tokens = 0
        self._signature: str | None = None  # goes on the next part
        self._call: tuple[str, list[str]] | None = None  # name, argument fragments

    def render(self, step: Step) -> bytes:
        match step:
            case Begin(input_tokens=input_tokens):
                self._input_tokens = input_tokens
                return b""
            case ThinkingDelta(text=text):
                return self._chunk([{"text": text, "thought": True}])
            case ThinkingSignature(signature=signature):
                self._signature = signature
                return b""
            case TextDelta(text=text):
                return self._chunk([{"text": text}])
            case ToolCallBegin(name=name):
                self._call = (name, [])
                return b""
            case ToolArgsDelta(fragment=fragment):
                assert self._call is not None
                self._call[1].append(fragment)
                return b""
            case ToolCallEnd():
                assert self._call is not None
                name, fragments = self._call
                call = {"name": name, "args": json.loads("".join(fragments))}
                return self._chunk([{"functionCall": call}])
            case Finish(stop_reason=stop_reason, output_tokens=output_tokens):
                usage = {"candidatesTokenCount": output_tokens}
                return self._chunk([], _FINISH_REASONS[stop_reason], usage)
            case Garbage():
                return b"data: {not json\n\n"
            case ErrorEvent():
                message = "The model is overloaded. Please try again later."
                return _data({"error": {"code": 503, "message": message, "status": "UNAVAILABLE"}})
            case Silence() | Abort():
                return b""

    def _chunk(
        self,
        parts: list[dict[str, Any]],
        finish_reason: str | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> bytes:
        if parts and self._signature is not None:
            parts[0]["thoughtSignature"], self._signature = self._signature, None
        candidate: dict[str, Any] = {"index": 0}
        if parts:
            candidate["content"] = {"role": "model", "parts": parts}
        if finish_reason is not None:
            candidate["finishReason"] = finish_reason
        counts = {"promptTokenCount": self._input_tokens, **(usage or {})}
        counts["totalTokenCount"] = counts["promptTokenCount"] + counts.get(
            "candidatesTokenCount", 0
        )
        return _data(
            {
                "candidates": [candidate],
                "usageMetadata": counts,
                "modelVersion": "sim",
                "responseId": self._id,
            }
        )


class GeminiFormat:
    """Reads a streamGenerateContent request and words errors the way Google does."""

    def parse(self, body: Mapping[str, Any]) -> Facts:
        contents = body.get("contents")
        if not isinstance(contents, list):
            raise RequestError("contents: expected a list of contents.")
        last_text, user_text = -1, ""
        for index, content in enumerate(contents):
            if not isinstance(content, Mapping):
                raise RequestError(f"contents[{index}]: expected an object.")
            if content.get("role", "user") == "user":
                texts = [str(part["text"]) for part in _parts(content) if "text" in part]
                if texts:
                    last_text, user_text = index, "\n".join(texts)
        results = tuple(
            str(part["functionResponse"].get("name"))
            for content in contents[max(last_text, 0) :]
            if content.get("role", "user") == "user"
            for part in _parts(content)
            if isinstance(part.get("functionResponse"), Mapping)
        )
        config = body.get("generationConfig")
        config = config if isinstance(config, Mapping) else {}
        thinking = config.get("thinkingConfig")
        max_tokens = config.get("maxOutputTokens")
        return Facts(
            user_text=user_text,
            thinking=isinstance(thinking, Mapping) and thinking.get("includeThoughts") is True,
            tool_results=results,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            input_tokens=max(1, len(json.dumps(contents)) // 4),
        )

    def renderer(self, body: Mapping[str, Any], response_id: int) -> GeminiRenderer:
        return GeminiRenderer(response_id)

    def error_body(self, status: int, message: str) -> bytes:
        error = {"code": status, "message": message, "status": _STATUSES.get(status, "INTERNAL")}
        return json.dumps({"error": error}).encode()


def _parts(content: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    parts = content.get("parts")
    return [part for part in parts if isinstance(part, Mapping)] if isinstance(parts, list) else []

"""The Model port over Google's Gemini API (``POST {base_url}/v1beta/models/{model}:
streamGenerateContent?alt=sse``), streamed with httpx and parsed with httpx-sse.

Configuration: ``model`` (required, e.g. ``gemini-2.5-flash``), ``api_key`` or
``GEMINI_API_KEY`` (required), ``base_url`` or ``GOOGLE_GEMINI_BASE_URL`` (the variable the
google-genai SDK reads; default ``https://generativelanguage.googleapis.com``).
``open_gemini`` owns one ``httpx.AsyncClient`` for the runtime's lifetime. The key goes in
the ``x-goog-api-key`` header, never in the URL, so no logged URL or error message holds it.

Each SSE event is a whole ``GenerateContentResponse`` carrying the next parts of
``candidates[0].content``: ``text`` parts become ``TextChunk``, ``thought: true`` parts
``ThinkingChunk`` (asked for with ``thinkingConfig.includeThoughts`` when
``request.thinking``), ``usageMetadata`` a ``UsageReport`` (output = candidates + thoughts
tokens). Gemini sends a function call whole, never in fragments: it becomes
``ToolCallBegin``, one ``ToolCallArgs`` and ``ToolCallEnd`` at once. While the model writes
the call's arguments the stream is silent, so a stop then lands on that silence.
``finishReason`` STOP ends the turn (``tool_use`` after function calls), MAX_TOKENS is
``max_tokens``; SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII and IMAGE_SAFETY,
and a ``promptFeedback.blockReason``, are a ``refusal`` error (after the usage report).

Thought signatures: the first ``thoughtSignature`` of a turn becomes the signature of its
thinking block and is sent back on the message's first function call (Gemini 3 rejects a
replayed function call without one). A call whose signature was not kept (thinking was not
asked for, or the run was stopped) gets Google's documented placeholder instead.

Function calls without an ``id`` (the Gemini API gives none) get a local one, which is
never sent back. Stopping, retries and errors are those of ``adapters._http``.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final

import attrs
import httpx

from runtime import (
    Message,
    ModelError,
    ModelEvent,
    ModelRequest,
    TextBlock,
    TextChunk,
    ThinkingBlock,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallEnd,
    ToolResultBlock,
    ToolUseBlock,
    UsageReport,
)

from ._http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    BadResponse,
    Endpoint,
    EndpointModel,
    Parser,
    ProviderError,
    Wording,
    field,
    json_object,
    open_client,
)

DEFAULT_BASE_URL: Final = "https://generativelanguage.googleapis.com"
WORDING: Final = Wording(
    server="the Gemini API",
    stream="Gemini event stream",
    key_env="GEMINI_API_KEY",
    url_hint="has no /v1beta (the adapter adds it)",
)
# Sent for a replayed function call whose thought signature was not kept; Google documents
# it for history the model did not produce.
SKIP_SIGNATURE: Final = "skip_thought_signature_validator"
LOCAL_ID_PREFIX: Final = "gemini-local-"  # a call id we made up, never sent back

_BLOCKED: Final = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)


@final
@attrs.define(eq=False)
class GeminiModel(EndpointModel):
    """One Gemini model, streamed through a shared client."""

    def turn(self, request: ModelRequest) -> tuple[str, Mapping[str, Any], Parser]:
        name = urllib.parse.quote(self.model.removeprefix("models/"), safe="-._")
        path = f"/v1beta/models/{name}:streamGenerateContent?alt=sse"
        return path, _request_body(request), _Turn()


@asynccontextmanager
async def open_gemini(
    *,
    model: str,
    api_key: str | None = None,
    base_url: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_retries: int = 2,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[GeminiModel]:
    """Open the shared client for the runtime's lifetime and yield the model on it.

    ``api_key`` defaults to ``GEMINI_API_KEY``, ``base_url`` to ``GOOGLE_GEMINI_BASE_URL``
    (then the public API); ``transport`` is for tests and custom transports.
    """
    if not model:
        raise ValueError("model is required: pass the model's name, e.g. 'gemini-2.5-flash'.")
    key = api_key or os.environ.get("GEMINI_API_KEY")
    if not key:
        raise ValueError("No Gemini API key: set GEMINI_API_KEY or pass api_key=.")
    base_url = base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or DEFAULT_BASE_URL
    async with open_client(
        {"x-goog-api-key": key},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        transport=transport,
    ) as client:
        endpoint = Endpoint(client, base_url.rstrip("/"), model, WORDING, key, max_retries)
        yield GeminiModel(endpoint=endpoint)


def _request_body(request: ModelRequest) -> dict[str, Any]:
    """The streamGenerateContent request for a turn."""
    config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
    if request.thinking:
        config["thinkingConfig"] = {"includeThoughts": True}
    body: dict[str, Any] = {"contents": _contents(request.messages), "generationConfig": config}
    if request.system:
        body["systemInstruction"] = {"parts": [{"text": request.system}]}
    if request.tools:
        declarations = [
            {
                "name": tool.name,
                "description": tool.description,
                "parametersJsonSchema": dict(tool.parameters),
            }
            for tool in request.tools
        ]
        body["tools"] = [{"functionDeclarations": declarations}]
    return body


def _contents(history: Sequence[Message]) -> list[dict[str, Any]]:
    """Gemini contents: tool results are user parts (merged with a user message next to
    them), thought text is not sent back, and a message left empty is dropped."""
    names = {
        block.id: block.name
        for message in history
        for block in message.content
        if isinstance(block, ToolUseBlock)
    }
    out: list[dict[str, Any]] = []
    for message in history:
        role = "model" if message.role == "assistant" else "user"
        parts = _model_parts(message) if role == "model" else _user_parts(message, names)
        if not parts:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})
    return out


def _model_parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, TextBlock) and block.text.strip():
            parts.append({"text": block.text})
        elif isinstance(block, ToolUseBlock):
            call: dict[str, Any] = {"name": block.name, "args": dict(block.arguments)}
            if not block.id.startswith(LOCAL_ID_PREFIX):
                call["id"] = block.id
            parts.append({"functionCall": call})
    signature = next(
        (b.signature for b in message.content if isinstance(b, ThinkingBlock) and b.signature),
        None,
    )
    calls = [part for part in parts if "functionCall" in part]
    if calls:
        calls[0]["thoughtSignature"] = signature or SKIP_SIGNATURE
    elif parts and signature:
        parts[-1]["thoughtSignature"] = signature
    return parts


def _user_parts(message: Message, names: Mapping[str, str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, TextBlock) and block.text.strip():
            parts.append({"text": block.text})
        elif isinstance(block, ToolResultBlock):
            response = {"error" if block.is_error else "output": block.content}
            result: dict[str, Any] = {
                "name": names.get(block.tool_call_id, block.tool_call_id),
                "response": response,
            }
            if not block.tool_call_id.startswith(LOCAL_ID_PREFIX):
                result["id"] = block.tool_call_id
            parts.append({"functionResponse": result})
    return parts


# -- the response -------------------------------------------------------------------------


@final
@attrs.define(eq=False)
class _Turn(Parser):
    """GenerateContentResponse chunks in, model events out."""

    _calls: int = 0
    _signed: bool = False  # the turn's first thought signature went out
    _usage: UsageReport | None = None

    def payload(self, data: str) -> list[ModelEvent | ModelError]:
        chunk = json_object(data)
        if (error := chunk.get("error")) is not None:
            raise ProviderError.of(error)
        events: list[ModelEvent | ModelError] = []
        reason: str | None = None
        for candidate in field(chunk, "candidates", list) or ():
            if isinstance(candidate, dict) and candidate.get("index", 0) == 0:
                content = field(candidate, "content", dict) or {}
                for part in field(content, "parts", list) or ():
                    if not isinstance(part, dict):
                        raise BadResponse("a content part is not an object")
                    events += self._part(part)
                reason = field(candidate, "finishReason", str)
        if usage := field(chunk, "usageMetadata", dict):
            report = _usage(usage)
            if report != self._usage:  # Gemini repeats the counts in every chunk
                self._usage = report
                events.append(report)
        feedback = field(chunk, "promptFeedback", dict) or {}
        if blocked := field(feedback, "blockReason", str):
            return [*events, _refusal(f"blockReason {blocked}")]
        if reason is not None and self.stop_reason is None:
            events += self._finish(reason)
        return events

    def _part(self, part: Mapping[str, Any]) -> list[ModelEvent | ModelError]:
        events: list[ModelEvent | ModelError] = []
        text = field(part, "text", str)
        call = field(part, "functionCall", dict)
        if text and part.get("thought") is True:
            events.append(ThinkingChunk(text))
        elif text:
            events.append(TextChunk(text))
        elif call is not None:
            name = field(call, "name", str)
            if not name:
                raise BadResponse("a function call came without a name")
            arguments = field(call, "args", dict) or {}
            call_id = field(call, "id", str) or f"{LOCAL_ID_PREFIX}{uuid.uuid4().hex[:16]}"
            self._calls += 1
            events += [
                ToolCallBegin(call_id, name),
                ToolCallArgs(call_id, json.dumps(arguments)),
                ToolCallEnd(call_id, arguments),
            ]
        if (signature := field(part, "thoughtSignature", str)) and not self._signed:
            self._signed = True
            events.append(ThinkingChunk("", signature=signature))
        return events

    def _finish(self, reason: str) -> list[ModelEvent | ModelError]:
        if reason in _BLOCKED:
            return [_refusal(f"finishReason {reason}")]
        if reason == "MALFORMED_FUNCTION_CALL":
            raise BadResponse("the model wrote a function call that does not parse")
        if reason == "STOP":
            self.stop_reason = "tool_use" if self._calls else "end_turn"
        elif reason == "MAX_TOKENS":
            self.stop_reason = "max_tokens"
        else:
            self.stop_reason = reason.lower()
        return []


def _usage(usage: Mapping[str, Any]) -> UsageReport:
    candidates = field(usage, "candidatesTokenCount", int)
    thoughts = field(usage, "thoughtsTokenCount", int)
    output = (
        None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    )
    return UsageReport(input_tokens=field(usage, "promptTokenCount", int), output_tokens=output)


def _refusal(why: str) -> ModelError:
    return ModelError(
        "refusal",
        f"Gemini blocked the reply ({why}). Rephrase the request or ask something else.",
    )

"""The Model port over OpenAI-compatible chat completions (OpenAI, OpenRouter, vLLM, Ollama,
llama.cpp server, Kimi), streamed with httpx and parsed with httpx-sse.

Configuration: ``model`` (required), ``base_url`` or ``OPENAI_BASE_URL`` (default
``https://api.openai.com/v1``), ``api_key`` or ``OPENAI_API_KEY`` (optional: local servers
need none). ``open_openai_compat`` owns one ``httpx.AsyncClient`` for the runtime's
lifetime; every turn borrows a pooled connection from it.

Thinking: when ``request.thinking`` is true the request carries ``reasoning_effort:
"medium"`` (OpenAI's reasoning models; servers that do not know it ignore it). Reasoning
text streamed as ``delta.reasoning`` or ``delta.reasoning_content`` (vLLM, Ollama,
llama.cpp, OpenRouter, Kimi) becomes ``ThinkingChunk``; it is never sent back.

Stopping, retries and errors are those of ``adapters._http`` (see its docstring): the turn's
response lives in ``async with``, a stop lands on the socket read and discards the
connection, and the same client serves the next turn. ``TurnEnd`` comes at the end of the
body, so a consumer that reads up to it leaves a complete response and a reusable
connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, final

import attrs
import httpx

from runtime import (
    ModelEvent,
    ModelRequest,
    TextChunk,
    ThinkingChunk,
    ToolCallBegin,
    ToolResultBlock,
    ToolUseBlock,
    UsageReport,
)

from ._http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    BadResponse,
    Endpoint,
    Parser,
    ProviderError,
    StreamedCall,
    Wording,
    field,
    json_object,
    open_client,
)

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
WORDING: Final = Wording(
    server="an OpenAI-compatible server",
    stream="chat completions stream",
    key_env="OPENAI_API_KEY",
    url_hint="ends in /v1",
)

_STOP_REASONS: Final = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
}


@final
@attrs.define(eq=False)
class OpenAICompatModel:
    """One model on one OpenAI-compatible server, streamed through a shared client."""

    _client: httpx.AsyncClient = attrs.field(alias="client", repr=False)
    model: str
    base_url: str = DEFAULT_BASE_URL
    _api_key: str | None = attrs.field(default=None, alias="api_key", repr=False)
    max_retries: int = 2
    # OpenAI's reasoning models reject "max_tokens"; older local servers read only it.
    max_tokens_field: str = "max_completion_tokens"

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        endpoint = Endpoint(
            client=self._client,
            base_url=self.base_url,
            model=self.model,
            wording=WORDING,
            api_key=self._api_key,
            max_retries=self.max_retries,
        )
        body = _request_body(self.model, request, max_tokens_field=self.max_tokens_field)
        return endpoint.stream("/chat/completions", body, _Turn())


@asynccontextmanager
async def open_openai_compat(
    *,
    model: str,
    base_url: str | None = None,
    api_key: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_retries: int = 2,
    max_tokens_field: str = "max_completion_tokens",
) -> AsyncIterator[OpenAICompatModel]:
    """Open the shared client for the runtime's lifetime and yield the model on it.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``.
    Pass ``max_tokens_field="max_tokens"`` for a server that ignores the newer name.
    """
    if not model:
        raise ValueError("model is required: pass the name the server serves, e.g. 'gpt-4.1'.")
    base_url, api_key = openai_settings(base_url, api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with open_client(
        headers, connect_timeout=connect_timeout, read_timeout=read_timeout
    ) as client:
        yield OpenAICompatModel(
            client=client,
            model=model,
            base_url=base_url,
            api_key=api_key,
            max_retries=max_retries,
            max_tokens_field=max_tokens_field,
        )


def openai_settings(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The base URL and key of an OpenAI API server: as given, else ``OPENAI_BASE_URL``
    (then OpenAI's) and ``OPENAI_API_KEY`` (then none)."""
    base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if api_key is None:
        api_key = os.environ.get("OPENAI_API_KEY") or None
    return base_url, api_key


def _request_body(
    model: str, request: ModelRequest, *, max_tokens_field: str = "max_completion_tokens"
) -> dict[str, Any]:
    """The chat completions request for a turn. Thinking blocks are not sent back."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for message in request.messages:
        if message.role == "tool":
            messages.extend(
                {
                    "role": "tool",
                    "tool_call_id": block.tool_call_id,
                    "content": f"Error: {block.content}" if block.is_error else block.content,
                }
                for block in message.content
                if isinstance(block, ToolResultBlock)
            )
        elif message.role == "user":
            messages.append({"role": "user", "content": message.text})
        else:
            entry: dict[str, Any] = {"role": "assistant", "content": message.text or None}
            calls = [
                {
                    "id": block.id,
                    "type": "function",
                    "function": {
                        "name": block.name,
                        "arguments": json.dumps(dict(block.arguments)),
                    },
                }
                for block in message.content
                if isinstance(block, ToolUseBlock)
            ]
            if calls:
                entry["tool_calls"] = calls
            if calls or entry["content"]:  # a message of thinking alone is not sent
                messages.append(entry)
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        max_tokens_field: request.max_tokens,
    }
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": dict(tool.parameters),
                },
            }
            for tool in request.tools
        ]
    if request.thinking:
        body["reasoning_effort"] = "medium"
    return body


# -- the response -------------------------------------------------------------------------


@final
@attrs.define(eq=False)
class _Turn(Parser):
    """Chat completion chunks in, model events out."""

    _calls: dict[int, StreamedCall] = attrs.Factory(dict)
    _done: bool = False  # "[DONE]" arrived; the rest of the body is ignored

    def payload(self, data: str) -> list[ModelEvent]:
        if self._done:
            return []
        if data.strip() == "[DONE]":
            self._done = True
            return []
        chunk = json_object(data)
        if (error := chunk.get("error")) is not None:
            raise ProviderError.of(error)
        events: list[ModelEvent] = []
        for choice in field(chunk, "choices", list) or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                events += self._choice(choice)
        if usage := field(chunk, "usage", dict):
            events.append(
                UsageReport(
                    input_tokens=field(usage, "prompt_tokens", int),
                    output_tokens=field(usage, "completion_tokens", int),
                )
            )
        return events

    def _choice(self, choice: Mapping[str, Any]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        delta = field(choice, "delta", dict) or {}
        if thinking := field(delta, "reasoning", str) or field(delta, "reasoning_content", str):
            events.append(ThinkingChunk(thinking))
        if text := field(delta, "content", str):
            events.append(TextChunk(text))
        for position, fragment in enumerate(field(delta, "tool_calls", list) or ()):
            if not isinstance(fragment, dict):
                raise BadResponse("a tool call fragment is not an object")
            index = field(fragment, "index", int)
            events += self._tool_fragment(position if index is None else index, fragment)
        if (reason := field(choice, "finish_reason", str)) and self.stop_reason is None:
            if reason == "length":  # the limit may have cut the last call's arguments
                events += [e for c in self._calls.values() if (e := c.end_at_limit())]
            else:
                events += [call.end() for call in self._calls.values()]
            if self._calls and reason == "stop":
                reason = "tool_calls"  # some local servers say "stop" after tool calls
            self.stop_reason = _STOP_REASONS.get(reason, reason)
        return events

    def _tool_fragment(self, index: int, fragment: Mapping[str, Any]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        function = field(fragment, "function", dict) or {}
        call = self._calls.get(index)
        if call is None:
            name = field(function, "name", str)
            if not name:
                raise BadResponse(f"tool call {index} began without a function name")
            call = StreamedCall(field(fragment, "id", str) or f"call_{index}", name)
            self._calls[index] = call
            events.append(ToolCallBegin(call.id, call.name))
        if arguments := field(function, "arguments", str):
            events.append(call.add(arguments))
        return events

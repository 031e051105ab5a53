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

Stopping: the turn's response lives in ``async with client.stream(...)``. A cancel lands
on the socket read, httpcore discards the half-read connection (never returns it to the
pool) and the same client serves the next turn. ``TurnEnd`` comes at the end of the body,
so a consumer that reads up to it leaves a complete response and a reusable connection.

Errors are mapped to ``ModelError`` in ``OpenAICompatModel._error`` only:

    HTTP 429                              rate_limit (retry_after from Retry-After)
    HTTP 529                              overloaded
    HTTP 500, 502, 503                    unavailable
    HTTP 408, 504, read timeout           timeout
    HTTP 400 naming the context window    context_length
    other HTTP statuses                   unknown (the message says what to check)
    connection refused / reset / dropped  unavailable
    not an event stream, bad JSON, bad
    tool arguments, no finish_reason      bad_response
    an error object inside the stream     by its code, else unknown

rate_limit, overloaded and unavailable are retried (``max_retries``) while no event has
been yielded, i.e. up to the response headers: after Retry-After (capped at 60 s) or an
exponential backoff, slept with ``trio.sleep`` so that a stop cancels it at once.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import httpx
import trio
from httpx_sse import EventSource, ServerSentEvent, SSEError

from runtime import (
    ErrorKind,
    ModelError,
    ModelEvent,
    ModelRequest,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallEnd,
    ToolResultBlock,
    ToolUseBlock,
    TurnEnd,
    UsageReport,
)

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
# Longer than the longest silent thinking phase we support.
DEFAULT_READ_TIMEOUT: Final = 600.0
MAX_RETRY_AFTER: Final = 60.0
BACKOFF_BASE: Final = 0.5  # seconds before the first retry when the server names no delay

_RETRIED_KINDS: Final = frozenset({"rate_limit", "overloaded", "unavailable"})
_STOP_REASONS: Final = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
}
_CONTEXT_LENGTH: Final = re.compile(
    r"context_length_exceeded|maximum context length|exceed_context_size|context window",
    re.IGNORECASE,
)


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

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        body = _request_body(self.model, request, max_tokens_field=self.max_tokens_field)
        for attempt in range(self.max_retries + 1):
            async with AsyncExitStack() as stack:
                try:
                    response = await self._open(stack, body)
                except ModelError as error:
                    if attempt == self.max_retries or error.kind not in _RETRIED_KINDS:
                        raise
                    delay = _backoff(attempt, error.retry_after)
                else:
                    events = _Events(self, response, EventSource(response).aiter_sse())
                    try:
                        yield events
                    finally:
                        await events.aclose()
                    return
            await trio.sleep(delay)

    async def _open(self, stack: AsyncExitStack, body: dict[str, Any]) -> httpx.Response:
        """Send the request; return the response once its headers say 2xx."""
        try:
            response = await stack.enter_async_context(
                self._client.stream(
                    "POST",
                    f"{self.base_url}/chat/completions",
                    json=body,
                    headers={"Accept": "text/event-stream"},
                )
            )
            if response.is_success:
                return response
            await response.aread()
            raise _ProviderError(
                response.status_code,
                _detail(_error_member(response.content)),
                retry_after=_retry_after(response.headers),
            )
        except (httpx.HTTPError, _ProviderError) as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> ModelError:
        """The one place where provider and transport failures become ModelError."""
        where = f"The provider at {self.base_url}"
        if isinstance(exc, _ProviderError):
            detail = exc.detail.replace(self._api_key, "***") if self._api_key else exc.detail
            kind, advice = _kind(exc.status, exc.code, detail)
            if kind == "rate_limit" and exc.retry_after is not None:
                advice = f"Wait {exc.retry_after:g} s before retrying, or lower the request rate."
            elif exc.status == 404:
                advice = f"Check the model name {self.model!r} and that the base URL ends in /v1."
            said = "mid-stream" if exc.in_stream else f"with HTTP {exc.status}"
            return ModelError(
                kind,
                f"{where} reported an error {said}: {detail} {advice}",
                retry_after=exc.retry_after,
            )
        if isinstance(exc, httpx.ReadTimeout):
            return ModelError(
                "timeout",
                f"{where} sent nothing for {self._client.timeout.read} s. Try again, or raise "
                "read_timeout if the model thinks silently for longer than that.",
            )
        if isinstance(exc, httpx.ConnectTimeout):
            return ModelError(
                "unavailable",
                f"{where} did not accept a connection within {self._client.timeout.connect} s. "
                "Check that the server is running and reachable, then try again.",
            )
        if isinstance(exc, httpx.TimeoutException):
            return ModelError("timeout", f"{where} timed out ({exc}). Try again later.")
        if isinstance(exc, SSEError):
            return ModelError(
                "bad_response",
                f"{where} did not answer with an event stream ({exc}). Check that the base URL "
                "points to an OpenAI-compatible server.",
            )
        if isinstance(exc, httpx.TransportError):
            return ModelError(
                "unavailable",
                f"The connection to the provider at {self.base_url} failed "
                f"({type(exc).__name__}: {exc}). Check that the server is running and "
                "reachable, then try again.",
            )
        return ModelError(
            "bad_response",
            f"{where} sent a response that is not a valid chat completions stream ({exc}). "
            "Check that the server is OpenAI-compatible and supports stream=true.",
        )


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
    base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if api_key is None:
        api_key = os.environ.get("OPENAI_API_KEY") or None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    # No cap on concurrent connections: httpx's default of 100 would make the 101st
    # concurrent run wait silently for a free connection. Idle ones kept: up to 100.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        yield OpenAICompatModel(
            client=client,
            model=model,
            base_url=base_url,
            api_key=api_key,
            max_retries=max_retries,
            max_tokens_field=max_tokens_field,
        )


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


T = TypeVar("T")


def _field(obj: Mapping[str, Any], key: str, kind: type[T]) -> T | None:
    """``obj[key]`` if present and of the expected type; a wrong type is a bad response."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise _BadResponse(f"{key} is a {type(value).__name__}, not a {kind.__name__}")
    return value


@final
@attrs.define(eq=False)
class _Call:
    id: str
    name: str
    arguments: list[str] = attrs.Factory(list)


@final
@attrs.define(eq=False)
class _Turn:
    """Turns the stream's data payloads into model events. Pure, so tests need no I/O.

    ``feed(data)`` takes one SSE data payload, or None at the end of the body, and raises
    ValueError or _ProviderError for the caller to map.
    """

    ended: bool = False
    _calls: dict[int, _Call] = attrs.Factory(dict)
    _stop_reason: str | None = None
    _done: bool = False  # "[DONE]" arrived; the rest of the body is ignored

    def feed(self, data: str | None) -> list[ModelEvent]:
        if data is None:
            if self._stop_reason is None:
                raise _BadResponse("the stream ended before the model finished its turn")
            self.ended = True
            return [TurnEnd(self._stop_reason)]
        if self._done or not data:
            return []
        if data.strip() == "[DONE]":
            self._done = True
            return []
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise _BadResponse(f"a chunk is a {type(chunk).__name__}, not an object")
        if (error := chunk.get("error")) is not None:
            raise _ProviderError.in_stream_error(error)
        events: list[ModelEvent] = []
        for choice in _field(chunk, "choices", list) or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                events += self._choice(choice)
        if usage := _field(chunk, "usage", dict):
            events.append(
                UsageReport(
                    input_tokens=_field(usage, "prompt_tokens", int),
                    output_tokens=_field(usage, "completion_tokens", int),
                )
            )
        return events

    def _choice(self, choice: Mapping[str, Any]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        delta = _field(choice, "delta", dict) or {}
        if thinking := _field(delta, "reasoning", str) or _field(delta, "reasoning_content", str):
            events.append(ThinkingChunk(thinking))
        if text := _field(delta, "content", str):
            events.append(TextChunk(text))
        for position, fragment in enumerate(_field(delta, "tool_calls", list) or ()):
            if not isinstance(fragment, dict):
                raise _BadResponse("a tool call fragment is not an object")
            index = _field(fragment, "index", int)
            events += self._tool_fragment(position if index is None else index, fragment)
        if (reason := _field(choice, "finish_reason", str)) and self._stop_reason is None:
            events += [ToolCallEnd(call.id, _arguments(call)) for call in self._calls.values()]
            if self._calls and reason == "stop":
                reason = "tool_calls"  # some local servers say "stop" after tool calls
            self._stop_reason = _STOP_REASONS.get(reason, reason)
        return events

    def _tool_fragment(self, index: int, fragment: Mapping[str, Any]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        function = _field(fragment, "function", dict) or {}
        call = self._calls.get(index)
        if call is None:
            name = _field(function, "name", str)
            if not name:
                raise _BadResponse(f"tool call {index} began without a function name")
            call = self._calls[index] = _Call(_field(fragment, "id", str) or f"call_{index}", name)
            events.append(ToolCallBegin(call.id, call.name))
        if arguments := _field(function, "arguments", str):
            call.arguments.append(arguments)
            events.append(ToolCallArgs(call.id, arguments))
        return events


def _arguments(call: _Call) -> Mapping[str, Any]:
    text = "".join(call.arguments)
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise _BadResponse(f"the arguments of tool call {call.name!r} are not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _BadResponse(f"the arguments of tool call {call.name!r} are not a JSON object")
    return value


@final
@attrs.define(eq=False)
class _Events:
    """One turn's events. A class rather than an async generator, so that leaving the
    stream early cannot strand a generator of ours; ``aclose`` finishes httpx's."""

    _model: OpenAICompatModel
    _response: httpx.Response
    _sse: AsyncGenerator[ServerSentEvent, None]
    _turn: _Turn = attrs.Factory(_Turn)
    _pending: deque[ModelEvent] = attrs.Factory(deque)

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> ModelEvent:
        while not self._pending:
            if self._turn.ended:
                raise StopAsyncIteration
            try:
                sse = await anext(self._sse, None)
                self._pending.extend(self._turn.feed(None if sse is None else sse.data))
            except (httpx.HTTPError, ValueError, _ProviderError) as exc:
                raise self._model._error(exc) from exc
        return self._pending.popleft()

    async def aclose(self) -> None:
        """Close the response (a half-read connection is discarded, not pooled), then run
        httpx's stranded async generators to their end: with the socket closed their next
        read fails at once, where a garbage-collected one would raise ResourceWarning."""
        try:
            await self._response.aclose()
        finally:
            try:
                async for _ in self._sse:
                    pass
            except (httpx.HTTPError, httpx.StreamError):
                pass


# -- errors -------------------------------------------------------------------------------


class _BadResponse(ValueError):
    """The stream broke the chat completions protocol."""


class _ProviderError(Exception):
    """The provider reported an error: as an HTTP status, or as an object in the stream."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        in_stream: bool = False,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code
        self.retry_after = retry_after
        self.in_stream = in_stream

    @classmethod
    def in_stream_error(cls, error: object) -> _ProviderError:
        """From the error object of a chunk; OpenRouter puts an HTTP status in its code."""
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
        return cls(
            code if isinstance(code, int) else None,
            _detail(error),
            code=code if isinstance(code, str) else None,
            in_stream=True,
        )


def _error_member(content: bytes) -> object:
    """The "error" member of an error body (OpenAI, OpenRouter, vLLM, Ollama), else the body."""
    try:
        return json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace").strip() or "no details"


def _detail(error: object) -> str:
    """The provider's own words about an error, short, ending in a full stop."""
    if isinstance(error, dict):
        error = error.get("message") or error
    text = str(error)
    text = text if len(text) <= 300 else f"{text[:300]}..."
    return text if text.endswith(".") else f"{text}."


def _kind(status: int | None, code: str | None, detail: str) -> tuple[ErrorKind, str]:
    """The error kind for a provider's status or error code, and what to do about it."""
    if status == 429 or code == "rate_limit_exceeded":
        return "rate_limit", "Wait before retrying, or lower the request rate."
    if status == 529 or code == "overloaded":
        return "overloaded", "The provider is overloaded; try again in a minute."
    if status in (500, 502, 503) or code == "server_error":
        return "unavailable", "Try again later; if it persists, check the provider's status."
    if status in (408, 504):
        return "timeout", "Try again, or ask for a shorter answer."
    if status in (400, None) and _CONTEXT_LENGTH.search(f"{code} {detail}"):
        return "context_length", "Shorten the history or start a new session."
    if status in (401, 403):
        return "unknown", "Check OPENAI_API_KEY or the api_key argument."
    return "unknown", "Check the request against what the server supports."


def _retry_after(headers: httpx.Headers) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER)
    return BACKOFF_BASE * 2.0**attempt

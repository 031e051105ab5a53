"""What the httpx adapters share (OpenAI-compatible chat completions, OpenAI Responses,
Gemini): one client per runtime, every turn's SSE stream under ``async with``, retries only
before any output, and one boundary where HTTP and transport failures become ``ModelError``.

Stopping: ``Endpoint.stream`` keeps the turn's response in ``async with
client.stream(...)``. A cancel lands on the socket read, httpcore discards the half-read
connection (never returns it to the pool) and the same client serves the next turn. The
events are pulled by ``Events``, a class rather than an async generator, so a consumer that
leaves early strands no generator of ours; its ``aclose`` finishes httpx's. A provider's
``Parser`` turns each SSE data payload into model events.

Errors are mapped to ``ModelError`` in ``Endpoint.error`` only:

    HTTP 429                              rate_limit (retry_after from Retry-After)
    HTTP 529                              overloaded
    HTTP 500, 502, 503                    unavailable
    HTTP 408, 504, read timeout           timeout
    HTTP 400 naming the context window    context_length
    other HTTP statuses                   unknown (the message says what to check)
    connection refused / reset / dropped
    before the response headers           unavailable
    a connection reset or dropped after
    the headers (whatever the exception)  bad_response (see ``adapters._failures``)
    not an event stream, bad JSON, bad
    tool arguments, an early end          bad_response
    an error object inside the stream     by its status or code, else unknown

An error response's body is read up to ``MAX_ERROR_BODY`` (64 KiB) and the connection is
then dropped; the message quotes the start of it.

rate_limit, overloaded and unavailable are retried (``max_retries``) while no event has
been yielded, i.e. up to the response headers: after Retry-After (capped at 60 s) or an
exponential backoff, slept with ``trio.sleep`` so that a stop cancels it at once. API keys
are replaced by ``***`` in every message and kept out of every repr.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
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
    ToolCallArgs,
    ToolCallEnd,
    TurnEnd,
)

from ._failures import MAX_ERROR_BODY, BoundedBody, Phase, transport_failure

DEFAULT_CONNECT_TIMEOUT: Final = 5.0
# Longer than the longest silent thinking phase we support.
DEFAULT_READ_TIMEOUT: Final = 600.0
MAX_RETRY_AFTER: Final = 60.0
BACKOFF_BASE: Final = 0.5  # seconds before the first retry when the server names no delay

_RETRIED_KINDS: Final = frozenset({"rate_limit", "overloaded", "unavailable"})
_CONTEXT_LENGTH: Final = re.compile(
    r"context_length_exceeded|maximum context length|exceed_context_size|context window"
    r"|exceeds the maximum number of tokens",
    re.IGNORECASE,
)


@asynccontextmanager
async def open_client(
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    read_timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The one client a model's turns share, closed on exit."""
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    # No cap on concurrent connections: httpx's default of 100 would make the 101st
    # concurrent run wait silently for a free connection. Idle ones kept: up to 100.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(
        headers=dict(headers), timeout=timeout, limits=limits, transport=transport
    ) as client:
        yield client


@attrs.define(eq=False)
class Parser:
    """One turn's SSE payloads in, model events out; pure, so tests need no I/O.

    A provider's subclass implements ``payload`` and sets ``stop_reason`` when the model
    ends its turn. ``TurnEnd`` goes out at the end of the body, so a consumer that reads up
    to it leaves a complete response and a reusable connection. A ``ModelError`` in the
    result is raised in its turn (after the events before it, such as a usage report);
    ValueError and ProviderError are raised for ``Endpoint.error`` to map.
    """

    ended: bool = False
    stop_reason: str | None = None

    def feed(self, data: str | None) -> Sequence[ModelEvent | ModelError]:
        """One SSE data payload, or None at the end of the body."""
        if data is not None:
            return self.payload(data) if data else []
        if self.stop_reason is None:
            raise BadResponse("the stream ended before the model finished its turn")
        self.ended = True
        return [TurnEnd(self.stop_reason)]

    def payload(self, data: str) -> Sequence[ModelEvent | ModelError]:
        raise NotImplementedError


@attrs.frozen
class Wording:
    """How one provider's errors name it and say what to check."""

    server: str  # what the base URL must point to: "an OpenAI-compatible server"
    stream: str  # the response's name: "chat completions stream"
    key_env: str  # where the key comes from: "OPENAI_API_KEY"
    url_hint: str  # what a 404 suggests about the base URL: "ends in /v1"


@final
@attrs.frozen
class Endpoint:
    """One model on one server, reached through a shared client."""

    client: httpx.AsyncClient = attrs.field(repr=False)
    base_url: str
    model: str
    wording: Wording = attrs.field(repr=False)
    api_key: str | None = attrs.field(default=None, repr=False)
    max_retries: int = 2

    @asynccontextmanager
    async def stream(
        self, path: str, body: Mapping[str, Any], parser: Parser
    ) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        """POST ``body`` to ``base_url + path`` and yield the turn's events."""
        for attempt in range(self.max_retries + 1):
            async with AsyncExitStack() as stack:
                try:
                    response = await self._open(stack, path, body)
                except ModelError as error:
                    if attempt == self.max_retries or error.kind not in _RETRIED_KINDS:
                        raise
                    delay = _backoff(attempt, error.retry_after)
                else:
                    events = Events(self, response, EventSource(response).aiter_sse(), parser)
                    try:
                        yield events
                    finally:
                        await events.aclose()
                    return
            await trio.sleep(delay)

    async def _open(
        self, stack: AsyncExitStack, path: str, body: Mapping[str, Any]
    ) -> httpx.Response:
        """Send the request; return the response once its headers say 2xx."""
        try:
            request = self.client.build_request(
                "POST", self.base_url + path, json=body, headers={"Accept": "text/event-stream"}
            )
            request.stream = _Body(request.content)
            response = await self.client.send(request, stream=True)
            stack.push_async_callback(response.aclose)
            if response.is_success:
                return response
            content, truncated = await read_error_body(response)
            raise ProviderError.of(
                _error_member(content),
                status=response.status_code,
                retry_after=_retry_after(response.headers),
                truncated=truncated,
            )
        except (httpx.HTTPError, ProviderError) as exc:
            raise self.error(exc, "connect") from exc

    def error(self, exc: Exception, phase: Phase) -> ModelError:
        """The one place where provider and transport failures become ModelError. ``phase``
        says whether the failure came while opening the stream (up to its response
        headers) or while reading it."""
        where = f"The provider at {self.base_url}"
        if isinstance(exc, ProviderError):
            detail = _short(exc.detail.replace(self.api_key, "***") if self.api_key else exc.detail)
            if exc.truncated:
                detail += f" (The error body was longer than {MAX_ERROR_BODY // 1024} KiB.)"
            kind, advice = _kind(exc.status, exc.code, detail, self.wording.key_env)
            if kind == "rate_limit" and exc.retry_after is not None:
                advice = f"Wait {exc.retry_after:g} s before retrying, or lower the request rate."
            elif exc.status == 404:
                advice = (
                    f"Check the model name {self.model!r} and that the base URL "
                    f"{self.wording.url_hint}."
                )
            said = "mid-stream" if exc.in_stream else f"with HTTP {exc.status}"
            return ModelError(
                kind,
                f"{where} reported an error {said}: {detail} {advice}",
                retry_after=exc.retry_after,
            )
        if isinstance(exc, httpx.ReadTimeout):
            return ModelError(
                "timeout",
                f"{where} sent nothing for {self.client.timeout.read} s. Try again, or raise "
                "read_timeout if the model thinks silently for longer than that.",
            )
        if isinstance(exc, httpx.ConnectTimeout):
            return ModelError(
                "unavailable",
                f"{where} did not accept a connection within {self.client.timeout.connect} s. "
                "Check that the server is running and reachable, then try again.",
            )
        if isinstance(exc, httpx.TimeoutException):
            return ModelError("timeout", f"{where} timed out ({exc}). Try again later.")
        if isinstance(exc, SSEError):
            return ModelError(
                "bad_response",
                f"{where} did not answer with an event stream ({exc}). Check that the base URL "
                f"points to {self.wording.server}.",
            )
        if isinstance(exc, httpx.TransportError):
            return transport_failure(phase, where=where, detail=f"{type(exc).__name__}: {exc}")
        return ModelError(
            "bad_response",
            f"{where} sent a response that is not a valid {self.wording.stream} ({exc}). "
            f"Check that the base URL points to {self.wording.server}.",
        )


@attrs.define(eq=False)
class EndpointModel:
    """The Model port over an ``Endpoint``; a subclass says how a turn is asked for."""

    _endpoint: Endpoint = attrs.field(alias="endpoint")

    @property
    def model(self) -> str:
        return self._endpoint.model

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        path, body, parser = self.turn(request)
        return self._endpoint.stream(path, body, parser)

    def turn(self, request: ModelRequest) -> tuple[str, Mapping[str, Any], Parser]:
        """The path, the body and the parser of one turn."""
        raise NotImplementedError


@final
@attrs.define(eq=False)
class Events:
    """One turn's events. A class rather than an async generator, so that leaving the
    stream early cannot strand a generator of ours; ``aclose`` finishes httpx's."""

    _endpoint: Endpoint
    _response: httpx.Response
    _sse: AsyncGenerator[ServerSentEvent, None]
    _parser: Parser
    _pending: deque[ModelEvent | ModelError] = attrs.Factory(deque)

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> ModelEvent:
        while not self._pending:
            if self._parser.ended:
                raise StopAsyncIteration
            try:
                sse = await anext(self._sse, None)
                self._pending.extend(self._parser.feed(None if sse is None else sse.data))
            except (httpx.HTTPError, ValueError, ProviderError) as exc:
                raise self._endpoint.error(exc, "stream") from exc
        item = self._pending.popleft()
        if isinstance(item, ModelError):
            raise item
        return item

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


# -- what parsers share --------------------------------------------------------------------


T = TypeVar("T")


def field(obj: Mapping[str, Any], key: str, kind: type[T]) -> T | None:
    """``obj[key]`` if present and of the expected type; a wrong type is a bad response."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise BadResponse(f"{key} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def json_object(data: str) -> dict[str, Any]:
    """One SSE payload, which must be a JSON object."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise BadResponse(f"an event is a {type(value).__name__}, not an object")
    return value


@final
@attrs.define(eq=False)
class StreamedCall:
    """A tool call whose JSON arguments arrive in fragments."""

    id: str
    name: str
    fragments: list[str] = attrs.Factory(list)

    def add(self, fragment: str) -> ToolCallArgs:
        self.fragments.append(fragment)
        return ToolCallArgs(self.id, fragment)

    def end_at_limit(self) -> ToolCallEnd | None:
        """The call, if its arguments are whole, when the output limit ended the turn
        (max_tokens); None if the limit cut them off (or before any came): such a call is
        dropped, as a stop drops it, since it never ran."""
        if not "".join(self.fragments).strip():
            return None
        try:
            return self.end()
        except BadResponse:
            return None

    def end(self) -> ToolCallEnd:
        """The call with its arguments, which must make one JSON object ("" is {})."""
        text = "".join(self.fragments)
        try:
            value = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise BadResponse(
                f"the arguments of tool call {self.name!r} are not JSON: {exc}"
            ) from exc
        if not isinstance(value, dict):
            raise BadResponse(f"the arguments of tool call {self.name!r} are not a JSON object")
        return ToolCallEnd(self.id, value)


@final
class _Body(httpx.AsyncByteStream):
    """A request body sent in one piece by a plain iterator. httpx's own is an async
    generator, which a stop landing while the body is written leaves unfinished (Trio
    then warns when it is collected)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._data)


@final
class _Once:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


class BadResponse(ValueError):
    """The stream broke the provider's protocol."""


class ProviderError(Exception):
    """The provider reported an error: as an HTTP status, or as an object in the stream."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        in_stream: bool = False,
        truncated: bool = False,
    ):
        # Not the detail, which may quote the key: a traceback prints this exception's args.
        super().__init__(f"HTTP {status}" if status else "an error reported by the provider")
        self.status = status
        self.detail = detail
        self.code = code
        self.retry_after = retry_after
        self.in_stream = in_stream
        self.truncated = truncated  # the error body was longer than what was read

    @classmethod
    def of(
        cls,
        error: object,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        truncated: bool = False,
    ) -> ProviderError:
        """From an error object: of an error response (``status``), or inside the stream
        (no status), where OpenRouter and Gemini put an HTTP status in its code."""
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
        return cls(
            status if status is not None or not isinstance(code, int) else code,
            _detail(error),
            code=code if isinstance(code, str) else None,
            retry_after=retry_after,
            in_stream=status is None,
            truncated=truncated,
        )


async def read_error_body(response: httpx.Response) -> tuple[bytes, bool]:
    """At most ``MAX_ERROR_BODY`` bytes of an error response's body, and whether there was
    more. A body that breaks off gives none (the message then says "no details")."""
    body = response.stream = _BoundedBody(response.stream)
    try:
        await response.aread()
    except httpx.TransportError:
        return b"", True
    return response.content, body.truncated


@final
class _BoundedBody(BoundedBody, httpx.AsyncByteStream):
    """``BoundedBody`` as the httpx stream that ``Response.aread`` requires."""


def _error_member(content: bytes) -> object:
    """The "error" member of an error body (OpenAI, OpenRouter, vLLM, Ollama, Gemini), else
    the body."""
    try:
        return json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace").strip() or "no details"


def _detail(error: object) -> str:
    """The provider's own words about an error: its message, else the whole object."""
    if isinstance(error, dict):
        error = error.get("message") or error
    return str(error)


def _short(text: str) -> str:
    """At most 300 characters, ending in a full stop. Cut only after the key is out."""
    text = text if len(text) <= 300 else f"{text[:300]}..."
    return text if text.endswith(".") else f"{text}."


def _kind(status: int | None, code: str | None, detail: str, key_env: str) -> tuple[ErrorKind, str]:
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
        return "unknown", f"Check {key_env} or the api_key argument."
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

"""The Model port over Anthropic's Messages API, through the official ``anthropic`` SDK.

One ``AsyncAnthropic`` client per runtime, opened by ``open_anthropic`` with ``async with``
(under Trio an unclosed SDK client is never closed) and shared by every turn. Each turn
runs under ``async with client.messages.stream(...)``; its events are pulled by a plain
class, not an async generator, with no await but the SDK's own. A stop therefore lands on
the socket read: the ``Cancelled`` unwinds the SDK's async generators on its way out and
the connection is discarded, not pooled; the same client serves the next turn. If a
consumer leaves the loop early instead (a break, an error, a stop on an await of its
own), the turn's exit unwinds those generators itself (see ``_Turn._unwind``).

Retries are the SDK's (``max_retries``, default 2). They cover opening the stream only
(429, 5xx, 529, connection errors), so no output is ever duplicated; they honour
``retry-after`` and back off with ``anyio.sleep``, a ``trio.sleep`` under Trio, which a
stop cancels at once. The SDK waits as long as ``retry-after`` asks, so pass
``max_retries=0`` to surface rate limits at once and retry in the caller.

Errors are mapped at one boundary, ``_model_error`` (kind: cause):

- ``rate_limit``: HTTP 429 (``retry_after`` from its header) or an in-stream
  ``rate_limit_error`` event.
- ``overloaded``: HTTP 529 or an in-stream ``overloaded_error`` event.
- ``context_length``: HTTP 400 about the context window ("prompt is too long").
- ``unavailable``: other 5xx or an in-stream ``api_error``; no connection, or a reset
  before the response headers; all after the SDK's retries.
- ``timeout``: ``APITimeoutError`` (connect) or a read timeout mid-stream.
- ``bad_response``: after the headers, a reset, an EOF before the turn ended, or bytes
  that are not the expected events; tool-call arguments that are not a JSON object.

A broken connection is classified by phase, not by exception class (see
``adapters._failures``): failing in ``__aenter__`` (up to the response headers) is
``unavailable``, failing while the events are read is ``bad_response``, whichever class
the SDK release raises (2.17 wraps a body that breaks off in ``APIConnectionError``;
earlier releases let httpx2's ``RemoteProtocolError`` through). The SDK retries only while
opening the stream, so a turn that broke off is never retried.
- ``refusal``: ``stop_reason == "refusal"`` (after its usage report).
- ``unknown``: anything else (401, 403, 404, other 400s); the message says what to check.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Final, Self, final

import anthropic
import attrs
import httpx2
import trio
from anthropic.lib.streaming import AsyncMessageStream, AsyncMessageStreamManager

from runtime import (
    Block,
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
    ToolSpec,
    ToolUseBlock,
    TurnEnd,
    UsageReport,
)

from ._failures import MAX_ERROR_BODY, BoundedBody, Phase, transport_failure

CONNECT_TIMEOUT: Final = 5.0
# Must exceed the longest silent thinking phase we support: the provider may send
# nothing at all for minutes after the response headers.
READ_TIMEOUT: Final = 600.0
MAX_RETRIES: Final = 2
# The API's smallest thinking budget; see ``_request_params`` for the rule.
MIN_THINKING_BUDGET: Final = 1024
# How long a turn that has ended may take to finish its stream when the consumer leaves
# without reading it to the end, so that its connection can be pooled.
END_GRACE: Final = 1.0


@final
@attrs.define(eq=False)
class AnthropicModel:
    """The Model port for one Anthropic model over a shared SDK client.

    Made by ``open_anthropic``; the client (and the API key inside it) stays out of the
    repr.
    """

    _client: anthropic.AsyncAnthropic = attrs.field(repr=False, alias="client")
    model: str

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        return _Turn(self._client, _request_params(self.model, request))


@asynccontextmanager
async def open_anthropic(
    *,
    model: str,
    api_key: str | None = None,
    base_url: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    max_retries: int = MAX_RETRIES,
    http_client: httpx2.AsyncClient | None = None,
) -> AsyncIterator[AnthropicModel]:
    """Open the shared SDK client and close it on exit.

    ``api_key`` defaults to ``ANTHROPIC_API_KEY``, ``base_url`` to ``ANTHROPIC_BASE_URL``
    (then the public API). ``http_client`` is for tests and custom transports (an
    ``httpx2`` client, which the SDK closes with itself). Either way the client gets a
    response hook that bounds error bodies to ``MAX_ERROR_BODY`` (the SDK reads them whole).
    """
    key = api_key or os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        raise ValueError("No Anthropic API key: set ANTHROPIC_API_KEY or pass api_key=.")
    if http_client is None:  # the SDK's own default, made here to add the hook below
        http_client = anthropic.DefaultAsyncHttpxClient()
    hooks = http_client.event_hooks
    hooks["response"] = [*hooks.get("response", []), _bound_error_body]
    http_client.event_hooks = hooks
    async with anthropic.AsyncAnthropic(
        api_key=key,
        base_url=base_url or os.environ.get("ANTHROPIC_BASE_URL") or None,
        timeout=httpx2.Timeout(read_timeout, connect=connect_timeout),
        max_retries=max_retries,
        http_client=http_client,
    ) as client:
        yield AnthropicModel(client=client, model=model)


# -- one turn --------------------------------------------------------------------------


@final
@attrs.define(eq=False)
class _Turn:
    """One model turn: the context manager that owns the SDK stream, and the iterator of
    mapped events. A class rather than an async generator, so that nothing of ours is left
    suspended when a consumer stops."""

    _client: anthropic.AsyncAnthropic
    _params: dict[str, Any]
    _manager: AsyncMessageStreamManager[Any] | None = None
    _stream: AsyncMessageStream[Any] | None = None
    # Mapped events not yet handed out; a ModelError in here is raised in its turn.
    _pending: deque[ModelEvent | ModelError] = attrs.Factory(deque)
    _tool_calls: dict[int, tuple[str, list[str]]] = attrs.Factory(dict)  # index -> id, args
    # A tool call whose arguments did not parse: dropped if the turn then ends with
    # max_tokens (the limit cut it off; it never ran), else the turn fails with this.
    _unparsed: ModelError | None = None
    _ended: bool = False  # a TurnEnd was mapped
    _sdk_done: bool = False  # the SDK's iteration raised (its end, an error, a cancel)

    async def __aenter__(self) -> Self:
        # The manager is made here, not in ``stream()``: making it starts the request
        # coroutine, which must not be left unawaited if the turn is never entered.
        self._manager = self._client.messages.stream(**self._params)
        try:
            self._stream = await self._manager.__aenter__()
        except (anthropic.APIError, httpx2.TransportError) as exc:
            raise _model_error(exc, self._client, "connect") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._manager is not None
        try:
            if self._stream is not None and not self._sdk_done:
                await self._unwind(self._stream)
        finally:
            # Every exit closes the SDK's response here, not in the garbage collector:
            # whatever _unwind raised, and even with a stop already pending (a refusal
            # racing an abort), which would otherwise land on the close's first checkpoint.
            with trio.move_on_after(END_GRACE, shield=True):
                await self._manager.__aexit__(exc_type, exc, tb)

    async def _unwind(self, stream: AsyncMessageStream[Any]) -> None:
        """The consumer left before the stream ended (a break, an error in its loop, a
        cancel that landed on an await of its own): the SDK's async generators are still
        suspended and would be garbage collected unclosed (a ResourceWarning under Trio).
        Pull on under a cancelled scope: the cancel lands on the socket read and unwinds
        them all, and the connection is discarded, as on any stop. After the turn's end
        only ``message_stop`` is left, so it gets a moment to arrive and the connection
        goes back to the pool."""
        with trio.CancelScope() as scope:
            if self._ended:
                scope.deadline = trio.current_time() + END_GRACE
            else:
                scope.cancel()
            while True:  # events already buffered come out without a checkpoint
                try:
                    await stream.__anext__()
                except Exception:
                    return

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ModelEvent:
        assert self._stream is not None, "iterate inside `async with model.stream(...)`"
        while not self._pending:
            try:
                event = await self._next_sdk_event(self._stream)
            except StopAsyncIteration:
                if self._ended:
                    raise
                raise ModelError(
                    "bad_response",
                    "The Anthropic stream ended before the model finished its turn; "
                    "retry the turn.",
                ) from None
            except Exception as exc:
                raise _model_error(exc, self._client, "stream") from exc
            self._pending.extend(self._map(event))
        item = self._pending.popleft()
        if isinstance(item, ModelError):
            raise item
        return item

    async def _next_sdk_event(self, stream: AsyncMessageStream[Any]) -> Any:
        try:
            return await stream.__anext__()
        except BaseException:
            # Whatever ended the stream (its end, an error, a cancel) unwound the SDK's
            # generators on its way out.
            self._sdk_done = True
            raise

    def _map(self, event: Any) -> list[ModelEvent | ModelError]:
        """The model events for one SDK event (the SDK adds derived events such as
        ``text``; the raw ``content_block_delta`` carries the same data and is used)."""
        match event.type:
            case "message_start":
                return [UsageReport(input_tokens=event.message.usage.input_tokens)]
            case "content_block_start" if event.content_block.type == "tool_use":
                block = event.content_block
                self._tool_calls[event.index] = (block.id, [])
                return [ToolCallBegin(id=block.id, name=block.name)]
            case "content_block_delta":
                return self._map_delta(event.index, event.delta)
            case "content_block_stop" if event.index in self._tool_calls:
                call_id, fragments = self._tool_calls.pop(event.index)
                end = _tool_call_end(call_id, "".join(fragments))
                if isinstance(end, ModelError):
                    self._unparsed = self._unparsed or end
                    return []
                return [end]
            case "message_delta":
                usage = event.usage
                mapped: list[ModelEvent | ModelError] = [
                    UsageReport(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
                ]
                stop_reason = event.delta.stop_reason
                if stop_reason == "refusal":
                    mapped.append(
                        ModelError(
                            "refusal",
                            "The model declined to answer this request; rephrase it or ask "
                            "something else.",
                        )
                    )
                elif self._unparsed is not None and stop_reason not in (None, "max_tokens"):
                    mapped.append(self._unparsed)
                elif stop_reason is not None:
                    self._ended = True
                    mapped.append(TurnEnd(stop_reason=stop_reason))
                return mapped
        return []

    def _map_delta(self, index: int, delta: Any) -> list[ModelEvent | ModelError]:
        match delta.type:
            case "text_delta":
                return [TextChunk(text=delta.text)]
            case "thinking_delta":
                return [ThinkingChunk(text=delta.thinking)]
            case "signature_delta":
                return [ThinkingChunk(text="", signature=delta.signature)]
            case "input_json_delta" if index in self._tool_calls and delta.partial_json:
                call_id, fragments = self._tool_calls[index]
                fragments.append(delta.partial_json)
                return [ToolCallArgs(id=call_id, fragment=delta.partial_json)]
        return []


def _tool_call_end(call_id: str, text: str) -> ToolCallEnd | ModelError:
    try:
        arguments = json.loads(text) if text else {}
    except ValueError:
        arguments = None
    if isinstance(arguments, dict):
        return ToolCallEnd(id=call_id, arguments=arguments)
    return ModelError(
        "bad_response",
        "The model sent tool-call arguments that are not a JSON object; retry the turn.",
    )


# -- errors ----------------------------------------------------------------------------

_CONTEXT_WORDS: Final = ("prompt is too long", "context window", "context length", "context limit")


def _model_error(exc: Exception, client: anthropic.AsyncAnthropic, phase: Phase) -> ModelError:
    """The one boundary where provider failures become ``ModelError``s. ``phase`` is where
    the failure was caught: opening the stream (``connect``) or reading it (``stream``)."""
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return ModelError(
            "timeout",
            "The Anthropic API did not answer in time; retry, or raise read_timeout if the "
            "model thinks silently for longer.",
        )
    if isinstance(exc, anthropic.APIStatusError):
        return _status_error(exc, client)
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        detail = _redact(f"{type(exc).__name__}: {exc}", client.api_key)
        where = f"The Anthropic API at {client.base_url}"
        error = transport_failure(phase, where=where, detail=detail)
        if phase == "connect":
            error = ModelError(error.kind, f"{error} Check ANTHROPIC_BASE_URL too.")
        return error
    # After the headers: a reset, a premature EOF, or bytes that are not the SSE we expect.
    return ModelError(
        "bad_response",
        f"The Anthropic stream broke off or was malformed ({type(exc).__name__}); retry the turn.",
    )


async def _bound_error_body(response: httpx2.Response) -> None:
    """The client's response hook: an error response's body is read up to
    ``MAX_ERROR_BODY`` bytes, however much the server sends (see ``adapters._failures``)."""
    if not response.is_success:
        response.stream = _BoundedBody(response.stream)


@final
class _BoundedBody(BoundedBody, httpx2.AsyncByteStream):
    """``BoundedBody`` as the httpx2 stream that ``Response.aread`` requires."""


def _status_error(exc: anthropic.APIStatusError, client: anthropic.AsyncAnthropic) -> ModelError:
    status, error_type = exc.status_code, exc.type
    detail = exc.api_message or str(error_type or "no details")
    body = exc.response.stream
    if isinstance(body, _BoundedBody) and body.truncated:  # not JSON, so no api_message
        text = exc.response.text.strip()
        text = text if len(text) <= 300 else f"{text[:300]}..."
        detail = f"{text} (the error body was longer than {MAX_ERROR_BODY // 1024} KiB)"
    detail = _redact(detail, client.api_key)
    # An error event inside a 200 stream carries only its type.
    where = f"HTTP {status}" if status != 200 else "an error event in the stream"
    if status == 429 or error_type == "rate_limit_error":
        retry_after = _retry_after(exc.response.headers) if status == 429 else None
        when = f"after {retry_after:g} seconds" if retry_after is not None else "later"
        return ModelError(
            "rate_limit",
            f"Anthropic rate-limited the request ({where}); retry {when} or lower the "
            "request rate.",
            retry_after=retry_after,
        )
    if status == 529 or error_type == "overloaded_error":
        return ModelError(
            "overloaded", f"Anthropic is overloaded ({where}); retry in a little while."
        )
    if status == 400 and any(word in detail.lower() for word in _CONTEXT_WORDS):
        return ModelError(
            "context_length",
            f"The conversation does not fit the model's context window ({detail}); "
            "shorten or summarize the history, then retry.",
        )
    if status >= 500 or error_type == "api_error":
        return ModelError(
            "unavailable",
            f"Anthropic had a server error ({where}: {detail}); retry later.",
        )
    return ModelError(
        "unknown",
        f"Anthropic rejected the request ({where}: {detail}); check the request, the model "
        "name and ANTHROPIC_API_KEY.",
    )


def _retry_after(headers: httpx2.Headers) -> float | None:
    try:
        return float(headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


# -- requests --------------------------------------------------------------------------


def _request_params(model: str, request: ModelRequest) -> dict[str, Any]:
    """The ``messages.stream`` arguments for a request.

    Thinking gets half of ``max_tokens`` as its budget, so it never starves the answer,
    and at least the API's minimum of 1024 tokens (``max_tokens`` is then raised to 2048
    if it was lower, since the budget must stay below it).
    """
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "messages": _messages(request.messages),
    }
    if request.system is not None:
        params["system"] = request.system
    if request.tools:
        params["tools"] = [_tool(spec) for spec in request.tools]
    if request.thinking:
        budget = max(MIN_THINKING_BUDGET, request.max_tokens // 2)
        params["max_tokens"] = max(request.max_tokens, 2 * MIN_THINKING_BUDGET)
        params["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return params


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "description": spec.description,
        "input_schema": dict(spec.parameters),
    }


def _messages(history: Sequence[Message]) -> list[dict[str, Any]]:
    """Anthropic messages: user and tool messages in a row merge into one user message
    (the API wants strict alternation), and a message left empty is dropped (an assistant
    reply whose only content was unsigned thinking from a stopped run)."""
    out: list[dict[str, Any]] = []
    for message in history:
        role = "assistant" if message.role == "assistant" else "user"
        blocks = [b for b in map(_block, message.content) if b is not None]
        if not blocks:
            continue
        if out and out[-1]["role"] == role == "user":
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


def _block(block: Block) -> dict[str, Any] | None:
    """One content block, or None for what must not be sent: unsigned thinking (cut
    short by a stop) and blank text (the API rejects it)."""
    match block:
        case TextBlock(text=text):
            return {"type": "text", "text": text} if text.strip() else None
        case ThinkingBlock(text=text, signature=signature):
            if signature is None:
                return None
            return {"type": "thinking", "thinking": text, "signature": signature}
        case ToolUseBlock(id=call_id, name=name, arguments=arguments):
            return {"type": "tool_use", "id": call_id, "name": name, "input": dict(arguments)}
        case ToolResultBlock(tool_call_id=call_id, content=content, is_error=is_error):
            return {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": content,
                "is_error": is_error,
            }
    raise TypeError(f"unknown content block {block!r}")

"""The Anthropic adapter: unit tests over ``httpx2.MockTransport`` (no sockets, so they run
on the autojump clock), then tests against the simulated provider over real sockets, and a
smoke test against the real API when ``ANTHROPIC_API_KEY`` is set."""

from __future__ import annotations

import functools
import gc
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
import trio
import trio.testing

from adapters.anthropic import AnthropicModel, open_anthropic
from runtime._history import Message, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock
from runtime._model import (
    ModelError,
    ModelEvent,
    ModelRequest,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallEnd,
    ToolSpec,
    TurnEnd,
    UsageReport,
)
from tests.http_adapter_suite import (
    Proxy,
    collect,
    max_tokens_mid_tool_arguments,
    request,
    start_proxy,
    user,
)

FAKE_KEY = "sk-ant-fake-0123456789abcdef"


# -- unit tests over a mock transport -------------------------------------------------


def _sse(*events: Mapping[str, Any]) -> bytes:
    return b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events
    )


def _start(input_tokens: int = 12) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    return {"type": "message_start", "message": message}


def _block_start(index: int, block: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _delta(index: int, delta: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def _finish(stop_reason: str = "end_turn", output_tokens: int = 9) -> list[dict[str, Any]]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
        {"type": "message_stop"},
    ]


def _text_reply(*words: str) -> bytes:
    return _sse(
        _start(),
        _block_start(0, {"type": "text", "text": ""}),
        *(_delta(0, {"type": "text_delta", "text": word}) for word in words),
        _block_stop(0),
        *_finish(),
    )


def _ok(body: bytes) -> httpx2.Response:
    return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})


@asynccontextmanager
async def _mock_model(
    handler: Callable[[httpx2.Request], httpx2.Response], *, max_retries: int = 0
) -> AsyncIterator[AnthropicModel]:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    async with open_anthropic(
        model="claude-test",
        api_key=FAKE_KEY,
        base_url="http://anthropic.test",
        max_retries=max_retries,
        http_client=client,
    ) as model:
        yield model


async def test_maps_thinking_text_tool_call_usage_and_stop(autojump_clock: Any) -> None:
    body = _sse(
        _start(input_tokens=42),
        _block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        _delta(0, {"type": "thinking_delta", "thinking": "Let me see."}),
        _delta(0, {"type": "signature_delta", "signature": "sig=="}),
        _block_stop(0),
        _block_start(1, {"type": "text", "text": ""}),
        _delta(1, {"type": "text_delta", "text": "Checking."}),
        _block_stop(1),
        _block_start(2, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}),
        _delta(2, {"type": "input_json_delta", "partial_json": ""}),
        _delta(2, {"type": "input_json_delta", "partial_json": '{"q": "ri'}),
        _delta(2, {"type": "input_json_delta", "partial_json": 'vers"}'}),
        _block_stop(2),
        *_finish("tool_use", output_tokens=17),
    )
    async with _mock_model(lambda request: _ok(body)) as model:
        events = await collect(model, request())
    assert events == [
        UsageReport(input_tokens=42),
        ThinkingChunk("Let me see."),
        ThinkingChunk("", signature="sig=="),
        TextChunk("Checking."),
        ToolCallBegin(id="toolu_1", name="lookup"),
        ToolCallArgs(id="toolu_1", fragment='{"q": "ri'),
        ToolCallArgs(id="toolu_1", fragment='vers"}'),
        ToolCallEnd(id="toolu_1", arguments={"q": "rivers"}),
        UsageReport(output_tokens=17),
        TurnEnd("tool_use"),
    ]


async def test_translates_history_tools_system_and_thinking(autojump_clock: Any) -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return _ok(_text_reply("Done."))

    history = [
        user("First."),
        user("Second."),
        Message(
            "assistant",
            (
                ThinkingBlock("signed", signature="sig"),
                TextBlock("Let me look."),
                ToolUseBlock("toolu_1", "lookup", {"q": "x"}),
                ToolUseBlock("toolu_2", "lookup", {"q": "y"}),
            ),
        ),
        Message(
            "tool",
            (
                ToolResultBlock("toolu_1", "found"),
                ToolResultBlock("toolu_2", "boom", is_error=True),
            ),
        ),
        user("Thanks."),
        # A stopped run's reply: unsigned thinking only, so nothing of it may be sent.
        Message("assistant", (ThinkingBlock("half a thou"),), meta={"aborted": True}),
        user("Go on."),
    ]
    tool = ToolSpec("lookup", "Looks things up.", {"type": "object", "properties": {}})
    turn = ModelRequest(
        messages=history, tools=[tool], system="Be brief.", thinking=True, max_tokens=8000
    )
    async with _mock_model(handler) as model:
        await collect(model, turn)
    (body,) = sent
    assert body["model"] == "claude-test"
    assert body["stream"] is True
    assert body["system"] == "Be brief."
    assert body["max_tokens"] == 8000
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4000}
    assert body["tools"] == [
        {
            "name": "lookup",
            "description": "Looks things up.",
            "input_schema": {"type": "object", "properties": {}},
        }
    ]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First."},
                {"type": "text", "text": "Second."},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "signed", "signature": "sig"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
                {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {"q": "y"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "found",
                    "is_error": False,
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "boom",
                    "is_error": True,
                },
                {"type": "text", "text": "Thanks."},
                {"type": "text", "text": "Go on."},
            ],
        },
    ]


async def test_thinking_budget_keeps_the_api_minimum(autojump_clock: Any) -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return _ok(_text_reply("Done."))

    async with _mock_model(handler) as model:
        await collect(model, request(thinking=True, max_tokens=1500))
    assert sent[0]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent[0]["max_tokens"] == 2048


def _status(status: int, message: str, error_type: str, **headers: str) -> httpx2.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return httpx2.Response(status, json=body, headers=headers)


def _broken_tool_args() -> bytes:
    return _sse(
        _start(),
        _block_start(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
        _delta(0, {"type": "input_json_delta", "partial_json": '["not an object"]'}),
        _block_stop(0),
        *_finish("tool_use"),
    )


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (_status(529, "Overloaded", "overloaded_error"), "overloaded"),
        (_status(500, "Internal error", "api_error"), "unavailable"),
        (_status(503, "Unavailable", "api_error"), "unavailable"),
        (
            _status(
                400, "prompt is too long: 210000 tokens > 200000 maximum", "invalid_request_error"
            ),
            "context_length",
        ),
        (_status(400, "messages.0: bad", "invalid_request_error"), "unknown"),
        (_status(401, "invalid x-api-key", "authentication_error"), "unknown"),
        (
            _ok(
                _sse(
                    _start(),
                    {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                )
            ),
            "overloaded",
        ),
        (
            _ok(
                _sse(
                    _start(),
                    {"type": "error", "error": {"type": "api_error", "message": "Internal"}},
                )
            ),
            "unavailable",
        ),
        (_ok(_sse(_start()) + b"event: content_block_delta\ndata: {not json\n\n"), "bad_response"),
        (_ok(_sse(_start(), _block_start(0, {"type": "text", "text": ""}))), "bad_response"),
        (_ok(_broken_tool_args()), "bad_response"),
        (_ok(_sse(_start(), *_finish("refusal"))), "refusal"),
    ],
)
async def test_maps_provider_errors(
    autojump_clock: Any, response: httpx2.Response, kind: str
) -> None:
    async with _mock_model(lambda request: response) as model:
        with pytest.raises(ModelError) as caught:
            await collect(model, request())
    assert caught.value.kind == kind
    message = str(caught.value)
    assert message.endswith(".") and FAKE_KEY not in message


async def test_rate_limit_carries_retry_after(autojump_clock: Any) -> None:
    response = _status(429, "Slow down", "rate_limit_error", **{"retry-after": "7"})
    async with _mock_model(lambda request: response) as model:
        with pytest.raises(ModelError) as caught:
            await collect(model, request())
    assert (caught.value.kind, caught.value.retry_after) == ("rate_limit", 7.0)
    assert "after 7 seconds" in str(caught.value)


async def test_connection_error_is_unavailable(autojump_clock: Any) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused")

    async with _mock_model(handler) as model:
        with pytest.raises(ModelError) as caught:
            await collect(model, request())
    assert caught.value.kind == "unavailable"
    assert "http://anthropic.test" in str(caught.value)


class _BreaksAfter(httpx2.AsyncByteStream):
    """A 200 body that sends ``head`` and then fails with ``error``, as a connection reset
    after the headers does."""

    def __init__(self, head: bytes, error: Exception) -> None:
        self._head, self._error = head, error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._head
        raise self._error


@pytest.mark.parametrize(
    "error",
    [
        httpx2.RemoteProtocolError("peer closed connection without sending complete message"),
        httpx2.ReadError("connection reset by peer"),
        httpx2.ConnectError("a release that names it a connection error"),
    ],
    ids=type,
)
async def test_a_break_after_the_headers_is_bad_response_whatever_the_class(
    autojump_clock: Any, error: Exception
) -> None:
    """Classified by phase: a body that breaks off after some output is bad_response and
    is not retried, whatever exception (or SDK wrapper of it) the release raises."""
    attempts: list[httpx2.Request] = []
    head = _sse(_start(), _block_start(0, {"type": "text", "text": ""}))
    head += _sse(_delta(0, {"type": "text_delta", "text": "Hel"}))

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts.append(request)
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_BreaksAfter(head, error)
        )

    seen: list[ModelEvent] = []
    async with _mock_model(handler, max_retries=2) as model:
        with pytest.raises(ModelError) as caught:
            async with model.stream(request()) as events:
                async for event in events:
                    seen.append(event)
    assert caught.value.kind == "bad_response"
    assert TextChunk("Hel") in seen and len(attempts) == 1
    assert str(caught.value).endswith(".") and FAKE_KEY not in str(caught.value)


@pytest.mark.parametrize(
    "error",
    [
        httpx2.RemoteProtocolError("Server disconnected without sending a response."),
        httpx2.ReadError("connection reset by peer"),
        httpx2.ConnectError("connection refused"),
    ],
    ids=type,
)
async def test_a_break_before_the_headers_is_unavailable_and_retried(
    autojump_clock: Any, error: Exception
) -> None:
    attempts: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts.append(request)
        raise error

    async with _mock_model(handler, max_retries=2) as model:
        with pytest.raises(ModelError) as caught:
            await collect(model, request())
    assert caught.value.kind == "unavailable" and len(attempts) == 3
    assert str(caught.value).endswith(".") and FAKE_KEY not in str(caught.value)


async def test_server_errors_are_retried_by_the_sdk(autojump_clock: Any) -> None:
    attempts: list[float] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts.append(trio.current_time())
        if len(attempts) < 3:
            return _status(500, "Internal error", "api_error")
        return _ok(_text_reply("Fine."))

    async with _mock_model(handler, max_retries=2) as model:
        events = await collect(model, request())
    assert TextChunk("Fine.") in events
    assert len(attempts) == 3 and attempts[-1] > attempts[0]  # with a backoff between


async def test_a_refusal_reports_usage_first(autojump_clock: Any) -> None:
    body = _sse(_start(), *_finish("refusal", output_tokens=3))
    seen: list[ModelEvent] = []
    async with _mock_model(lambda request: _ok(body)) as model:
        with pytest.raises(ModelError, match="declined"):
            async with model.stream(request()) as events:
                async for event in events:
                    seen.append(event)
    assert seen == [UsageReport(input_tokens=12), UsageReport(output_tokens=3)]


async def test_leaving_the_loop_early_leaves_no_generator_behind(autojump_clock: Any) -> None:
    """A consumer that breaks out (or fails in its loop) must not leave the SDK's async
    generators to the garbage collector, which Trio reports as a ResourceWarning (an
    error here, pyproject's filterwarnings)."""
    body = _text_reply(*(f"w{i} " for i in range(50)))
    async with _mock_model(lambda request: _ok(body)) as model:
        async with model.stream(request()) as events:
            async for event in events:
                if isinstance(event, TextChunk):
                    break
        del events
        gc.collect()
        await trio.sleep(0.1)  # any finalizer would run (and warn) now
        assert TextChunk("w49 ") in await collect(model, request())


async def test_key_stays_out_of_reprs_and_errors(autojump_clock: Any) -> None:
    response = _status(401, f"invalid x-api-key {FAKE_KEY}", "authentication_error")
    async with _mock_model(lambda request: response) as model:
        assert FAKE_KEY not in repr(model)
        with pytest.raises(ModelError) as caught:
            await collect(model, request())
    assert FAKE_KEY not in str(caught.value) and FAKE_KEY not in repr(caught.value)
    assert "[redacted]" in str(caught.value)


async def test_a_key_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        async with open_anthropic(model="claude-test"):
            pass


async def test_key_and_base_url_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: Any
) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return _ok(_text_reply("Hi."))

    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://from-env.test")
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    async with open_anthropic(model="claude-test", http_client=client) as model:
        await collect(model, request())
    assert any(FAKE_KEY in value for value in seen[0].headers.values())
    assert str(seen[0].url) == "http://from-env.test/v1/messages"


# -- against the simulated provider, over real sockets ---------------------------------


@asynccontextmanager
async def _sim_model(sim: Any, *, max_retries: int = 0) -> AsyncIterator[AnthropicModel]:
    async with open_anthropic(
        model="claude-sim", api_key=FAKE_KEY, base_url=sim.base_url, max_retries=max_retries
    ) as model:
        yield model


async def _complete_turn(model: AnthropicModel) -> None:
    """The model (and its pooled client) still serves a whole turn."""
    events = await collect(model, request("#sim words=3 rate=1000"))
    assert [e for e in events if isinstance(e, TextChunk)] != []
    assert events[-1] == TurnEnd("end_turn")


async def test_sim_maps_thinking_text_and_usage(sim: Any, io_bound: float) -> None:
    with trio.fail_after(io_bound):
        async with _sim_model(sim) as model:
            events = await collect(model, request("#sim words=5 rate=1000", thinking=True))
        (record,) = await sim.wait_closed()
    assert record.closed_by == "server"
    usage = [e for e in events if isinstance(e, UsageReport)]
    assert usage[0].input_tokens and usage[-1].output_tokens
    thinking = [e for e in events if isinstance(e, ThinkingChunk)]
    assert "".join(e.text for e in thinking).startswith("The user asked")
    assert thinking[-1].signature
    assert len([e for e in events if isinstance(e, TextChunk)]) == 5
    assert events[-1] == TurnEnd("end_turn")


async def test_sim_maps_a_tool_call_and_takes_its_result(sim: Any, io_bound: float) -> None:
    tool = ToolSpec("lookup", "Looks things up.", {"type": "object"})
    prompt = user("#sim tool=lookup rate=1000")
    with trio.fail_after(io_bound):
        async with _sim_model(sim) as model:
            first = await collect(model, ModelRequest(messages=[prompt], tools=[tool]))
            begin = next(e for e in first if isinstance(e, ToolCallBegin))
            end = next(e for e in first if isinstance(e, ToolCallEnd))
            fragments = [e.fragment for e in first if isinstance(e, ToolCallArgs)]
            assert begin.name == "lookup" and end.id == begin.id and len(fragments) > 1
            assert json.loads("".join(fragments)) == end.arguments
            assert isinstance(end.arguments["text"], str)
            assert first[-1] == TurnEnd("tool_use")
            history = [
                prompt,
                Message("assistant", (ToolUseBlock(begin.id, "lookup", end.arguments),)),
                Message("tool", (ToolResultBlock(begin.id, "42"),)),
            ]
            second = await collect(model, ModelRequest(messages=history, tools=[tool]))
    assert second[-1] == TurnEnd("end_turn")


async def _stop_turn(
    model: AnthropicModel,
    request: ModelRequest,
    stop_after: Callable[[list[ModelEvent]], bool],
    delay: float = 0.0,
) -> tuple[list[ModelEvent], float]:
    """Run a turn and stop it from another task, ``delay`` seconds after ``stop_after``
    holds (checked once entered and after each event), while the turn waits on the
    provider; return the events seen and when the stop was issued."""
    seen: list[ModelEvent] = []
    ready = trio.Event()
    stopped_at = 0.0

    async def stopper(scope: trio.CancelScope) -> None:
        nonlocal stopped_at
        await ready.wait()
        await trio.sleep(delay)
        stopped_at = time.monotonic()
        scope.cancel(reason="test stop")

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(stopper, scope)
            async with model.stream(request) as events:
                if stop_after(seen):
                    ready.set()
                async for event in events:
                    seen.append(event)  # no await in the loop body: the stop lands on a read
                    if stop_after(seen):
                        ready.set()
        assert scope.cancelled_caught, "the turn ended before the stop"
    return seen, stopped_at


def _count(kind: type) -> Callable[[list[ModelEvent]], bool]:
    return lambda seen: any(isinstance(e, kind) for e in seen)


@pytest.mark.parametrize(
    ("directive", "stop_after", "delay", "last_kind"),
    [
        # Silent after the headers (a long "thinking" phase): not a byte is coming.
        ("#sim think=60", lambda seen: True, 0.3, None),
        # Mid text, between two words.
        ("#sim words=1000 rate=20", lambda seen: len(seen) >= 4, 0.0, TextChunk),
        # Mid tool-call arguments, between two fragments.
        ("#sim tool=lookup rate=5", _count(ToolCallArgs), 0.0, ToolCallArgs),
    ],
    ids=["silent-after-headers", "mid-text", "mid-tool-arguments"],
)
async def test_sim_stop_closes_the_connection_and_the_client_serves_on(
    sim: Any,
    io_bound: float,
    directive: str,
    stop_after: Callable[[list[ModelEvent]], bool],
    delay: float,
    last_kind: type | None,
) -> None:
    tool = ToolSpec("lookup", "Looks things up.", {"type": "object"})
    request = ModelRequest(messages=[user(directive)], tools=[tool])
    with trio.fail_after(io_bound):
        async with _sim_model(sim) as model:
            seen, stopped_at = await _stop_turn(model, request, stop_after, delay)
            (record,) = await sim.wait_closed()
            assert record.closed_by == "client"
            assert record.closed_at - stopped_at < 2.0
            if last_kind is not None:
                assert isinstance(seen[-1], last_kind)
            assert not any(isinstance(e, TurnEnd) for e in seen)
            await _complete_turn(model)
            closed = await sim.wait_closed(count=2)
    assert [r.closed_by for r in closed] == ["client", "server"]


async def test_sim_stop_on_an_await_in_the_loop_body_still_closes_cleanly(
    sim: Any, io_bound: float
) -> None:
    """The port asks consumers for no awaits between events; one that breaks the rule
    gets the stop on its own await, with the SDK's generators suspended. The turn's exit
    unwinds them (else: ResourceWarnings, errors here) and still hangs up at once."""
    with trio.fail_after(io_bound):
        async with _sim_model(sim) as model:
            with trio.CancelScope() as scope:
                async with model.stream(request("#sim words=1000 rate=20")) as events:
                    async for event in events:
                        if isinstance(event, TextChunk):
                            stopped_at = time.monotonic()
                            scope.cancel(reason="test stop")
                        await trio.lowlevel.checkpoint()
            del events
            gc.collect()
            (record,) = await sim.wait_closed()
            assert record.closed_by == "client" and record.closed_at - stopped_at < 2.0
            await _complete_turn(model)


async def test_stop_before_the_response_headers_closes_the_connection(io_bound: float) -> None:
    """A provider that takes the request and never answers (the sim sends its headers at
    once, so this is a raw listener): the stop still hangs up at once."""
    got_request, hung_up = trio.Event(), trio.Event()
    hung_up_at = 0.0

    async def never_answer(stream: trio.SocketStream) -> None:
        nonlocal hung_up_at
        try:
            while data := await stream.receive_some():
                if b"\r\n\r\n" in data:
                    got_request.set()
        except trio.BrokenResourceError:
            pass
        hung_up_at = time.monotonic()
        hung_up.set()

    with trio.fail_after(io_bound):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            async with open_anthropic(
                model="claude-sim",
                api_key=FAKE_KEY,
                base_url=f"http://127.0.0.1:{port}",
                max_retries=0,
            ) as model:
                with trio.CancelScope() as scope:
                    nursery.start_soon(_cancel_when_set, got_request, scope)
                    await collect(model, request())
                stopped_at = time.monotonic()
                await hung_up.wait()
                assert hung_up_at - stopped_at < 2.0
            nursery.cancel_scope.cancel()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel(reason="test stop")


async def test_sim_stop_during_a_retry_backoff_is_immediate(sim: Any, io_bound: float) -> None:
    """The SDK sleeps ``retry-after`` (30 s here) before retrying a 429; that sleep is an
    ``anyio.sleep``, i.e. a ``trio.sleep`` under Trio, so a stop ends it at once."""
    with trio.fail_after(io_bound):
        async with _sim_model(sim, max_retries=2) as model:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_when_refused, sim, scope)
                    await collect(model, request("#sim fail=429 retry_after=30"))
            assert scope.cancelled_caught
            ended_at = time.monotonic()
            (refused,) = sim.connections()  # no retry went out
            assert (refused.status, refused.closed_by) == (429, "server")
            assert ended_at - refused.closed_at < 2.0
            await _complete_turn(model)


async def _cancel_when_refused(sim: Any, scope: trio.CancelScope) -> None:
    await sim.wait_closed()
    await trio.sleep(0.2)  # well into the backoff
    scope.cancel(reason="test stop")


@pytest.mark.parametrize("where", ["in-the-loop", "on-exit"])
async def test_sim_a_stop_racing_a_refusal_closes_the_response(
    sim: Any, io_bound: float, where: str
) -> None:
    """The refusal is raised and the stop lands at that instant: in the consumer's loop, or
    as the turn's ``async with`` exits. The SDK's response is closed on the spot (no
    generator or response left to the garbage collector: warnings are errors), the stop
    wins, and the client serves the next turn."""
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(sim, nursery)
        with trio.fail_after(io_bound):
            await _refusal_then_stop(proxy, where)
            await trio.testing.wait_all_tasks_blocked()
        # Every connection but the pooled one was closed: none is held by a response
        # that nobody closed.
        assert proxy.accepted - len(proxy.closed_at) <= 1, (proxy.accepted, proxy.closed_at)
        nursery.cancel_scope.cancel()


async def _refusal_then_stop(proxy: Proxy, where: str) -> None:
    async with open_anthropic(
        model="claude-sim",
        api_key=FAKE_KEY,
        base_url=f"http://127.0.0.1:{proxy.port}",
        max_retries=0,
    ) as model:
        with trio.CancelScope() as scope:
            try:
                async with model.stream(request("#sim fail=refusal rate=1000")) as events:
                    try:
                        async for _ in events:
                            pass
                    except ModelError as exc:
                        assert exc.kind == "refusal"
                        scope.cancel(reason="test stop")
                        if where == "in-the-loop":
                            await trio.sleep(1)  # the stop lands here
                        raise
            except ModelError:
                pass
        gc.collect()
        await trio.sleep(0.1)  # a finalizer would run (and warn) now
        await _complete_turn(model)
        await _complete_turn(model)


async def test_sim_max_tokens_mid_tool_arguments_drops_the_call(sim: Any) -> None:
    async with _sim_model(sim) as model:
        await max_tokens_mid_tool_arguments(model)


async def test_sim_a_huge_error_body_is_read_only_in_part(sim: Any, io_bound: float) -> None:
    """The SDK reads an error body whole; the adapter's response hook bounds it to 64 KiB,
    so the client hangs up on a 32 MiB body (the sim records it) and quotes its start."""
    with trio.fail_after(io_bound):
        async with _sim_model(sim) as model:
            with pytest.raises(ModelError) as caught:
                await collect(model, request(f"#sim fail=500 error_bytes={32 * 1024 * 1024}"))
            [record] = await sim.wait_closed(count=1)
            assert (record.status, record.closed_by) == (500, "client")
            await _complete_turn(model)
    error = caught.value
    assert error.kind == "unavailable" and "Simulated HTTP 500" in str(error)
    assert "longer than 64 KiB" in str(error) and len(str(error)) < 1000
    assert FAKE_KEY not in str(error)


@pytest.mark.parametrize(
    ("directive", "max_retries", "kind", "requests"),
    [
        ("#sim fail=429 retry_after=2.5", 0, "rate_limit", 1),
        ("#sim fail=500", 2, "unavailable", 3),
        ("#sim fail=529", 0, "overloaded", 1),
        ("#sim fail=reset words=20 rate=1000", 2, "bad_response", 1),
        ("#sim fail=garbage words=20 rate=1000", 2, "bad_response", 1),
        ("#sim fail=error_event words=20 rate=1000", 2, "overloaded", 1),
    ],
)
async def test_sim_failures_map_to_error_kinds(
    sim: Any, io_bound: float, directive: str, max_retries: int, kind: str, requests: int
) -> None:
    with trio.fail_after(io_bound):
        async with _sim_model(sim, max_retries=max_retries) as model:
            with pytest.raises(ModelError) as caught:
                await collect(model, request(directive))
            assert caught.value.kind == kind
            assert FAKE_KEY not in str(caught.value)
            if kind == "rate_limit":
                assert caught.value.retry_after == 2.5
            assert len(sim.connections()) == requests  # streams that began are not retried
            await _complete_turn(model)


@pytest.mark.skipif(not os.environ.get("ANTHROPIC_API_KEY"), reason="ANTHROPIC_API_KEY is not set")
async def test_real_provider_smoke(io_bound: float) -> None:
    model_name = os.environ.get("ANTHROPIC_MODEL", "claude-haiku-4-5")
    with trio.fail_after(io_bound):
        async with open_anthropic(model=model_name) as model:
            events = await collect(model, request("Reply with the single word: ok", max_tokens=64))
    assert any(isinstance(e, TextChunk) for e in events)
    assert isinstance(events[0], UsageReport) and events[0].input_tokens
    assert isinstance(events[-1], TurnEnd)

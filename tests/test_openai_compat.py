"""The OpenAI-compatible adapter: unit tests of the request and the chunk translation, a few
over ``httpx.MockTransport`` (no sockets), then tests against the simulated provider over
real sockets (through a counting TCP proxy where connections matter), and a smoke test
against the real API when ``OPENAI_API_KEY`` is set."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio

from adapters import openai_compat
from adapters.openai_compat import OpenAICompatModel, _request_body, _Turn, open_openai_compat
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

FAKE_KEY = "sk-fake-0123456789abcdef"
CLOSE_BOUND = 2.0  # "closed at once", generously: a busy CI machine may be slow
TOOLS = (ToolSpec("lookup", "Look a thing up.", {"type": "object"}),)


def _user(text: str) -> Message:
    return Message("user", (TextBlock(text),))


def _request(text: str = "Hello.", **kwargs: Any) -> ModelRequest:
    return ModelRequest(messages=[_user(text)], **kwargs)


async def _collect(model: OpenAICompatModel, request: ModelRequest) -> list[ModelEvent]:
    async with model.stream(request) as events:
        return [event async for event in events]


def _text(events: list[ModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


# -- the request ------------------------------------------------------------------------


def test_request_translates_history_tools_and_thinking() -> None:
    history = [
        _user("What is in the box?"),
        Message(
            "assistant",
            (
                ThinkingBlock("Let me look.", signature="sig"),
                TextBlock("I will look."),
                ToolUseBlock("call_1", "lookup", {"what": "box"}),
                ToolUseBlock("call_2", "lookup", {"what": "lid"}),
            ),
        ),
        Message(
            "tool",
            (
                ToolResultBlock("call_1", "a cat"),
                ToolResultBlock("call_2", "stuck", is_error=True),
            ),
        ),
        Message("assistant", (ThinkingBlock("cut short by a stop"),)),
        _user("And now?"),
    ]
    request = ModelRequest(history, tools=TOOLS, system="Be brief.", thinking=True, max_tokens=100)
    body = _request_body("m", request)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is in the box?"},
        {
            "role": "assistant",
            "content": "I will look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"what": "box"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"what": "lid"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: stuck"},
        {"role": "user", "content": "And now?"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a thing up.",
                "parameters": {"type": "object"},
            },
        }
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 100
    assert body["reasoning_effort"] == "medium"
    json.dumps(body)  # the wire form


def test_request_without_thinking_tools_or_system() -> None:
    body = _request_body("m", _request("Hi."), max_tokens_field="max_tokens")
    assert body["messages"] == [{"role": "user", "content": "Hi."}]
    assert body["max_tokens"] == 4096
    assert not {"tools", "reasoning_effort", "max_completion_tokens"} & body.keys()


# -- the chunk translation ----------------------------------------------------------------


def _chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return json.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": choices, "usage": usage}
    )


def _feed(*payloads: str | None) -> list[ModelEvent]:
    turn = _Turn()
    return [event for data in payloads for event in turn.feed(data)]


def test_text_thinking_usage_and_end() -> None:
    events = _feed(
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning": "Hmm"}),
        _chunk({"reasoning_content": " yes"}),
        _chunk({"content": "Hi"}),
        _chunk({}, finish="stop"),
        _chunk(usage={"prompt_tokens": 5, "completion_tokens": 2}),
        "[DONE]",
        None,
    )
    assert events == [
        ThinkingChunk("Hmm"),
        ThinkingChunk(" yes"),
        TextChunk("Hi"),
        UsageReport(input_tokens=5, output_tokens=2),
        TurnEnd("end_turn"),
    ]


def test_parallel_tool_calls_by_index() -> None:
    def call(index: int, args: str, **first: str) -> str:
        fragment: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if first:
            fragment["id"] = first["id"]
            fragment["function"]["name"] = first["name"]
        return _chunk({"tool_calls": [fragment]})

    events = _feed(
        call(0, "", id="a", name="lookup"),
        call(1, '{"q"', id="b", name="search"),
        call(0, '{"what": '),
        call(1, ": 1}"),
        call(0, '"box"}'),
        _chunk({}, finish="tool_calls"),
        None,
    )
    assert events == [
        ToolCallBegin("a", "lookup"),
        ToolCallBegin("b", "search"),
        ToolCallArgs("b", '{"q"'),
        ToolCallArgs("a", '{"what": '),
        ToolCallArgs("b", ": 1}"),
        ToolCallArgs("a", '"box"}'),
        ToolCallEnd("a", {"what": "box"}),
        ToolCallEnd("b", {"q": 1}),
        TurnEnd("tool_use"),
    ]


def test_whole_tool_call_in_one_fragment_and_stop_after_tool_calls() -> None:
    """Ollama and llama.cpp may send a call whole, and some say "stop" after it."""
    fragment = {"index": 0, "id": "x", "function": {"name": "now", "arguments": ""}}
    events = _feed(_chunk({"tool_calls": [fragment]}, finish="stop"), "[DONE]", None)
    assert events == [ToolCallBegin("x", "now"), ToolCallEnd("x", {}), TurnEnd("tool_use")]


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "content_filter")],
)
def test_finish_reasons(finish: str, stop_reason: str) -> None:
    assert _feed(_chunk({"content": "x"}, finish=finish), "[DONE]", None)[-1] == TurnEnd(
        stop_reason
    )


def test_anything_after_done_is_ignored() -> None:
    assert _feed(_chunk({}, finish="stop"), "[DONE]", "{not json", None) == [TurnEnd("end_turn")]


@pytest.mark.parametrize(
    "payloads",
    [
        ["{not json"],
        ["[1, 2]"],
        [_chunk({"content": 5})],
        [_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]})],
        [
            _chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}}
                    ]
                },
                finish="tool_calls",
            )
        ],
        [
            _chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "a", "function": {"name": "f", "arguments": "[]"}}
                    ]
                },
                finish="tool_calls",
            )
        ],
        [_chunk({"content": "cut"}), None],  # the body ended with no finish_reason
    ],
)
def test_protocol_violations_raise_value_error(payloads: list[str | None]) -> None:
    with pytest.raises(ValueError):
        _feed(*payloads)


# -- over a mock transport ----------------------------------------------------------------


@asynccontextmanager
async def _mock_model(
    handler: Callable[[httpx.Request], httpx.Response],
) -> AsyncIterator[OpenAICompatModel]:
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), headers={"Authorization": f"Bearer {FAKE_KEY}"}
    ) as client:
        yield OpenAICompatModel(
            client=client, model="m", base_url="http://mock/v1", api_key=FAKE_KEY
        )


def _sse(*payloads: str) -> httpx.Response:
    body = "".join(f"data: {payload}\n\n" for payload in payloads).encode()
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


async def test_mock_turn_sends_the_request_and_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _sse(_chunk({"content": "Hi"}, finish="stop"), "[DONE]")

    async with _mock_model(handler) as model:
        assert await _collect(model, _request()) == [TextChunk("Hi"), TurnEnd("end_turn")]
    [request] = seen
    assert str(request.url) == "http://mock/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert request.headers["accept"] == "text/event-stream"
    assert json.loads(request.content)["model"] == "m"
    assert FAKE_KEY not in repr(model)


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (401, {"error": {"message": f"Incorrect API key provided: {FAKE_KEY}."}}, "unknown"),
        (
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens.",
                    "code": "context_length_exceeded",
                }
            },
            "context_length",
        ),
        (404, {"error": "model 'm' not found"}, "unknown"),
        (504, {"error": {"message": "upstream timed out"}}, "timeout"),
    ],
)
async def test_mock_status_errors(status: int, body: dict[str, Any], kind: str) -> None:
    async with _mock_model(lambda request: httpx.Response(status, json=body)) as model:
        with pytest.raises(ModelError) as caught:
            await _collect(model, _request())
    assert caught.value.kind == kind
    assert FAKE_KEY not in str(caught.value) and FAKE_KEY not in repr(caught.value)
    assert f"HTTP {status}" in str(caught.value)


async def test_mock_not_an_event_stream_is_a_bad_response() -> None:
    async with _mock_model(lambda request: httpx.Response(200, json={"choices": []})) as model:
        with pytest.raises(ModelError) as caught:
            await _collect(model, _request())
    assert caught.value.kind == "bad_response"


async def test_mock_retries_503_then_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_compat, "BACKOFF_BASE", 0.01)
    answers = [httpx.Response(503, text="busy"), _sse(_chunk({}, finish="stop"))]
    async with _mock_model(lambda request: answers.pop(0)) as model:
        assert await _collect(model, _request()) == [TurnEnd("end_turn")]
    assert answers == []


# -- against the simulated provider -------------------------------------------------------


@attrs.define(eq=False)
class Proxy:
    """A TCP proxy in front of the sim that counts connections and notes when each one
    ends. While ``silent``, it answers nothing: a provider stuck before its headers."""

    target_port: int
    port: int = 0
    silent: bool = False
    accepted: int = 0
    request_seen: trio.Event = attrs.Factory(trio.Event)
    closed: trio.Event = attrs.Factory(trio.Event)  # set when the first connection ends
    closed_at: list[float] = attrs.Factory(list)

    async def handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            if self.silent:
                while await client.receive_some():
                    self.request_seen.set()
                return
            async with await trio.open_tcp_stream("127.0.0.1", self.target_port) as upstream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope)
        except trio.BrokenResourceError:
            pass
        finally:
            self.closed_at.append(time.monotonic())
            self.closed.set()

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some():
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.fixture
async def proxy(sim: Any, nursery: trio.Nursery) -> Proxy:
    proxy = Proxy(sim.port)
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
    )
    proxy.port = listeners[0].socket.getsockname()[1]
    return proxy


@asynccontextmanager
async def _open(port: int, **kwargs: Any) -> AsyncIterator[OpenAICompatModel]:
    async with open_openai_compat(
        model="sim", base_url=f"http://127.0.0.1:{port}/v1", api_key=FAKE_KEY, **kwargs
    ) as model:
        yield model


async def test_sim_text_thinking_and_usage(sim: Any) -> None:
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            events = await _collect(model, _request("#sim words=8 rate=1000", thinking=True))
    kinds = [type(e) for e in events]
    assert kinds.index(ThinkingChunk) < kinds.index(TextChunk)
    assert len(_text(events).split()) == 8
    usage = [e for e in events if isinstance(e, UsageReport)]
    assert usage and usage[-1].input_tokens and usage[-1].output_tokens
    assert events[-1] == TurnEnd("end_turn")


async def test_sim_tool_call_then_result(sim: Any) -> None:
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            events = await _collect(model, _request("#sim tool=lookup rate=1000", tools=TOOLS))
            [begin] = [e for e in events if isinstance(e, ToolCallBegin)]
            args = [e for e in events if isinstance(e, ToolCallArgs)]
            [end] = [e for e in events if isinstance(e, ToolCallEnd)]
            assert begin.name == "lookup" and len(args) > 1
            assert json.loads("".join(a.fragment for a in args)) == end.arguments
            assert set(end.arguments) == {"text"} and end.id == begin.id
            assert events[-1] == TurnEnd("tool_use")

            history = [
                _user("#sim tool=lookup rate=1000"),
                Message("assistant", (ToolUseBlock(end.id, "lookup", end.arguments),)),
                Message("tool", (ToolResultBlock(end.id, "found it"),)),
            ]
            after = await _collect(model, ModelRequest(history, tools=TOOLS))
    assert _text(after) and after[-1] == TurnEnd("end_turn")


async def test_sim_max_tokens(sim: Any) -> None:
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            events = await _collect(model, _request("#sim words=50 rate=1000", max_tokens=5))
    assert len(_text(events).split()) == 5 and events[-1] == TurnEnd("max_tokens")


async def _stop_turn(
    model: OpenAICompatModel,
    request: ModelRequest,
    ready: Callable[[list[ModelEvent]], bool],
) -> tuple[list[ModelEvent], float]:
    """Run a turn in a task and cancel it from this one once ``ready(events so far)`` holds
    (checked when the stream opens and after each event) and the task is blocked in the
    stream again. Return the events and when the stop was made."""
    seen: list[ModelEvent] = []
    scope = trio.CancelScope()
    reached = trio.Event()

    async def consume() -> None:
        with scope:
            async with model.stream(request) as events:
                if ready(seen):
                    reached.set()
                async for event in events:
                    seen.append(event)
                    if ready(seen):
                        reached.set()
            raise AssertionError("the turn ended before it was stopped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await reached.wait()
        await trio.sleep(0.2)
        stopped_at = time.monotonic()
        scope.cancel(reason="test stop")
    assert scope.cancelled_caught
    return seen, stopped_at


async def _closed_by_client(sim: Any, stopped_at: float) -> None:
    [record] = await sim.wait_closed(count=1)
    assert record.closed_by == "client"
    assert record.closed_at - stopped_at < CLOSE_BOUND


async def _next_turn_completes(model: OpenAICompatModel) -> None:
    events = await _collect(model, _request("#sim words=5 rate=1000"))
    assert len(_text(events).split()) == 5 and events[-1] == TurnEnd("end_turn")


@pytest.mark.parametrize(
    ("directive", "ready", "check"),
    [
        pytest.param(  # silent after the headers: the stream is open, no byte has come
            "#sim think=60", lambda seen: True, lambda seen: seen == [], id="silent-thinking"
        ),
        pytest.param(
            "#sim words=300 rate=20",
            lambda seen: any(isinstance(e, TextChunk) for e in seen),
            lambda seen: not isinstance(seen[-1], TurnEnd),
            id="mid-text",
        ),
        pytest.param(
            "#sim tool=lookup rate=2",
            lambda seen: any(isinstance(e, ToolCallArgs) for e in seen),
            lambda seen: not any(isinstance(e, ToolCallEnd) for e in seen),
            id="mid-tool-arguments",
        ),
    ],
)
async def test_sim_stop_closes_the_connection_and_the_client_serves_on(
    sim: Any,
    directive: str,
    ready: Callable[[list[ModelEvent]], bool],
    check: Callable[[list[ModelEvent]], bool],
) -> None:
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            seen, stopped_at = await _stop_turn(model, _request(directive, tools=TOOLS), ready)
            assert check(seen)
            await _closed_by_client(sim, stopped_at)
            await _next_turn_completes(model)


async def test_sim_stop_during_retry_backoff(sim: Any) -> None:
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            scope = trio.CancelScope()

            async def consume() -> None:
                with scope:
                    await _collect(model, _request("#sim fail=429 retry_after=30"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                [refused] = await sim.wait_closed(count=1)  # the 429 went out
                await trio.sleep(0.2)
                stopped_at = time.monotonic()
                scope.cancel(reason="test stop")
            assert time.monotonic() - stopped_at < CLOSE_BOUND
            assert refused.status == 429 and len(sim.connections()) == 1  # no retry was sent
            await _next_turn_completes(model)


async def test_stop_before_the_response_headers(proxy: Proxy) -> None:
    proxy.silent = True
    with trio.fail_after(30):
        async with _open(proxy.port) as model:
            scope = trio.CancelScope()

            async def consume() -> None:
                with scope:
                    await _collect(model, _request("Hello."))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await proxy.request_seen.wait()
                await trio.sleep(0.2)
                stopped_at = time.monotonic()
                scope.cancel(reason="test stop")
            await proxy.closed.wait()
            assert proxy.closed_at[0] - stopped_at < CLOSE_BOUND
            proxy.silent = False
            await _next_turn_completes(model)


async def test_pool_reuses_complete_connections_and_drops_stopped_ones(proxy: Proxy) -> None:
    with trio.fail_after(30):
        async with _open(proxy.port) as model:
            await _next_turn_completes(model)
            await _next_turn_completes(model)
            assert proxy.accepted == 1 and proxy.closed_at == []
            await _stop_turn(
                model,
                _request("#sim words=300 rate=20"),
                lambda seen: any(isinstance(e, TextChunk) for e in seen),
            )
            await _next_turn_completes(model)
            assert proxy.accepted == 2 and len(proxy.closed_at) == 1


async def test_leaving_the_stream_early_closes_everything(sim: Any) -> None:
    """A consumer that breaks out, or is cancelled at an await of its own, strands no async
    generator (warnings are errors here) and still closes the connection."""
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            async with model.stream(_request("#sim words=300 rate=50")) as events:
                async for event in events:
                    if isinstance(event, TextChunk):
                        break
            await _closed_by_client(sim, time.monotonic())
            sim.clear_connections()

            with trio.CancelScope() as scope:
                async with model.stream(_request("#sim words=300 rate=50")) as events:
                    async for event in events:
                        if isinstance(event, TextChunk):
                            scope.cancel()
                            await trio.sleep(1)  # the cancel lands here, not on the stream
            await _closed_by_client(sim, time.monotonic())

            async with model.stream(_request("#sim words=5 rate=1000")):
                pass  # entered, never iterated
            await _next_turn_completes(model)


@pytest.mark.parametrize(
    ("directive", "kind"),
    [
        ("#sim fail=429 retry_after=7", "rate_limit"),
        ("#sim fail=500", "unavailable"),
        ("#sim fail=529", "overloaded"),
        ("#sim fail=reset rate=1000", "unavailable"),  # dropped mid-stream: a network failure
        ("#sim fail=garbage rate=1000", "bad_response"),
        ("#sim fail=error_event rate=1000", "overloaded"),
    ],
)
async def test_sim_errors(
    sim: Any, monkeypatch: pytest.MonkeyPatch, directive: str, kind: str
) -> None:
    monkeypatch.setattr(openai_compat, "BACKOFF_BASE", 0.01)
    retried = directive.split()[1] in ("fail=500", "fail=529")
    with trio.fail_after(30):
        async with _open(sim.port, max_retries=2 if retried else 0) as model:
            with pytest.raises(ModelError) as caught:
                await _collect(model, _request(directive))
            await _next_turn_completes(model)
    error = caught.value
    assert error.kind == kind
    assert FAKE_KEY not in str(error) and FAKE_KEY not in repr(error)
    assert str(error).endswith(".")
    if kind == "rate_limit":
        assert error.retry_after == 7
    if retried:
        assert len(sim.connections()) == 3 + 1  # three attempts, then the next turn


async def test_sim_retry_succeeds_after_a_429(sim: Any) -> None:
    with trio.fail_after(30):
        async with _open(sim.port) as model:
            events = await _collect(
                model, _request("#sim fail=429 retry_after=0.1 fail_count=1 words=3 rate=1000")
            )
    assert events[-1] == TurnEnd("end_turn")
    assert [r.status for r in sim.connections()] == [429, 200]


async def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    async with open_openai_compat(model="m", max_retries=0) as model:
        assert model.base_url == "http://127.0.0.1:9/v1"
        assert FAKE_KEY not in repr(model)
        with trio.fail_after(30), pytest.raises(ModelError) as caught:
            await _collect(model, _request())  # nothing listens on port 9
    assert caught.value.kind == "unavailable" and FAKE_KEY not in str(caught.value)
    with pytest.raises(ValueError, match="model is required"):
        async with open_openai_compat(model=""):
            pass


# -- the real provider --------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY"), reason="OPENAI_API_KEY is not set")
async def test_real_provider_smoke() -> None:
    with trio.fail_after(60):
        async with open_openai_compat(
            model=os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")
        ) as model:
            events = await _collect(model, _request("Say hello in three words.", max_tokens=50))
    assert _text(events) and isinstance(events[-1], TurnEnd)
    assert any(isinstance(e, UsageReport) and e.input_tokens for e in events)


async def test_more_than_a_hundred_turns_stream_at_once(sim) -> None:
    """httpx's default pool (100) would make the 101st concurrent turn wait silently."""
    from runtime import ModelRequest

    async with open_openai_compat(model="sim", base_url=sim.base_url + "/v1", api_key="") as model:
        all_open = trio.Event()
        opened = 0

        async def one_turn() -> None:
            nonlocal opened
            request = ModelRequest([Message("user", (TextBlock("#sim think=30"),))])
            async with model.stream(request):
                opened += 1
                if opened == 120:
                    all_open.set()
                await trio.sleep_forever()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(120):
                    nursery.start_soon(one_turn)
                await all_open.wait()
                assert len(sim.connections()) == 120
                nursery.cancel_scope.cancel()

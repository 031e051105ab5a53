"""The OpenAI-compatible adapter: unit tests of the request and the chunk translation, a few
over ``httpx.MockTransport`` (no sockets), then tests against the simulated provider over
real sockets (the tests every httpx adapter passes are in tests/http_adapter_suite.py),
and a smoke test against the real API when ``OPENAI_API_KEY`` is set."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from adapters import _http
from adapters.openai_compat import OpenAICompatModel, _request_body, _Turn, open_openai_compat
from runtime import Model
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
    TurnEnd,
    UsageReport,
)
from tests.http_adapter_suite import FAKE_KEY, TOOLS, AdapterSuite
from tests.http_adapter_suite import collect as _collect
from tests.http_adapter_suite import request as _request
from tests.http_adapter_suite import text_of as _text
from tests.http_adapter_suite import user as _user

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
    monkeypatch.setattr(_http, "BACKOFF_BASE", 0.01)
    answers = [httpx.Response(503, text="busy"), _sse(_chunk({}, finish="stop"))]
    async with _mock_model(lambda request: answers.pop(0)) as model:
        assert await _collect(model, _request()) == [TurnEnd("end_turn")]
    assert answers == []


# -- against the simulated provider -------------------------------------------------------


@asynccontextmanager
async def _open(port: int, **kwargs: Any) -> AsyncIterator[OpenAICompatModel]:
    async with open_openai_compat(
        model="sim", base_url=f"http://127.0.0.1:{port}/v1", api_key=FAKE_KEY, **kwargs
    ) as model:
        yield model


class TestAdapterSuite(AdapterSuite):
    """The tests every httpx adapter passes (tests/http_adapter_suite.py)."""

    ERROR_EVENT_KIND = "overloaded"

    def open_model(self, port: int, **kwargs: Any) -> AbstractAsyncContextManager[Model]:
        return _open(port, **kwargs)


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

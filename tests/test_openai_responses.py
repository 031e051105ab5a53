"""The OpenAI Responses adapter: unit tests of the request and the event translation, a few
over ``httpx.MockTransport`` (no sockets), then tests against the simulated provider over
real sockets (the tests every httpx adapter passes are in tests/http_adapter_suite.py),
and a smoke test against the real API when ``OPENAI_API_KEY`` is set."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import trio

from adapters._http import ProviderError
from adapters.openai_responses import (
    OpenAIResponsesModel,
    _request_body,
    _Turn,
    open_openai_responses,
)
from runtime import (
    Message,
    Model,
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
    TurnEnd,
    UsageReport,
)
from tests.http_adapter_suite import (
    FAKE_KEY,
    IO_BOUND,
    TOOLS,
    AdapterSuite,
    collect,
    mock_model,
    request,
    smoke,
    sse_response,
    turn_error,
    user,
)

# -- the request ------------------------------------------------------------------------


def test_request_translates_history_tools_and_thinking() -> None:
    history = [
        user("What is in the box?"),
        Message(
            "assistant",
            (
                ThinkingBlock("Let me look.", signature="sig"),
                TextBlock("I will look."),
                ToolUseBlock("call_1", "lookup", {"what": "box"}),
            ),
        ),
        Message("tool", (ToolResultBlock("call_1", "stuck", is_error=True),)),
        Message("assistant", (ThinkingBlock("cut short by a stop"),)),
        user("And now?"),
    ]
    body = _request_body(
        "m", ModelRequest(history, tools=TOOLS, system="Be brief.", thinking=True, max_tokens=99)
    )
    assert body["input"] == [
        {"role": "user", "content": "What is in the box?"},
        {"role": "assistant", "content": "I will look."},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "lookup",
            "arguments": '{"what": "box"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Error: stuck"},
        {"role": "user", "content": "And now?"},
    ]
    assert body["instructions"] == "Be brief."
    assert body["tools"] == [
        {
            "type": "function",
            "name": "lookup",
            "description": "Look a thing up.",
            "parameters": {"type": "object"},
        }
    ]
    assert body["reasoning"] == {"effort": "medium", "summary": "auto"}
    assert (body["stream"], body["store"], body["max_output_tokens"]) == (True, False, 99)
    json.dumps(body)  # the wire form


def test_request_without_thinking_tools_or_system() -> None:
    body = _request_body("m", request("Hi."))
    assert body["input"] == [{"role": "user", "content": "Hi."}]
    assert not {"tools", "reasoning", "instructions"} & body.keys()


# -- the event translation -----------------------------------------------------------------


def _event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "sequence_number": 0, **fields})


def _completed(kind: str = "response.completed", **response: Any) -> str:
    usage = {"input_tokens": 5, "output_tokens": 2}
    return _event(kind, response={"status": "completed", "usage": usage, **response})


def _feed(*payloads: str | None) -> list[ModelEvent | ModelError]:
    turn = _Turn()
    return [event for data in payloads for event in turn.feed(data)]


def _call_added(index: int, call_id: str, name: str) -> str:
    item = {"type": "function_call", "id": f"fc_{index}", "call_id": call_id, "name": name}
    return _event("response.output_item.added", output_index=index, item={**item, "arguments": ""})


def _call_done(index: int, arguments: str) -> str:
    item = {"type": "function_call", "id": f"fc_{index}", "arguments": arguments}
    return _event("response.output_item.done", output_index=index, item=item)


def test_text_reasoning_usage_and_end() -> None:
    events = _feed(
        _event("response.created", response={"status": "in_progress"}),
        _event("response.reasoning_summary_part.added", summary_index=0),
        _event("response.reasoning_summary_text.delta", delta="Hmm", summary_index=0),
        _event("response.reasoning_summary_part.added", summary_index=1),
        _event("response.reasoning_text.delta", delta="yes"),
        _event("response.output_text.delta", delta="Hi"),
        _event("response.output_text.done", text="Hi"),
        _completed(),
        None,
    )
    assert events == [
        ThinkingChunk("Hmm"),
        ThinkingChunk("\n\n"),
        ThinkingChunk("yes"),
        TextChunk("Hi"),
        UsageReport(input_tokens=5, output_tokens=2),
        TurnEnd("end_turn"),
    ]


def test_function_calls_stream_their_arguments_by_output_index() -> None:
    events = _feed(
        _call_added(1, "call_a", "lookup"),
        _call_added(2, "call_b", "search"),
        _event("response.function_call_arguments.delta", output_index=2, delta='{"q": 1}'),
        _event("response.function_call_arguments.delta", output_index=1, delta='{"what": '),
        _event("response.function_call_arguments.delta", output_index=1, delta='"box"}'),
        _call_done(1, '{"what": "box"}'),
        _call_done(2, '{"q": 1}'),
        _completed(),
        None,
    )
    assert events == [
        ToolCallBegin("call_a", "lookup"),
        ToolCallBegin("call_b", "search"),
        ToolCallArgs("call_b", '{"q": 1}'),
        ToolCallArgs("call_a", '{"what": '),
        ToolCallArgs("call_a", '"box"}'),
        ToolCallEnd("call_a", {"what": "box"}),
        ToolCallEnd("call_b", {"q": 1}),
        UsageReport(input_tokens=5, output_tokens=2),
        TurnEnd("tool_use"),
    ]


def test_arguments_sent_only_whole_go_out_as_one_fragment() -> None:
    events = _feed(_call_added(0, "c", "now"), _call_done(0, '{"tz": "UTC"}'), _completed(), None)
    assert events[:3] == [
        ToolCallBegin("c", "now"),
        ToolCallArgs("c", '{"tz": "UTC"}'),
        ToolCallEnd("c", {"tz": "UTC"}),
    ]


def test_incomplete_for_max_output_tokens_is_max_tokens() -> None:
    cut = _completed("response.incomplete", incomplete_details={"reason": "max_output_tokens"})
    assert _feed(_event("response.output_text.delta", delta="x"), cut, None)[-1] == TurnEnd(
        "max_tokens"
    )


@pytest.mark.parametrize(
    "payloads",
    [
        [_event("response.refusal.delta", delta="I can't help with that"), _completed()],
        [_completed("response.incomplete", incomplete_details={"reason": "content_filter"})],
    ],
    ids=["refusal", "content-filter"],
)
def test_refusals_are_refusal_errors_after_the_usage(payloads: list[str]) -> None:
    usage, error = _feed(*payloads)
    assert usage == UsageReport(input_tokens=5, output_tokens=2)
    assert isinstance(error, ModelError) and error.kind == "refusal"
    assert str(error).endswith(".")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (
            _event(
                "response.failed",
                response={"error": {"code": "rate_limit_exceeded", "message": "Slow down"}},
            ),
            "rate_limit_exceeded",
        ),
        (_event("error", code="server_error", message="Oops", param=None), "server_error"),
    ],
)
def test_failed_and_error_events_raise_the_provider_error(payload: str, code: str) -> None:
    with pytest.raises(ProviderError) as caught:
        _feed(payload)
    assert caught.value.code == code and caught.value.in_stream


def test_anything_after_the_terminal_event_is_ignored() -> None:
    assert _feed(_completed(), "{not json", None) == [
        UsageReport(input_tokens=5, output_tokens=2),
        TurnEnd("end_turn"),
    ]


def test_a_call_cut_off_by_the_output_limit_is_dropped() -> None:
    cut = {"reason": "max_output_tokens"}
    events = _feed(
        _call_added(0, "c", "f"),
        _call_done(0, '{"text": "cut'),
        _completed("response.incomplete", status="incomplete", incomplete_details=cut),
        None,
    )
    assert not any(isinstance(e, ToolCallEnd) for e in events)
    assert events[-1] == TurnEnd("max_tokens")


@pytest.mark.parametrize(
    "payloads",
    [
        ["{not json"],
        ["[1, 2]"],
        [_event("response.output_text.delta", delta=5)],
        [_event("response.output_item.added", output_index=0, item={"type": "function_call"})],
        # arguments that do not parse fail a turn that did not end at the output limit
        [_call_added(0, "c", "f"), _call_done(0, "{"), _completed()],
        [_call_added(0, "c", "f"), _call_done(0, "[]"), _completed()],
        [_event("response.output_text.delta", delta="cut"), None],  # no terminal event
    ],
)
def test_protocol_violations_raise_value_error(payloads: list[str | None]) -> None:
    with pytest.raises(ValueError):
        _feed(*payloads)


# -- over a mock transport ----------------------------------------------------------------


def _mock_model(
    handler: Callable[[httpx.Request], httpx.Response],
) -> AbstractAsyncContextManager[OpenAIResponsesModel]:
    return mock_model(open_openai_responses, handler, model="m", base_url="http://mock/v1")


def _sse(*payloads: str) -> httpx.Response:
    return sse_response(*(f"event: {json.loads(p)['type']}\ndata: {p}\n\n" for p in payloads))


async def test_mock_turn_sends_the_request_and_key() -> None:
    seen: list[httpx.Request] = []

    def handler(sent: httpx.Request) -> httpx.Response:
        seen.append(sent)
        return _sse(_event("response.output_text.delta", delta="Hi"), _completed())

    async with _mock_model(handler) as model:
        events = await collect(model, request())
    assert events[0] == TextChunk("Hi") and events[-1] == TurnEnd("end_turn")
    [sent] = seen
    assert str(sent.url) == "http://mock/v1/responses"
    assert sent.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert sent.headers["accept"] == "text/event-stream"
    assert json.loads(sent.content)["model"] == "m"
    assert FAKE_KEY not in repr(model)


@pytest.mark.parametrize(
    ("response", "kind", "said"),
    [
        (
            httpx.Response(401, json={"error": {"message": f"Incorrect API key: {FAKE_KEY}"}}),
            "unknown",
            "HTTP 401",
        ),
        (
            httpx.Response(
                400,
                json={"error": {"message": "Too long.", "code": "context_length_exceeded"}},
            ),
            "context_length",
            "HTTP 400",
        ),
        (
            _sse(
                _event(
                    "response.failed",
                    response={"error": {"code": "rate_limit_exceeded", "message": "Slow down"}},
                )
            ),
            "rate_limit",
            "mid-stream",
        ),
        (_sse(_event("error", code="server_error", message="Oops")), "unavailable", "mid-stream"),
    ],
)
async def test_mock_errors_map_to_kinds(response: httpx.Response, kind: str, said: str) -> None:
    async with _mock_model(lambda sent: response) as model:
        error = await turn_error(model)
    assert error.kind == kind and said in str(error)


# -- against the simulated provider -------------------------------------------------------


def _open(port: int, **kwargs: Any) -> AbstractAsyncContextManager[OpenAIResponsesModel]:
    return open_openai_responses(
        model="sim", base_url=f"http://127.0.0.1:{port}/v1", api_key=FAKE_KEY, **kwargs
    )


class TestAdapterSuite(AdapterSuite):
    """The tests every httpx adapter passes (tests/http_adapter_suite.py)."""

    ERROR_EVENT_KIND = "unavailable"  # the sim sends response.failed, code server_error

    def open_model(self, port: int, **kwargs: Any) -> AbstractAsyncContextManager[Model]:
        return _open(port, **kwargs)


async def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    async with open_openai_responses(model="m", max_retries=0) as model:
        assert FAKE_KEY not in repr(model) and "http://127.0.0.1:9/v1" in repr(model)
        with trio.fail_after(IO_BOUND), pytest.raises(ModelError) as caught:
            await collect(model, request())  # nothing listens on port 9
    assert caught.value.kind == "unavailable" and FAKE_KEY not in str(caught.value)
    with pytest.raises(ValueError, match="model is required"):
        async with open_openai_responses(model=""):
            pass


# -- the real provider --------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY"), reason="OPENAI_API_KEY is not set")
async def test_real_provider_smoke() -> None:
    async with open_openai_responses(model=os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")) as model:
        await smoke(model, max_tokens=50)

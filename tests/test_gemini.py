"""The Gemini adapter: unit tests of the request and the chunk translation, a few over
``httpx.MockTransport`` (no sockets), then tests against the simulated provider over real
sockets (the tests every httpx adapter passes are in tests/http_adapter_suite.py), and
a smoke test against the real API when ``GEMINI_API_KEY`` is set.

Gemini sends a function call whole, so "stop mid tool call" is a stop after the call
arrived and before the turn ended; the stop while the model writes the call's arguments is
a stop in a silent stream, the ``silent-thinking`` case."""

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
from adapters.gemini import (
    LOCAL_ID_PREFIX,
    SKIP_SIGNATURE,
    GeminiModel,
    _request_body,
    _Turn,
    open_gemini,
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
    saw,
    smoke,
    sse_response,
    turn_error,
    user,
)

LOCAL_ID = f"{LOCAL_ID_PREFIX}1"

# -- the request ------------------------------------------------------------------------


def test_request_translates_history_tools_and_thinking() -> None:
    history = [
        user("What is in the boxes?"),
        Message(
            "assistant",
            (
                ThinkingBlock("Let me look.", signature="sig-1"),
                TextBlock("I will look."),
                ToolUseBlock(LOCAL_ID, "lookup", {"what": "box"}),
                ToolUseBlock("call-from-gemini", "lookup", {"what": "lid"}),
            ),
        ),
        Message(
            "tool",
            (
                ToolResultBlock(LOCAL_ID, "a cat"),
                ToolResultBlock("call-from-gemini", "stuck", is_error=True),
            ),
        ),
        Message("assistant", (ThinkingBlock("cut short by a stop"),)),
        user("And now?"),
    ]
    body = _request_body(
        ModelRequest(history, tools=TOOLS, system="Be brief.", thinking=True, max_tokens=99)
    )
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "What is in the boxes?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "I will look."},
                {
                    "functionCall": {"name": "lookup", "args": {"what": "box"}},
                    "thoughtSignature": "sig-1",
                },
                {
                    "functionCall": {
                        "name": "lookup",
                        "args": {"what": "lid"},
                        "id": "call-from-gemini",
                    }
                },
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "lookup", "response": {"output": "a cat"}}},
                {
                    "functionResponse": {
                        "name": "lookup",
                        "response": {"error": "stuck"},
                        "id": "call-from-gemini",
                    }
                },
                {"text": "And now?"},  # merged: the unsigned thinking left nothing to send
            ],
        },
    ]
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "lookup",
                    "description": "Look a thing up.",
                    "parametersJsonSchema": {"type": "object"},
                }
            ]
        }
    ]
    assert body["generationConfig"] == {
        "maxOutputTokens": 99,
        "thinkingConfig": {"includeThoughts": True},
    }
    json.dumps(body)  # the wire form


def test_signatures_not_kept_are_replaced_on_function_calls_only() -> None:
    history = [
        user("Go."),
        Message("assistant", (ToolUseBlock(LOCAL_ID, "lookup", {}),)),
        Message("tool", (ToolResultBlock(LOCAL_ID, "ok"),)),
        Message("assistant", (ThinkingBlock("Done.", signature="sig-2"), TextBlock("Found."))),
        Message("assistant", (TextBlock("Unsigned."),)),
    ]
    contents = _request_body(ModelRequest(history))["contents"]
    assert contents[1]["parts"][0]["thoughtSignature"] == SKIP_SIGNATURE
    assert contents[3]["parts"] == [
        {"text": "Found.", "thoughtSignature": "sig-2"},
        {"text": "Unsigned."},
    ]


def test_request_without_thinking_tools_or_system() -> None:
    body = _request_body(request("Hi."))
    assert body == {
        "contents": [{"role": "user", "parts": [{"text": "Hi."}]}],
        "generationConfig": {"maxOutputTokens": 4096},
    }


# -- the chunk translation ----------------------------------------------------------------


def _chunk(
    *parts: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None
) -> str:
    candidate: dict[str, Any] = {"index": 0}
    if parts:
        candidate["content"] = {"role": "model", "parts": list(parts)}
    if finish:
        candidate["finishReason"] = finish
    payload: dict[str, Any] = {"candidates": [candidate]}
    if usage:
        payload["usageMetadata"] = usage
    return json.dumps(payload)


def _feed(*payloads: str | None) -> list[ModelEvent | ModelError]:
    turn = _Turn()
    return [event for data in payloads for event in turn.feed(data)]


def test_text_thoughts_usage_and_end() -> None:
    prompt = {"promptTokenCount": 7}
    events = _feed(
        _chunk({"text": "Hmm", "thought": True}, usage=prompt),
        _chunk({"text": "Hi", "thoughtSignature": "sig"}, usage=prompt),  # same counts: no report
        _chunk({"text": " there", "thoughtSignature": "later"}),
        _chunk(
            finish="STOP",
            usage={"promptTokenCount": 7, "candidatesTokenCount": 2, "thoughtsTokenCount": 3},
        ),
        None,
    )
    assert events == [
        ThinkingChunk("Hmm"),
        UsageReport(input_tokens=7),
        TextChunk("Hi"),
        ThinkingChunk("", signature="sig"),  # only the turn's first signature
        TextChunk(" there"),
        UsageReport(input_tokens=7, output_tokens=5),
        TurnEnd("end_turn"),
    ]


def test_function_calls_arrive_whole() -> None:
    events = _feed(
        _chunk(
            {"functionCall": {"name": "lookup", "args": {"what": "box"}, "id": "g1"}},
            {"functionCall": {"name": "now"}},
        ),
        _chunk(finish="STOP"),
        None,
    )
    local = events[3]
    assert isinstance(local, ToolCallBegin) and local.id.startswith(LOCAL_ID_PREFIX)
    assert events == [
        ToolCallBegin("g1", "lookup"),
        ToolCallArgs("g1", '{"what": "box"}'),
        ToolCallEnd("g1", {"what": "box"}),
        ToolCallBegin(local.id, "now"),
        ToolCallArgs(local.id, "{}"),
        ToolCallEnd(local.id, {}),
        TurnEnd("tool_use"),
    ]


def test_max_tokens() -> None:
    assert _feed(_chunk({"text": "x"}, finish="MAX_TOKENS"), None)[-1] == TurnEnd("max_tokens")


@pytest.mark.parametrize(
    "payload",
    [
        _chunk({"text": "As"}, finish="SAFETY", usage={"promptTokenCount": 7}),
        json.dumps(
            {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7}}
        ),
    ],
    ids=["finish-safety", "prompt-blocked"],
)
def test_safety_blocks_are_refusals_after_the_usage(payload: str) -> None:
    *events, usage, error = _feed(payload)
    assert usage == UsageReport(input_tokens=7)
    assert isinstance(error, ModelError) and error.kind == "refusal"
    assert "SAFETY" in str(error) and str(error).endswith(".")


def test_an_error_in_the_stream_carries_its_status() -> None:
    error = {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}
    with pytest.raises(ProviderError) as caught:
        _feed(json.dumps({"error": error}))
    assert caught.value.status == 503 and caught.value.in_stream


@pytest.mark.parametrize(
    "payloads",
    [
        ["{not json"],
        ["[1, 2]"],
        [_chunk({"text": 5})],
        [_chunk({"functionCall": {"args": {}}})],
        [_chunk({"functionCall": {"name": "f", "args": [1]}})],
        [_chunk(finish="MALFORMED_FUNCTION_CALL")],
        [_chunk({"text": "cut"}), None],  # the body ended with no finishReason
    ],
)
def test_protocol_violations_raise_value_error(payloads: list[str | None]) -> None:
    with pytest.raises(ValueError):
        _feed(*payloads)


# -- over a mock transport ----------------------------------------------------------------


def _mock_model(
    handler: Callable[[httpx.Request], httpx.Response],
) -> AbstractAsyncContextManager[GeminiModel]:
    return mock_model(open_gemini, handler, model="models/gemini-test", base_url="http://mock/")


def _sse(*payloads: str) -> httpx.Response:
    return sse_response(*(f"data: {payload}\r\n\r\n" for payload in payloads))


async def test_mock_turn_sends_the_key_in_a_header_never_the_url() -> None:
    seen: list[httpx.Request] = []

    def handler(sent: httpx.Request) -> httpx.Response:
        seen.append(sent)
        return _sse(_chunk({"text": "Hi"}, finish="STOP"))

    async with _mock_model(handler) as model:
        assert await collect(model, request()) == [TextChunk("Hi"), TurnEnd("end_turn")]
    [sent] = seen
    assert str(sent.url) == "http://mock/v1beta/models/gemini-test:streamGenerateContent?alt=sse"
    assert sent.headers["x-goog-api-key"] == FAKE_KEY and FAKE_KEY not in str(sent.url)
    assert "authorization" not in sent.headers
    assert json.loads(sent.content)["contents"] == [{"role": "user", "parts": [{"text": "Hello."}]}]
    assert FAKE_KEY not in repr(model)


def _google_error(status: int, name: str, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": status, "message": message, "status": name}}
    )


@pytest.mark.parametrize(
    ("response", "kind", "said"),
    [
        (
            _google_error(403, "PERMISSION_DENIED", f"Key {FAKE_KEY} has no access"),
            "unknown",
            "GEMINI_API_KEY",
        ),
        (  # the key straddles the cut at 300 characters: redacted before the cut
            _google_error(403, "PERMISSION_DENIED", f"{'x' * 290} {FAKE_KEY} may not."),
            "unknown",
            "***",
        ),
        (
            _google_error(
                400,
                "INVALID_ARGUMENT",
                "The input token count (2000000) exceeds the maximum number of tokens allowed "
                "(1048576).",
            ),
            "context_length",
            "HTTP 400",
        ),
        (_google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded"), "rate_limit", "HTTP 429"),
        (
            _sse(json.dumps({"error": {"code": 503, "message": "Overloaded"}})),
            "unavailable",
            "mid-stream",
        ),
        (_sse(_chunk(finish="SAFETY")), "refusal", "SAFETY"),
    ],
)
async def test_mock_errors_map_to_kinds(response: httpx.Response, kind: str, said: str) -> None:
    async with _mock_model(lambda sent: response) as model:
        error = await turn_error(model)
    assert error.kind == kind and said in str(error)


# -- against the simulated provider -------------------------------------------------------


def _open(port: int, **kwargs: Any) -> AbstractAsyncContextManager[GeminiModel]:
    return open_gemini(model="sim", base_url=f"http://127.0.0.1:{port}", api_key=FAKE_KEY, **kwargs)


async def test_sim_signature_rides_on_the_first_answer_part(sim: Any) -> None:
    with trio.fail_after(IO_BOUND):
        async with _open(sim.port) as model:
            events = await collect(model, request("#sim words=3 rate=1000", thinking=True))
    signed = [i for i, e in enumerate(events) if isinstance(e, ThinkingChunk) and e.signature]
    assert len(signed) == 1 and events[signed[0] - 1] == TextChunk("Rivers ")
    [record] = sim.connections()
    assert record.path == "/v1beta/models/sim:streamGenerateContent"


class TestAdapterSuite(AdapterSuite):
    """The tests every httpx adapter passes (tests/http_adapter_suite.py)."""

    ERROR_EVENT_KIND = "unavailable"  # Gemini's in-stream 503
    # Gemini sends the call whole: stop after it arrived, before the turn ended.
    TOOL_STOP = ("#sim tool=lookup rate=2", saw(ToolCallEnd), saw(ToolCallEnd))

    def open_model(self, port: int, **kwargs: Any) -> AbstractAsyncContextManager[Model]:
        return _open(port, **kwargs)


async def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_KEY)
    async with open_gemini(model="m", max_retries=0) as model:
        assert FAKE_KEY not in repr(model) and "http://127.0.0.1:9'" in repr(model)
        with trio.fail_after(IO_BOUND), pytest.raises(ModelError) as caught:
            await collect(model, request())  # nothing listens on port 9
    assert caught.value.kind == "unavailable" and FAKE_KEY not in str(caught.value)
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        async with open_gemini(model="m"):
            pass


# -- the real provider --------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("GEMINI_API_KEY"), reason="GEMINI_API_KEY is not set")
async def test_real_provider_smoke() -> None:
    async with open_gemini(model=os.environ.get("GEMINI_MODEL", "gemini-2.5-flash")) as model:
        await smoke(model, max_tokens=500)  # thinking models spend some of it thinking

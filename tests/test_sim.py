"""The simulated model provider, over real sockets: all four wire formats parse (Anthropic
through the real SDK), every directive does what it says, and the connection records
show who hung up and when.

Replies run at high ``rate`` values except where timing is the point; timing bounds are
generous lower bounds or loose upper bounds (see the policy in conftest.py).
"""

from __future__ import annotations

import gc
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import trio
from anthropic import AsyncAnthropic

from adapters.sim import (
    CONNECTIONS_PATH,
    ConnectionRecord,
    Directive,
    DirectiveError,
    SimServer,
    parse_directive,
    serve_sim,
)
from adapters.sim._script import (
    DEFAULT_WORDS,
    Finish,
    Silence,
    TextDelta,
    ToolArgsDelta,
    build_script,
)
from adapters.sim._script import Facts as _Facts
from adapters.sim._text import REPLY_WORDS, THINKING_TEXT, reply_words

IO_BOUND = 30.0  # as in conftest.py
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
GEMINI = "/v1beta/models/sim:streamGenerateContent"
CLOSE_BOUND = 2.0  # seconds between a client's close and the record of it; typically ms
FAST = "rate=5000"
TOOLS = [{"name": "echo", "description": "Echo text.", "input_schema": {"type": "object"}}]
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}
]


def anthropic_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def openai_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim",
        "stream": True,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def responses_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim", "stream": True, "input": [{"role": "user", "content": text}], **extra}


def gemini_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


BODIES = {
    MESSAGES: anthropic_body,
    CHAT: openai_body,
    RESPONSES: responses_body,
    GEMINI: gemini_body,
}


def text_of(words: list[str] | tuple[str, ...]) -> str:
    return " ".join(words)


async def openai_chunks(client: httpx.AsyncClient, body: Mapping[str, Any]) -> list[Any]:
    """Every ``data:`` payload of one chat completions stream; ``[DONE]`` kept as a str."""
    out: list[Any] = []
    async with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def anthropic_events(client: httpx.AsyncClient, body: Mapping[str, Any]) -> list[str]:
    """The ``event:`` names of one Messages stream, in order."""
    names: list[str] = []
    async with client.stream("POST", MESSAGES, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
    return names


async def responses_events(client: httpx.AsyncClient, body: Mapping[str, Any]) -> list[Any]:
    """The events of one Responses stream; each ``event:`` line names its data's type."""
    raw = await raw_body(client, RESPONSES, body)
    events = []
    for block in raw.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


async def gemini_chunks(client: httpx.AsyncClient, body: Mapping[str, Any]) -> list[Any]:
    """The ``data:`` payloads of one Gemini stream."""
    raw = await raw_body(client, GEMINI + "?alt=sse", body)
    return [json.loads(block.removeprefix("data: ")) for block in raw.strip().split("\n\n")]


@pytest.fixture
async def http(sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=IO_BOUND) as client:
        yield client


@pytest.fixture
async def claude(sim: SimServer) -> AsyncIterator[AsyncAnthropic]:
    async with AsyncAnthropic(base_url=sim.base_url, api_key="test", max_retries=0) as client:
        yield client


# -- directives, without sockets -----------------------------------------------------


def test_parse_directive_reads_every_key() -> None:
    text = (
        "Please answer.\n  #sim words=7 rate=12.5 think=2 pause_at=3:1.5 tool=echo repeat=4 "
        "fail=429 retry_after=0.25 fail_count=2\nthanks"
    )
    directive = parse_directive(text)
    assert directive == Directive(
        words=7,
        rate=12.5,
        think=2.0,
        pause_at=(3, 1.5),
        tool="echo",
        repeat=4,
        fail="429",
        retry_after=0.25,
        fail_count=2,
        line=(
            "#sim words=7 rate=12.5 think=2 pause_at=3:1.5 tool=echo repeat=4 fail=429 "
            "retry_after=0.25 fail_count=2"
        ),
    )
    assert parse_directive("#sim fail=500 error_bytes=70000 max_tokens=3") == Directive(
        fail="500",
        error_bytes=70000,
        max_tokens=3,
        line="#sim fail=500 error_bytes=70000 max_tokens=3",
    )
    assert parse_directive("no directive here") == Directive()
    assert parse_directive("#simulate words=3") == Directive()  # not a #sim line


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("#sim colour=blue", "colour"),
        ("#sim words", "words"),
        ("#sim words=many", "words"),
        ("#sim words=-1", "words"),
        ("#sim rate=0", "rate"),
        ("#sim think=nan", "think"),
        ("#sim pause_at=3", "pause_at"),
        ("#sim tool=no/slash", "tool"),
        ("#sim fail=418", "fail"),
        ("#sim fail_count=2", "fail_count"),
        ("#sim fail=500 retry_after=1", "retry_after"),
        ("#sim repeat=3", "repeat"),
        ("#sim error_bytes=100", "error_bytes"),
        ("#sim fail=reset error_bytes=100", "error_bytes"),
        ("#sim max_tokens=-1", "max_tokens"),
        ("#sim words=1 words=2", "words"),
        ('#sim args={"a":1}', "args"),
        ("#sim tool=echo args=[1]", "args"),
        ("#sim tool=echo args={not json", "args"),
    ],
)
def test_parse_directive_rejects_with_the_key_named(line: str, key: str) -> None:
    with pytest.raises(DirectiveError) as caught:
        parse_directive(line)
    assert caught.value.key == key
    assert repr(key) in str(caught.value)


def test_args_take_the_rest_of_the_line_and_become_the_calls_arguments() -> None:
    directive = parse_directive(
        'Go.\n#sim tool=research rate=5000 args={"topic": "rivers of Europe", "depth": 2}'
    )
    assert directive.tool == "research" and directive.rate == 5000
    assert directive.args == {"topic": "rivers of Europe", "depth": 2}
    facts = _Facts(user_text="x", thinking=False, tool_results=(), max_tokens=None, input_tokens=1)
    script = build_script(directive, facts)
    fragments = "".join(step.fragment for step in script if isinstance(step, ToolArgsDelta))
    assert json.loads(fragments) == {"topic": "rivers of Europe", "depth": 2}


def test_default_reply_is_150_readable_words_at_30_per_second() -> None:
    facts = _Facts(user_text="hi", thinking=False, tool_results=(), max_tokens=None, input_tokens=1)
    script = build_script(parse_directive("hi"), facts)
    words = [step.text for step in script if isinstance(step, TextDelta)]
    assert len(words) == DEFAULT_WORDS == len(REPLY_WORDS)
    assert "".join(words) == text_of(REPLY_WORDS)
    assert words[-1].endswith(".")
    gaps = [step.seconds for step in script if isinstance(step, Silence)]
    assert len(gaps) == DEFAULT_WORDS - 1
    assert all(gap == pytest.approx(1 / 30) for gap in gaps)
    assert script[-1] == Finish("end_turn", DEFAULT_WORDS)


# -- Anthropic, through the real SDK ---------------------------------------------------


async def test_anthropic_sdk_parses_text(sim: SimServer, claude: AsyncAnthropic) -> None:
    with trio.fail_after(IO_BOUND):
        async with claude.messages.stream(
            model="sim",
            max_tokens=1024,
            messages=[{"role": "user", "content": f"Hello.\n#sim words=20 {FAST}"}],
        ) as stream:
            texts = [event.text async for event in stream if event.type == "text"]
            message = await stream.get_final_message()
    assert "".join(texts) == text_of(reply_words(20))
    assert len(texts) == 20 and texts[0] == "Rivers "
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 20 and message.usage.input_tokens > 0
    assert message.id.startswith("msg_")
    [record] = await sim.wait_closed(MESSAGES)
    assert record.closed_by == "server" and record.status == 200


async def test_anthropic_sdk_parses_thinking(claude: AsyncAnthropic) -> None:
    with trio.fail_after(IO_BOUND):
        async with claude.messages.stream(
            model="sim",
            max_tokens=2048,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": f"#sim words=5 think=0.05 {FAST}"}],
        ) as stream:
            kinds = [event.type async for event in stream]
            message = await stream.get_final_message()
    thinking, text = message.content
    assert thinking.type == "thinking" and text.type == "text"
    assert thinking.thinking == THINKING_TEXT and thinking.signature
    assert text.text == text_of(reply_words(5))
    assert "thinking" in kinds and "signature" in kinds
    assert kinds.index("signature") < kinds.index("text")


async def test_anthropic_sdk_parses_tool_use_and_repeat(
    sim: SimServer, claude: AsyncAnthropic
) -> None:
    history: list[Any] = [{"role": "user", "content": f"Go.\n#sim tool=echo repeat=2 {FAST}"}]
    ids = []
    with trio.fail_after(IO_BOUND):
        for _ in range(2):
            async with claude.messages.stream(
                model="sim", max_tokens=1024, tools=TOOLS, messages=history
            ) as stream:
                fragments = [event async for event in stream if event.type == "input_json"]
                message = await stream.get_final_message()
            assert message.stop_reason == "tool_use"
            [call] = message.content
            assert call.type == "tool_use" and call.name == "echo"
            assert isinstance(call.input, dict) and set(call.input) == {"text"}
            assert len(fragments) > 1  # the arguments arrive in several fragments
            ids.append(call.id)
            history += [
                {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "done"}],
                },
            ]
        async with claude.messages.stream(
            model="sim", max_tokens=1024, tools=TOOLS, messages=history
        ) as stream:
            message = await stream.get_final_message()
    assert len(set(ids)) == 2
    assert message.stop_reason == "end_turn"
    assert [block.type for block in message.content] == ["text"]
    assert len(sim.connections()) == 3


async def test_anthropic_max_tokens_cuts_the_reply(claude: AsyncAnthropic) -> None:
    with trio.fail_after(IO_BOUND):
        async with claude.messages.stream(
            model="sim",
            max_tokens=4,
            messages=[{"role": "user", "content": f"#sim words=50 {FAST}"}],
        ) as stream:
            message = await stream.get_final_message()
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text"
    assert message.content[0].text == text_of(reply_words(4))


async def test_anthropic_event_order(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        names = await anthropic_events(http, anthropic_body(f"#sim words=2 {FAST}"))
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


# -- OpenAI ----------------------------------------------------------------------------


async def test_openai_text_with_usage(http: httpx.AsyncClient) -> None:
    body = openai_body(f"#sim words=12 {FAST}", stream_options={"include_usage": True})
    with trio.fail_after(IO_BOUND):
        chunks = await openai_chunks(http, body)
    assert chunks[-1] == "[DONE]"
    *with_choices, usage_chunk, _ = chunks
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 12
    assert usage_chunk["usage"]["total_tokens"] == (usage_chunk["usage"]["prompt_tokens"] + 12)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in with_choices)
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    assert text == text_of(reply_words(12))
    assert [c["choices"][0]["finish_reason"] for c in with_choices][-1] == "stop"


async def test_openai_without_include_usage_has_no_usage(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        chunks = await openai_chunks(http, openai_body(f"#sim words=3 {FAST}"))
    assert chunks[-1] == "[DONE]"
    assert all("usage" not in chunk for chunk in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_openai_reasoning_tool_calls_and_repeat(http: httpx.AsyncClient) -> None:
    messages: list[Any] = [{"role": "user", "content": f"#sim tool=echo repeat=2 {FAST}"}]
    ids = []
    with trio.fail_after(IO_BOUND):
        for _ in range(2):
            body = openai_body("", tools=OPENAI_TOOLS, reasoning_effort="low")
            body["messages"] = messages
            chunks = (await openai_chunks(http, body))[:-1]
            deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            assert reasoning == THINKING_TEXT
            calls = [call for d in deltas for call in d.get("tool_calls", ())]
            first, *rest = calls
            assert first["index"] == 0 and first["type"] == "function"
            assert first["function"]["name"] == "echo"
            assert len(rest) > 1 and all("id" not in call for call in rest)
            arguments = "".join(call["function"]["arguments"] for call in calls)
            assert set(json.loads(arguments)) == {"text"}
            assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
            ids.append(first["id"])
            messages += [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": first["id"],
                            "type": "function",
                            "function": {"name": "echo", "arguments": arguments},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": first["id"], "content": "done"},
            ]
        body = openai_body("", tools=OPENAI_TOOLS)
        body["messages"] = messages
        chunks = (await openai_chunks(http, body))[:-1]
    assert len(set(ids)) == 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


async def test_openai_max_tokens_finishes_with_length(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        chunks = await openai_chunks(http, openai_body(f"#sim words=30 {FAST}", max_tokens=3))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == text_of(reply_words(3))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


# -- timing directives -----------------------------------------------------------------


async def timed_chunks(
    client: httpx.AsyncClient, path: str, body: Mapping[str, Any]
) -> tuple[float, list[tuple[float, bytes]]]:
    """When the headers arrived, and each raw body chunk with its arrival time."""
    async with client.stream("POST", path, json=body) as response:
        headers_at = time.monotonic()
        chunks = [(time.monotonic(), chunk) async for chunk in response.aiter_raw()]
    return headers_at, chunks


def is_word(chunk: bytes) -> bool:
    """An OpenAI chunk carrying a word (the opening chunk's content is empty)."""
    return b'"content":"' in chunk and b'"content":""' not in chunk


async def test_rate_sets_words_per_second(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        _, chunks = await timed_chunks(http, CHAT, openai_body("#sim words=6 rate=20"))
    word_times = [at for at, data in chunks if is_word(data)]
    assert len(word_times) == 6
    assert word_times[-1] - word_times[0] >= 5 / 20 * 0.8


async def test_think_is_silence_after_the_headers(sim: SimServer, http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        headers_at, chunks = await timed_chunks(
            http, MESSAGES, anthropic_body(f"#sim think=0.5 words=2 {FAST}")
        )
    first_at, first = chunks[0]
    assert first.startswith(b"event: message_start")  # nothing at all came before it
    assert first_at - headers_at >= 0.45
    [record] = sim.connections()
    assert record.first_byte_at is not None
    assert record.first_byte_at - record.opened_at >= 0.5


async def test_think_silence_holds_for_openai(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        async with http.stream("POST", CHAT, json=openai_body("#sim think=60")) as response:
            assert response.status_code == 200
            received = b""
            with trio.move_on_after(0.5):
                async for chunk in response.aiter_raw():
                    received += chunk
    assert received == b""


async def test_pause_at_falls_silent_after_word_k(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        _, chunks = await timed_chunks(
            http, CHAT, openai_body(f"#sim words=6 pause_at=3:0.5 {FAST}")
        )
    times = [at for at, data in chunks if is_word(data)]
    assert len(times) == 6
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[2] >= 0.45  # between word 3 and word 4
    assert max(gaps[:2] + gaps[3:]) < 0.45


# -- OpenAI Responses ------------------------------------------------------------------


async def test_responses_event_order_text_and_usage(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        events = await responses_events(http, responses_body(f"#sim words=2 {FAST}"))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == text_of(reply_words(2)) == events[6]["text"]
    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["usage"]["output_tokens"] == 2
    assert completed["output"][0]["content"][0]["text"] == deltas


async def test_responses_reasoning_then_a_tool_call_then_its_result(
    http: httpx.AsyncClient,
) -> None:
    body = responses_body(f"#sim tool=echo {FAST}", reasoning={"effort": "low"})
    with trio.fail_after(IO_BOUND):
        events = await responses_events(http, body)
        summary = [
            e["delta"]
            for e in events
            if e["type"].startswith("response.reasoning_summary") and e["type"].endswith(".delta")
        ]
        [added] = [
            e["item"]
            for e in events
            if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"
        ]
        fragments = [e["delta"] for e in events if e["type"].endswith("arguments.delta")]
        [done] = [e["item"] for e in events if e["type"] == "response.output_item.done"][1:]
        assert "".join(summary) == THINKING_TEXT
        assert added["name"] == "echo" and added["arguments"] == ""
        assert len(fragments) > 1 and done["arguments"] == "".join(fragments)
        assert set(json.loads(done["arguments"])) == {"text"}
        assert events[-1]["type"] == "response.completed"
        body["input"] += [
            {k: done[k] for k in ("type", "call_id", "name", "arguments")},
            {"type": "function_call_output", "call_id": done["call_id"], "output": "done"},
        ]
        after = await responses_events(http, body)
    assert not any(e["type"].endswith("arguments.delta") for e in after)
    assert any(e["type"] == "response.output_text.delta" for e in after)


async def test_responses_max_output_tokens_is_incomplete(http: httpx.AsyncClient) -> None:
    body = responses_body(f"#sim words=30 {FAST}", max_output_tokens=3)
    with trio.fail_after(IO_BOUND):
        events = await responses_events(http, body)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# -- Gemini ----------------------------------------------------------------------------


async def test_gemini_thoughts_text_signature_and_usage(http: httpx.AsyncClient) -> None:
    config = {"thinkingConfig": {"includeThoughts": True}}
    with trio.fail_after(IO_BOUND):
        chunks = await gemini_chunks(
            http, gemini_body(f"#sim words=3 {FAST}", generationConfig=config)
        )
    parts = [p for c in chunks for p in c["candidates"][0].get("content", {}).get("parts", [])]
    thoughts = [p for p in parts if p.get("thought")]
    answer = [p for p in parts if not p.get("thought")]
    assert "".join(p["text"] for p in thoughts) == THINKING_TEXT
    assert "thoughtSignature" in answer[0]  # the signature rides on the next part
    assert "".join(p["text"] for p in answer) == text_of(reply_words(3))
    last = chunks[-1]
    assert (
        last["candidates"][0]["finishReason"] == "STOP" and "content" not in last["candidates"][0]
    )
    assert last["usageMetadata"]["candidatesTokenCount"] == len(THINKING_TEXT.split()) + 3
    assert all(c["usageMetadata"]["promptTokenCount"] > 0 for c in chunks)


async def test_gemini_function_call_arrives_whole_then_its_result(
    http: httpx.AsyncClient,
) -> None:
    body = gemini_body(f"#sim tool=echo {FAST}")
    with trio.fail_after(IO_BOUND):
        call_chunk, finish = await gemini_chunks(http, body)
        [part] = call_chunk["candidates"][0]["content"]["parts"]
        call = part["functionCall"]
        assert call["name"] == "echo" and set(call["args"]) == {"text"} and "id" not in call
        assert finish["candidates"][0]["finishReason"] == "STOP"
        body["contents"] += [
            {"role": "model", "parts": [part]},
            {"role": "user", "parts": [{"functionResponse": {"name": "echo", "response": {}}}]},
        ]
        after = await gemini_chunks(http, body)
    assert "text" in after[0]["candidates"][0]["content"]["parts"][0]


async def test_gemini_max_output_tokens(http: httpx.AsyncClient) -> None:
    body = gemini_body(f"#sim words=30 {FAST}", generationConfig={"maxOutputTokens": 3})
    with trio.fail_after(IO_BOUND):
        chunks = await gemini_chunks(http, body)
    assert len(chunks) == 4 and chunks[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"


# -- failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_anthropic_http_failures(
    sim: SimServer,
    claude: AsyncAnthropic,
    status: int,
    error_class: type[Exception],
    error_type: str,
) -> None:
    with trio.fail_after(IO_BOUND), pytest.raises(error_class) as caught:
        async with claude.messages.stream(
            model="sim",
            max_tokens=16,
            messages=[{"role": "user", "content": f"#sim fail={status}"}],
        ) as stream:
            await stream.get_final_message()
    assert isinstance(caught.value, anthropic.APIStatusError)
    assert caught.value.status_code == status and caught.value.type == error_type
    [record] = await sim.wait_closed()
    assert record.status == status and record.closed_by == "server"


@pytest.mark.parametrize("path", [CHAT, RESPONSES, GEMINI])
@pytest.mark.parametrize("status", [429, 500, 529])
async def test_openai_and_gemini_http_failures(
    http: httpx.AsyncClient, path: str, status: int
) -> None:
    with trio.fail_after(IO_BOUND):
        response = await http.post(path, json=BODIES[path](f"#sim fail={status}"))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"]
    if path == GEMINI:
        assert error["code"] == status and error["status"]
    else:
        assert "type" in error and "code" in error
    assert ("retry-after" in response.headers) == (status == 429)


async def test_retry_after_header(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        plain = await http.post(MESSAGES, json=anthropic_body("#sim fail=429"))
        set_ = await http.post(MESSAGES, json=anthropic_body("#sim fail=429 retry_after=2.5"))
    assert plain.headers["retry-after"] == "1"
    assert set_.headers["retry-after"] == "2.5"
    assert plain.json()["type"] == "error"


async def test_fail_count_lets_a_retry_succeed(sim: SimServer) -> None:
    line = f"#sim fail=429 retry_after=0.01 fail_count=2 words=3 {FAST}"
    with trio.fail_after(IO_BOUND):
        async with AsyncAnthropic(base_url=sim.base_url, api_key="test", max_retries=2) as client:
            async with client.messages.stream(
                model="sim", max_tokens=16, messages=[{"role": "user", "content": line}]
            ) as stream:
                message = await stream.get_final_message()
    assert message.content[0].type == "text"
    assert message.content[0].text == text_of(reply_words(3))
    assert [record.status for record in sim.connections()] == [429, 429, 200]
    assert {record.directive for record in sim.connections()} == {line}


async def test_fail_reset_cuts_the_stream(sim: SimServer, http: httpx.AsyncClient) -> None:
    received = b""
    with trio.fail_after(IO_BOUND), pytest.raises(httpx.RemoteProtocolError):
        body = openai_body(f"#sim fail=reset words=50 {FAST}")
        async with http.stream("POST", CHAT, json=body) as response:
            async for chunk in response.aiter_raw():
                received += chunk
    assert received.count(b'"content":"') == 4  # the opening chunk and three words
    assert b"[DONE]" not in received
    [record] = await sim.wait_closed()
    assert record.closed_by == "server"


async def test_fail_reset_through_the_sdk(sim: SimServer, claude: AsyncAnthropic) -> None:
    texts: list[str] = []
    opened = False
    # Which exception class a broken body raises depends on the SDK release (httpx2's
    # RemoteProtocolError, or anthropic.APIConnectionError since 2.17): not asserted here.
    with trio.fail_after(IO_BOUND), pytest.raises(Exception):  # noqa: B017
        async with claude.messages.stream(
            model="sim",
            max_tokens=1024,
            messages=[{"role": "user", "content": f"#sim fail=reset {FAST}"}],
        ) as stream:
            opened = True
            async for event in stream:
                if event.type == "text":
                    texts.append(event.text)
    assert opened  # the headers came; the error surfaced inside the iteration
    assert len(texts) <= 3  # the sim breaks off after its third delta
    [record] = sim.connections()
    assert (record.status, record.closed_by) == (200, "server")  # the sim hung up


async def test_fail_garbage_is_a_malformed_event(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        raw_openai = await openai_chunks_raw(http, openai_body(f"#sim fail=garbage words=6 {FAST}"))
        raw_anthropic = await raw_body(http, MESSAGES, anthropic_body(f"#sim fail=garbage {FAST}"))
    # After three words the malformed event, then the reply goes on to its normal end.
    assert raw_openai.count('"content":"') == 7
    assert "\ndata: {not json\n\n" in raw_openai
    garbage_at = raw_openai.index("{not json")
    assert raw_openai.index('"content":"not "') < garbage_at
    assert garbage_at < raw_openai.index('"content":"hurry, "')
    assert raw_openai.endswith("data: [DONE]\n\n")
    assert "event: content_block_delta\ndata: {not json\n\n" in raw_anthropic
    assert raw_anthropic.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')


# When a decode error interrupts the SDK's stream, the SDK leaves its inner async
# generators unclosed and Trio warns when they are collected. That is the SDK's doing, not
# the sim's; collect them here, under these filters, so the warning cannot land elsewhere.


@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_fail_garbage_through_the_sdk(claude: AsyncAnthropic) -> None:
    with trio.fail_after(IO_BOUND), pytest.raises(ValueError):  # json.JSONDecodeError
        async with claude.messages.stream(
            model="sim",
            max_tokens=1024,
            messages=[{"role": "user", "content": f"#sim fail=garbage {FAST}"}],
        ) as stream:
            await stream.get_final_message()
    gc.collect()


async def raw_body(client: httpx.AsyncClient, path: str, body: Mapping[str, Any]) -> str:
    async with client.stream("POST", path, json=body) as response:
        return (await response.aread()).decode()


async def openai_chunks_raw(client: httpx.AsyncClient, body: Mapping[str, Any]) -> str:
    return await raw_body(client, CHAT, body)


async def test_fail_error_event(claude: AsyncAnthropic, http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with claude.messages.stream(
                model="sim",
                max_tokens=1024,
                messages=[{"role": "user", "content": f"#sim fail=error_event {FAST}"}],
            ) as stream:
                await stream.get_final_message()
        raw = await openai_chunks_raw(http, openai_body(f"#sim fail=error_event {FAST}"))
        responses = await responses_events(http, responses_body(f"#sim fail=error_event {FAST}"))
        gemini = await gemini_chunks(http, gemini_body(f"#sim fail=error_event {FAST}"))
    assert caught.value.type == "overloaded_error"
    last = json.loads(raw.strip().splitlines()[-1].removeprefix("data: "))
    assert last["error"]["code"] == "overloaded"
    assert responses[-1]["type"] == "response.failed"
    assert responses[-1]["response"]["error"]["code"] == "server_error"
    assert gemini[-1] == {
        "error": {
            "code": 503,
            "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE",
        }
    }


@pytest.mark.parametrize("path", [MESSAGES, CHAT, RESPONSES, GEMINI])
async def test_bad_directive_is_a_400_naming_the_key(
    sim: SimServer, http: httpx.AsyncClient, path: str
) -> None:
    make = BODIES[path]
    with trio.fail_after(IO_BOUND):
        unknown = await http.post(path, json=make("#sim words=3 colour=blue"))
        bad_value = await http.post(path, json=make("#sim words=lots"))
    assert unknown.status_code == bad_value.status_code == 400
    assert "'colour'" in unknown.text and "'words'" in bad_value.text
    error = unknown.json()["error"]
    if path == GEMINI:
        assert error["status"] == "INVALID_ARGUMENT"
    else:
        assert error["type"] == "invalid_request_error"
    assert [record.status for record in sim.connections()] == [400, 400]


async def test_bad_directive_through_the_sdk(claude: AsyncAnthropic) -> None:
    with trio.fail_after(IO_BOUND), pytest.raises(anthropic.BadRequestError, match="colour"):
        async with claude.messages.stream(
            model="sim",
            max_tokens=16,
            messages=[{"role": "user", "content": "#sim colour=blue"}],
        ) as stream:
            await stream.get_final_message()


async def test_non_streaming_and_bad_requests_are_400(http: httpx.AsyncClient) -> None:
    with trio.fail_after(IO_BOUND):
        not_streaming = await http.post(MESSAGES, json={**anthropic_body("hi"), "stream": False})
        not_json = await http.post(CHAT, content=b"{nope")
        wrong_method = await http.get(MESSAGES)
        nowhere = await http.post("/v1/elsewhere", json={})
    assert not_streaming.status_code == 400 and "stream" in not_streaming.text
    assert not_json.status_code == 400
    assert wrong_method.status_code == 405
    assert nowhere.status_code == 404


# -- connection records ----------------------------------------------------------------


async def test_client_close_mid_think_is_recorded_at_once(sim: SimServer) -> None:
    with trio.fail_after(IO_BOUND):
        async with AsyncAnthropic(base_url=sim.base_url, api_key="test") as client:
            async with client.messages.stream(
                model="sim",
                max_tokens=64,
                messages=[{"role": "user", "content": "#sim think=60"}],
            ):
                await trio.sleep(0.1)  # headers are in; the sim is silent
            closed_at = time.monotonic()
            [record] = await sim.wait_closed(MESSAGES)
    assert record.closed_by == "client"
    assert record.first_byte_at is None
    assert record.closed_at is not None and record.closed_at - closed_at < CLOSE_BOUND


async def test_client_close_mid_text_is_recorded_at_once(
    sim: SimServer, http: httpx.AsyncClient
) -> None:
    seen = 0
    with trio.fail_after(IO_BOUND):
        async with http.stream("POST", CHAT, json=openai_body("#sim words=1000 rate=50")) as r:
            # Stop by cancelling, as a Stop button does: the cancel lands on the socket read
            # inside httpx, so its generators unwind (a `break` here would leave them open).
            with trio.move_on_after(0.3):
                async for _ in r.aiter_raw():
                    seen += 1
        closed_at = time.monotonic()
        [record] = await sim.wait_closed(CHAT)
    assert seen > 3
    assert record.closed_by == "client"
    assert record.first_byte_at is not None
    assert record.closed_at is not None and record.closed_at - closed_at < CLOSE_BOUND


async def test_sdk_stop_mid_text_is_recorded_at_once(
    sim: SimServer, claude: AsyncAnthropic
) -> None:
    texts: list[str] = []
    with trio.fail_after(IO_BOUND):
        with trio.CancelScope() as stop:
            async with claude.messages.stream(
                model="sim",
                max_tokens=2048,
                messages=[{"role": "user", "content": "#sim words=1000 rate=100"}],
            ) as stream:
                async for event in stream:
                    if event.type == "text":
                        texts.append(event.text)  # no await in the loop body
                        if len(texts) == 3:
                            stop.cancel(reason="test stop")
                            stopped_at = time.monotonic()
        [record] = await sim.wait_closed(MESSAGES)
    assert texts == ["Rivers ", "do ", "not "]
    assert record.closed_by == "client"
    assert record.closed_at is not None and record.closed_at - stopped_at < CLOSE_BOUND


async def test_completed_response_is_closed_by_server_and_records_clear(
    sim: SimServer, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(IO_BOUND):
        await anthropic_events(http, anthropic_body(f"#sim words=3 {FAST}"))
        await openai_chunks(http, openai_body(f"#sim words=3 {FAST}"))
        records = await sim.wait_closed(count=2)
        listed = (await http.get(CONNECTIONS_PATH)).json()
        cleared = await http.delete(CONNECTIONS_PATH)
        after = (await http.get(CONNECTIONS_PATH)).json()
    assert [record.path for record in records] == [MESSAGES, CHAT]
    for record in records:
        assert isinstance(record, ConnectionRecord)
        assert record.closed_by == "server" and record.status == 200
        assert record.opened_at <= record.first_byte_at <= record.closed_at  # type: ignore[operator]
    assert [entry["id"] for entry in listed] == [record.id for record in records]
    assert set(listed[0]) >= {"id", "path", "opened_at", "first_byte_at", "closed_at", "closed_by"}
    assert listed[0]["closed_by"] == "server"
    assert cleared.status_code == 200 and cleared.json() == {"cleared": 2}
    assert after == [] and sim.connections() == []


async def test_wait_closed_filters_by_path_and_counts(
    sim: SimServer, http: httpx.AsyncClient
) -> None:
    async def one(path: str) -> None:
        if path == CHAT:
            await openai_chunks(http, openai_body("#sim words=2 rate=40"))
        else:
            await anthropic_events(http, anthropic_body("#sim words=2 rate=40"))

    with trio.fail_after(IO_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, CHAT)
            nursery.start_soon(one, CHAT)
            nursery.start_soon(one, MESSAGES)
            chats = await sim.wait_closed(CHAT, count=2)
        assert [record.path for record in chats] == [CHAT, CHAT]
        assert len(await sim.wait_closed(count=3)) == 3


# -- lifecycle -------------------------------------------------------------------------


async def test_shutdown_with_a_stream_open_is_prompt() -> None:
    outcome: list[BaseException] = []
    server_scope = trio.CancelScope()
    stopped_at: list[float] = []
    streaming = trio.Event()

    async def run_server(*, task_status: trio.TaskStatus[SimServer]) -> None:
        with server_scope:
            await serve_sim(task_status=task_status)
        stopped_at.append(time.monotonic())

    async def client(server: SimServer) -> None:
        try:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                async with http.stream("POST", CHAT, json=openai_body("#sim think=60")) as r:
                    streaming.set()
                    await r.aread()
        except httpx.HTTPError as error:
            outcome.append(error)

    with trio.fail_after(IO_BOUND):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(run_server)
            nursery.start_soon(client, server)
            await streaming.wait()
            cancelled_at = time.monotonic()
            server_scope.cancel(reason="test shutdown")
    assert stopped_at[0] - cancelled_at < 5
    [record] = server.connections()
    assert record.closed_by == "server"
    assert len(outcome) == 1  # the client saw its stream end abruptly, not a hang


async def test_two_servers_get_distinct_ports(nursery: trio.Nursery) -> None:
    first: SimServer = await nursery.start(serve_sim)
    second: SimServer = await nursery.start(serve_sim)
    assert first.port != second.port and first.port > 0
    assert first.base_url == f"http://127.0.0.1:{first.port}"


async def test_standalone_main_prints_its_url_and_stops_on_ctrl_c() -> None:
    with trio.fail_after(IO_BOUND):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "adapters.sim", "--port", "0"],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
            url = line.decode().split()[4]
            assert url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=url) as http:
                response = await http.get(CONNECTIONS_PATH)
            assert response.json() == []
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()

"""The tests every httpx model adapter passes (OpenAI-compatible, OpenAI Responses, Gemini),
over real sockets against the simulated provider, plus the helpers their own tests share.

A test module subclasses ``AdapterSuite`` as ``TestAdapterSuite`` and says how to open its
adapter on a port and which error kind the sim's ``fail=error_event`` maps to. What the
suite checks: text, thinking, usage, a tool call and its result, and max_tokens map from
the sim's replies; a stop before the response headers, while silent after them, mid text
and mid tool call
closes the connection at once (the sim, or a TCP proxy, records the client's close); a stop
during a retry backoff ends it at once and sends no retry; a stopped connection is
discarded and a complete one reused by the same client; a consumer that leaves early
strands no generator (warnings are errors); a 429 is retried after its Retry-After; and
the sim's failures map to their kinds.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

import attrs
import httpx
import pytest
import trio
import trio.testing

from adapters import _http
from runtime import (
    Block,
    MemoryStore,
    Message,
    Model,
    ModelError,
    ModelEvent,
    ModelRequest,
    RunFinished,
    Runtime,
    TextBlock,
    TextChunk,
    ThinkingBlock,
    ThinkingChunk,
    Tool,
    ToolCallArgs,
    ToolCallBegin,
    ToolCallEnd,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    TurnEnd,
    UsageReport,
    validate_history,
)

FAKE_KEY = "sk-fake-0123456789abcdef"
IO_BOUND = 30.0  # as in conftest.py
HUGE_ERROR = 32 * 1024 * 1024  # bytes of error body: far more than socket buffers hold
CLOSE_BOUND = 2.0  # "closed at once", generously: a busy CI machine may be slow
TOOLS = (ToolSpec("lookup", "Look a thing up.", {"type": "object"}),)

Seen = Callable[[list[ModelEvent]], bool]
M = TypeVar("M", bound=Model)


def user(text: str) -> Message:
    return Message("user", (TextBlock(text),))


def request(text: str = "Hello.", **kwargs: Any) -> ModelRequest:
    return ModelRequest(messages=[user(text)], **kwargs)


async def collect(model: Model, turn: ModelRequest) -> list[ModelEvent]:
    async with model.stream(turn) as events:
        return [event async for event in events]


def text_of(events: list[ModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def saw(kind: type) -> Seen:
    return lambda seen: any(isinstance(e, kind) for e in seen)


def reply_of(events: list[ModelEvent]) -> Message:
    """The assistant message a turn's events make, as the runtime keeps it."""
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingChunk))
    signatures = [e.signature for e in events if isinstance(e, ThinkingChunk) and e.signature]
    blocks: list[Block] = []
    if thinking:
        blocks.append(ThinkingBlock(thinking, signatures[-1] if signatures else None))
    if text := text_of(events):
        blocks.append(TextBlock(text))
    names = {e.id: e.name for e in events if isinstance(e, ToolCallBegin)}
    blocks += [
        ToolUseBlock(e.id, names[e.id], e.arguments) for e in events if isinstance(e, ToolCallEnd)
    ]
    return Message("assistant", tuple(blocks))


def mock_model(
    open_model: Callable[..., AbstractAsyncContextManager[M]],
    handler: Callable[[httpx.Request], httpx.Response],
    **kwargs: Any,
) -> AbstractAsyncContextManager[M]:
    """An adapter on a MockTransport (no sockets), with the fake key and no retries."""
    return open_model(
        api_key=FAKE_KEY, max_retries=0, transport=httpx.MockTransport(handler), **kwargs
    )


def sse_response(*events: str) -> httpx.Response:
    """A 200 event stream of whole SSE events ("data: ...\n\n"), for a MockTransport."""
    content = "".join(events).encode()
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)


async def turn_error(model: Model) -> ModelError:
    """The error a turn ends with, which must not hold the key, nor a piece of it."""
    with pytest.raises(ModelError) as caught:
        await collect(model, request())
    error = caught.value
    for text in (str(error), repr(error), str(error.__cause__)):
        assert "sk-fake" not in text
    return error


async def smoke(model: Model, max_tokens: int) -> None:
    """A real provider answers a short question."""
    with trio.fail_after(60):
        events = await collect(model, request("Say hello in three words.", max_tokens=max_tokens))
    assert text_of(events) and isinstance(events[-1], TurnEnd)
    assert any(isinstance(e, UsageReport) and e.input_tokens for e in events)


@attrs.define(eq=False)
class Proxy:
    """A TCP proxy in front of the sim that counts connections and notes when each one
    ends. While ``silent``, it answers nothing: a provider stuck before its headers. While
    ``hang_up``, it reads the request and closes: a connection dropped before the headers."""

    target_port: int
    port: int = 0
    silent: bool = False
    hang_up: bool = False
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
            if self.hang_up:
                await client.receive_some()
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


async def start_proxy(sim: Any, nursery: trio.Nursery) -> Proxy:
    proxy = Proxy(sim.port)
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
    )
    proxy.port = listeners[0].socket.getsockname()[1]
    return proxy


async def stop_turn(
    model: Model, turn: ModelRequest, ready: Seen
) -> tuple[list[ModelEvent], float]:
    """Run a turn in a task and cancel it from this one once ``ready(events so far)`` holds
    (checked when the stream opens and after each event) and every task is blocked again,
    the turn's on its socket read. Return the events and when the stop was made."""
    seen: list[ModelEvent] = []
    scope = trio.CancelScope()
    reached = trio.Event()

    async def consume() -> None:
        with scope:
            async with model.stream(turn) as events:
                if ready(seen):
                    reached.set()
                async for event in events:
                    seen.append(event)  # no await in the loop body: the stop lands on a read
                    if ready(seen):
                        reached.set()
            raise AssertionError("the turn ended before it was stopped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await reached.wait()
        await trio.testing.wait_all_tasks_blocked()
        stopped_at = time.monotonic()
        scope.cancel(reason="test stop")
    assert scope.cancelled_caught
    return seen, stopped_at


async def stop_once(
    model: Model, turn: ModelRequest, reached: Callable[[], Awaitable[object]]
) -> float:
    """Run a turn in a task, stop it 0.2 s after ``reached()`` returns (the turn cannot
    signal it: it waits before any event); return when the stop was made."""
    scope = trio.CancelScope()

    async def consume() -> None:
        with scope:
            await collect(model, turn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await reached()
        await trio.sleep(0.2)
        stopped_at = time.monotonic()
        scope.cancel(reason="test stop")
    assert scope.cancelled_caught
    return stopped_at


async def closed_by_client(sim: Any, stopped_at: float) -> None:
    [record] = await sim.wait_closed(count=1)
    assert record.closed_by == "client"
    assert record.closed_at - stopped_at < CLOSE_BOUND


async def next_turn_completes(model: Model) -> None:
    events = await collect(model, request("#sim words=5 rate=1000"))
    assert len(text_of(events).split()) == 5 and events[-1] == TurnEnd("end_turn")


async def max_tokens_mid_tool_arguments(model: Model) -> None:
    """The output limit cuts a tool call's arguments (the sim's max_tokens=2): the turn
    ends with max_tokens and no ToolCallEnd, and a run through the runtime finishes
    normally with the call dropped, as a stop drops a cut-off call: it never ran."""
    prompt = "Look it up.\n#sim tool=lookup max_tokens=2 rate=1000"
    ran: list[object] = []

    async def lookup(arguments: Any) -> str:
        ran.append(arguments)
        return "found it"

    with trio.fail_after(IO_BOUND):
        events = await collect(model, ModelRequest([user(prompt)], tools=TOOLS))
        assert events[-1] == TurnEnd("max_tokens") and not saw(ToolCallEnd)(events)
        store = MemoryStore()
        async with Runtime(model=model, store=store, tools=[Tool("lookup", lookup)]) as rt:
            end = await (await rt.start_run("s", prompt)).wait()
        history = await store.history("s")
    assert isinstance(end, RunFinished), end
    assert end.stop_reason == "max_tokens" and ran == []
    validate_history(history)
    assert [m.role for m in history] == ["user"]  # the cut-off call was all it said
    assert not any(isinstance(b, ToolUseBlock) for m in history for b in m.content)


class AdapterSuite:
    """The shared tests; a subclass names its adapter (see the module docstring)."""

    ERROR_EVENT_KIND: ClassVar[str]  # what the sim's fail=error_event maps to
    # The mid-tool-call stop: the directive, when to stop, what must hold of what was seen.
    # By default: between two streamed argument fragments.
    TOOL_STOP: ClassVar[tuple[str, Seen, Seen]] = (
        "#sim tool=lookup rate=2",
        saw(ToolCallArgs),
        lambda seen: not saw(ToolCallEnd)(seen),
    )

    def open_model(self, port: int, **kwargs: Any) -> AbstractAsyncContextManager[Model]:
        raise NotImplementedError

    @pytest.fixture
    async def proxy(self, sim: Any, nursery: trio.Nursery) -> Proxy:
        return await start_proxy(sim, nursery)

    async def test_sim_text_thinking_and_usage(self, sim: Any) -> None:
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                events = await collect(model, request("#sim words=8 rate=1000", thinking=True))
        kinds = [type(e) for e in events]
        assert kinds.index(ThinkingChunk) < kinds.index(TextChunk)
        assert "".join(e.text for e in events if isinstance(e, ThinkingChunk)).startswith(
            "The user asked"
        )
        assert len(text_of(events).split()) == 8
        usage = [e for e in events if isinstance(e, UsageReport)]
        assert usage[0].input_tokens and usage[-1].output_tokens
        assert events[-1] == TurnEnd("end_turn")

    async def test_sim_tool_call_then_result(self, sim: Any) -> None:
        prompt = user("#sim tool=lookup rate=1000")
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                events = await collect(model, ModelRequest([prompt], tools=TOOLS, thinking=True))
                [begin] = [e for e in events if isinstance(e, ToolCallBegin)]
                args = [e.fragment for e in events if isinstance(e, ToolCallArgs)]
                [end] = [e for e in events if isinstance(e, ToolCallEnd)]
                assert begin.name == "lookup" and end.id == begin.id
                assert json.loads("".join(args)) == end.arguments
                assert set(end.arguments) == {"text"} and events[-1] == TurnEnd("tool_use")
                result = Message("tool", (ToolResultBlock(end.id, "found it"),))
                history = [prompt, reply_of(events), result]
                after = await collect(model, ModelRequest(history, tools=TOOLS))
        assert text_of(after) and after[-1] == TurnEnd("end_turn")

    async def test_sim_max_tokens(self, sim: Any) -> None:
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                events = await collect(model, request("#sim words=50 rate=1000", max_tokens=5))
        assert len(text_of(events).split()) == 5 and events[-1] == TurnEnd("max_tokens")

    @pytest.mark.parametrize("case", ["silent-thinking", "mid-text", "mid-tool-call"])
    async def test_sim_stop_closes_the_connection_and_the_client_serves_on(
        self, sim: Any, case: str
    ) -> None:
        directive, ready, check = {
            # silent after the headers: the stream is open, no byte has come
            "silent-thinking": ("#sim think=60", lambda seen: True, lambda seen: seen == []),
            "mid-text": (
                "#sim words=300 rate=20",
                saw(TextChunk),
                lambda seen: not isinstance(seen[-1], TurnEnd),
            ),
            "mid-tool-call": self.TOOL_STOP,
        }[case]
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                seen, stopped_at = await stop_turn(model, request(directive, tools=TOOLS), ready)
                assert check(seen) and not saw(TurnEnd)(seen)
                await closed_by_client(sim, stopped_at)
                await next_turn_completes(model)

    async def test_sim_stop_during_retry_backoff(self, sim: Any) -> None:
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                turn = request("#sim fail=429 retry_after=30")
                stopped_at = await stop_once(model, turn, sim.wait_closed)  # the 429 went out
                assert time.monotonic() - stopped_at < CLOSE_BOUND
                [refused] = sim.connections()  # and no retry
                assert refused.status == 429
                await next_turn_completes(model)

    async def test_stop_before_the_response_headers(self, proxy: Proxy) -> None:
        proxy.silent = True
        with trio.fail_after(IO_BOUND):
            async with self.open_model(proxy.port) as model:
                stopped_at = await stop_once(model, request(), proxy.request_seen.wait)
                await proxy.closed.wait()
                assert proxy.closed_at[0] - stopped_at < CLOSE_BOUND
                proxy.silent = False
                await next_turn_completes(model)

    async def test_a_connection_dropped_before_the_headers_is_unavailable_and_retried(
        self, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Classified by phase: nothing was delivered, so it is retried, then reported as
        unavailable (a drop after the headers is bad_response: see test_sim_errors)."""
        monkeypatch.setattr(_http, "BACKOFF_BASE", 0.01)
        proxy.hang_up = True
        with trio.fail_after(IO_BOUND):
            async with self.open_model(proxy.port, max_retries=2) as model:
                with pytest.raises(ModelError) as caught:
                    await collect(model, request())
                assert caught.value.kind == "unavailable" and proxy.accepted == 3
                assert str(caught.value).endswith(".") and FAKE_KEY not in str(caught.value)
                proxy.hang_up = False
                await next_turn_completes(model)

    async def test_sim_max_tokens_mid_tool_arguments_drops_the_call(self, sim: Any) -> None:
        async with self.open_model(sim.port) as model:
            await max_tokens_mid_tool_arguments(model)

    async def test_a_huge_error_body_is_read_only_in_part(self, sim: Any) -> None:
        """A 32 MiB error body: the adapter reads 64 KiB, hangs up (the sim records the
        client's close before the body's end) and quotes the start of it."""
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port, max_retries=0) as model:
                with pytest.raises(ModelError) as caught:
                    await collect(model, request(f"#sim fail=500 error_bytes={HUGE_ERROR}"))
                [record] = await sim.wait_closed(count=1)
                assert (record.status, record.closed_by) == (500, "client")
                await next_turn_completes(model)
        error = caught.value
        assert error.kind == "unavailable" and "Simulated HTTP 500" in str(error)
        assert "longer than 64 KiB" in str(error) and len(str(error)) < 1000

    async def test_pool_reuses_complete_connections_and_drops_stopped_ones(
        self, proxy: Proxy
    ) -> None:
        with trio.fail_after(IO_BOUND):
            async with self.open_model(proxy.port) as model:
                await next_turn_completes(model)
                await next_turn_completes(model)
                assert proxy.accepted == 1 and proxy.closed_at == []
                await stop_turn(model, request("#sim words=300 rate=20"), saw(TextChunk))
                await next_turn_completes(model)
                assert proxy.accepted == 2 and len(proxy.closed_at) == 1

    async def test_leaving_the_stream_early_closes_everything(self, sim: Any) -> None:
        """A consumer that breaks out, or is cancelled at an await of its own, strands no
        async generator (warnings are errors here) and still closes the connection."""
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                async with model.stream(request("#sim words=300 rate=50")) as events:
                    async for event in events:
                        if isinstance(event, TextChunk):
                            break
                await closed_by_client(sim, time.monotonic())
                sim.clear_connections()

                with trio.CancelScope() as scope:
                    async with model.stream(request("#sim words=300 rate=50")) as events:
                        async for event in events:
                            if isinstance(event, TextChunk):
                                scope.cancel()
                                await trio.sleep(1)  # the cancel lands here, not on the stream
                await closed_by_client(sim, time.monotonic())

                async with model.stream(request("#sim words=5 rate=1000")):
                    pass  # entered, never iterated
                await next_turn_completes(model)

    async def test_sim_retry_succeeds_after_a_429(self, sim: Any) -> None:
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port) as model:
                events = await collect(
                    model, request("#sim fail=429 retry_after=0.1 fail_count=1 words=3 rate=1000")
                )
        assert events[-1] == TurnEnd("end_turn")
        assert [r.status for r in sim.connections()] == [429, 200]

    @pytest.mark.parametrize(
        ("directive", "kind"),
        [
            ("#sim fail=429 retry_after=7", "rate_limit"),
            ("#sim fail=500", "unavailable"),
            ("#sim fail=529", "overloaded"),
            # dropped after the headers: never retried, whatever the exception class
            ("#sim fail=reset rate=1000", "bad_response"),
            ("#sim fail=garbage rate=1000", "bad_response"),
            ("#sim fail=error_event rate=1000", None),  # the adapter's ERROR_EVENT_KIND
        ],
    )
    async def test_sim_errors(
        self, sim: Any, monkeypatch: pytest.MonkeyPatch, directive: str, kind: str | None
    ) -> None:
        monkeypatch.setattr(_http, "BACKOFF_BASE", 0.01)
        retried = directive.split()[1] in ("fail=500", "fail=529")
        with trio.fail_after(IO_BOUND):
            async with self.open_model(sim.port, max_retries=2 if retried else 0) as model:
                with pytest.raises(ModelError) as caught:
                    await collect(model, request(directive))
                await next_turn_completes(model)
        error = caught.value
        assert error.kind == (kind or self.ERROR_EVENT_KIND)
        assert FAKE_KEY not in str(error) and FAKE_KEY not in repr(error)
        assert str(error).endswith(".")
        if kind == "rate_limit":
            assert error.retry_after == 7
        if retried:
            assert len(sim.connections()) == 3 + 1  # three attempts, then the next turn

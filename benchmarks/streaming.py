"""Streaming overhead: what the gateway adds between the provider's delta and the client.

The gateway runs in its own process (``_gateway.gateway_process``). This process is both
ends of the pipe: a small OpenAI-compatible provider (the sim's own chunk renderer, but
each delta sent when the benchmark says) and the WebSocket clients, so the provider's
write and the client's read are stamped on one clock. Latency: one delta at a time, the
next only once the client has it. Throughput: the provider writes a whole reply at once
and every connected client reads it to its ``final`` event; the gateway's CPU time comes
from /proc.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import trio

from adapters.sim._openai_format import OpenAIRenderer
from adapters.sim._script import Begin, Finish, TextDelta

from ._gateway import Client, GatewayProcess, gateway_process, open_client
from ._report import Plot, Section, Series, Summary, ms

HEADERS: Final = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"connection: close\r\n\r\n"
)
BATCH: Final = 100  # deltas per write in the throughput runs
FANOUT_RATE: Final = 100.0  # words/s of the reply many clients follow
# What limits the fan-out's tail, as measured on 2026-12-04 (rewrite it with a new run).
FANOUT_LIMITS: Final = (
    " What limits it, measured: frames, not bytes. Each delta is two frames (`chat` and "
    "`agent`) to each of 100 connections, 200 WebSocket writes of one socket send each; "
    "the 100-client throughput row gives about 39 µs of gateway CPU per frame (0.5 CPU-s "
    "per 1,000 deltas at 64 frames per client), so 100 words/s to 100 clients asks about "
    "0.8 of a core of the gateway, while the other core ran the 100 clients' JSON parsing "
    "in this process and other engineers' tests (load average 3.1 at the end). The gateway "
    "falls behind, the clients' deltas merge (every client still got every word) and the "
    "latency grows to the tail shown. Fewer writes per frame (a connection's waiting "
    "frames in one socket send) is the next thing to measure."
)
BOUND: Final = 300.0  # seconds for one measurement; longer is a hang


@attrs.define(eq=False)
class Provider:
    """Answers each chat completions request with the headers and a first chunk, then
    hands the open stream to the benchmark, which writes the deltas and the end."""

    requests: trio.MemorySendChannel[Reply]
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some()
            head, body = request.split(b"\r\n\r\n", 1)
            length = next(
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            while len(body) < length:
                body += await stream.receive_some()
            include_usage = bool(json.loads(body).get("stream_options", {}).get("include_usage"))
            renderer = OpenAIRenderer("sim", next(self._ids), include_usage=include_usage)
            await stream.send_all(HEADERS + renderer.render(Begin(input_tokens=1)))
            reply = Reply(stream, renderer)
            await self.requests.send(reply)
            await reply.done.wait()


@attrs.define(eq=False)
class Reply:
    stream: trio.SocketStream
    renderer: OpenAIRenderer
    done: trio.Event = attrs.Factory(trio.Event)

    async def send(self, words: list[str]) -> None:
        chunks = b"".join(self.renderer.render(TextDelta(word)) for word in words)
        await self.stream.send_all(chunks)

    async def finish(self, words: int) -> None:
        await self.stream.send_all(self.renderer.render(Finish("end_turn", words)))
        self.done.set()


@contextlib.asynccontextmanager
async def provider() -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[Reply]]]:
    """Serve the provider on 127.0.0.1; yield its base URL and the replies to write."""
    send, receive = trio.open_memory_channel[Reply](math.inf)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, Provider(send).handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", receive
        nursery.cancel_scope.cancel()


async def latency(
    client: Client, replies: trio.MemoryReceiveChannel[Reply], deltas: int
) -> Summary:
    """Milliseconds from the provider's write of each delta to the client's read of it."""
    arrived: dict[str, float] = {}
    event = trio.Event()

    def on_delta(payload: dict[str, Any], now: float) -> None:
        arrived[payload["deltaText"]] = now
        event.set()

    client.on_delta, run_id = on_delta, "latency"
    client.watched.add(run_id)
    params = {"sessionKey": "latency", "message": "Go.", "idempotencyKey": run_id}
    await client.call("chat.send", params)
    reply = await replies.receive()
    samples = []
    for index in range(deltas):
        word = f"w{index} "
        sent = time.monotonic()
        await reply.send([word])
        while word not in arrived:
            event = trio.Event()
            await event.wait()
        samples.append((arrived.pop(word) - sent) * 1000)
    await reply.finish(deltas)
    await client.wait((run_id, "final"))
    client.on_delta = None
    return Summary.of(samples)


@attrs.frozen
class Throughput:
    clients: int
    deltas: int
    per_second: float
    cpu_per_thousand: float  # the gateway's CPU seconds per 1,000 deltas
    frames_per_client: float  # delta frames each client received (merged when behind)


async def throughput(
    gateway: GatewayProcess, replies: trio.MemoryReceiveChannel[Reply], clients: int, deltas: int
) -> Throughput:
    run_id = f"burst-{clients}"
    async with contextlib.AsyncExitStack() as stack:
        connected = [
            await stack.enter_async_context(open_client(gateway.port)) for _ in range(clients)
        ]
        for client in connected:
            client.watched.add(run_id)
        params = {"sessionKey": run_id, "message": "Go.", "idempotencyKey": run_id}
        await connected[0].call("chat.send", params)
        reply = await replies.receive()
        before = [client.deltas for client in connected]
        cpu, began = gateway.cpu_seconds(), time.monotonic()
        for start in range(0, deltas, BATCH):
            await reply.send([f"w{index} " for index in range(start, min(deltas, start + BATCH))])
        await reply.finish(deltas)
        ended = max([await client.wait((run_id, "final")) for client in connected])
        cpu = gateway.cpu_seconds() - cpu
        frames = sum(c.deltas - b for c, b in zip(connected, before, strict=True)) / clients
    return Throughput(clients, deltas, deltas / (ended - began), cpu / deltas * 1000, frames)


@attrs.frozen
class Fanout:
    clients: int
    words: int
    rate: float
    added: Summary  # ms from the provider's write of a word to each client's read of it
    complete: int  # clients that got every word, in order, from deltaText alone
    frames_per_client: float


async def fanout(
    gateway: GatewayProcess,
    replies: trio.MemoryReceiveChannel[Reply],
    clients: int,
    words: int,
    rate: float,
) -> Fanout:
    """``clients`` connections subscribed to one session follow one reply written at
    ``rate`` words/s; each word's latency is stamped at every client."""
    run_id, session = f"fanout-{clients}", f"fanout-{clients}"
    sent: dict[str, float] = {}
    samples: list[float] = []
    texts: list[list[str]] = [[] for _ in range(clients)]
    frames = [0] * clients

    def on_delta(index: int) -> Callable[[dict[str, Any], float], None]:
        def seen(payload: dict[str, Any], now: float) -> None:
            frames[index] += 1
            texts[index].append(payload["deltaText"])
            for word in payload["deltaText"].split():  # several, if merged
                samples.append((now - sent[word]) * 1000)

        return seen

    async with contextlib.AsyncExitStack() as stack:
        connected = [
            await stack.enter_async_context(open_client(gateway.port)) for _ in range(clients)
        ]
        for index, client in enumerate(connected):
            await client.call("sessions.messages.subscribe", {"key": session})
            client.watched.add(run_id)
            client.on_delta = on_delta(index)
        params = {"sessionKey": session, "message": "Go.", "idempotencyKey": run_id}
        await connected[0].call("chat.send", params)
        reply = await replies.receive()
        begin = trio.current_time()
        for index in range(words):
            await trio.sleep_until(begin + index / rate)
            word = f"w{index}"
            sent[word] = time.monotonic()
            await reply.send([word + " "])
        await reply.finish(words)
        for client in connected:
            await client.wait((run_id, "final"))
    expected = "".join(f"w{index} " for index in range(words))
    complete = sum("".join(text) == expected for text in texts)
    return Fanout(clients, words, rate, Summary.of(samples), complete, sum(frames) / clients)


async def run(quick: bool) -> Section:
    samples, deltas, crowd = (50, 50, 10) if quick else (2000, 500, 100)
    async with provider() as (url, replies), gateway_process(url) as gateway:
        with trio.fail_after(BOUND):
            async with open_client(gateway.port) as client:
                added = await latency(client, replies, samples)
            bursts = [await throughput(gateway, replies, n, deltas) for n in (1, crowd)]
            fan = await fanout(gateway, replies, crowd, 50 if quick else 1000, FANOUT_RATE)
    rows = [
        (
            "added latency per delta, provider → WebSocket client, ms",
            "1",
            ms(added.median),
            ms(added.p99),
            ms(added.max),
            str(added.trials),
        ),
    ]
    for burst in bursts:
        rows += [
            (
                "deltas per second through the gateway",
                str(burst.clients),
                f"{burst.per_second:.0f}",
                "",
                "",
                str(burst.deltas),
            ),
            (
                "gateway CPU seconds per 1,000 deltas",
                str(burst.clients),
                f"{burst.cpu_per_thousand:.3f}",
                "",
                "",
                str(burst.deltas),
            ),
            (
                "delta frames each client received",
                str(burst.clients),
                f"{burst.frames_per_client:.0f}",
                "",
                "",
                str(burst.deltas),
            ),
        ]
    rows.append(
        (
            f"added latency per word, {fan.clients} subscribed clients following one reply "
            f"at {fan.rate:g} words/s, ms",
            str(fan.clients),
            ms(fan.added.median),
            ms(fan.added.p99),
            ms(fan.added.max),
            str(fan.words),
        )
    )
    rows.append(
        (
            "clients that got every word from deltaText alone",
            str(fan.clients),
            f"{fan.complete}/{fan.clients}",
            "",
            "",
            str(fan.words),
        )
    )
    met = "met" if added.median < 1 else "MISSED"
    fan_met = "met" if fan.added.p99 <= 50 and fan.complete == fan.clients else "MISSED"
    notes = (
        "The gateway (Runtime on the OpenAI-compatible adapter, MemoryStore) runs in its "
        "own process; this one plays the provider, writing chat completion chunks on a "
        "loopback socket, and the WebSocket clients, so both ends are stamped on one "
        f"clock. Latency: {added.trials} deltas, one at a time, each written once the "
        "client has the previous one; it includes both loopback hops. Throughput: the "
        f"provider writes a {deltas}-word reply as fast as the gateway reads it "
        f"({BATCH} deltas a write) and every connected client reads it to its `final` "
        "event; these clients never subscribe, so each gets every run's events (the "
        "operator broadcast); a delta frame carries only the new text (the text so far on "
        "the first delta a connection sees of a run), and each event is encoded once for "
        "all of them. "
        "A client that falls behind gets its pending deltas merged into one (the bus's "
        "policy), hence fewer frames than deltas. CPU is the gateway process's user+system "
        f"time. Target: under 1 ms median added per delta; now {ms(added.median)} ms, {met}. "
        f"Fan-out: {fan.clients} clients, each subscribed to the reply's session "
        "(`sessions.messages.subscribe`), follow one reply the provider writes at "
        f"{fan.rate:g} words/s; every word's latency is stamped at every client (all in "
        "this one process, which also parses their frames: its own lag counts in). "
        f"Target: every client gets every word, p99 ≤ 50 ms; now p99 {ms(fan.added.p99)} "
        f"ms, {fan.complete}/{fan.clients} complete, {fan_met}."
        + (FANOUT_LIMITS if not quick else "")
    )
    plot = Plot(
        "connected clients",
        "per second / CPU ms per 1,000 deltas",
        (
            Series(
                "deltas per second",
                tuple(str(b.clients) for b in bursts),
                tuple(b.per_second for b in bursts),
            ),
            Series(
                "gateway CPU ms per 1,000 deltas",
                tuple(str(b.clients) for b in bursts),
                tuple(b.cpu_per_thousand * 1000 for b in bursts),
            ),
        ),
        kind="bar",
        log_y=True,
    )
    return Section(
        "Streaming overhead (provider → gateway → WebSocket client)",
        ("measure", "clients", "median (or value)", "p99", "max", "deltas"),
        tuple(rows),
        notes,
        plot,
    )

"""The gateway under measurement, in its own process, and the client that measures it.

``python -m benchmarks._gateway --sim-url URL`` serves a Gateway in front of a Runtime on
the OpenAI-compatible adapter (unbounded httpx pool) and a MemoryStore, and prints its
port; ``gateway_process`` runs it as a child. ``Client`` is one WebSocket connection that
stamps the arrival of the frames it waits for, so the measuring process never shares an
event loop with what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from ._process import first_line

CONNECT: Final = {
    "minProtocol": 4,
    "maxProtocol": 4,
    "client": {"id": "gateway-client", "version": "bench", "platform": "linux", "mode": "backend"},
    "role": "operator",
    "scopes": ["operator.read", "operator.write"],
    "caps": [],
}
# How the gateway's process sets up its garbage collector: Python's defaults; what
# start-up built frozen out of the collector's passes (gc.freeze); that plus rarer
# collections, as ``trio-agent serve`` does (adapters/cli.py), the mode measured by default.
GC_MODES: Final = ("default", "freeze", "freeze+threshold")
SERVED: Final = "freeze+threshold"

Key = tuple[str, str]  # ("res", request id) or (run id, "start" | "aborted")


# -- the gateway's process ------------------------------------------------------------


async def _serve(sim_url: str, gc_mode: str) -> None:
    from adapters.gateway import Gateway
    from adapters.openai_compat import open_openai_compat
    from runtime import Runtime

    async with open_openai_compat(model="sim", base_url=sim_url + "/v1", api_key="") as model:
        async with Runtime(model=model) as runtime, trio.open_nursery() as nursery:
            gateway = Gateway(runtime)
            port = await nursery.start(gateway.serve, "127.0.0.1", 0)
            tune_gc(gc_mode)
            print(f"gateway on ws://127.0.0.1:{port}", flush=True)
            await _until_told_to_stop()
            gateway.shutdown()


def tune_gc(mode: str) -> None:
    if mode != "default":
        gc.freeze()  # after start-up: what start-up made is never collected, nor walked
    if mode == "freeze+threshold":
        gc.set_threshold(50_000, 20, 20)


async def _until_told_to_stop() -> None:
    """Return on SIGINT, SIGTERM, or stdin's end (the benchmark process is gone)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

            async def on_eof() -> None:
                async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
                    while await stdin.receive_some():
                        pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_eof)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc; clock ticks of 10 ms)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class GatewayProcess:
    """The running gateway child: where it listens, and what it costs (from /proc)."""

    port: int
    pid: int

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")


@contextlib.asynccontextmanager
async def gateway_process(
    sim_url: str,
    gc_mode: str = SERVED,
    command: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """Run the gateway (or ``command``, which prints the same first line) in a child
    process, with ``env`` added to this process's environment; yield it. The child always
    ends."""
    if command is None:
        command = [sys.executable, "-m", "benchmarks._gateway", "--sim-url", sim_url]
        command += ["--gc", gc_mode]
    async with trio.open_nursery() as nursery:
        start = functools.partial(
            trio.run_process,
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            check=False,
            env={**os.environ, **env} if env is not None else None,
        )
        process: trio.Process = await nursery.start(start)
        try:
            line = await first_line(process, "gateway process")
            yield GatewayProcess(int(line.split("ws://127.0.0.1:")[1].split()[0]), process.pid)
        finally:
            process.terminate()


# -- the measuring client -------------------------------------------------------------


@attrs.define(eq=False)
class Client:
    """One WebSocket connection that stamps the arrival of the frames it waits for.

    It reads every frame the gateway pushes (the gateway sends each connection every
    session's events), so background deltas are only counted, never parsed; ``on_delta``,
    when set, sees the delta frames of the ``watched`` runs.
    """

    ws: WebSocketConnection
    deltas: int = 0  # chat delta frames received
    watched: set[str] = attrs.Factory(set)  # trial runs whose events are stamped
    background: set[str] = attrs.Factory(set)  # live background runs
    not_streaming: set[str] = attrs.Factory(set)  # first background runs without text yet
    streaming: trio.Event = attrs.Factory(trio.Event)  # set when that set has emptied
    closing: bool = False  # we are closing the connection: its end is no error
    ended: trio.MemorySendChannel[str] | None = None  # background runs that finished
    on_delta: Callable[[dict[str, Any], float], None] | None = None
    # the gateway's own ms from a watched run's abort to its stop commit (runtime.stopped)
    committed: dict[str, float] = attrs.Factory(dict)
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _arrived: dict[Key, float] = attrs.Factory(dict)
    _waiting: dict[Key, trio.Event] = attrs.Factory(dict)
    _responses: dict[str, dict[str, Any]] = attrs.Factory(dict)

    async def read(self) -> None:
        while True:
            try:
                text = await self.ws.get_message()
            except ConnectionClosed:
                if self.closing:
                    return
                raise
            now = time.monotonic()
            assert isinstance(text, str)
            if '"state":"delta"' in text:  # JSON escapes quotes inside strings: exact
                self.deltas += 1
                if self.not_streaming:
                    self.not_streaming.discard(json.loads(text)["payload"]["runId"])
                    if not self.not_streaming:
                        self.streaming.set()
                if self.on_delta is not None:
                    payload = json.loads(text)["payload"]
                    if payload["runId"] in self.watched:
                        self.on_delta(payload, now)
                continue
            if '"stream":"assistant"' in text:
                continue
            self._dispatch(json.loads(text), now)

    def _dispatch(self, frame: dict[str, Any], now: float) -> None:
        if frame["type"] == "res":
            self._responses[frame["id"]] = frame
            self._arrive(("res", frame["id"]), now)
            return
        payload = frame["payload"]
        run_id = payload.get("runId")
        if frame["event"] == "agent" and payload["data"].get("phase") == "start":
            if run_id in self.watched:
                self._arrive((run_id, "start"), now)
        elif frame["event"] == "chat" and payload["state"] in ("final", "aborted", "error"):
            if run_id in self.background:
                if payload["state"] != "final":
                    raise RuntimeError(f"background run {run_id} ended {payload['state']}")
                assert self.ended is not None
                self.ended.send_nowait(run_id)
            elif run_id in self.watched:
                self._arrive((run_id, payload["state"]), now)
        elif frame["event"] == "runtime.stopped" and run_id in self.watched:
            self.committed[run_id] = payload["timings"]["committedMs"]
            self._arrive((run_id, "stopped"), now)

    def _arrive(self, key: Key, now: float) -> None:
        self._arrived[key] = now
        event = self._waiting.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: Key) -> float:
        """When the frame for ``key`` arrived (``time.monotonic``), once it has."""
        if key not in self._arrived:
            await self._waiting.setdefault(key, trio.Event()).wait()
        return self._arrived.pop(key)

    async def call(self, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Send a request; return its payload and when the response arrived."""
        request_id = f"r{next(self._ids)}"
        frame = {"type": "req", "id": request_id, "method": method, "params": params}
        await self.ws.send_message(json.dumps(frame))
        arrived = await self.wait(("res", request_id))
        response = self._responses.pop(request_id)
        if not response["ok"]:
            raise RuntimeError(f"{method} failed: {response['error']}")
        return response["payload"], arrived


@contextlib.asynccontextmanager
async def open_client(
    port: int,
    params: Mapping[str, Any] = CONNECT,
    make: Callable[[WebSocketConnection], Client] = Client,
) -> AsyncIterator[Client]:
    """Connect and shake hands with ``params``; ``make`` builds the client. The TCP stream
    is closed by us (trio-websocket 0.12 leaves it open after a close the server started;
    see tests/gateway_client.py)."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
            client = make(ws)
            await ws.get_message()  # connect.challenge
            nursery.start_soon(client.read)
            await client.call("connect", params)
            yield client
            client.closing = True
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks._gateway")
    parser.add_argument("--sim-url", required=True)
    parser.add_argument("--gc", choices=GC_MODES, default=SERVED)
    args = parser.parse_args()
    trio.run(_serve, args.sim_url, args.gc)

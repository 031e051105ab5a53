"""A minimal gateway client for tests: real WebSocket, every received frame recorded."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from tests.openclaw_schema import check_frames

Frame = dict[str, Any]


@attrs.define(eq=False)
class Client:
    ws: WebSocketConnection
    received: list[Frame] = attrs.Factory(list)  # every frame, in order
    hello: Frame | None = None
    closed: trio.Event = attrs.Factory(trio.Event)
    _ids: itertools.count = attrs.Factory(lambda: itertools.count(1))
    _responses: dict[str, Frame] = attrs.Factory(dict)
    _arrived: trio.Event = attrs.Factory(trio.Event)

    async def _read(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                self.received.append(frame)
                if frame.get("type") == "res":
                    self._responses[frame["id"]] = frame
                self._arrived.set()
                self._arrived = trio.Event()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send_message(text)

    async def call(self, method: str, params: Any = None) -> Frame:
        """Send a request and return the whole response frame."""
        request_id = f"r{next(self._ids)}"
        frame = {"type": "req", "id": request_id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.ws.send_message(json.dumps(frame))
        return await self.response(request_id)

    async def response(self, request_id: str) -> Frame:
        while request_id not in self._responses:
            if self.closed.is_set():
                raise ConnectionClosed(self.ws.closed)
            await self._arrived.wait()
        return self._responses.pop(request_id)

    async def ok(self, method: str, params: Any = None) -> Any:
        response = await self.call(method, params)
        assert response["ok"], response
        return response["payload"]

    def events(self, name: str | None = None, run_id: str | None = None) -> list[Frame]:
        return [
            f
            for f in self.received
            if f.get("type") == "event"
            and (name is None or f["event"] == name)
            and (run_id is None or f["payload"].get("runId") == run_id)
        ]

    async def wait_event(self, predicate: Callable[[Frame], bool]) -> Frame:
        """The first received event frame (earlier ones included) that matches."""
        seen = 0
        while True:
            for frame in self.received[seen:]:
                if frame.get("type") == "event" and predicate(frame):
                    return frame
            seen = len(self.received)
            if self.closed.is_set():
                raise AssertionError("the connection closed before the event arrived")
            await self._arrived.wait()

    async def wait_chat(self, run_id: str, state: str) -> Frame:
        return await self.wait_event(
            lambda f: (
                f["event"] == "chat"
                and f["payload"]["runId"] == run_id
                and f["payload"]["state"] == state
            )
        )


def connect_params(
    token: str | None = None, scopes: list[str] | None = None, caps: list[str] | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {
            "id": "gateway-client",
            "version": "test",
            "platform": "linux",
            "mode": "backend",
        },
        "role": "operator",
        "scopes": ["operator.read", "operator.write"] if scopes is None else scopes,
        "caps": caps or [],
    }
    if token is not None:
        params["auth"] = {"token": token}
    return params


@asynccontextmanager
async def open_client(
    port: int, *, handshake: bool = True, **connect: Any
) -> AsyncIterator[Client]:
    """Connect; with ``handshake``, also do connect/hello-ok.

    The TCP stream is ours to close: trio-websocket 0.12's client leaves it open after a
    close the server started (its reader stops at EOF without closing the stream).
    """
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
            client = Client(ws)
            nursery.start_soon(client._read)
            await client.wait_event(lambda f: f["event"] == "connect.challenge")
            if handshake:
                client.hello = await client.ok("connect", connect_params(**connect))
            yield client
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()
    check_frames(client.received)  # every frame the gateway sent, against OpenClaw's schema


@asynccontextmanager
async def open_raw(
    port: int, *, graceful: bool = True, receive_buffer: int | None = None
) -> AsyncIterator[tuple[WebSocketConnection, list[Frame]]]:
    """A handshaken connection that reads nothing more unless told (queue of one frame).
    ``receive_buffer`` shrinks its socket's buffer, so that the gateway's writes to it
    block soon. On exit it closes the WebSocket (``graceful``), or just drops the TCP
    connection, as a client that stopped reading and went away does."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if receive_buffer is not None:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        async with stream:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/", message_queue_size=1)
            frames = [json.loads(await ws.get_message())]  # connect.challenge
            connect = {"type": "req", "id": "c", "method": "connect", "params": connect_params()}
            await ws.send_message(json.dumps(connect))
            frames.append(json.loads(await ws.get_message()))  # hello-ok
            assert frames[-1]["ok"]
            yield ws, frames
            if graceful:
                with trio.move_on_after(2):
                    await ws.aclose()
            nursery.cancel_scope.cancel()

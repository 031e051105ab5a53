"""The terminal client behind ``trio-agent chat`` and ``trio-agent history``: one WebSocket
connection to a gateway, speaking the OpenClaw gateway protocol (docs: PROTOCOL.md).

The TCP stream is opened and closed here, not by trio-websocket: its 0.12 client leaves
the stream open after a close that the server started.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, final

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from adapters.gateway import DEFAULT_PORT

DEFAULT_URL: Final = f"ws://127.0.0.1:{DEFAULT_PORT}"
DEFAULT_SESSION: Final = "agent:main:main"
HANDSHAKE_SILENCE: Final = 30.0  # seconds; after hello-ok, twice the gateway's tick interval

Frame = dict[str, Any]


class GatewayError(Exception):
    """What went wrong, in one line for the terminal (exit 1)."""


@final
@attrs.define(eq=False)
class GatewayClient:
    ws: WebSocketConnection
    silence_limit: float = HANDSHAKE_SILENCE
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    async def receive(self) -> Frame:
        """The next frame; a gateway silent for longer than its ticks allow is gone."""
        with trio.move_on_after(self.silence_limit):
            try:
                frame: Frame = json.loads(await self.ws.get_message())
            except ConnectionClosed as closed:
                why = (
                    f" ({closed.reason.code} {closed.reason.reason or ''})" if closed.reason else ""
                )
                raise GatewayError(f"the gateway closed the connection{why}") from None
            return frame
        raise GatewayError(f"the gateway sent nothing for {self.silence_limit:.0f} s")

    async def send(self, method: str, params: dict[str, Any]) -> str:
        request_id = f"cli{next(self._ids)}"
        frame = {"type": "req", "id": request_id, "method": method, "params": params}
        try:
            await self.ws.send_message(json.dumps(frame))
        except ConnectionClosed:
            raise GatewayError("the gateway closed the connection") from None
        return request_id

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        """Send a request and return its payload (frames before the answer are skipped)."""
        request_id = await self.send(method, params)
        while True:
            frame = await self.receive()
            if frame.get("type") == "res" and frame.get("id") == request_id:
                if not frame["ok"]:
                    raise GatewayError(f"{method}: {frame['error']['message']}")
                return frame["payload"]


async def _session(
    url: str, token: str | None, use: Callable[[GatewayClient], Awaitable[int]]
) -> int:
    """Connect, do the handshake, run ``use``; any GatewayError is one line and exit 1."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        _note(f"trio-agent: {url} is not a ws:// URL, e.g. {DEFAULT_URL}")
        return 1
    try:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
    except OSError:
        _note(f"trio-agent: no gateway at {url}: start one with `trio-agent serve`")
        return 1
    async with trio.open_nursery() as nursery, stream:
        try:
            ws = await wrap_client_stream(nursery, stream, parts.hostname, parts.path or "/")
        except (HandshakeError, ConnectionClosed) as exc:
            _note(f"trio-agent: {url} did not accept a WebSocket connection: {exc!r}")
            return 1
        client = GatewayClient(ws)
        try:
            await client.receive()  # connect.challenge
            hello = await client.request("connect", _connect_params(token))
            client.silence_limit = 2 * hello["policy"]["tickIntervalMs"] / 1000
            code = await use(client)
        except GatewayError as exc:
            _note(f"trio-agent: {exc}")
            code = 1
        with trio.move_on_after(2):
            await ws.aclose()
        nursery.cancel_scope.cancel()
    return code


def _connect_params(token: str | None) -> dict[str, Any]:
    try:
        ours = version("trio-agent-runtime")
    except PackageNotFoundError:  # running from a source tree
        ours = "0.0.0"
    params: dict[str, Any] = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {"id": "cli", "version": ours, "platform": sys.platform, "mode": "cli"},
        "role": "operator",
        "scopes": ["operator.read", "operator.write"],
        "caps": [],
    }
    if token:
        params["auth"] = {"token": token}
    return params


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- chat ------------------------------------------------------------------------------


@final
@attrs.define(eq=False)
class _Chat:
    session: str
    message: str
    run_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)  # the idempotencyKey
    client: GatewayClient | None = None  # set once chat.send is on its way
    stopping: bool = False

    async def handle_interrupts(
        self, interrupts: AsyncIterator[int], scope: trio.CancelScope
    ) -> None:
        """Ctrl-C stops the run (the reply's end is still read); a second one quits."""
        async for _ in interrupts:
            if self.client is None or self.stopping:
                scope.cancel(reason="interrupted")
                return
            self.stopping = True
            abort = {"sessionKey": self.session, "runId": self.run_id}
            with contextlib.suppress(GatewayError):  # closed: the reader says so
                await self.client.send("chat.abort", abort)

    async def converse(self, client: GatewayClient) -> int:
        params = {
            "sessionKey": self.session,
            "message": self.message,
            "idempotencyKey": self.run_id,
        }
        self.client = client
        # only this session's events (and our own run's) reach us; the answer is skipped
        # below, and an older gateway that lacks the method broadcasts instead
        await client.send("sessions.messages.subscribe", {"key": self.session})
        send_id = await client.send("chat.send", params)
        printed = ""
        while True:
            frame = await client.receive()
            if frame.get("type") == "res" and frame.get("id") == send_id:
                if not frame["ok"]:
                    raise GatewayError(f"chat.send: {frame['error']['message']}")
                if "runIds" in frame["payload"]:  # a stop command: no run was started
                    stopped = len(frame["payload"]["runIds"])
                    _note(f"stopped {stopped} run(s)" if stopped else "nothing to stop")
                    return 0
                continue
            payload = frame.get("payload", {})
            if frame.get("event") != "chat" or payload.get("runId") != self.run_id:
                continue
            state = payload["state"]
            if state == "delta":
                _say(payload["deltaText"])
                printed += payload["deltaText"]
                continue
            text = _text(payload["message"]) if "message" in payload else ""
            _say(text[len(printed) :] if text.startswith(printed) else "")
            if state == "final":
                _say("\n")
                return 0
            if printed or text:
                _say("\n")
            if state == "error":
                _note(f"error: {payload['errorMessage']}")
                return 1
            await self._report_stop(client, payload["stopReason"], kept=bool(text))
            return 130

    async def _report_stop(self, client: GatewayClient, reason: str, *, kept: bool) -> None:
        """Say what the stop did; ``runtime.stopped`` follows the aborted event."""
        stopped: Frame = {}
        try:
            while not stopped:
                frame = await client.receive()
                payload = frame.get("payload", {})
                if frame.get("event") == "runtime.stopped" and payload["runId"] == self.run_id:
                    stopped = payload
        except GatewayError:
            pass  # an older gateway, or one shutting down: say what we know
        if stopped.get("policy") == "rollback":
            _note(f"[stopped: {reason}] rolled back; your message was:")
            _note(stopped.get("restoredPrompt") or "")
        elif kept:
            _note(f"[stopped: {reason}] the partial reply above was kept")
        else:
            _note(f"[stopped: {reason}] before the model said anything")


async def chat(url: str, token: str | None, session: str, message: str) -> int:
    """Send one message and stream the reply: 0 final, 1 error, 130 stopped."""
    talk = _Chat(session, message)
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk.handle_interrupts, interrupts, nursery.cancel_scope)
            code = await _session(url, token, talk.converse)
            nursery.cancel_scope.cancel()
            return code
    _note("\ntrio-agent: interrupted")  # a second Ctrl-C, or one before the message went out
    return 130


# -- history ---------------------------------------------------------------------------


async def history(url: str, token: str | None, session: str, limit: int) -> int:
    """Print the session's messages, one a line."""

    async def show(client: GatewayClient) -> int:
        params = {"sessionKey": session, "limit": limit}
        for message in (await client.request("chat.history", params))["messages"]:
            line = f"{message['role']}: {_text(message).rstrip()}".replace("\n", "\\n")
            _say(line + (" [stopped]\n" if message.get("openclawAbort") else "\n"))
        return 0

    return await _session(url, token, show)


def _text(message: Frame) -> str:
    """A message's text; tool calls as ``[calls NAME]``, thinking left out."""
    parts = []
    for block in message.get("content", []):
        if block.get("type") == "text":
            parts.append(block["text"])
        elif block.get("type") == "toolCall":
            parts.append(f"[calls {block['name']}]")
        elif block.get("type") == "toolResult":
            parts.append(block.get("text", ""))
    return "".join(parts)

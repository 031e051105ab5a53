"""A minimal gateway client: send one message, stream the reply, Ctrl-C stops the run.

Copy it to talk to `trio-agent serve` (or any OpenClaw gateway) from your own code; it
needs trio and trio-websocket only. With a gateway running (`trio-agent serve`):

    python examples/ws_client.py "Tell me about rivers."
    python examples/ws_client.py --url ws://127.0.0.1:18789 --session demo "Hi."

The protocol, in the order it happens (docs/protocol.md):

1. the gateway sends the `connect.challenge` event; we answer with a `connect` request;
2. `chat.send` starts a run; `chat` events for its runId follow: `delta` (new text),
   then exactly one of `final`, `aborted` or `error`;
3. Ctrl-C sends `chat.abort`: the run stops at once, and its `aborted` event carries the
   partial reply the gateway kept in the session's history. A second Ctrl-C quits
   without waiting.

The reply goes to stdout, notes to stderr. Exit status: 0 finished, 1 error, 130 stopped
by Ctrl-C (128 + SIGINT, what a shell reports for an interrupted command).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, wrap_client_stream

STOPPED = 130


class Refused(Exception):
    """The gateway answered a request with an error."""


class Chat:
    """One message to one session, over one connection."""

    def __init__(self, session: str, message: str) -> None:
        self.session = session
        self.message = message
        self.run_id = uuid.uuid4().hex  # the idempotencyKey is the run's id
        self.ws: WebSocketConnection | None = None  # set when chat.send goes out
        self.stopping = False
        self._ids = itertools.count(1)

    async def request(self, ws: WebSocketConnection, method: str, params: dict[str, Any]) -> str:
        request_id = f"req{next(self._ids)}"
        frame = {"type": "req", "id": request_id, "method": method, "params": params}
        await ws.send_message(json.dumps(frame))
        return request_id

    async def converse(self, ws: WebSocketConnection, token: str | None) -> int:
        """Handshake, send, print the run's chat events until its terminal one."""
        await ws.get_message()  # the connect.challenge event
        client = {"id": "cli", "version": "0.1", "platform": sys.platform, "mode": "cli"}
        connect: dict[str, Any] = {"minProtocol": 4, "maxProtocol": 4, "client": client}
        connect |= {"role": "operator", "scopes": ["operator.read", "operator.write"]}
        if token:
            connect["auth"] = {"token": token}
        connect_id = await self.request(ws, "connect", connect)
        while (frame := json.loads(await ws.get_message())).get("id") != connect_id:
            pass  # not the answer: skip it
        if not frame["ok"]:
            raise Refused(frame["error"]["message"])  # e.g. a missing or wrong token
        send = {"sessionKey": self.session, "message": self.message, "idempotencyKey": self.run_id}
        self.ws = ws  # from here, Ctrl-C aborts the run rather than quitting
        send_id = await self.request(ws, "chat.send", send)
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("id") == send_id and not frame["ok"]:
                raise Refused(frame["error"]["message"])
            payload = frame.get("payload", {})
            if frame.get("event") != "chat" or payload.get("runId") != self.run_id:
                continue  # ticks, agent events, answers, other runs
            if payload["state"] == "delta":
                print(payload["deltaText"], end="", flush=True)
            elif payload["state"] == "final":
                print()
                return 0
            elif payload["state"] == "error":
                print(f"\nerror: {payload['errorMessage']}", file=sys.stderr)
                return 1
            else:  # aborted: `message` is the partial reply as kept (absent: nothing kept)
                kept = text_of(payload.get("message", {}))
                print("\n" if kept else "", end="")
                what = f"the {len(kept)} characters above" if kept else "no reply"
                print(f"[stopped: {payload['stopReason']}] {what} kept", file=sys.stderr)
                return STOPPED

    async def on_ctrl_c(self, interrupts: AsyncIterator[int], quit: trio.CancelScope) -> None:
        """The first Ctrl-C sends chat.abort (the reader then sees `aborted`); the next,
        or one before the message went out, quits at once."""
        async for _ in interrupts:
            if self.ws is None or self.stopping:
                quit.cancel()
                return
            self.stopping = True
            with contextlib.suppress(ConnectionClosed):  # closed: the reader says so
                await self.request(
                    self.ws, "chat.abort", {"sessionKey": self.session, "runId": self.run_id}
                )


def text_of(message: dict[str, Any]) -> str:
    return "".join(b["text"] for b in message.get("content", []) if b.get("type") == "text")


async def main(url: str, token: str | None, session: str, message: str) -> int:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    chat = Chat(session, message)
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chat.on_ctrl_c, interrupts, nursery.cancel_scope)
            try:
                stream = await trio.open_tcp_stream(host, parts.port or 80)
            except OSError as exc:
                print(f"no gateway at {url}: {exc}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            # The TCP stream is ours to close: trio-websocket 0.12's client leaves it open
            # when the server closes first (a gateway shutting down, a refused connect).
            async with stream, trio.open_nursery() as ws_nursery:
                try:
                    ws = await wrap_client_stream(ws_nursery, stream, host, parts.path or "/")
                    code = await chat.converse(ws, token)
                    with trio.move_on_after(2):
                        await ws.aclose()
                except (HandshakeError, ConnectionClosed, Refused) as exc:
                    print(f"\ngateway error: {exc}", file=sys.stderr)
                    code = 1
                ws_nursery.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
            return code
    print("\ninterrupted", file=sys.stderr)
    return STOPPED


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message")
    parser.add_argument("--url", default="ws://127.0.0.1:18789")
    parser.add_argument("--token", default=None, help="the gateway's shared token, if any")
    parser.add_argument("--session", default="agent:main:main", help="session key")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.url, args.token, args.session, args.message))

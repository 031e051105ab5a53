"""The gateway server: trio-websocket in front of one Runtime, and the chat page.

One TCP port serves both: the server reads each connection's request head, hands a
WebSocket upgrade to trio-websocket (replaying the bytes it read) and answers any other
request from ``adapters.web``.

``Gateway.serve`` follows Trio's ``task_status`` protocol (``port = await
nursery.start(gateway.serve, host, 0)``) and runs until ``shutdown()`` or cancellation.
A shutdown stops accepting, aborts every run with reason ``shutdown`` (their partials are
committed and their ``aborted`` events still reach clients), then closes every connection
with 1001.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Final, final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from adapters.web import BadRequest, ReplayStream, RequestHead, answer, read_head, send_error
from runtime import Runtime

from ._auth import FailureLimiter, check_tokens
from ._connection import Connection
from ._protocol import (
    COALESCE_AFTER,
    GOING_AWAY,
    MAX_BUFFERED_BYTES,
    PRE_HANDSHAKE_MAX_BYTES,
    SEND_TIMEOUT,
    TICK_INTERVAL_MS,
)
from ._translate import FAILED_EVENT, STOPPED_EVENT, FrameCache

logger = logging.getLogger("adapters.gateway")

DEFAULT_PORT: Final = 18789
SHUTDOWN_GRACE: Final = 4.0  # seconds for runs to commit their stop before connections close
# A TCP connection must send its request head and finish its WebSocket upgrade (and a
# close its handshake) within this, or it is dropped, so idle sockets cannot pile up.
CONNECT_TIMEOUT: Final = 5.0
TOOL_CAPABILITY: Final = "runtime.tool:"  # hello-ok lists each tool as runtime.tool:NAME


def _version() -> str:
    try:
        return version("trio-agent-runtime")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0"


class UnsafeBind(ValueError):
    """Refusing to listen beyond loopback without a token."""


def check_bind(host: str, token: str | None, tokens: Mapping[str, str] | None = None) -> None:
    """Loopback needs no token; any other address does, or anyone could drive the model."""
    if token or tokens:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UnsafeBind(
            f"Refusing to listen on {host} without a token: anyone who can reach it could "
            "run and stop your agents. Pass --token or --token-file, or bind 127.0.0.1."
        )


@final
@attrs.define(eq=False)
class Gateway:
    runtime: Runtime
    token: str | None = attrs.field(default=None, repr=False)
    # named tokens: each principal reaches only its own sessions (see _auth)
    tokens: Mapping[str, str] = attrs.field(
        factory=dict, repr=False, validator=lambda gw, _, tokens: check_tokens(tokens, gw.token)
    )
    auth_failures: FailureLimiter = attrs.field(factory=FailureLimiter)
    tick_interval_ms: int = TICK_INTERVAL_MS
    # a connection further behind than either is closed with 1013 (see _connection)
    max_buffered_bytes: int = MAX_BUFFERED_BYTES
    send_timeout: float = SEND_TIMEOUT
    # events waiting for a connection before its deltas merge (see _bus)
    coalesce_after: int = COALESCE_AFTER
    # each event encoded once for every connection (see _translate)
    frames: FrameCache = attrs.field(factory=FrameCache, init=False)
    version: str = attrs.field(factory=_version)
    started_at: float = attrs.field(factory=time.monotonic)
    connections: set[Connection] = attrs.field(factory=set, init=False)
    _shutdown: trio.Event = attrs.field(factory=trio.Event, init=False)

    def event_names(self) -> list[str]:
        return ["agent", "chat", "connect.challenge", FAILED_EVENT, STOPPED_EVENT, "tick"]

    def capabilities(self) -> list[str]:
        """``hello-ok.features.capabilities``: the runtime's tools, ``runtime.tool:NAME``."""
        return [f"{TOOL_CAPABILITY}{tool.name}" for tool in self.runtime.tools]

    def shutdown(self) -> None:
        """Begin a graceful shutdown; ``serve`` returns when it is done."""
        self._shutdown.set()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        check_bind(host, self.token, self.tokens)
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            listener = trio.CancelScope()

            async def run_listener(
                task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with listener:
                    await trio.serve_listeners(
                        self._handle_stream,
                        listeners,
                        handler_nursery=nursery,
                        task_status=task_status,
                    )

            await nursery.start(run_listener)
            shown = f"[{host}]" if ":" in host else host
            logger.info(
                "gateway listening on ws://%s:%d, chat page on http://%s:%d/",
                shown,
                bound,
                shown,
                bound,
            )
            task_status.started(bound)
            await self._shutdown.wait()
            listener.cancel()
            await self._stop_runs()
            async with trio.open_nursery() as closing:
                for connection in list(self.connections):
                    closing.start_soon(connection.close_after_flush, GOING_AWAY)
            nursery.cancel_scope.cancel()

    async def _stop_runs(self) -> None:
        runs = self.runtime.live_runs()
        for run in runs:
            self.runtime.abort(run_id=run.run_id, reason="shutdown")
        with trio.move_on_after(SHUTDOWN_GRACE):
            for run in runs:
                await run.wait()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        """One TCP connection: a WebSocket upgrade becomes a client connection; any other
        request is for the chat page, answered, then closed. Closed by the caller."""
        deadline = trio.current_time() + CONNECT_TIMEOUT
        try:
            with trio.move_on_at(deadline):
                head = await read_head(stream)
                refusal = None if head is None else self._refusal(head)
                if head is not None and refusal is not None:
                    await send_error(stream, 403, refusal)
                    return
                if head is not None and not head.wants_websocket:
                    await answer(stream, head)
                    return
        except BadRequest as bad:
            with trio.move_on_after(CONNECT_TIMEOUT):
                await send_error(stream, bad.status, str(bad))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the peer left
        if head is None:  # it left, or sent no whole head in time
            return
        try:
            address = stream.socket.getpeername()[0]  # whose failed tokens count (see _auth)
        except OSError:
            return  # the peer left
        await self._serve_websocket(ReplayStream(stream, head.raw), deadline, address)

    def _refusal(self, head: RequestHead) -> str | None:
        """Why a token-less gateway refuses this request (the page or an upgrade), if it
        does. Without a token, loopback is the only protection, so the request must be
        addressed to loopback by name: otherwise a page whose name an attacker points at
        127.0.0.1 (DNS rebinding) would be same-origin with the gateway."""
        if self.token is not None or self.tokens:
            return None  # the token decides
        foreign = head.foreign_name()
        if foreign is not None:
            return (
                f"This gateway has no token, so it answers only requests addressed to "
                f"127.0.0.1, localhost or [::1]; {foreign} is refused, because a web page "
                "could use such a name to reach it (DNS rebinding). Open "
                "http://127.0.0.1:<port>/ instead, or start the gateway with a token."
            )
        if head.wants_websocket and not head.same_origin():
            return "Without a token, only the gateway's own page may connect."
        return None

    async def _serve_websocket(
        self, stream: trio.abc.Stream, deadline: float, address: str
    ) -> None:
        """As trio-websocket's own server does, with the upgrade bounded by ``deadline``."""
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_at(deadline):
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    message_queue_size=16,
                    # raised to maxPayload once connect is admitted (Connection._handshake)
                    max_message_size=PRE_HANDSHAKE_MAX_BYTES,
                )
            try:
                if request is not None:
                    await self._handle(request, address)
            finally:
                nursery.cancel_scope.cancel()  # the reader task, whatever happened

    async def _handle(self, request: WebSocketRequest, address: str) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        connection = Connection(self, ws, address)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)
            with trio.move_on_after(CONNECT_TIMEOUT):
                await ws.aclose()  # the close handshake, if nobody did it yet

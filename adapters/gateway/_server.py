"""The gateway server: trio-websocket in front of one Runtime.

``Gateway.serve`` follows Trio's ``task_status`` protocol (``port = await
nursery.start(gateway.serve, host, 0)``) and runs until ``shutdown()`` or cancellation.
A shutdown stops accepting, aborts every run with reason ``shutdown`` (their partials are
committed and their ``aborted`` events still reach clients), then closes every connection
with 1001.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Final, final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from runtime import Runtime

from ._connection import Connection
from ._protocol import GOING_AWAY, MAX_PAYLOAD, TICK_INTERVAL_MS
from ._translate import STOPPED_EVENT

logger = logging.getLogger("adapters.gateway")

DEFAULT_PORT: Final = 18789
SHUTDOWN_GRACE: Final = 4.0
# A TCP connection must finish its WebSocket upgrade (and a close its handshake) within
# this, or it is dropped: trio-websocket's default of 60 s lets idle sockets pile up.
CONNECT_TIMEOUT: Final = 5.0  # seconds for runs to commit their stop before connections close


def _version() -> str:
    try:
        return version("trio-agent-runtime")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0"


class UnsafeBind(ValueError):
    """Refusing to listen beyond loopback without a token."""


def check_bind(host: str, token: str | None) -> None:
    """Loopback needs no token; any other address does, or anyone could drive the model."""
    if token:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UnsafeBind(
            f"Refusing to listen on {host} without a token: anyone who can reach it could "
            "run and stop your agents. Pass --token, or bind 127.0.0.1."
        )


@final
@attrs.define(eq=False)
class Gateway:
    runtime: Runtime
    token: str | None = None
    tick_interval_ms: int = TICK_INTERVAL_MS
    version: str = attrs.field(factory=_version)
    started_at: float = attrs.field(factory=time.monotonic)
    connections: set[Connection] = attrs.field(factory=set, init=False)
    _shutdown: trio.Event = attrs.field(factory=trio.Event, init=False)

    def event_names(self) -> list[str]:
        return ["agent", "chat", "connect.challenge", STOPPED_EVENT, "tick"]

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
        check_bind(host, self.token)
        async with trio.open_nursery() as nursery:
            listen = functools.partial(
                serve_websocket,
                self._handle,
                host,
                port,
                None,
                handler_nursery=nursery,
                max_message_size=MAX_PAYLOAD,
                message_queue_size=16,
                connect_timeout=CONNECT_TIMEOUT,
                disconnect_timeout=CONNECT_TIMEOUT,
            )
            listener = trio.CancelScope()

            async def run_listener(
                task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with listener:
                    await listen(task_status=task_status)

            server = await nursery.start(run_listener)
            bound = server.port
            logger.info("gateway listening on ws://%s:%d", host, bound)
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

    async def _handle(self, request: WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        connection = Connection(self, ws)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

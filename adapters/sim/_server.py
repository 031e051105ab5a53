"""The sim's HTTP server: a hand-written ASGI app served by hypercorn on Trio.

Why a real server: the point of the sim is to prove that a client closes its connection
at the instant of a stop, which only a real socket can show. Each streamed response runs
beside a task that waits on ASGI ``receive()`` for ``http.disconnect``. Hypercorn's Trio
backend keeps reading the socket while the app streams, so a client's FIN (or RST) turns
into ``http.disconnect`` at once, even while the sim is silent in a ``think`` phase; the
task stamps ``closed_at`` and cancels the streaming.

``message_start`` (or the first chunk or event of the other dialects) is sent AFTER a
``think=S`` silence: the response headers go out at once, then the socket carries no byte
for S seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final, cast, final

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from . import _anthropic_format, _gemini_format, _openai_format, _responses_format
from ._directives import HTTP_FAILS, DirectiveError, parse_directive
from ._records import ConnectionRecord, Registry
from ._script import Abort, Renderer, RequestError, Silence, Step, WireFormat, build_script

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CONNECTIONS_PATH: Final = "/v1/_sim/connections"
ERROR_PIECE: Final = 64 * 1024  # bytes per body message of an error_bytes=N response
_FORMATS: Final[dict[str, WireFormat]] = {
    _anthropic_format.PATH: _anthropic_format.AnthropicFormat(),
    _openai_format.PATH: _openai_format.OpenAIFormat(),
    _responses_format.PATH: _responses_format.ResponsesFormat(),
}
_GEMINI: Final = _gemini_format.GeminiFormat()
GEMINI_PATH: Final = "/v1beta/models/MODEL:streamGenerateContent"  # for the usage line
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
# Hypercorn's error log goes here, at WARNING, so "Running on ..." stays quiet but a crash
# in the app is still logged. Its access log is off.
_LOG: Final = logging.getLogger("adapters.sim.hypercorn")


@final
@attrs.define(eq=False)
class SimServer:
    """A running sim: where it listens, and what it has seen."""

    port: int
    base_url: str  # "http://127.0.0.1:PORT"
    _registry: Registry = attrs.field(alias="registry", repr=False)

    def connections(self) -> list[ConnectionRecord]:
        """A snapshot of every model request's record, oldest first."""
        return self._registry.records()

    def clear_connections(self) -> None:
        self._registry.clear()

    async def wait_closed(
        self, path: str | None = None, *, count: int = 1
    ) -> list[ConnectionRecord]:
        """Wait until at least ``count`` records (for ``path``, if given) are closed; return
        the closed ones."""
        return await self._registry.wait_closed(path, count)


async def serve_sim(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[SimServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the sim until cancelled; ``task_status.started(SimServer)`` once listening.

    With ``port=0`` the OS picks a free port; hypercorn reports the bound address through
    its own ``task_status`` and the real port is read from there.
    """
    registry = Registry()
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = _LOG
    if _LOG.level == logging.NOTSET:
        _LOG.setLevel(logging.WARNING)
    # The app is typed with plain dicts rather than hypercorn's TypedDicts.
    app = cast(ASGIFramework, _SimApp(registry))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, app, config, mode="asgi"))
        bound_port = int(binds[0].rsplit(":", 1)[1])
        url_host = f"[{host}]" if ":" in host else host
        task_status.started(
            SimServer(
                port=bound_port, base_url=f"http://{url_host}:{bound_port}", registry=registry
            )
        )


class _SimApp:
    """The ASGI application: four model endpoints and the connection records."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._next_response_id = 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == CONNECTIONS_PATH:
            await self._connections(method, send)
            return
        wire = _wire_format(path)
        if wire is None:
            body = json.dumps({"error": {"message": f"The sim has no endpoint {path}."}})
            await _send_whole(send, 404, body.encode())
            return
        if method != "POST":
            await _send_whole(send, 405, wire.error_body(405, f"Use POST for {path}."))
            return
        await self._model_request(wire, path, receive, send)

    async def _connections(self, method: str, send: Send) -> None:
        if method == "GET":
            records = [attrs.asdict(record) for record in self._registry.records()]
            await _send_whole(send, 200, json.dumps(records).encode())
        elif method == "DELETE":
            cleared = self._registry.clear()
            await _send_whole(send, 200, json.dumps({"cleared": cleared}).encode())
        else:
            body = json.dumps({"error": {"message": "Use GET or DELETE."}})
            await _send_whole(send, 405, body.encode())

    async def _model_request(
        self, wire: WireFormat, path: str, receive: Receive, send: Send
    ) -> None:
        record_id = self._registry.open(path)
        try:
            raw = await _read_body(receive)
            if raw is None:
                self._registry.close(record_id, "client")
                return
            try:
                body = json.loads(raw)
                if not isinstance(body, Mapping):
                    raise RequestError("The request body must be a JSON object.")
                facts = wire.parse(body)
                directive = parse_directive(facts.user_text)
            except (ValueError, RequestError, DirectiveError) as error:
                message = str(error)
                if isinstance(error, json.JSONDecodeError):
                    message = f"The request body is not JSON: {error}."
                await self._refuse(record_id, send, 400, wire.error_body(400, message))
                return
            if directive.line:
                self._registry.update(record_id, directive=directive.line)
            if directive.fail is not None and not self._registry.take_failure(
                directive.line, directive.fail_count
            ):
                directive = attrs.evolve(directive, fail=None)
            if directive.fail is not None and directive.fail in HTTP_FAILS:
                status = int(directive.fail)
                headers = []
                if status == 429:
                    headers.append((b"retry-after", f"{directive.retry_after:g}".encode()))
                message = f"Simulated HTTP {status} (#sim fail={directive.fail})."
                if directive.error_bytes is not None:
                    padding = directive.error_bytes - len(wire.error_body(status, message))
                    message += " " + "x" * max(padding - 1, 0)
                    body = wire.error_body(status, message)
                    await self._refuse_in_pieces(record_id, receive, send, status, body)
                    return
                await self._refuse(
                    record_id, send, status, wire.error_body(status, message), headers
                )
                return
            response_id = self._next_response_id
            self._next_response_id += 1
            script = build_script(directive, facts)
            await self._stream(record_id, script, wire.renderer(body, response_id), receive, send)
        finally:
            # Cancelled by a server shutdown, or failed: either way the server ended it.
            self._registry.close(record_id, "server")

    async def _refuse(
        self,
        record_id: int,
        send: Send,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._registry.update(record_id, status=status)
        self._registry.first_byte(record_id)
        await _send_whole(send, status, body, headers)
        self._registry.close(record_id, "server")

    async def _refuse_in_pieces(
        self, record_id: int, receive: Receive, send: Send, status: int, body: bytes
    ) -> None:
        """An error response sent in ``ERROR_PIECE`` pieces (``error_bytes=N``): a client
        that hangs up part-way is recorded as the one that closed."""
        self._registry.update(record_id, status=status)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        sent_all = False

        async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not sent_all:
                self._registry.close(record_id, "client")
                cancel_scope.cancel(reason="client disconnected")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            self._registry.first_byte(record_id)
            view = memoryview(body)
            for start in range(0, len(body), ERROR_PIECE):
                piece = bytes(view[start : start + ERROR_PIECE])
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent_all = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self._registry.close(record_id, "server")
            nursery.cancel_scope.cancel(reason="response complete")

    async def _stream(
        self,
        record_id: int,
        script: list[Step],
        renderer: Renderer,
        receive: Receive,
        send: Send,
    ) -> None:
        """Send ``script`` as an SSE response, stopping the moment the client disconnects."""
        finishing = False

        async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            # Hypercorn also reports a disconnect once the last byte is out; that one is
            # the server's own close, recorded below.
            if not finishing:
                self._registry.close(record_id, "client")
                cancel_scope.cancel(reason="client disconnected")

        self._registry.update(record_id, status=200)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            for step in script:
                if isinstance(step, Silence):
                    await trio.sleep(step.seconds)
                    continue
                if isinstance(step, Abort):
                    # Return without ending the body: hypercorn closes the connection, so
                    # the client sees a chunked body cut off mid-stream.
                    self._registry.close(record_id, "server")
                    nursery.cancel_scope.cancel(reason="fail=reset")
                    return
                data = renderer.render(step)
                if data:
                    self._registry.first_byte(record_id)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            finishing = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self._registry.close(record_id, "server")
            nursery.cancel_scope.cancel(reason="response complete")


def _wire_format(path: str) -> WireFormat | None:
    """The dialect served at ``path``; Gemini names the model in the path."""
    if _gemini_format.PATH_PATTERN.fullmatch(path):
        return _GEMINI
    return _FORMATS.get(path)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client left first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_whole(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer hypercorn's lifespan protocol, so it does not log that lifespan is missing."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> None:
    """``python -m adapters.sim --port N``: print the URL and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m adapters.sim",
        description=(
            "Serve the simulated model provider (Anthropic, OpenAI chat completions, "
            "OpenAI Responses and Gemini streaming)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    args = parser.parse_args(argv)

    async def run() -> None:
        # Ctrl-C (or SIGTERM) cancels the server, which then shuts down cleanly.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                server: SimServer = await nursery.start(partial(serve_sim, args.host, args.port))
                print(
                    f"sim model provider on {server.base_url} "
                    f"(POST {_anthropic_format.PATH}, POST {_openai_format.PATH}, "
                    f"POST {_responses_format.PATH}, POST {GEMINI_PATH}, "
                    f"GET {CONNECTIONS_PATH}); Ctrl-C stops it",
                    flush=True,
                )
                async for _ in signals:
                    nursery.cancel_scope.cancel(reason="signal")
                    break

    trio.run(run)

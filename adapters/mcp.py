"""Tools from MCP servers, through the official ``mcp`` SDK, whose calls stop with the run.

``open_mcp_tools(servers)`` connects to each server, lists its tools and yields them as
``runtime.Tool``s (with the servers' JSON schemas), for ``Runtime(tools=...)``::

    async with open_mcp_tools([StdioServer("research", ("python", "server.py"))]) as mcp:
        async with Runtime(model=model, tools=mcp.tools) as rt:
            ...

Open the Runtime inside, so that its shutdown stops its runs (telling the servers) before
the servers go.

- **Transports.** ``StdioServer``: a command this module starts and owns, in its own
  process group. ``HttpServer``: a streamable HTTP URL. Both speak the handshake protocol
  (``initialize``), on which ``notifications/cancelled`` is a message on the wire for both
  transports. (On the 2026-07-28 HTTP wire a client cancels by closing the request's
  stream instead, and the server would see no notification.)
- **A stop reaches the server.** When the run's scope is cancelled while a ``tools/call``
  is in flight, the call sends ``notifications/cancelled`` for that request id, with the
  stop reason, shielded and bounded by ``CANCEL_NOTICE_TIMEOUT``; it never waits for the
  server's reply. The stop receipt then says so (``ToolReceipt.cancel_delivered``). The
  call's own id is ours (``call-N``), so the one we cancel is the one we sent. A reply
  that arrives for it afterwards is dropped and logged, never written.
- **Lifetimes.** Each server has a supervisor task in the ``async with``'s nursery. It
  connects once and the connection serves every run; if the server dies, calls in
  flight end as tool errors at once and the supervisor starts it again, with a growing
  delay. On exit a stdio server goes as the SDK's ``stdio_client`` ends it: stdin closed,
  then after ``mcp.client.stdio.PROCESS_TERMINATION_TIMEOUT`` (2 s) SIGTERM to its
  process group, then after ``FORCE_KILL_TIMEOUT`` (2 s) SIGKILL.
- **Progress and timeouts.** MCP progress notifications become the runtime's
  ``ToolCallProgress`` events. A call that outlives its tool's timeout is cancelled at
  the server (reason ``timeout``) and ends as a tool error.

On Trio: the SDK is written on anyio, and everything used here runs on anyio's Trio
backend (the client session and its dispatcher, ``stdio_client``, whose process-group
kill polls ``returncode`` so Trio reaps the child, and ``streamable_http_client`` on
httpx2). Nothing here needs asyncio.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shlex
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, final

import anyio
import attrs
import mcp_types as types
import trio
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._stream_protocols import ReadStream
from mcp.shared.dispatcher import CallOptions
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.message import SessionMessage
from mcp_types import CONNECTION_CLOSED, JSONRPCError, JSONRPCResponse, RequestId

from runtime import Tool, ToolCall, current_tool_call

logger = logging.getLogger("adapters.mcp")

CANCEL_NOTICE_TIMEOUT: Final = 0.5  # a stop waits at most this long to hand the notice on
CONNECT_TIMEOUT: Final = 20.0  # to start a server, initialize and list its tools
SERVER_WAIT: Final = 10.0  # a call waits this long for a restarting server
RESTART_DELAY: Final = 0.25  # first delay before a restart; doubles up to RESTART_DELAY_MAX
RESTART_DELAY_MAX: Final = 10.0
STABLE_AFTER: Final = 30.0  # a connection that lived this long resets the delay
ABANDONED_KEPT: Final = 1024  # cancelled request ids remembered, to drop their late replies

# The request id the calling task's next tools/call goes out under (see _Dispatcher).
_request_id: ContextVar[str | None] = ContextVar("mcp_request_id", default=None)


class MCPToolError(Exception):
    """The MCP server could not serve the call; the model reads the message."""


@attrs.frozen
class StdioServer:
    """An MCP server this process starts: ``command`` is the program and its arguments."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] | None = None  # added to the SDK's safe default environment
    cwd: str | None = None


@attrs.frozen
class HttpServer:
    """An MCP server at a streamable HTTP ``url``."""

    name: str
    url: str


ServerSpec = StdioServer | HttpServer


def parse_server(option: str) -> ServerSpec:
    """``NAME=URL`` (http:// or https://) or ``NAME=COMMAND``, the command split as a
    shell would split it: the ``--mcp`` option of ``trio-agent serve``."""
    name, eq, target = option.partition("=")
    name, target = name.strip(), target.strip()
    if not eq or not name or not target:
        raise ValueError(f"--mcp {option!r}: write NAME=COMMAND or NAME=URL.")
    if target.startswith(("http://", "https://")):
        return HttpServer(name, target)
    try:
        command = tuple(shlex.split(target))
    except ValueError as exc:
        raise ValueError(f"--mcp {option!r}: the command cannot be split: {exc}.") from None
    return StdioServer(name, command)


@final
@attrs.frozen
class ToolInfo:
    """One tool as the server described it."""

    server: str
    name: str
    description: str
    input_schema: Mapping[str, Any]


@final
@attrs.define(eq=False)
class MCPTools:
    """What ``open_mcp_tools`` yields: ``tools`` for the Runtime, ``servers`` to inspect."""

    servers: tuple[MCPServer, ...]
    tools: tuple[Tool, ...]
    infos: tuple[ToolInfo, ...]


@asynccontextmanager
async def open_mcp_tools(
    servers: Iterable[ServerSpec],
    *,
    call_timeout: float | None = None,
    tool_timeouts: Mapping[str, float] | None = None,
) -> AsyncIterator[MCPTools]:
    """Connect to every server and yield their tools; stop the servers on exit.

    ``call_timeout`` bounds every call in seconds (None: no bound); ``tool_timeouts``
    overrides it per tool name. Fails (``MCPToolError``) if a server cannot start, or
    two tools share a name.
    """
    specs = list(servers)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise MCPToolError(f"Two MCP servers share a name ({', '.join(names)}); rename one.")
    async with trio.open_nursery() as nursery:
        connected = []
        for spec in specs:
            server = MCPServer(spec, call_timeout, dict(tool_timeouts or {}))
            await nursery.start(server.supervise)
            connected.append(server)
        try:
            tools, infos = _tools_of(connected)
            yield MCPTools(tuple(connected), tools, infos)
        finally:
            nursery.cancel_scope.cancel(reason="shutdown")


def _tools_of(servers: Sequence[MCPServer]) -> tuple[tuple[Tool, ...], tuple[ToolInfo, ...]]:
    tools: dict[str, Tool] = {}
    infos: list[ToolInfo] = []
    owner: dict[str, str] = {}
    for server in servers:
        for listed in server.listing:
            if listed.name in tools:
                raise MCPToolError(
                    f"The MCP servers {owner[listed.name]!r} and {server.name!r} both have a "
                    f"tool named {listed.name!r}; attach only one of them."
                )
            owner[listed.name] = server.name
            tools[listed.name] = Tool(
                listed.name,
                _Caller(server, listed.name),
                listed.description or "",
                listed.input_schema,
            )
            infos.append(
                ToolInfo(server.name, listed.name, listed.description or "", listed.input_schema)
            )
    return tuple(tools.values()), tuple(infos)


@final
@attrs.frozen
class _Caller:
    """``Tool.fn`` for one tool of one server."""

    server: MCPServer
    tool: str

    async def __call__(self, arguments: Mapping[str, Any]) -> str:
        return await self.server.call(self.tool, arguments)


@final
@attrs.define(eq=False)
class _Link:
    """One live connection to a server: its session, and the event set when it ends."""

    session: ClientSession
    ended: trio.Event = attrs.Factory(trio.Event)


@final
@attrs.define(eq=False)
class MCPServer:
    """One MCP server, connected and supervised. Made by ``open_mcp_tools``."""

    spec: ServerSpec
    call_timeout: float | None = None
    tool_timeouts: dict[str, float] = attrs.Factory(dict)
    listing: list[types.Tool] = attrs.Factory(list)
    starts: int = 0  # connections made: 1 + restarts
    late_replies: int = 0  # replies dropped because their call had been cancelled
    _link: _Link | None = None
    _up: trio.Event = attrs.Factory(trio.Event)
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _abandoned: OrderedDict[RequestId, None] = attrs.Factory(OrderedDict)

    @property
    def name(self) -> str:
        return self.spec.name

    async def supervise(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, and connect again whenever the connection ends, until cancelled.

        The first connection must succeed (it reports started); later failures are
        logged and retried with a growing delay.
        """
        delay = RESTART_DELAY
        while True:
            began = trio.current_time()
            try:
                async with self._connect() as link:
                    self.starts += 1
                    if self.starts == 1:
                        task_status.started()
                    else:
                        logger.info("MCP server %s restarted (start %d)", self.name, self.starts)
                    self._link = link
                    self._up.set()
                    try:
                        await link.ended.wait()
                    finally:
                        self._link = None
                        self._up = trio.Event()
            except Exception as exc:
                if self.starts == 0:
                    raise MCPToolError(
                        f"The MCP server {self.name!r} did not start: {_describe(exc)}"
                    ) from exc
                logger.warning("MCP server %s failed: %s", self.name, _describe(exc))
            if trio.current_time() - began > STABLE_AFTER:
                delay = RESTART_DELAY
            logger.warning("MCP server %s is gone; starting it again in %.2f s", self.name, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[_Link]:
        async with AsyncExitStack() as stack:
            spec = self.spec
            if isinstance(spec, StdioServer):
                params = StdioServerParameters(
                    command=spec.command[0],
                    args=list(spec.command[1:]),
                    env=dict(spec.env) if spec.env is not None else None,
                    cwd=spec.cwd,
                )
                read, write = await stack.enter_async_context(stdio_client(params))
            else:
                read, write = await stack.enter_async_context(streamable_http_client(spec.url))
            ended = trio.Event()
            dispatcher = _Dispatcher(_Watched(read, self, ended), write)
            session = await stack.enter_async_context(
                ClientSession(
                    dispatcher=dispatcher,
                    client_info=types.Implementation(name="trio-agent-runtime", version="0.1"),
                )
            )
            # Only plain awaits under this bound: a context entered inside it and left
            # open after it would break the nesting of cancel scopes.
            with trio.fail_after(CONNECT_TIMEOUT):
                await session.initialize()
                listing: list[types.Tool] = []
                cursor: str | None = None
                while True:
                    page = await session.list_tools(
                        params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
                    )
                    listing.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
            self.listing = listing
            yield _Link(session, ended)

    async def call(self, tool: str, arguments: Mapping[str, Any]) -> str:
        """Call ``tool`` with ``arguments`` and return its text. A stop (cancellation)
        tells the server before it propagates; a timeout tells it and raises."""
        call = current_tool_call()
        link = await self._wait_up()
        request_id = f"call-{next(self._ids)}"
        timeout = self.tool_timeouts.get(tool, self.call_timeout)

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if call is not None:
                call.report_progress(progress, total, message)

        token = _request_id.set(request_id)
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as timer:
                result = await link.session.call_tool(
                    tool, dict(arguments), progress_callback=on_progress
                )
        except trio.Cancelled as stop:
            await self._tell_cancelled(link, request_id, _stop_reason(stop), call)
            raise
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED or link.ended.is_set():
                link.ended.set()  # the supervisor starts it again
                raise MCPToolError(
                    f"The MCP server {self.name!r} went away during the call (it is being "
                    "started again); the call's effects are unknown."
                ) from None
            raise MCPToolError(f"The MCP server {self.name!r} refused the call: {exc}") from None
        finally:
            _request_id.reset(token)
        if timer.cancelled_caught:
            told = await self._tell_cancelled(link, request_id, "timeout", None)
            raise MCPToolError(
                f"{tool} did not answer within {timeout} s; the MCP server "
                + ("was told to cancel the call." if told else "could not be told to cancel it.")
            )
        text = _result_text(result)
        if result.is_error:
            raise MCPToolError(text)
        return text

    async def _wait_up(self) -> _Link:
        with trio.move_on_after(SERVER_WAIT):
            while True:
                link = self._link
                if link is not None and not link.ended.is_set():
                    return link
                await self._up.wait()
                await trio.lowlevel.checkpoint()
        raise MCPToolError(
            f"The MCP server {self.name!r} is not running (it failed and has not come back "
            f"within {SERVER_WAIT} s)."
        )

    async def _tell_cancelled(
        self, link: _Link, request_id: str, reason: str, call: ToolCall | None
    ) -> bool:
        """Send ``notifications/cancelled`` for ``request_id``: shielded, bounded, never
        waiting for the server's reply. Returns whether the transport took it."""
        self._abandoned[request_id] = None
        while len(self._abandoned) > ABANDONED_KEPT:
            self._abandoned.popitem(last=False)
        notice = types.CancelledNotification(
            params=types.CancelledNotificationParams(request_id=request_id, reason=reason)
        )
        with trio.move_on_after(CANCEL_NOTICE_TIMEOUT, shield=True) as bound:
            await link.session.send_notification(notice)
        if bound.cancelled_caught or link.ended.is_set():
            logger.warning(
                "MCP server %s could not be told to cancel request %s (%s)",
                self.name,
                request_id,
                "the connection is gone" if link.ended.is_set() else "the transport is blocked",
            )
            return False
        logger.info(
            "MCP server %s told to cancel request %s reason=%s", self.name, request_id, reason
        )
        if call is not None:
            call.note_cancel_delivered(
                f"notifications/cancelled sent to MCP server {self.name!r} "
                f"(request {request_id}, reason {reason!r})"
            )
        return True

    def _is_late(self, message: SessionMessage) -> bool:
        """A reply to a request we cancelled: dropped here, so it is never written."""
        reply = message.message
        if not isinstance(reply, JSONRPCResponse | JSONRPCError):
            return False
        if reply.id is None or reply.id not in self._abandoned:
            return False
        del self._abandoned[reply.id]
        self.late_replies += 1
        logger.info(
            "MCP server %s answered request %s after it was cancelled: the reply is dropped",
            self.name,
            reply.id,
        )
        return True


@final
class _Dispatcher(JSONRPCDispatcher[Any]):
    """The SDK's JSON-RPC dispatcher, but a ``tools/call`` goes out under the id the
    calling task chose (``_request_id``) and without the SDK's own courtesy cancel on
    abandon (reason "caller cancelled", bounded by 5 s): ``MCPServer.call`` sends its
    own, with the stop's reason, within its own bound."""

    async def send_raw_request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        opts: CallOptions | None = None,
        *,
        _related_request_id: RequestId | None = None,
    ) -> dict[str, Any]:
        request_id = _request_id.get()
        if method == "tools/call" and request_id is not None:
            opts = {**(opts or {}), "request_id": request_id, "cancel_on_abandon": False}
        return await super().send_raw_request(
            method, params, opts, _related_request_id=_related_request_id
        )


@final
class _Watched:
    """The transport's read stream as the dispatcher sees it: sets ``ended`` when the
    server's side closes, and drops replies to cancelled requests."""

    def __init__(
        self,
        inner: ReadStream[SessionMessage | Exception],
        server: MCPServer,
        ended: trio.Event,
    ) -> None:
        self._inner = inner
        self._server = server
        self._ended = ended

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        while True:
            try:
                item = await self._inner.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._ended.set()
                raise
            if isinstance(item, SessionMessage) and self._server._is_late(item):
                continue
            return item

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._ended.set()
        await self._inner.aclose()

    async def __aenter__(self) -> _Watched:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _stop_reason(stop: trio.Cancelled) -> str:
    """Why the run stopped, from the cancel scope's reason (``rpc``, ``shutdown``...)."""
    if stop.reason:
        return stop.reason
    return "timeout" if stop.source == "deadline" else "shutdown"


def _result_text(result: types.CallToolResult) -> str:
    parts = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        else:
            parts.append(json.dumps(block.model_dump(mode="json", by_alias=True)))
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"

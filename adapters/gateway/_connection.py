"""One client connection: handshake, requests, and the events it follows.

After ``hello-ok`` four tasks share the connection: the request loop, the event sender
(draining the connection's own runtime subscription, bounded in bytes, so a slow client
delays nobody but itself), the ticker and the lag watch. Every frame goes out through
``_write``, under one lock (events are numbered under it, so ``seq`` on the wire is
gap-free and in order).

Which events a connection gets: every session's (the operator broadcast) until it calls
``sessions.messages.subscribe``; from then on only those of the sessions it subscribed
to, plus the runs it started itself. Each event is encoded once for every connection
(``FrameCache``); the connection numbers the frames and picks each delta's form (see
``_translate``). When more than ``Gateway.coalesce_after`` events wait for it, each run's
deltas merge into the one already waiting; a run's terminal event goes out before other
runs' waiting events (see ``runtime._bus``), and a stop's reply before all of them.

A client that falls behind is closed with 1013 (try again later), after the frame being
written: when the events waiting for it pass ``Gateway.max_buffered_bytes`` (hello-ok's
``maxBufferedBytes``), or when one frame has waited ``Gateway.send_timeout`` seconds to be
written. Terminal events are never dropped before that close; the client reconnects,
reads ``chat.history`` (its ``liveRuns`` too) and follows on.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any, final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from runtime import (
    AbortRefused,
    AbortResult,
    InvalidRequest,
    RunCancelled,
    RunExists,
    RuntimeClosing,
    SessionBusy,
    SessionSettings,
    Subscription,
    SubscriptionOverflow,
    TerminalEvent,
    is_stop_command,
)

from ._auth import DEFAULT_AGENT_ID, MAIN_KEY, Principal, identify
from ._history import cursor_after, live_state, messages_since, visible_messages
from ._protocol import (
    ABORT_ON_DISCONNECT_CAP,
    ADMIN,
    CLOSE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    INVALID_PAYLOAD,
    MAX_PAYLOAD,
    POLICY_VIOLATION,
    PROTOCOL_VERSION,
    READ,
    TOOL_EVENTS_CAP,
    TRY_AGAIN_LATER,
    WRITE,
    AnsweredError,
    Cancel,
    ChatAbortParams,
    ChatHistoryParams,
    ChatSendParams,
    ConnectParams,
    ProtocolError,
    Request,
    RuntimeChatSendParams,
    SessionsAbortParams,
    SessionsConfigureParams,
    SessionsListParams,
    SessionsMessagesParams,
    Unreadable,
    invalid,
    parse_request,
    structure_params,
)
from ._translate import EventView, dumps, now_ms, visible

if TYPE_CHECKING:
    from ._server import Gateway

logger = logging.getLogger("adapters.gateway")

QUEUE_MODES = {
    "followup": "enqueue",
    "collect": "enqueue",
    "steer": "interrupt",
    "interrupt": "interrupt",
}
# Requests are served one at a time, in order, except stops (chat.abort, sessions.abort and
# a chat.send of "/stop"): those are served as soon as they are read, so a Stop never
# waits behind the connection's queued sends. Up to this many requests wait in the queue.
QUEUED_REQUESTS = 64
# chat.history reads the messages again while a run ends during the read, this many times
# at most (then the run's terminal event, which the client receives, tells its end)
HISTORY_READS = 3
# chat.send, and our extension of it that takes allowCancel
SEND_METHODS = frozenset({"chat.send", "runtime.chat.send"})


def _send_key(request: Request) -> str | None:
    """The run id a chat.send request names, if it is readable."""
    params = request.params
    if request.method in SEND_METHODS and isinstance(params, dict):
        key = params.get("idempotencyKey")
        return key if isinstance(key, str) else None
    return None


def _is_stop(request: Request) -> bool:
    if request.method in ("chat.abort", "sessions.abort"):
        return True
    params = request.params
    return (
        request.method in SEND_METHODS
        and isinstance(params, dict)
        and isinstance(params.get("message"), str)
        and is_stop_command(params["message"])
    )


@attrs.define(eq=False)
class _Pending:
    """A request read and not yet answered: a cancel frame withdraws it while it waits
    in the queue, or cancels its handler once it runs."""

    request: Request
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    started: bool = False
    withdrawn: bool = False


def _cancelled(request: Request) -> ProtocolError:
    """The answer to a request that a cancel frame withdrew before it was done. A
    chat.send's message comes back in ``details.restoredPrompt``: no run was started."""
    details: dict[str, Any] = {"code": "REQUEST_CANCELLED"}
    params = request.params
    message = f"The {request.method} request was cancelled before it was done."
    if request.method in SEND_METHODS and isinstance(params, dict):
        if isinstance(params.get("message"), str):
            details["restoredPrompt"] = params["message"]
            message = (
                f"The {request.method} request was cancelled before its run was admitted: "
                "nothing was started, and its message is in details.restoredPrompt."
            )
    return ProtocolError("UNAVAILABLE", message, details=details, retryable=False)


class _Close(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@final
@attrs.define(eq=False)
class Connection:
    gateway: Gateway
    ws: WebSocketConnection
    address: str  # the client's IP address, whose failed tokens are counted
    conn_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    principal: Principal = attrs.field(factory=Principal)
    scopes: frozenset[str] = frozenset()
    caps: frozenset[str] = frozenset()
    _seq: int = 0
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _started_runs: set[str] = attrs.field(factory=set)  # live runs, for abort-on-disconnect
    # Queued chat.send requests not yet admitted: run id -> (session key, admitted)
    _pending_sends: dict[str, tuple[Any, trio.Event]] = attrs.field(factory=dict)
    _requests: dict[str, _Pending] = attrs.field(factory=dict)  # read, not yet answered
    _events: Subscription | None = None
    _view: EventView | None = None
    _seeding: trio.Event | None = None  # set while sessions.messages.subscribe reads runs
    _sender_done: trio.Event = attrs.field(factory=trio.Event)
    # its deadline is the frame being written's (send_timeout after it began); inf when idle
    _write_deadline: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    behind: str | None = None  # why it was closed for falling behind, once it is

    async def serve(self) -> None:
        """Run the connection until the client leaves or the gateway closes it."""
        try:
            if await self._handshake():
                await self._serve_requests()
        except* _Close as group:  # raised bare or from inside the connection's nursery
            close = group.exceptions[0]
            assert isinstance(close, _Close)
            await self.ws.aclose(close.code, close.reason)
        except* ConnectionClosed:
            pass  # the client left; nothing of ours is lost (runs go on, or are aborted below)
        finally:
            if ABORT_ON_DISCONNECT_CAP in self.caps and self._started_runs:
                # its runs here are stopped at once; those on another process, within 2 s
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    for run_id in list(self._started_runs):
                        try:
                            await self.gateway.runtime.abort_anywhere(
                                run_id, reason="disconnect"
                            )
                        except AbortRefused:
                            pass  # started with allowCancel false: it ends by itself
                        except Exception as exc:  # the bus unreachable: nothing more to do
                            logger.warning("abort on disconnect of %s failed: %s", run_id, str(exc))

    async def close_after_flush(self, code: int, flush_timeout: float = 1.0) -> None:
        """Send what is buffered for this client (a run's last events), then close."""
        if self._events is not None:
            self._events.close()  # the sender drains what is buffered, then ends
            with trio.move_on_after(flush_timeout):
                await self._sender_done.wait()
        with trio.move_on_after(flush_timeout):
            await self.ws.aclose(code, "The gateway is shutting down.")

    # -- handshake -------------------------------------------------------------------

    async def _handshake(self) -> bool:
        await self._event("connect.challenge", {"nonce": secrets.token_hex(16), "ts": now_ms()})
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as timer:
            message = await self.ws.get_message()
        if timer.cancelled_caught:
            raise _Close(POLICY_VIOLATION, "No connect request arrived in time.")
        request = await self._read(message)
        if request is None:  # malformed, and answered: the handshake cannot go on
            raise _Close(POLICY_VIOLATION, "The first request must be a well-formed connect.")
        if isinstance(request, Cancel):
            raise _Close(POLICY_VIOLATION, "The first request must be connect.")
        if request.method != "connect":
            await self._fail(request.id, invalid("The first request must be connect."))
            raise _Close(POLICY_VIOLATION, "The first request must be connect.")
        try:
            params = structure_params(request.params, ConnectParams)
            self._admit(params)
        except ProtocolError as error:
            await self._fail(request.id, error)
            raise _Close(POLICY_VIOLATION, str(error)[:120]) from None
        set_message_limit(self.ws, MAX_PAYLOAD)  # before hello-ok: what it promises holds
        await self._respond(request.id, self._hello())
        return True

    def _admit(self, params: ConnectParams) -> None:
        if not params.minProtocol <= PROTOCOL_VERSION <= params.maxProtocol:
            raise ProtocolError(
                "INVALID_REQUEST",
                f"This gateway speaks protocol {PROTOCOL_VERSION}; the client asked for "
                f"{params.minProtocol} to {params.maxProtocol}.",
                details={"code": "PROTOCOL_MISMATCH"},
            )
        if self.gateway.token is not None or self.gateway.tokens:
            self.principal = self._authenticate(params)
        if params.role != "operator":
            raise ProtocolError("FORBIDDEN", f"Unknown role {params.role!r}; use operator.")
        asked = set(params.scopes if params.scopes is not None else [ADMIN])
        granted = asked & {READ, WRITE, ADMIN}
        if ADMIN in granted:
            granted |= {READ, WRITE}
        self.scopes = frozenset(granted)
        self.caps = frozenset(params.caps)

    def _authenticate(self, params: ConnectParams) -> Principal:
        gateway = self.gateway
        wait = gateway.auth_failures.retry_after(self.address)
        if wait is not None:  # checked first: while locked out, even the right token fails
            raise ProtocolError(
                "FORBIDDEN",
                "Too many failed authentication attempts from this address; retry in "
                f"{math.ceil(wait)} s.",
                details={"code": "AUTH_RATE_LIMITED"},
                retryable=True,
                retry_after_ms=math.ceil(wait * 1000),
            )
        given = params.auth.token if params.auth is not None else None
        if given is None:
            raise ProtocolError(
                "FORBIDDEN",
                "This gateway needs a token; pass auth.token.",
                details={"code": "AUTH_TOKEN_MISSING"},
            )
        principal = identify(given, gateway.token, gateway.tokens)
        if principal is None:
            gateway.auth_failures.record_failure(self.address)
            logger.warning("wrong token conn=%s address=%s", self.conn_id, self.address)
            raise ProtocolError(
                "FORBIDDEN", "The token is wrong.", details={"code": "AUTH_TOKEN_MISMATCH"}
            )
        return principal

    def _own(self, **keys: str | None) -> None:
        """Refuse a session key or run id outside this principal's namespace. The rule
        reads the key alone, so a refusal never tells whether the session exists."""
        for field, key in keys.items():
            if key is not None and not self.principal.owns(key):
                raise ProtocolError(
                    "FORBIDDEN",
                    f"params.{field} must begin with '{self.principal.name}:': this "
                    "connection's token reaches only the sessions and runs named so.",
                    details={"code": "NOT_YOUR_SESSION"},
                )

    def _hello(self) -> dict[str, Any]:
        gateway = self.gateway
        return {
            "type": "hello-ok",
            "protocol": PROTOCOL_VERSION,
            "server": {"version": gateway.version, "connId": self.conn_id},
            "features": {
                "methods": sorted(_METHODS),
                "events": gateway.event_names(),
                "capabilities": gateway.capabilities(),
            },
            "snapshot": {
                "presence": [],
                "health": {},
                "stateVersion": {"presence": 0, "health": 0},
                "uptimeMs": int((time.monotonic() - gateway.started_at) * 1000),
                "sessionDefaults": {
                    "defaultAgentId": DEFAULT_AGENT_ID,
                    "mainKey": MAIN_KEY,
                    "mainSessionKey": self.principal.main_session_key,
                },
            },
            "auth": {"role": "operator", "scopes": sorted(self.scopes)},
            "policy": {
                "maxPayload": MAX_PAYLOAD,
                "maxBufferedBytes": gateway.max_buffered_bytes,
                "tickIntervalMs": gateway.tick_interval_ms,
            },
        }

    # -- after the handshake -----------------------------------------------------------

    async def _serve_requests(self) -> None:
        gateway = self.gateway
        runtime = gateway.runtime
        view = EventView(tool_events=TOOL_EVENTS_CAP in self.caps, cache=gateway.frames)
        with runtime.subscribe(
            max_bytes=gateway.max_buffered_bytes, capacity=gateway.coalesce_after
        ) as events:
            # no await since subscribing: they line up
            live = [r for r in runtime.live_runs() if self.principal.owns(r.session_key)]
            view.seed([run.snapshot() for run in live])
            self._events = events
            self._view = view
            queue, queued = trio.open_memory_channel[Request](QUEUED_REQUESTS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_events, events, view)
                nursery.start_soon(self._watch_lag, events)
                nursery.start_soon(self._tick)
                nursery.start_soon(self._serve_in_order, queued)
                while True:
                    request = await self._read(await self.ws.get_message())
                    if request is None:
                        continue
                    if isinstance(request, Cancel):
                        await self._cancel(request.id)
                        continue
                    self._requests[request.id] = _Pending(request)
                    if _is_stop(request):
                        await self._after_pending_sends(request.params)
                        await self._handle(request)
                    else:
                        self._note_pending_send(request)
                        await queue.send(request)

    async def _serve_in_order(self, queued: trio.MemoryReceiveChannel[Request]) -> None:
        async for request in queued:
            try:
                await self._handle(request)
            finally:
                key = _send_key(request)
                if key is not None and key in self._pending_sends:
                    self._pending_sends.pop(key)[1].set()

    async def _cancel(self, request_id: str) -> None:
        """A cancel frame: a request still queued is withdrawn and answered now; one being
        handled is cancelled at its next await (a chat.send whose run was registered is
        past its last await, so it is answered as started). Unknown or answered: ignored,
        as a cancel that crossed the answer."""
        pending = self._requests.get(request_id)
        if pending is None or pending.withdrawn:
            return
        if pending.started:
            pending.scope.cancel("cancel frame")
            return
        pending.withdrawn = True
        key = _send_key(pending.request)
        if key is not None and key in self._pending_sends:  # stops waiting for it go on
            self._pending_sends.pop(key)[1].set()
        await self._fail(request_id, _cancelled(pending.request))

    def _note_pending_send(self, request: Request) -> None:
        key = _send_key(request)
        if key is not None:
            session = request.params.get("sessionKey")
            self._pending_sends.setdefault(key, (session, trio.Event()))

    async def _after_pending_sends(self, params: Any) -> None:
        """Let the queued sends a stop names be admitted first: "send, then Stop" stops it."""
        if not isinstance(params, dict):
            return
        run_id = params.get("runId")
        session = params.get("sessionKey", params.get("key"))
        for pending_id, (pending_session, admitted) in list(self._pending_sends.items()):
            if pending_id == run_id or (run_id is None and pending_session == session):
                await admitted.wait()

    async def _send_events(self, events: Subscription, view: EventView) -> None:
        try:
            async for event in events:
                if isinstance(event, TerminalEvent):
                    self._started_runs.discard(event.run_id)
                if READ not in self.scopes or not self.principal.owns(event.session_key):
                    continue
                if self._seeding is not None:  # what comes is read after the snapshot
                    await self._seeding.wait()
                for name, payload in view.frames(event):
                    await self._event_raw(name, payload)
                if isinstance(event, RunCancelled):
                    logger.info(
                        "aborted event sent conn=%s session=%s run=%s reason=%s committed_ms=%.2f",
                        self.conn_id,
                        event.session_key,
                        event.run_id,
                        event.reason,
                        event.timings.committed_ms,
                    )
        except SubscriptionOverflow:
            pass  # everything buffered was sent; _watch_lag closes the connection
        finally:
            self._sender_done.set()

    async def _watch_lag(self, events: Subscription) -> None:
        """Close the connection once it is too far behind (see the module docstring)."""
        with self._write_deadline:
            await events.wait_overflowed()
        if self._write_deadline.cancelled_caught:
            self.behind = f"a frame waited {self.gateway.send_timeout:g} s to be sent"
        else:
            self.behind = f"over {self.gateway.max_buffered_bytes} bytes of events waited"
        logger.warning("closing a client that fell behind conn=%s: %s", self.conn_id, self.behind)
        events.close()  # nothing more is buffered for it
        reason = f"Too far behind: {self.behind}. Reconnect and resume."  # <= 123 bytes
        # Shielded: the other tasks end with ConnectionClosed as soon as the close begins,
        # and must not cut it short. Bounded: past it, aclose drops the TCP connection.
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose(TRY_AGAIN_LATER, reason)  # after the frame in progress
        raise _Close(TRY_AGAIN_LATER, reason)  # ends the tasks; the close is already done

    async def _tick(self) -> None:
        while True:
            await trio.sleep(self.gateway.tick_interval_ms / 1000)
            await self._event("tick", {"ts": now_ms()})

    async def _read(self, message: str | bytes) -> Request | Cancel | None:
        """Parse a frame. None: it was malformed and has been answered."""
        try:
            return parse_request(message)
        except Unreadable as exc:
            raise _Close(INVALID_PAYLOAD, str(exc)) from None
        except AnsweredError as exc:
            await self._fail(exc.request_id, exc.error)
            return None

    async def _handle(self, request: Request) -> None:
        pending = self._requests.get(request.id)
        if pending is None or pending.request is not request:
            pending = _Pending(request)  # not read by the loop (not cancellable by id)
        elif pending.withdrawn:
            return  # answered when it was withdrawn
        pending.started = True
        try:
            await self._answer(request, pending)
        finally:
            if self._requests.get(request.id) is pending:
                del self._requests[request.id]

    async def _answer(self, request: Request, pending: _Pending) -> None:
        method = _METHODS.get(request.method)
        try:
            if method is None:
                raise invalid(f"Unknown method {request.method!r}.")
            needed, handler = method
            if needed not in self.scopes:
                raise ProtocolError(
                    "FORBIDDEN",
                    f"missing scope: {needed}",
                    details={
                        "code": "MISSING_SCOPE",
                        "missingScope": needed,
                        "requiredScopes": [needed],
                    },
                )
            with pending.scope:
                payload = await handler(self, request.params)
            if pending.scope.cancelled_caught:
                raise _cancelled(request)
        except ProtocolError as error:
            await self._fail(request.id, error)
        except InvalidRequest as exc:
            await self._fail(request.id, invalid(str(exc)))
        except (SessionBusy, RuntimeClosing) as exc:
            await self._fail(request.id, ProtocolError("UNAVAILABLE", str(exc), retryable=True))
        except AbortRefused as exc:
            await self._fail(request.id, _refusal(str(exc), [exc.run_id]))
        except Exception as exc:  # a bug or a failing store: answer it, never crash the server
            logger.exception("request failed conn=%s method=%s", self.conn_id, request.method)
            await self._fail(
                request.id,
                ProtocolError(
                    "UNAVAILABLE",
                    f"The gateway could not handle {request.method}: {type(exc).__name__}.",
                    retryable=True,
                ),
            )
        else:
            await self._respond(request.id, payload)

    # -- methods -----------------------------------------------------------------------

    async def _chat_send(self, raw: Any) -> dict[str, Any]:
        if isinstance(raw, dict) and "allowCancel" in raw:  # never ignored in silence
            raise invalid(
                "params.allowCancel is not a chat.send parameter: OpenClaw's schema allows "
                "no extra field there. Send the same params to runtime.chat.send instead."
            )
        return await self._start(structure_params(raw, ChatSendParams), allow_cancel=True)

    async def _runtime_chat_send(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, RuntimeChatSendParams)
        return await self._start(params, allow_cancel=params.allowCancel)

    async def _start(self, params: ChatSendParams, *, allow_cancel: bool) -> dict[str, Any]:
        self._own(sessionKey=params.sessionKey, idempotencyKey=params.idempotencyKey)
        runtime = self.gateway.runtime
        if is_stop_command(params.message):
            return _aborted(
                await runtime.abort_anywhere(session_key=params.sessionKey, reason="stop-command")
            )
        if not params.message.strip():
            raise invalid("params.message is empty; there is nothing to send.")
        concurrency = None
        if params.queueMode is not None:
            concurrency = QUEUE_MODES.get(params.queueMode)
            if concurrency is None:
                raise invalid(
                    f"Unknown params.queueMode {params.queueMode!r}; use one of "
                    f"{', '.join(QUEUE_MODES)}."
                )
        run_id = params.idempotencyKey
        events = self._events
        assert events is not None  # methods are served after the handshake
        # before it starts (here, or on the process that holds the session): its first
        # event is already ours
        events.follow_run(run_id, params.sessionKey)
        thinking = params.thinking is not None and params.thinking.lower() not in (
            "",
            "off",
            "none",
        )
        timeout = params.timeoutMs / 1000 if params.timeoutMs else None
        try:
            await runtime.start_run_anywhere(
                params.sessionKey,
                params.message,
                run_id,
                concurrency=concurrency,  # type: ignore[arg-type]
                thinking=thinking,
                run_timeout=timeout,
                allow_cancel=allow_cancel,
            )
        except RunExists as exists:  # the idempotency key was used: never a second run
            if not exists.live:  # a live one is followed still: the client resent it
                events.unfollow_run(run_id)
            return {"runId": run_id, "status": "in_flight" if exists.live else "ok"}
        except BaseException:
            events.unfollow_run(run_id)
            raise
        if ABORT_ON_DISCONNECT_CAP in self.caps:
            self._started_runs.add(run_id)
        return {"runId": run_id, "status": "started"}

    async def _chat_abort(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, ChatAbortParams)
        self._own(sessionKey=params.sessionKey, runId=params.runId)
        logger.info(
            "abort request received conn=%s session=%s run=%s",
            self.conn_id,
            params.sessionKey,
            params.runId,
        )
        return _aborted(
            await self.gateway.runtime.abort_anywhere(
                run_id=params.runId, session_key=params.sessionKey, reason="rpc"
            )
        )

    async def _sessions_abort(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, SessionsAbortParams)
        self._own(key=params.key, runId=params.runId)
        runtime = self.gateway.runtime
        if params.runId is not None:
            return _aborted(
                await runtime.abort_anywhere(run_id=params.runId, session_key=params.key)
            )
        if params.key is None:
            raise invalid("Name params.key (a session) or params.runId to abort.")
        if params.clearQueued:
            return _aborted(await runtime.abort_anywhere(session_key=params.key, reason="rpc"))
        # the run under way, on whichever process holds the session; queued ones stay
        live = await runtime.live_runs_anywhere(params.key)
        running = [r for r in live if r.phase == "running"]
        refused = tuple(r.run_id for r in running if not r.allow_cancel)
        aborted: tuple[str, ...] = ()
        for run in running:
            if run.allow_cancel:
                result = await runtime.abort_anywhere(run.run_id, params.key, reason="rpc")
                aborted += result.run_ids
        return _aborted(AbortResult(bool(aborted), aborted, refused))

    async def _chat_history(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, ChatHistoryParams)
        self._own(sessionKey=params.sessionKey)
        if not 1 <= params.limit <= 1000:
            raise invalid("params.limit must be from 1 to 1000.")
        runtime = self.gateway.runtime
        key = params.sessionKey
        settings = None
        if params.cursor is None:
            settings = await runtime.store.get_settings(key)
        for _ in range(HISTORY_READS):
            before = {r.run_id for r in await runtime.live_runs_anywhere(key)}
            stored = await runtime.store.history(key, params.limit + 1)
            if self._events is not None:  # (for a run on another process, the snapshot
                self._events.seal()  # is taken during the next await: seal on both sides)
            runs = await runtime.live_runs_anywhere(key)
            if before <= {r.run_id for r in runs}:
                break
            # A run ended during the read: its result may have landed just after it (a
            # run leaves the registry only once committed), so read again.
        if self._events is not None:
            self._events.seal()  # no delta merges across the snapshot (see Subscription.seal)
        live = live_state(runs, stored)
        if params.cursor is not None:
            since = messages_since(params.cursor, stored, params.limit)
            if since is None:
                return {"kind": "reset"}
            return {
                "kind": "delta",
                "messages": visible(since),
                "deltaCursor": cursor_after(stored),
                **live,
            }
        assert settings is not None
        live_runs = [  # ours: what the page needs beyond OpenClaw's words (allowCancel)
            {
                "runId": r.run_id,
                "phase": r.phase,
                "prompt": r.prompt,
                "text": r.text,
                "allowCancel": r.allow_cancel,
            }
            for r in runs
        ]
        return {
            "sessionKey": key,
            "sessionId": key,
            "messages": visible_messages(stored, params.limit),
            "deltaCursor": cursor_after(stored),
            **live,
            "liveRuns": live_runs,
            "settings": {"stopPolicy": settings.stop_policy, "concurrency": settings.concurrency},
        }

    async def _messages_subscribe(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, SessionsMessagesParams)
        self._own(key=params.key)
        events, view = self._events, self._view
        assert events is not None and view is not None
        followed = events.follows_everything or params.key in events.sessions
        # The runs' text so far (here, or on the process that holds the session), read
        # after following: the events that come meanwhile wait (_send_events) until the
        # view has the snapshots, which then drops those the snapshots hold (by seq).
        self._seeding = seeding = trio.Event()
        try:
            events.follow_session(params.key)
            live = await self.gateway.runtime.live_runs_anywhere(params.key)
            if not followed:  # followed anew: the next delta of each run carries its text
                view.seed([r for r in live if r.run_id not in events.runs], refresh=True)
            view.seed(live)
        finally:
            self._seeding = None
            seeding.set()
        self._forget_unfollowed()
        return {"subscribed": True, "key": params.key}

    async def _messages_unsubscribe(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, SessionsMessagesParams)
        self._own(key=params.key)
        assert self._events is not None
        self._events.unfollow_session(params.key)
        self._forget_unfollowed()
        return {"subscribed": False, "key": params.key}

    def _forget_unfollowed(self) -> None:
        """Drop the view's runs that ended while this connection did not follow them (a
        followed run's view ends with its terminal event; an unfollowed live run keeps its
        per-run seq, should the connection follow it again)."""
        events, view, runtime = self._events, self._view, self.gateway.runtime
        assert events is not None and view is not None
        view.forget(
            lambda run_id, key: (
                events.follows_everything
                or key in events.sessions
                or run_id in events.runs
                or runtime.get_run(run_id) is not None
            )
        )

    async def _sessions_list(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, SessionsListParams)
        if not 1 <= params.limit <= 1000:
            raise invalid("params.limit must be from 1 to 1000.")
        runtime = self.gateway.runtime
        phases: dict[str, set[str]] = {}
        for run in runtime.live_runs():
            phases.setdefault(run.session_key, set()).add(run.phase)
        rows = []
        keys = [k for k in await runtime.store.sessions() if self.principal.owns(k)]
        keys = keys[: params.limit]
        elsewhere = await runtime.abort_bus.held_elsewhere(keys)  # their runs: not seen here
        for key in keys:
            row = {"key": key, "sessionId": key, "kind": "direct"}
            live = phases.get(key, set())
            if live:
                row["status"] = "running" if "running" in live else "queued"
            elif key in elsewhere:
                row["status"] = "running"
            rows.append(row)
        return {"ts": now_ms(), "count": len(rows), "sessions": rows}

    async def _stats(self, raw: Any) -> dict[str, Any]:
        gateway = self.gateway
        stats = gateway.runtime.statistics()
        latency = stats.stop_latency
        # runs and connections are counted within the principal's reach; aborts and the
        # latency summary are the process's, and name no session
        runs = [r for r in gateway.runtime.live_runs() if self.principal.owns(r.session_key)]
        queued = sum(1 for r in runs if r.phase == "queued")
        connections = [
            c
            for c in gateway.connections
            if self.principal.name is None or c.principal == self.principal
        ]
        return {
            "liveRuns": len(runs) - queued,
            "queuedRuns": queued,
            "aborts": stats.aborts,
            "connections": len(connections),
            "stopLatencyMs": {
                "count": latency.count,
                "median": latency.median_ms,
                "p99": latency.p99_ms,
                "max": latency.max_ms,
            },
        }

    async def _configure(self, raw: Any) -> dict[str, Any]:
        params = structure_params(raw, SessionsConfigureParams)
        self._own(sessionKey=params.sessionKey)
        store = self.gateway.runtime.store
        current = await store.get_settings(params.sessionKey)
        settings = SessionSettings(
            params.stopPolicy or current.stop_policy,  # type: ignore[arg-type]
            params.concurrency or current.concurrency,  # type: ignore[arg-type]
        )
        await store.set_settings(params.sessionKey, settings)
        return {
            "sessionKey": params.sessionKey,
            "stopPolicy": settings.stop_policy,
            "concurrency": settings.concurrency,
        }

    # -- frames out --------------------------------------------------------------------

    async def _send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._write(frame)

    async def _event(self, name: str, payload: dict[str, Any]) -> None:
        await self._event_raw(name, dumps(payload))

    async def _event_raw(self, name: str, payload: str) -> None:
        """Send an event whose payload is already JSON (encoded once for all connections)."""
        async with self._send_lock:  # numbered under the lock: wire order is seq order
            seq = self._seq
            self._seq += 1
            await self._write_text(
                f'{{"type":"event","event":"{name}","payload":{payload},"seq":{seq}}}'
            )

    async def _write(self, frame: dict[str, Any]) -> None:
        await self._write_text(dumps(frame))

    async def _write_text(self, text: str) -> None:
        """Write one frame (the send lock held), watched by ``_watch_lag``."""
        self._write_deadline.deadline = trio.current_time() + self.gateway.send_timeout
        try:
            await self.ws.send_message(text)
        finally:
            self._write_deadline.deadline = math.inf

    async def _respond(self, request_id: str, payload: dict[str, Any]) -> None:
        await self._send({"type": "res", "id": request_id, "ok": True, "payload": payload})

    async def _fail(self, request_id: str, error: ProtocolError) -> None:
        try:
            await self._send(
                {"type": "res", "id": request_id, "ok": False, "error": error.error_shape()}
            )
        except ConnectionClosed:
            pass


def set_message_limit(ws: WebSocketConnection, size: int) -> None:
    """Change the largest message ``ws`` accepts from now on.

    trio-websocket (0.12) takes ``max_message_size`` only when the connection is made, and
    checks it as each piece of a message arrives (``_handle_message_event``), against the
    private attribute set here: there is no public setter. The gateway opens every
    connection at the pre-handshake limit, so a client that has not yet connected cannot
    make it buffer more, and raises the limit once connect is admitted.
    """
    if not isinstance(getattr(ws, "_max_message_size", None), int):
        raise RuntimeError(
            "This trio-websocket keeps no _max_message_size; the gateway cannot raise its "
            "message limit after the handshake. Check trio-websocket's version."
        )
    ws._max_message_size = size


def _aborted(result: AbortResult) -> dict[str, Any]:
    """A stop's answer. A stop that stopped nothing because every run it found was started
    with allowCancel false is refused (FORBIDDEN, details.code ABORT_REFUSED), so a client
    shows why; one that stopped some lists the others in ``refusedRunIds``."""
    if result.refused and not result.aborted:
        if len(result.refused) == 1:
            raise AbortRefused(result.refused[0])
        names = ", ".join(repr(run_id) for run_id in result.refused)
        raise _refusal(
            f"The runs {names} were started with allowCancel false, so they cannot be "
            "stopped; they end by themselves, at their timeout, or when the server shuts down.",
            list(result.refused),
        )
    answer: dict[str, Any] = {
        "ok": True,
        "aborted": result.aborted,
        "runIds": list(result.run_ids),
    }
    if result.refused:
        answer["refusedRunIds"] = list(result.refused)
    return answer


def _refusal(message: str, run_ids: list[str]) -> ProtocolError:
    return ProtocolError(
        "FORBIDDEN",
        message,
        details={"code": "ABORT_REFUSED", "runIds": run_ids},
        retryable=False,
    )


# method -> (the scope it needs, its handler)
_METHODS = {
    "chat.send": (WRITE, Connection._chat_send),
    "runtime.chat.send": (WRITE, Connection._runtime_chat_send),
    "chat.abort": (WRITE, Connection._chat_abort),
    "sessions.abort": (WRITE, Connection._sessions_abort),
    "chat.history": (READ, Connection._chat_history),
    "sessions.list": (READ, Connection._sessions_list),
    "sessions.messages.subscribe": (READ, Connection._messages_subscribe),
    "sessions.messages.unsubscribe": (READ, Connection._messages_unsubscribe),
    "runtime.stats": (READ, Connection._stats),
    "runtime.sessions.configure": (WRITE, Connection._configure),
}

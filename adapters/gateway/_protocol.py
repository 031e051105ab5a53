"""The wire: frames, request params, error responses (OpenClaw gateway protocol v4).

Params are attrs classes named and spelled as on the wire, structured by one strict cattrs
converter: a wrong type is an error naming the field (``invalid value ... @ $.sessionKey``),
never a silent coercion. Unknown fields are ignored, because OpenClaw's schema allows many
optional fields we do not act on.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, TypeVar, cast

import attrs
import cattrs
from cattrs.preconf.json import make_converter

T = TypeVar("T")

PROTOCOL_VERSION: Final = 4
PRE_HANDSHAKE_MAX_BYTES: Final = 64 * 1024
MAX_PAYLOAD: Final = 1024 * 1024
MAX_BUFFERED_BYTES: Final = 4 * 1024 * 1024
TICK_INTERVAL_MS: Final = 15_000
HANDSHAKE_TIMEOUT: Final = 10.0
# A connection that falls behind is closed with TRY_AGAIN_LATER when the events waiting for
# it pass maxBufferedBytes, or when one frame has waited SEND_TIMEOUT seconds to be
# written. The close frame follows the frame being written; if that cannot be written
# within CLOSE_TIMEOUT more seconds, the TCP connection is dropped.
SEND_TIMEOUT: Final = 10.0
# A connection with more than this many events waiting cannot keep up: from then on each
# run's deltas merge into its delta already waiting (no timer: nothing waits for a merge).
COALESCE_AFTER: Final = 32
CLOSE_TIMEOUT: Final = 5.0

READ: Final = "operator.read"
WRITE: Final = "operator.write"
ADMIN: Final = "operator.admin"

# caps a client may send in `connect`
TOOL_EVENTS_CAP: Final = "tool-events"
ABORT_ON_DISCONNECT_CAP: Final = "abort-on-disconnect"

# WebSocket close codes
GOING_AWAY: Final = 1001
POLICY_VIOLATION: Final = 1008
INVALID_PAYLOAD: Final = 1007
TOO_BIG: Final = 1009
TRY_AGAIN_LATER: Final = 1013  # fell behind: reconnect, read chat.history, follow again


class ProtocolError(Exception):
    """A request the gateway answers with ``ok: false``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retryable: bool | None = None,
        retry_after_ms: int | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.details = details
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    def error_shape(self) -> dict[str, Any]:
        shape: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.details is not None:
            shape["details"] = self.details
        if self.retryable is not None:
            shape["retryable"] = self.retryable
        if self.retry_after_ms is not None:
            shape["retryAfterMs"] = self.retry_after_ms
        return shape


def invalid(message: str) -> ProtocolError:
    return ProtocolError("INVALID_REQUEST", message)


@attrs.frozen
class Request:
    id: str
    method: str
    params: Any


@attrs.frozen
class Cancel:
    """A ``{"type": "cancel", "id"}`` frame: withdraw the pending request with this id."""

    id: str


class Unreadable(Exception):
    """A frame with no id we could answer to: the connection is closed with 1007."""


_ID = re.compile(r'"id"\s*:\s*"([^"\\]{1,256})"')


def parse_request(text: str | bytes) -> Request | Cancel:
    """Read one request (or cancel) frame. Raises ProtocolError (answerable) or Unreadable."""
    if isinstance(text, bytes):
        raise Unreadable("Binary frames are not part of the protocol; send JSON text.")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        problem = _unreadable(exc)
        found = _ID.search(text)
        if found is None:
            raise Unreadable(f"The frame {problem}.") from exc
        raise _answer(found.group(1), f"The frame {problem}.") from exc
    if not isinstance(frame, dict):
        raise Unreadable("The frame is JSON but not an object.")
    frame_id = frame.get("id")
    if not isinstance(frame_id, str) or not frame_id:
        raise Unreadable("The frame has no string id, so there is nothing to answer.")
    if frame.get("type") == "cancel":
        return Cancel(frame_id)
    if frame.get("type") != "req":
        raise _answer(frame_id, 'Only request ("req") and cancel frames may be sent.')
    method = frame.get("method")
    if not isinstance(method, str) or not method:
        raise _answer(frame_id, "The request has no method name.")
    return Request(frame_id, method, frame.get("params", {}))


def _unreadable(exc: Exception) -> str:
    """What is wrong with a frame json could not read, for the client."""
    if isinstance(exc, RecursionError):  # json stops at the recursion limit, memory intact
        return "nests too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return "is not valid JSON"
    return "holds a number too long to read"  # Python's limit on digits in an int


class AnsweredError(Exception):
    """A ProtocolError that belongs to a known request id."""

    def __init__(self, request_id: str, error: ProtocolError):
        super().__init__(str(error))
        self.request_id = request_id
        self.error = error


def _answer(request_id: str, message: str) -> AnsweredError:
    return AnsweredError(request_id, invalid(message))


# -- params ----------------------------------------------------------------------------


@attrs.frozen
class ClientInfo:
    id: str
    version: str
    platform: str
    mode: str


@attrs.frozen
class Auth:
    token: str | None = None


@attrs.frozen
class ConnectParams:
    minProtocol: int
    maxProtocol: int
    client: ClientInfo
    role: str = "operator"
    scopes: list[str] | None = None
    caps: list[str] = attrs.Factory(list)
    auth: Auth | None = None


@attrs.frozen
class ChatSendParams:
    sessionKey: str
    message: str
    idempotencyKey: str
    thinking: str | None = None
    timeoutMs: int | None = None
    queueMode: str | None = None


@attrs.frozen
class RuntimeChatSendParams(ChatSendParams):
    """``runtime.chat.send``: chat.send's params, plus what OpenClaw's schema (whose
    ChatSendParams allow no extra field) has no word for."""

    allowCancel: bool = True


@attrs.frozen
class ChatAbortParams:
    sessionKey: str
    runId: str | None = None


@attrs.frozen
class ChatHistoryParams:
    sessionKey: str
    limit: int = 200
    cursor: str | None = None  # a deltaCursor: only what changed since (see _history)


@attrs.frozen
class SessionsAbortParams:
    key: str | None = None
    runId: str | None = None
    clearQueued: bool = False


@attrs.frozen
class SessionsMessagesParams:
    """``sessions.messages.subscribe`` / ``unsubscribe``: one session. OpenClaw's
    ``agentId`` and ``includeApprovals`` are accepted and ignored (no agents, no approvals)."""

    key: str


@attrs.frozen
class SessionsListParams:
    """``sessions.list``: OpenClaw's filters are accepted and ignored but for ``limit``."""

    limit: int = 200


@attrs.frozen
class SessionsConfigureParams:
    """``runtime.sessions.configure``: a session's stop and concurrency policies."""

    sessionKey: str
    stopPolicy: str | None = None
    concurrency: str | None = None


SAFE_INTEGER: Final = 2**53 - 1  # the largest integer every JSON client reads exactly


def _make_converter() -> cattrs.Converter:
    converter = make_converter(forbid_extra_keys=False)

    def strict(kind: type) -> Any:
        def structure(value: Any, _: type) -> Any:
            if type(value) is not kind:
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("the text is not valid Unicode (a lone surrogate)") from None
            if isinstance(value, int) and abs(value) > SAFE_INTEGER:
                raise ValueError(f"the number is beyond {SAFE_INTEGER}")
            return value

        return structure

    for kind in (str, int, bool):
        converter.register_structure_hook(kind, strict(kind))

    def strings(value: Any, _: type) -> list[str]:
        if type(value) is not list:
            raise TypeError(f"expected a list of strings, got {type(value).__name__}")
        return [converter.structure(item, str) for item in value]

    converter.register_structure_hook_func(lambda kind: kind == list[str], strings)
    return converter


_converter = _make_converter()


def structure_params(params: Any, kind: type[T]) -> T:
    """The params as ``kind``, or an INVALID_REQUEST naming each bad field."""
    if not isinstance(params, dict):
        raise invalid("params must be an object.")
    try:
        value = _converter.structure(params, kind)
    except Exception as exc:
        problems = "; ".join(cattrs.transform_error(exc, path="params"))
        raise invalid(f"Invalid params: {problems}.") from None
    for field in attrs.fields(cast(Any, kind)):
        text = getattr(value, field.name)
        if isinstance(text, str) and field.name in _NON_EMPTY and not text.strip():
            raise invalid(f"params.{field.name} is empty.")
    return value


_NON_EMPTY = {"sessionKey", "idempotencyKey", "runId", "key"}

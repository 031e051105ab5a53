"""Validate gateway frames against OpenClaw's published protocol schema.

The contract (``/work/shared/PROTOCOL.md``) is ``protocol.schema.json`` of
``@openclaw/gateway-protocol@2026.9.1``, installed by ``npm ci --prefix tests/node``. Usage::

    from tests.openclaw_schema import (
        check_frame, frame_errors, payload_errors, request_params_errors,
    )

    check_frame(frame)                      # AssertionError listing every violation
    assert frame_errors(frame) == []        # the same, as a list of strings
    assert payload_errors("chat", payload) == []   # a payload alone (or a definition name)
    assert request_params_errors("chat.send", params) == []

``frame_errors`` checks the frame (RequestFrame / ResponseFrame / EventFrame, chosen by
``type``) and, where the schema defines one, its payload:

- event ``chat``     -> the ChatEvent variant chosen by ``state`` (ChatDeltaEvent, ...)
- event ``agent``    -> AgentEvent; ``tick`` -> TickEvent; ``shutdown`` -> ShutdownEvent
- response with ``payload.type == "hello-ok"`` -> HelloOk; error response -> ErrorShape
- request of a method in ``REQUEST_PARAMS`` -> its params definition

Everything else (``connect.challenge``, ``runtime.*`` extensions, results of ``chat.send`` ...)
has no schema and is checked at the frame level only. Messages read
``"<what>: <path>: <message>"``, e.g. ``"chat/aborted: payload: Additional properties are not
allowed ('usage' was unexpected)"``.
"""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError

PROTOCOL_PACKAGE = "@openclaw/gateway-protocol"
PROTOCOL_PACKAGE_VERSION = "2026.9.1"
NODE_DIR = Path(__file__).resolve().parent / "node"
PACKAGE_DIR = NODE_DIR / "node_modules" / "@openclaw" / "gateway-protocol"
SCHEMA_PATH = PACKAGE_DIR / "protocol.schema.json"

FRAME_DEFINITIONS = {"req": "RequestFrame", "res": "ResponseFrame", "event": "EventFrame"}
CHAT_STATE_DEFINITIONS = {
    "status": "ChatStatusEvent",
    "delta": "ChatDeltaEvent",
    "final": "ChatFinalEvent",
    "aborted": "ChatAbortedEvent",
    "error": "ChatErrorEvent",
}
EVENT_DEFINITIONS = {"agent": "AgentEvent", "tick": "TickEvent", "shutdown": "ShutdownEvent"}
REQUEST_PARAMS = {
    "connect": "ConnectParams",
    "chat.send": "ChatSendParams",
    "chat.abort": "ChatAbortParams",
    "chat.history": "ChatHistoryParams",
    "sessions.abort": "SessionsAbortParams",
}


class OpenClawSchemaMissing(RuntimeError):
    """The npm packages under tests/node are not installed (or are the wrong version)."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The whole ``protocol.schema.json`` (draft-07; named schemas under ``definitions``)."""
    hint = "run `npm ci --prefix tests/node` in the repository root (see .ci/run)"
    if not SCHEMA_PATH.is_file():
        raise OpenClawSchemaMissing(f"{SCHEMA_PATH} not found: {hint}")
    version = json.loads((PACKAGE_DIR / "package.json").read_text("utf-8")).get("version")
    if version != PROTOCOL_PACKAGE_VERSION:
        raise OpenClawSchemaMissing(
            f"{PROTOCOL_PACKAGE} is {version}, expected {PROTOCOL_PACKAGE_VERSION}: {hint}"
        )
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text("utf-8"))
    return loaded


@cache
def validator(name: str) -> Draft7Validator:
    """A Draft7 validator for ``#/definitions/<name>`` (KeyError if the schema lacks it)."""
    definitions = schema()["definitions"]
    if name not in definitions:
        raise KeyError(f"{name} is not a definition of {SCHEMA_PATH.name}")
    # Wrapped in a $ref so that any "#/definitions/..." reference inside still resolves.
    return Draft7Validator({"$ref": f"#/definitions/{name}", "definitions": definitions})


def _describe(error: ValidationError) -> str:
    message = error.message
    if len(message) > 300:
        message = message[:300] + "..."
    if error.context:  # anyOf/oneOf: say why the alternatives failed
        consts = [sub.validator_value for sub in error.context if sub.validator == "const"]
        if len(consts) == len(error.context):
            message = f"{error.instance!r} is not one of {consts!r}"
        else:
            reasons = sorted({sub.message for sub in error.context}, key=len)[:3]
            message += " (" + "; ".join(reasons) + ")"
    return message


def definition_errors(name: str, instance: Any, *, label: str = "", path: str = "") -> list[str]:
    """Violations of ``instance`` against definition ``name``, as readable strings.

    ``label`` starts each message (default: ``name``); ``path`` is prefixed to the location
    of each error (e.g. ``"payload"`` when ``instance`` is a frame's payload).
    """
    out = []
    errors = sorted(
        validator(name).iter_errors(instance), key=lambda e: ([str(p) for p in e.path], e.message)
    )
    for error in errors:
        where = "/".join([*([path] if path else []), *map(str, error.path)])
        out.append(f"{label or name}: {where or '<root>'}: {_describe(error)}")
    return out


def request_params_errors(method: str, params: Any) -> list[str]:
    """Violations of a request's ``params`` against the method's params definition.

    Only the methods of ``REQUEST_PARAMS`` are known; any other raises ``KeyError``.
    """
    name = REQUEST_PARAMS[method]
    return definition_errors(name, params, label=f"{method} params")


def frame_errors(frame: Any) -> list[str]:
    """Every violation of the protocol schema in one frame (empty list when valid)."""
    if not isinstance(frame, dict):
        return [f"frame: <root>: {frame!r} is not a JSON object"]
    kind = frame.get("type")
    if kind not in FRAME_DEFINITIONS:
        return [f"frame: type: {kind!r} is not one of {sorted(FRAME_DEFINITIONS)}"]
    errors = definition_errors(FRAME_DEFINITIONS[kind], frame, label=f"{kind} frame")

    if kind == "event":
        errors += _event_payload_errors(frame.get("event"), frame.get("payload"))
    elif kind == "res":
        if "error" in frame:
            # ResponseFrame inlines ErrorShape, which is checked below: drop the duplicates.
            errors = [e for e in errors if not e.startswith("res frame: error")]
        errors += _response_payload_errors(frame)
    else:
        method, params = frame.get("method"), frame.get("params")
        if method in REQUEST_PARAMS:
            name = REQUEST_PARAMS[method]
            errors += definition_errors(name, params, label=f"{method} params", path="params")
    return errors


def payload_errors(kind: str, payload: Any) -> list[str]:
    """Violations of a payload on its own.

    ``kind`` is a definition name of the schema (``"ChatFinalEvent"``, ``"HelloOk"`` ...) or
    one of the short names ``"chat"`` (variant chosen by ``state``), ``"agent"``, ``"tick"``,
    ``"shutdown"``, ``"hello-ok"``, ``"error"`` (ErrorShape). Paths are relative to the payload.
    """
    if kind == "hello-ok":
        return definition_errors("HelloOk", payload, label="hello-ok")
    if kind == "error":
        return definition_errors("ErrorShape", payload, label="error response")
    if kind == "chat" or kind in EVENT_DEFINITIONS:
        return _event_payload_errors(kind, payload, path="")
    return definition_errors(kind, payload)


def _event_payload_errors(event: Any, payload: Any, path: str = "payload") -> list[str]:
    where = f"{path}/" if path else ""
    if event == "chat":
        if not isinstance(payload, dict):
            return [f"chat: {path or '<root>'}: {payload!r} is not of type 'object'"]
        state = payload.get("state")
        if state not in CHAT_STATE_DEFINITIONS:
            allowed = list(CHAT_STATE_DEFINITIONS)
            return [f"chat: {where}state: {state!r} is not one of {allowed}"]
        name = CHAT_STATE_DEFINITIONS[state]
        return definition_errors(name, payload, label=f"chat/{state}", path=path)
    if event in EVENT_DEFINITIONS:
        return definition_errors(EVENT_DEFINITIONS[event], payload, label=event, path=path)
    return []


def _response_payload_errors(frame: dict[str, Any]) -> list[str]:
    ok, payload, error = frame.get("ok"), frame.get("payload"), frame.get("error")
    errors = []
    # The schema does not tie `ok` to `payload`/`error`; PROTOCOL.md does.
    if ok is False and "error" not in frame:
        errors.append("res frame: <root>: ok is false but there is no 'error'")
    if ok is True and "error" in frame:
        errors.append("res frame: error: ok is true but the frame carries an 'error'")
    if "error" in frame:
        errors += definition_errors("ErrorShape", error, label="error response", path="error")
    if isinstance(payload, dict) and payload.get("type") == "hello-ok":
        errors += definition_errors("HelloOk", payload, label="hello-ok", path="payload")
    return errors


def check_frame(frame: Any) -> None:
    """Assert that ``frame`` satisfies the protocol schema (for tests)."""
    errors = frame_errors(frame)
    if errors:
        shown = json.dumps(frame, default=repr)
        if len(shown) > 2000:
            shown = shown[:2000] + "..."
        raise AssertionError(
            f"{len(errors)} schema violation(s) in frame {shown}:\n  " + "\n  ".join(errors)
        )


def check_frames(frames: list[Any]) -> None:
    """``check_frame`` for each frame, reporting all failing frames at once."""
    failures = []
    for index, frame in enumerate(frames):
        errors = frame_errors(frame)
        if errors:
            label = None
            if isinstance(frame, dict):
                label = frame.get("event") or frame.get("method") or frame.get("id")
            failures.append(f"frame #{index} ({label}): " + "; ".join(errors))
    if failures:
        raise AssertionError("schema violations:\n  " + "\n  ".join(failures))

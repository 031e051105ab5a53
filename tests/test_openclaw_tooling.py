"""The OpenClaw test tooling itself: schema checks (tests/openclaw_schema.py) and the Node
driver (tests/node/drive.mjs). No gateway needed."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import openclaw_schema
from tests.openclaw_schema import (
    OpenClawSchemaMissing,
    check_frame,
    frame_errors,
    payload_errors,
    request_params_errors,
)

NODE_DIR = Path(__file__).resolve().parent / "node"
RUN = "3f1c9a52-8d0e-4c61-9b7a-2f4e5d6c7b8a"
SESSION = "agent:main:main"


def event(name: str, payload: dict[str, Any], seq: int = 0) -> dict[str, Any]:
    return {"type": "event", "event": name, "payload": payload, "seq": seq}


def chat(state: str, **fields: Any) -> dict[str, Any]:
    return event("chat", {"runId": RUN, "sessionKey": SESSION, "seq": 0, "state": state, **fields})


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}], "timestamp": 1}


HELLO_OK: dict[str, Any] = {
    "type": "res",
    "id": "1:abc",
    "ok": True,
    "payload": {
        "type": "hello-ok",
        "protocol": 4,
        "server": {"version": "0.1.0", "connId": "c-1"},
        "features": {
            "methods": ["chat.send", "chat.abort", "chat.history", "sessions.abort"],
            "events": ["connect.challenge", "tick", "chat", "agent", "runtime.stopped"],
        },
        "snapshot": {
            "presence": [],
            "health": {},
            "stateVersion": {"presence": 0, "health": 0},
            "uptimeMs": 12,
        },
        "auth": {"role": "operator", "scopes": ["operator.read", "operator.write"]},
        "policy": {"maxPayload": 1048576, "maxBufferedBytes": 4194304, "tickIntervalMs": 15000},
    },
}

VALID_FRAMES = {
    "hello-ok": HELLO_OK,
    "challenge": event("connect.challenge", {"nonce": "n-1", "ts": 1700000000000}),
    "tick": event("tick", {"ts": 1700000000000}, seq=1),
    "shutdown": event("shutdown", {"reason": "gateway stopping"}),
    "delta": chat("delta", deltaText="Hel", message=assistant("Hel")),
    "delta-replace": chat("delta", deltaText="Hello", replace=True, message=assistant("Hello")),
    "final": chat("final", message=assistant("Hello."), stopReason="end_turn", usage={"out": 2}),
    "aborted": chat("aborted", message=assistant("Hel"), stopReason="rpc"),
    "aborted-empty": chat("aborted", stopReason="stop-command"),
    "error": chat("error", errorMessage="The model refused.", errorKind="refusal"),
    "agent-start": event(
        "agent",
        {"runId": RUN, "seq": 0, "stream": "lifecycle", "ts": 1, "data": {"phase": "start"}},
    ),
    "agent-text": event(
        "agent",
        {
            "runId": RUN,
            "seq": 1,
            "stream": "assistant",
            "ts": 2,
            "data": {"text": "Hel", "delta": "Hel"},
        },
    ),
    "extension": event("runtime.stopped", {"runId": RUN, "anything": {"goes": True}}),
    "send-result": {
        "type": "res",
        "id": "2:x",
        "ok": True,
        "payload": {"runId": RUN, "status": "started"},
    },
    "error-response": {
        "type": "res",
        "id": "3:x",
        "ok": False,
        "error": {"code": "INVALID_REQUEST", "message": "Unknown method: x."},
    },
    "request": {
        "type": "req",
        "id": "4:x",
        "method": "chat.abort",
        "params": {"sessionKey": SESSION, "runId": RUN},
    },
}


@pytest.mark.parametrize("name", sorted(VALID_FRAMES))
def test_valid_frames_pass(name: str) -> None:
    check_frame(VALID_FRAMES[name])
    assert frame_errors(VALID_FRAMES[name]) == []


def with_payload(frame: dict[str, Any], **changes: Any) -> dict[str, Any]:
    frame = copy.deepcopy(frame)
    frame["payload"].update(changes)
    return frame


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param(
            with_payload(VALID_FRAMES["agent-start"], sessionKey=SESSION),
            "agent: payload: Additional properties are not allowed ('sessionKey' was unexpected)",
            id="agent-with-sessionKey",
        ),
        pytest.param(
            with_payload(VALID_FRAMES["aborted"], usage={"out": 3}),
            "chat/aborted: payload: Additional properties are not allowed ('usage' was unexpected)",
            id="aborted-with-usage",
        ),
        pytest.param(
            with_payload(HELLO_OK, runtime={"version": 1}),
            "hello-ok: payload: Additional properties are not allowed ('runtime' was unexpected)",
            id="hello-ok-extra-key",
        ),
        pytest.param(
            {"type": "res", "id": "3:x", "ok": False, "error": {"code": "INVALID_REQUEST"}},
            "error response: error: 'message' is a required property",
            id="error-without-message",
        ),
        pytest.param(
            chat("delta", message=assistant("Hel")),
            "chat/delta: payload: 'deltaText' is a required property",
            id="delta-without-deltaText",
        ),
        pytest.param(
            chat("error", errorKind="overloaded"),
            "chat/error: payload/errorKind: 'overloaded' is not one of "
            "['refusal', 'timeout', 'rate_limit', 'context_length', 'unknown']",
            id="error-kind-unknown",
        ),
        pytest.param(
            chat("stopped"),
            "chat: payload/state: 'stopped' is not one of "
            "['status', 'delta', 'final', 'aborted', 'error']",
            id="chat-unknown-state",
        ),
        pytest.param(
            event("tick", {"ts": -5}),
            "tick: payload/ts: -5 is less than the minimum of 0",
            id="tick-negative",
        ),
        pytest.param(
            {**VALID_FRAMES["tick"], "seq": "1"},
            "event frame: seq: '1' is not of type 'integer'",
            id="seq-not-integer",
        ),
        pytest.param(
            {"type": "res", "id": "2:x", "ok": False},
            "res frame: <root>: ok is false but there is no 'error'",
            id="error-response-without-error",
        ),
        pytest.param(
            {
                "type": "req",
                "id": "4:x",
                "method": "chat.send",
                "params": {"sessionKey": SESSION, "message": "hi"},
            },
            "chat.send params: params: 'idempotencyKey' is a required property",
            id="chat-send-without-idempotencyKey",
        ),
        pytest.param({"type": "hello"}, "frame: type: 'hello' is not one of", id="bad-type"),
    ],
)
def test_invalid_frames_fail_readably(frame: dict[str, Any], expected: str) -> None:
    errors = frame_errors(frame)
    assert any(e.startswith(expected) for e in errors), errors
    with pytest.raises(AssertionError, match="schema violation"):
        check_frame(frame)


def test_payload_errors() -> None:
    assert payload_errors("TickEvent", {"ts": 1}) == []
    assert payload_errors("ShutdownEvent", {}) == [
        "ShutdownEvent: <root>: 'reason' is a required property"
    ]
    assert payload_errors("hello-ok", HELLO_OK["payload"]) == []
    assert payload_errors("chat", VALID_FRAMES["final"]["payload"]) == []
    assert payload_errors("chat", {**VALID_FRAMES["final"]["payload"], "extra": 1}) == [
        "chat/final: <root>: Additional properties are not allowed ('extra' was unexpected)"
    ]
    assert payload_errors("agent", {"runId": RUN}) == [
        "agent: <root>: 'data' is a required property",
        "agent: <root>: 'seq' is a required property",
        "agent: <root>: 'stream' is a required property",
        "agent: <root>: 'ts' is a required property",
    ]
    assert payload_errors("error", {"code": "", "message": "x"}) == [
        "error response: code: '' should be non-empty"
    ]


def test_request_params() -> None:
    connect = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {
            "id": "gateway-client",
            "version": "0.1.0",
            "platform": "linux",
            "mode": "backend",
        },
        "role": "operator",
        "scopes": ["operator.read", "operator.write"],
        "caps": [],
        "auth": {"token": "t"},
    }
    assert request_params_errors("connect", connect) == []
    bad_client = {**connect, "client": {**connect["client"], "id": "trio-agent"}}
    assert request_params_errors("connect", bad_client)[0].startswith(
        "connect params: client/id: 'trio-agent' is not one of"
    )
    send = {"sessionKey": SESSION, "message": "Hi", "idempotencyKey": RUN, "timeoutMs": 1000}
    assert request_params_errors("chat.send", send) == []
    assert request_params_errors("chat.abort", {"sessionKey": SESSION}) == []
    assert request_params_errors("chat.history", {"sessionKey": SESSION, "limit": 1000}) == []
    assert request_params_errors("chat.history", {"sessionKey": SESSION, "limit": 1001}) == [
        "chat.history params: limit: 1001 is greater than the maximum of 1000"
    ]
    assert request_params_errors("sessions.abort", {"key": SESSION, "clearQueued": True}) == []
    with pytest.raises(KeyError):
        request_params_errors("runtime.status", {})


def test_missing_node_modules_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(openclaw_schema, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(openclaw_schema, "SCHEMA_PATH", tmp_path / "protocol.schema.json")
    openclaw_schema.schema.cache_clear()
    try:
        with pytest.raises(OpenClawSchemaMissing, match=r"npm ci --prefix tests/node"):
            openclaw_schema.schema()
    finally:
        monkeypatch.undo()
        openclaw_schema.schema.cache_clear()
    assert "definitions" in openclaw_schema.schema()


def test_lockfile_pins_the_packages_from_the_npm_registry() -> None:
    package = json.loads((NODE_DIR / "package.json").read_text())
    assert package["dependencies"] == {
        "@openclaw/gateway-client": "2026.9.1",
        "@openclaw/gateway-protocol": "2026.9.1",
    }
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    packages = lock["packages"]
    assert packages["node_modules/@openclaw/gateway-client"]["version"] == "2026.9.1"
    assert packages["node_modules/@openclaw/gateway-protocol"]["version"] == "2026.9.1"
    for path, entry in packages.items():
        resolved = entry.get("resolved")
        assert resolved is None or resolved.startswith("https://registry.npmjs.org/"), path
        assert path == "" or entry.get("integrity", "").startswith("sha512-"), path


def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.fail("node is not on PATH (the gateway tests need Node 20+)")
    return exe


def test_drive_check_resolves_node_and_packages() -> None:
    proc = subprocess.run(
        [node(), str(NODE_DIR / "drive.mjs"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line == {
        "kind": "check",
        "node": line["node"],
        "client": "2026.9.1",
        "protocol": "2026.9.1",
        "protocolVersion": 4,
        "gatewayClient": "function",
    }


def test_drive_rejects_unknown_scenario() -> None:
    proc = subprocess.run(
        [node(), str(NODE_DIR / "drive.mjs"), "no-such-scenario", "--url", "ws://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown or missing scenario" in proc.stderr
    assert "send-abort" in proc.stderr

"""Errors the runtime raises to its callers. Each message is a full sentence naming what
was wrong, fit to show a client as it is."""

from __future__ import annotations


class AgentRuntimeError(Exception):
    """Base of the runtime's own errors."""


class InvalidRequest(AgentRuntimeError, ValueError):
    """The caller asked for something malformed: an empty message, an unknown policy."""


class RunExists(InvalidRequest):
    """A run with this id is live or already recorded: ids are idempotency keys."""

    def __init__(self, run_id: str, *, live: bool):
        state = "is still running" if live else "has already run"
        super().__init__(f"The run {run_id!r} {state}; choose a new run id to start another.")
        self.run_id = run_id
        self.live = live


class RunSessionMismatch(InvalidRequest):
    def __init__(self, run_id: str, session_key: str):
        super().__init__(
            f"runId does not match sessionKey: run {run_id!r} is not in {session_key!r}."
        )


class SessionBusy(AgentRuntimeError):
    """The session rejects new messages while a run is live (concurrency policy
    ``reject``)."""

    def __init__(self, session_key: str, live_run_id: str):
        super().__init__(
            f"The session {session_key!r} is busy with run {live_run_id!r} and its policy "
            "rejects new messages until it ends; stop it or wait."
        )
        self.live_run_id = live_run_id


class SessionElsewhere(SessionBusy):
    """The session's runs live on another process (processes that share a store hold a
    session one at a time, so its history stays in order: see ``AbortBus``).
    ``Runtime.start_run_anywhere`` sends the message there instead."""

    def __init__(self, session_key: str, process_id: str) -> None:
        AgentRuntimeError.__init__(
            self,
            f"The session {session_key!r} has a run in progress on another gateway process "
            f"({process_id}); send there, or once that run has ended.",
        )
        self.live_run_id = ""
        self.process_id = process_id


class AbortRefused(AgentRuntimeError):
    """The run was started with ``allow_cancel=False``: no client may stop it. It still
    ends by itself, at its run timeout, or when the runtime shuts down."""

    def __init__(self, run_id: str):
        super().__init__(
            f"The run {run_id!r} was started with allowCancel false, so it cannot be "
            "stopped; it ends by itself, at its timeout, or when the server shuts down."
        )
        self.run_id = run_id


class RuntimeClosing(AgentRuntimeError):
    """The runtime is shutting down and admits no new run."""

    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down and accepts no new runs; send the message again "
            "once it is back."
        )

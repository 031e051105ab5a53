"""``chat.history``: the session's messages and where its live run stands, in OpenClaw's words.

A reconnecting client reads one answer and knows exactly where it is:

- ``inFlightRun`` ``{runId, text, seq}``: the live run's reply so far and the per-run
  ``seq`` of the last event that text reflects. The client applies only the ``chat`` and
  ``agent`` events of that run with a higher ``seq``.
- ``sessionInfo`` ``{hasActiveRun, activeRunIds}``: the run under way (those waiting
  behind it are not active; they are ``pendingInputs``).
- ``pendingInputs`` ``{items, total}``: messages admitted but waiting behind the live run,
  each ``{id, runId, message, acceptedAt, state: "queued"}``.
- ``deltaCursor``: pass it back as ``cursor`` to get only the messages added since
  (``kind: "delta"``), or ``kind: "reset"`` when history changed in a way a delta cannot
  say (a rollback removed a message the client has, or more than ``limit`` were added).

The cursor names the newest stored message by a digest of it, so the server keeps no
state per client; a delta read looks for it among the newest ``limit + 1`` messages.

Everything about the live runs is read at one instant, after the stored messages were
read: here with no await, or on the process that holds the session, which answers with
snapshots taken at once (``Runtime.live_runs_anywhere``). A run whose result reached the
store in between (its commit landed while its task had not yet resumed) is left out of
``inFlightRun``: its messages are in ``messages`` already, and its terminal event follows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Final

from runtime import Message, RunSnapshot, converter

from ._protocol import invalid
from ._translate import visible

CURSOR_PREFIX: Final = "h1:"
PENDING_INPUTS_SHOWN: Final = 20  # OpenClaw's schema allows at most 20 items


def message_digest(message: Message) -> str:
    doc = converter.unstructure(message, Message)
    encoded = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:24]


def cursor_after(stored: Sequence[Message]) -> str:
    """The cursor that names the newest of ``stored`` (the whole read, hidden ones too)."""
    return CURSOR_PREFIX + (message_digest(stored[-1]) if stored else "")


def messages_since(cursor: str, stored: Sequence[Message], limit: int) -> list[Message] | None:
    """The stored messages after the one ``cursor`` names, or None: reset.

    ``stored`` is the newest ``limit + 1`` messages, so finding the cursor among them
    means at most ``limit`` came after it, and a read shorter than ``limit + 1`` is the
    whole session (an empty cursor then asks for all of it).
    """
    if not cursor.startswith(CURSOR_PREFIX):
        raise invalid(
            "params.cursor is not a cursor of this gateway; pass the deltaCursor of an "
            "earlier chat.history answer, or leave it out to read the history afresh."
        )
    digest = cursor[len(CURSOR_PREFIX) :]
    if not digest:
        return list(stored) if len(stored) <= limit else None
    for index in range(len(stored) - 1, -1, -1):
        if message_digest(stored[index]) == digest:
            return list(stored[index + 1 :])
    return None


def _committed(run_id: str, stored: Sequence[Message]) -> bool:
    """Whether the run's result is in ``stored`` already (a commit writes the replies;
    only the prompt is written before it)."""
    return any(m.meta.get("run_id") == run_id and m.role != "user" for m in stored)


def live_state(runs: Sequence[RunSnapshot], stored: Sequence[Message]) -> dict[str, Any]:
    """``sessionInfo``, ``pendingInputs`` and ``inFlightRun`` of a session's live runs
    (``Runtime.live_runs_anywhere(key)``, read after the messages)."""
    # A session runs one run at a time, in admission order: the first is under way (or
    # about to start, its task not yet scheduled), the others wait behind it.
    active, queued = list(runs[:1]), list(runs[1:])
    fields: dict[str, Any] = {
        "sessionInfo": {
            "hasActiveRun": bool(active),
            "activeRunIds": [r.run_id for r in active],
        },
        "pendingInputs": {
            "items": [_pending(r) for r in queued[:PENDING_INPUTS_SHOWN]],
            "total": len(queued),
        },
    }
    if active and not _committed(active[0].run_id, stored):
        fields["inFlightRun"] = {
            "runId": active[0].run_id,
            "text": active[0].text,
            "seq": active[0].seq,
        }
    return fields


def _pending(run: RunSnapshot) -> dict[str, Any]:
    accepted = int(run.accepted_at * 1000)
    return {
        "id": run.run_id,
        "runId": run.run_id,
        "message": {
            "role": "user",
            "content": [{"type": "text", "text": run.prompt}],
            "timestamp": accepted,
        },
        "acceptedAt": accepted,
        "state": "queued",
    }


def visible_messages(stored: Sequence[Message], limit: int) -> list[dict[str, Any]]:
    return visible(list(stored[-limit:]))

"""How messages and run records are kept in a row, for the SQL stores alike: JSON text
written with the runtime's converter, read back into the same values."""

from __future__ import annotations

import json
from collections.abc import Iterable

import attrs

from runtime import Message, RunRecord, converter


def message_body(message: Message) -> str:
    return json.dumps(converter.unstructure(message, Message))


def message_from(body: str) -> Message:
    return converter.structure(json.loads(body), Message)


def record_body(record: RunRecord) -> str:
    """The record without its checkpoint, which is kept in fragments of its own."""
    return json.dumps(converter.unstructure(attrs.evolve(record, checkpoint=None)))


def record_from(
    run_id: str, session_key: str, status: str, body: str, fragments: Iterable[str | None]
) -> RunRecord:
    """A record from its row and its checkpoint fragments, in order. A body that cannot
    be read (a corrupt row, a format this version does not know) still gives a record,
    from the row's own columns, so that recovery can close that run rather than refuse to
    start."""
    checkpoint = "\n".join(f for f in fragments if f) or None
    try:
        record = converter.structure(json.loads(body), RunRecord)
    except Exception as exc:
        error = f"This run's record could not be read ({exc}); only its ids were kept."
        record = RunRecord(
            run_id=run_id,
            session_key=session_key,
            status=status,  # type: ignore[arg-type]
            started_at=0.0,
            error=error,
        )
    return attrs.evolve(record, checkpoint=checkpoint)

"""Ready-made ``on_cancelled`` hooks."""

from __future__ import annotations

import time
from typing import Any

from ._history import Message, TextBlock

STOPPED_NOTE = "[The user stopped the previous reply before it was finished.]"


def note_stopped_by_user(run: Any, pending_items: list[Message], context: Any) -> list[Message]:
    """Add a hidden user-role note after a kept partial, so the model's next turn knows
    the reply was cut short by the user rather than finished. A transcript skips messages
    whose ``meta`` has ``hidden``."""
    if not pending_items:
        return pending_items
    note = Message(
        "user", (TextBlock(STOPPED_NOTE),), time.time(), {"run_id": run.run_id, "hidden": True}
    )
    return [*pending_items, note]

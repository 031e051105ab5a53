"""Schema migrations, shipped with the package and run when a store opens.

Each store keeps its schema's version in a one-row table, ``schema_version``. The
migrations are SQL files, ``migrations/<dialect>/NNNN_name.sql``, numbered from 1 without
gaps; opening a store applies, in one transaction, every migration above the version
found, then records the new version. A database whose version is above the newest this
release knows was written by a newer release: it is refused, never changed.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Literal, final

import attrs

Dialect = Literal["sqlite", "postgres"]

CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
)


@final
@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


class SchemaTooNew(Exception):
    """The database was written by a newer release; the message says what to do."""


def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """The dialect's migrations in order, checked to be numbered 1, 2, 3, ..."""
    folder = resources.files("adapters") / "migrations" / dialect
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"The {dialect} migrations are not numbered 1, 2, 3, ...: a bug.")
    return tuple(found)


def pending(dialect: Dialect, current: int, where: str) -> tuple[Migration, ...]:
    """The migrations to apply to a database at version ``current``."""
    known = migrations(dialect)
    if current > len(known):
        raise SchemaTooNew(
            f"{where} has schema version {current}, newer than this release knows "
            f"({len(known)}): it was written by a newer trio-agent-runtime. Upgrade this "
            "one, or point it at another database."
        )
    return known[current:]


def latest(dialect: Dialect) -> int:
    return len(migrations(dialect))

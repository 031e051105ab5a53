"""Which Store a ``--db`` value names: a ``postgresql://`` URL is PostgreSQL (shared by
several processes), anything else a SQLite file (the single-process default)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

from adapters.postgres_store import PostgresStore, is_postgres_url
from adapters.sqlite_store import SQLiteStore
from runtime import Store


def open_store(db: str | Path) -> AbstractAsyncContextManager[Store]:
    """The store for ``db``, to be entered with ``async with``."""
    if isinstance(db, str) and is_postgres_url(db):
        return PostgresStore(db)
    return SQLiteStore(Path(db))


def describe(db: str | Path) -> str:
    """``db`` for a log line or a banner: a URL without its password."""
    if isinstance(db, str) and is_postgres_url(db):
        return PostgresStore(db).where.removeprefix("The ")
    return str(db)

"""What only the SQLite store does; the behaviours every store shares are in
test_store_contract.py, which runs on SQLite too."""

from __future__ import annotations

import sqlite3

from adapters._migrations import latest
from adapters.sqlite_store import SQLiteStore
from runtime import Message, RunRecord, TextBlock

# The schema of the releases before migrations were numbered (no schema_version table).
UNVERSIONED = """
CREATE TABLE sessions (key TEXT PRIMARY KEY, stop_policy TEXT NOT NULL DEFAULT 'keep_partial',
    concurrency TEXT NOT NULL DEFAULT 'enqueue', updated_at REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_key TEXT NOT NULL,
    run_id TEXT, body TEXT NOT NULL);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, session_key TEXT NOT NULL, status TEXT NOT NULL,
    body TEXT NOT NULL, checkpoint TEXT);
CREATE TABLE checkpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
    fragment TEXT NOT NULL);
"""


async def test_a_database_from_before_migrations_is_adopted_and_migrated(tmp_path) -> None:
    path = tmp_path / "old.db"
    async with SQLiteStore(path) as store:  # written by this release: one message
        record = RunRecord(run_id="r1", session_key="s", status="running", started_at=0)
        await store.begin_run(record, Message("user", (TextBlock("hi"),), 0, {"run_id": "r1"}))
    with sqlite3.connect(path) as old:  # made to look like an unversioned database
        old.execute("DROP TABLE schema_version")
        old.execute("DROP INDEX sessions_by_activity")
    old.close()
    async with SQLiteStore(path) as store:
        assert [m.text for m in await store.history("s")] == ["hi"]
        assert [r.run_id for r in await store.running_runs()] == ["r1"]
    with sqlite3.connect(path) as check:
        versions = check.execute("SELECT version FROM schema_version").fetchall()
        assert versions == [(latest("sqlite"),)]
        indexes = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
    check.close()
    assert "sessions_by_activity" in indexes


async def test_an_empty_file_gets_every_migration(tmp_path) -> None:
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as fresh:
        fresh.executescript(UNVERSIONED)
    fresh.close()
    async with SQLiteStore(path) as store:
        assert await store.sessions() == []
    with sqlite3.connect(path) as check:
        versions = check.execute("SELECT version FROM schema_version").fetchall()
        assert versions == [(latest("sqlite"),)]
    check.close()

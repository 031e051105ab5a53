-- Version 1: the schema the SQLite store had before migrations were numbered. Every
-- statement says IF NOT EXISTS, so a database made by an older release (which has these
-- tables and no schema_version) is brought to version 1 unchanged.
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    stop_policy TEXT NOT NULL DEFAULT 'keep_partial',
    concurrency TEXT NOT NULL DEFAULT 'enqueue',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key TEXT NOT NULL,
    run_id TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_key, id);
CREATE INDEX IF NOT EXISTS messages_by_run ON messages (run_id);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    session_key TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    checkpoint TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    fragment TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_run ON checkpoints (run_id, id);

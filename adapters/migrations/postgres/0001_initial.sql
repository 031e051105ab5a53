-- Version 1: the same tables as the SQLite store's. Bodies are JSON kept as text, so a
-- message reads back byte for byte as it was written.
CREATE TABLE sessions (
    key TEXT PRIMARY KEY,
    stop_policy TEXT NOT NULL DEFAULT 'keep_partial',
    concurrency TEXT NOT NULL DEFAULT 'enqueue',
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX sessions_by_activity ON sessions (updated_at);
CREATE TABLE messages (
    id BIGSERIAL PRIMARY KEY,
    session_key TEXT NOT NULL,
    run_id TEXT,
    body TEXT NOT NULL
);
CREATE INDEX messages_by_session ON messages (session_key, id);
CREATE INDEX messages_by_run ON messages (run_id);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    session_key TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX runs_running ON runs (run_id) WHERE status = 'running';
CREATE TABLE checkpoints (
    id BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL,
    fragment TEXT NOT NULL
);
CREATE INDEX checkpoints_by_run ON checkpoints (run_id, id);

-- Version 2: sessions() lists sessions most recently active first; an index for it.
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (updated_at);

-- The ledger: one row per chat request that reached a model (see src/ledger).
-- The same SQL for SQLite and PostgreSQL: BIGINT and DOUBLE PRECISION are SQLite's
-- INTEGER and REAL by affinity.
CREATE TABLE IF NOT EXISTS requests (
    -- sluice's own id for the record (a request's x-request-id may come from its client).
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    -- When the request arrived: microseconds since 1970-01-01 UTC.
    at_us BIGINT NOT NULL,
    -- The instance that served it (its host name and process id).
    instance TEXT NOT NULL,
    -- The key's name (sluice with no keys: the client's address), and its team.
    key_name TEXT NOT NULL,
    team TEXT,
    -- The HTTP route, the model asked for, the name it was served as, and where.
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    served_model TEXT,
    target TEXT,
    -- The client's API: openai, anthropic, sluice.
    api TEXT NOT NULL,
    stream_id TEXT,
    -- completed, cancelled, timed_out, upstream_error, shutdown; and the error, if any.
    outcome TEXT NOT NULL,
    error TEXT,
    input_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    -- USD; NULL when the model has no price.
    cost_usd DOUBLE PRECISION,
    ttft_ms DOUBLE PRECISION,
    duration_ms DOUBLE PRECISION NOT NULL,
    trace_id TEXT
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at_us, id);
CREATE INDEX IF NOT EXISTS requests_key_at ON requests (key_name, at_us);

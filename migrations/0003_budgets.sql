-- Teams, and budgets for keys and teams (src/ledger/keys.rs, src/admission/budget.rs).
-- A budget is USD or tokens (or both) per calendar period in UTC: day, week, month or
-- total. NULL: none.
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    rpm BIGINT,
    tpm BIGINT,
    max_streams BIGINT,
    budget_usd DOUBLE PRECISION,
    budget_tokens BIGINT,
    budget_period TEXT,
    disabled BIGINT NOT NULL,
    metadata TEXT,
    deleted_at_us BIGINT,
    created_us BIGINT NOT NULL,
    updated_us BIGINT NOT NULL
);
ALTER TABLE api_keys ADD COLUMN team_id TEXT;
ALTER TABLE api_keys ADD COLUMN budget_usd DOUBLE PRECISION;
ALTER TABLE api_keys ADD COLUMN budget_tokens BIGINT;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT;
-- Revoked with ?end_streams=true: its open streams end, on every instance.
ALTER TABLE api_keys ADD COLUMN end_streams BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS requests_team_at ON requests (team, at_us);

-- Keys made through the admin API (src/ledger/keys.rs): only a digest of each secret.
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- SHA-256 of the secret, hex; and the secret's first characters, to recognise it.
    digest TEXT NOT NULL,
    prefix TEXT NOT NULL,
    -- The secret before the last rotation, and until when it still works (microseconds
    -- since 1970).
    previous_digest TEXT,
    previous_until_us BIGINT,
    -- Limits; NULL: sluice's defaults.
    rpm BIGINT,
    tpm BIGINT,
    max_streams BIGINT,
    -- JSON array of the model names the key may use; NULL: every model.
    models TEXT,
    expires_at_us BIGINT,
    disabled BIGINT NOT NULL,
    -- JSON object, the operator's own.
    metadata TEXT,
    revoked_at_us BIGINT,
    created_us BIGINT NOT NULL,
    updated_us BIGINT NOT NULL
);

-- Gateway keys: clients authenticate with a key, and each call records
-- which key made it (its id and name, never the key). The store keeps a
-- key's SHA-256 hash and a short prefix only. Portable SQL: times are unix
-- milliseconds, lists are JSON text, booleans are 0/1.
ALTER TABLE calls ADD COLUMN key_id TEXT;
ALTER TABLE calls ADD COLUMN key_name TEXT;

-- A key's spend in its budget period, and reports by key.
CREATE INDEX calls_key_created_at ON calls (key_id, created_at);

CREATE TABLE gateway_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL,
    tasks TEXT,
    models TEXT,
    budget_usd DOUBLE PRECISION,
    budget_period TEXT,
    rpm BIGINT,
    tpm BIGINT,
    expires_at BIGINT,
    admin BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE UNIQUE INDEX gateway_keys_hash ON gateway_keys (hash);
-- Two usable keys cannot share a name (reports group by it); a revoked
-- key's name can be given to its replacement.
CREATE UNIQUE INDEX gateway_keys_active_name ON gateway_keys (name) WHERE revoked_at IS NULL;

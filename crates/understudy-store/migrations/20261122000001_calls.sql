-- Every call the gateway served or imported. Portable SQL: it runs unchanged
-- on SQLite and Postgres. Times are unix milliseconds, JSON bodies are text.
CREATE TABLE calls (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    task TEXT,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    stream BIGINT NOT NULL,
    request TEXT NOT NULL,
    response TEXT,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    usage_source TEXT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    ttft_ms DOUBLE PRECISION,
    status BIGINT NOT NULL,
    error TEXT,
    cost DOUBLE PRECISION NOT NULL
);

CREATE INDEX calls_task_created_at ON calls (task, created_at);
CREATE INDEX calls_created_at ON calls (created_at);
CREATE INDEX calls_model_created_at ON calls (model, created_at);

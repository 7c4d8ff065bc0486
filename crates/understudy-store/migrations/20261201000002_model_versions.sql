-- Trained understudies: one row per training run that finished. The weights
-- live in files under `path`; this table is the registry a task's understudy
-- is chosen from. Portable SQL: times are unix milliseconds, JSON is text.
CREATE TABLE model_versions (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    method TEXT NOT NULL,
    base_model TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    wall_seconds DOUBLE PRECISION NOT NULL,
    metrics TEXT NOT NULL
);

CREATE INDEX model_versions_task_created_at ON model_versions (task, created_at);

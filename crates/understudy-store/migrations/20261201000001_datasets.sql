-- Dataset versions built from a task's calls. The rows live in files under
-- `path`; this table is the registry. `id` is a content hash, so building the
-- same rows with the same parameters registers nothing new. Portable SQL:
-- times are unix milliseconds, JSON is text.
CREATE TABLE datasets (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    labels TEXT NOT NULL,
    n_train BIGINT NOT NULL,
    n_validation BIGINT NOT NULL,
    n_test BIGINT NOT NULL,
    parameters TEXT NOT NULL,
    path TEXT NOT NULL
);

CREATE INDEX datasets_task_created_at ON datasets (task, created_at);

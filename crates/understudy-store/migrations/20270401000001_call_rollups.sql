-- Daily totals of the calls table, per task, model, endpoint and gateway key:
-- what the ledger, the cost reports and the dashboard read, so that they stay
-- fast however long the log grows, and stay true after old calls are pruned.
-- The recorder adds each batch's totals in the transaction that writes the
-- batch (src/rollups.rs holds the one rule for each total). Names that a call
-- may lack (task, key) are '' here: a primary key column cannot be NULL.
CREATE TABLE call_rollups (
    day BIGINT NOT NULL,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_name TEXT NOT NULL,
    n_calls BIGINT NOT NULL,
    n_errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost DOUBLE PRECISION NOT NULL,
    n_understudy BIGINT NOT NULL,
    n_compared BIGINT NOT NULL,
    n_agreed BIGINT NOT NULL,
    understudy_cost DOUBLE PRECISION NOT NULL,
    lead_cost_avoided DOUBLE PRECISION NOT NULL,
    n_audited BIGINT NOT NULL,
    n_audit_agreed BIGINT NOT NULL,
    audit_cost DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day, task, model, endpoint, key_id, key_name)
);

-- One row while the calls stored before this migration are not yet counted:
-- the first Store::connect after it adds them (in Rust, with the same rules
-- as every later batch) and deletes the row in the same transaction.
CREATE TABLE call_rollups_backfill (pending BIGINT NOT NULL);
INSERT INTO call_rollups_backfill (pending) VALUES (1);

-- How far retention got: the bodies of calls created before `up_to` are
-- cleared already, so each pass looks only at calls that aged since.
CREATE TABLE retention_marks (
    what TEXT PRIMARY KEY,
    up_to BIGINT NOT NULL
);

-- Lists are ordered by (created_at, id), newest or oldest first, a page at a
-- time: with id in the index the first page is read straight off it. Without
-- it, both backends sorted every matching call for a page of 50 (24 s on 10M
-- calls in SQLite, bench/dashboard).
DROP INDEX calls_created_at;
DROP INDEX calls_task_created_at;
DROP INDEX calls_model_created_at;
CREATE INDEX calls_created_at_id ON calls (created_at, id);
CREATE INDEX calls_task_created_at_id ON calls (task, created_at, id);
CREATE INDEX calls_model_created_at_id ON calls (model, created_at, id);

-- Failed calls, newest first, are what an operator looks at; they are a few
-- per cent of the calls, so their own small index finds a page of them
-- without reading the successes (the condition is the one `status = error`
-- filters with, so both backends see the index applies).
CREATE INDEX calls_failed ON calls (created_at, id) WHERE (status < 200 OR status >= 300 OR error IS NOT NULL);

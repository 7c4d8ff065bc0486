-- Routing between a task's lead and its understudy. Each call of a routed task
-- says which model served it and why; policy_changes is the history of
-- `understudy promote`, newest row per task current. Portable SQL.
ALTER TABLE calls ADD COLUMN policy TEXT;
ALTER TABLE calls ADD COLUMN served_by TEXT;
ALTER TABLE calls ADD COLUMN fallback_reason TEXT;
ALTER TABLE calls ADD COLUMN understudy_model TEXT;
ALTER TABLE calls ADD COLUMN understudy_answer TEXT;
ALTER TABLE calls ADD COLUMN understudy_confidence DOUBLE PRECISION;
ALTER TABLE calls ADD COLUMN understudy_latency_ms DOUBLE PRECISION;
ALTER TABLE calls ADD COLUMN understudy_cost DOUBLE PRECISION;
ALTER TABLE calls ADD COLUMN agreement BIGINT;
ALTER TABLE calls ADD COLUMN lead_cost_avoided DOUBLE PRECISION;

CREATE TABLE policy_changes (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    policy TEXT NOT NULL,
    understudy TEXT,
    understudy_path TEXT,
    created_at BIGINT NOT NULL,
    note TEXT
);

CREATE INDEX policy_changes_task ON policy_changes (task, id);

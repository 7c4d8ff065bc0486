-- Live audits: a share of the calls the understudy served are also asked of
-- the lead, in the background. The lead's answer is kept beside the served
-- one (never served), with their agreement and what the audit cost.
ALTER TABLE calls ADD COLUMN audit_answer TEXT;
ALTER TABLE calls ADD COLUMN audit_agreement BIGINT;
ALTER TABLE calls ADD COLUMN audit_cost DOUBLE PRECISION;

CREATE INDEX calls_task_audit ON calls (task, created_at, audit_agreement);

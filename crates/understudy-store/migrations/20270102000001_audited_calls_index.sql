-- The guardrail's tally reads the audited calls of a task since a time.
-- Only audited calls need to be in that index (a few per cent of them): an
-- index over every call cost each write one more B-tree insert, and its
-- (task, created_at) prefix only repeated calls_task_created_at.
DROP INDEX calls_task_audit;
CREATE INDEX calls_task_audited ON calls (task, created_at) WHERE audit_agreement IS NOT NULL;

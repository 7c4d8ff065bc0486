-- Users' verdicts on recorded calls' answers. Every verdict is kept; the
-- newest row of a call (by created_at, then id) is the one that counts.
-- No foreign key to calls: feedback may arrive while its call's record is
-- still in the recorder's queue. Portable SQL: times are unix
-- milliseconds, the score is 1 (positive) or -1 (negative).
CREATE TABLE feedback (
    id TEXT PRIMARY KEY,
    call_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    score BIGINT NOT NULL,
    comment TEXT
);

CREATE INDEX feedback_call_id ON feedback (call_id, created_at);

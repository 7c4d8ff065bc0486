-- The autopilot's history: every transition of a task's state machine, with
-- the reason and its evidence (JSON text). The newest row of a task is where
-- its autopilot stands, so a restarted autopilot resumes from here. Portable SQL.
CREATE TABLE autopilot_events (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    stage_from TEXT NOT NULL,
    stage_to TEXT NOT NULL,
    reason TEXT NOT NULL,
    evidence TEXT NOT NULL
);

CREATE INDEX autopilot_events_task ON autopilot_events (task, id);

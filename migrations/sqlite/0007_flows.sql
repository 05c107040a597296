-- Flows (README, "Flows"): steps with execute and revert, each a request row.
-- Every new column has a default, so an INSERT naming only flow_name works.

CREATE TABLE IF NOT EXISTS task_runner_flows (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at          DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- the flow's name in the config (or a task-sdk program's --list-flows)
    flow_name           TEXT NOT NULL,
    -- YAML: the store at the start
    options             TEXT,
    -- NULL until a daemon takes it; then RUNNING, REVERTING, FINISHED,
    -- REVERTED, FAILED (a revert was exhausted) or CANCELLED
    state               TEXT,
    -- 1 for the first run; each restart after a full revert (retry.times) adds one
    attempt             INTEGER NOT NULL DEFAULT 0,
    -- index (from 0) of the step whose execute or revert is the current row
    current_step        INTEGER,
    -- YAML: the options, plus what each step provided
    store               TEXT,
    -- YAML: the steps as they were when the flow started
    definition          TEXT,
    finished_at         DATETIME,
    result_text         TEXT,
    -- `flow cancel`: no restart after this; with --revert the finished steps are reverted
    cancel_requested_at DATETIME
);

-- Flows not final yet, for the daemon's start and repair pass.
CREATE INDEX IF NOT EXISTS task_runner_flows_open
    ON task_runner_flows (id)
    WHERE state IS NULL OR state IN ('RUNNING', 'REVERTING');

-- the flow whose step this request runs, which step (from 0), and
-- whether it is the step's execute or its revert
ALTER TABLE task_runner_requests ADD COLUMN flow_id INTEGER;
ALTER TABLE task_runner_requests ADD COLUMN flow_step INTEGER;
ALTER TABLE task_runner_requests ADD COLUMN flow_action TEXT;

-- Steps of a flow, for the step machine and the board.
CREATE INDEX IF NOT EXISTS task_runner_requests_flow
    ON task_runner_requests (flow_id)
    WHERE flow_id IS NOT NULL;

-- Flows (README, "Flows"): steps with execute and revert, each a request row.
-- Every new column has a default, so an INSERT naming only flow_name works.

CREATE TABLE IF NOT EXISTS task_runner_flows (
    id                  BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    created_at          DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- the flow's name in the config (or a task-sdk program's --list-flows)
    flow_name           VARCHAR(255) NOT NULL,
    -- YAML: the store at the start
    options             MEDIUMTEXT,
    -- NULL until a daemon takes it; then RUNNING, REVERTING, FINISHED,
    -- REVERTED, FAILED (a revert was exhausted) or CANCELLED
    state               VARCHAR(255),
    -- 1 for the first run; each restart after a full revert (retry.times) adds one
    attempt             INTEGER NOT NULL DEFAULT 0,
    -- index (from 0) of the step whose execute or revert is the current row
    current_step        INTEGER,
    -- YAML: the options, plus what each step provided
    store               MEDIUMTEXT,
    -- YAML: the steps as they were when the flow started
    definition          MEDIUMTEXT,
    finished_at         DATETIME(6),
    result_text         MEDIUMTEXT,
    -- `flow cancel`: no restart after this; with --revert the finished steps are reverted
    cancel_requested_at DATETIME(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Flows not final yet, for the daemon's start and repair pass.
CREATE INDEX task_runner_flows_open
    ON task_runner_flows (state, id);

ALTER TABLE task_runner_requests
    -- the flow whose step this request runs, which step (from 0), and
    -- whether it is the step's execute or its revert
    ADD COLUMN flow_id BIGINT,
    ADD COLUMN flow_step INTEGER,
    ADD COLUMN flow_action VARCHAR(255);

-- Steps of a flow, for the step machine and the board.
CREATE INDEX task_runner_requests_flow
    ON task_runner_requests (flow_id);

-- A flow inserted by any means is noticed by the daemons' wake-up check
-- (its newest id), which takes it: MySQL has no NOTIFY.

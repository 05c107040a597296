-- Pauses: a queue or a task type whose pending rows no daemon claims until
-- it is resumed (`taskrunner-cli pause` / `resume`, or plain SQL). Tries
-- already claimed run to their end; rows are still enqueued, released and
-- listed. Each daemon reads this table at most once a second, before a
-- claim (README, "Pausing a queue or a task type").
CREATE TABLE IF NOT EXISTS task_runner_pauses (
    -- 'queue' or 'task'
    kind       VARCHAR(8) NOT NULL CHECK (kind IN ('queue', 'task')),
    -- the queue's or the task type's name
    name       VARCHAR(255) NOT NULL,
    paused_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- why, for the people who read `status` and the web page
    reason     TEXT,
    PRIMARY KEY (kind, name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

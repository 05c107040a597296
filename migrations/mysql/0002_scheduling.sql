-- Scheduling: queues, nodes, periodic rows, unique requests, cron slots.
-- Every new column has a default, so an INSERT naming only task_class_name works.
ALTER TABLE task_runner_requests
    ADD COLUMN queue VARCHAR(255) NOT NULL DEFAULT 'default',
    -- run only on the daemon of this node name / never there
    ADD COLUMN node VARCHAR(255),
    ADD COLUMN not_node VARCHAR(255),
    -- seconds; when a try ends (success or exhausted) the next occurrence is inserted
    ADD COLUMN period INTEGER,
    -- this occurrence's planned start; retries never rewrite it
    ADD COLUMN planned_at DATETIME(6),
    -- at most one pending or running request per key
    ADD COLUMN unique_key VARCHAR(255),
    -- the config schedule that enqueued it, if any
    ADD COLUMN schedule VARCHAR(255),
    -- Without partial indexes: the key while the request is pending or
    -- running, NULL otherwise; its unique index is the uniqueness rule, which
    -- `INSERT … ON DUPLICATE KEY UPDATE id = id` honours.
    ADD COLUMN active_unique_key VARCHAR(255) AS (
        CASE WHEN unique_key IS NOT NULL
              AND (result IS NULL OR result = 'RUNNING'
                   OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit))
             THEN unique_key END) STORED;

CREATE UNIQUE INDEX task_runner_requests_unique_key
    ON task_runner_requests (active_unique_key);

-- Running rows by type, for per-type concurrency limits.
CREATE INDEX task_runner_requests_running_by_type
    ON task_runner_requests (result, task_class_name);

-- One row per cron slot enqueued: the primary key makes each slot happen
-- exactly once, however many daemons share the database.
CREATE TABLE IF NOT EXISTS task_runner_schedule_slots (
    schedule   VARCHAR(255) NOT NULL,
    slot       DATETIME(6) NOT NULL,
    request_id BIGINT,
    PRIMARY KEY (schedule, slot)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

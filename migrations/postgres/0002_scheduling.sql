-- Scheduling: queues, nodes, periodic rows, unique requests, cron slots.
-- Every new column has a default, so an INSERT naming only task_class_name works.
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS queue TEXT NOT NULL DEFAULT 'default';
-- run only on the daemon of this node name / never there
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS node TEXT;
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS not_node TEXT;
-- seconds; when a try ends (success or exhausted) the next occurrence is inserted
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS period INTEGER;
-- this occurrence's planned start; retries never rewrite it
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS planned_at TIMESTAMPTZ;
-- at most one pending or running request per key
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS unique_key TEXT;
-- the config schedule that enqueued it, if any
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS schedule TEXT;

CREATE UNIQUE INDEX IF NOT EXISTS task_runner_requests_unique_key
    ON task_runner_requests (unique_key)
    WHERE unique_key IS NOT NULL
      AND (result IS NULL OR result = 'RUNNING'
           OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit));

-- Running rows by type, for per-type concurrency limits.
CREATE INDEX IF NOT EXISTS task_runner_requests_running_by_type
    ON task_runner_requests (task_class_name)
    WHERE result = 'RUNNING';

-- One row per cron slot enqueued: the primary key makes each slot happen
-- exactly once, however many daemons share the database.
CREATE TABLE IF NOT EXISTS task_runner_schedule_slots (
    schedule   TEXT NOT NULL,
    slot       TIMESTAMPTZ NOT NULL,
    request_id BIGINT,
    PRIMARY KEY (schedule, slot)
);

-- Tell waiters (taskrunner-cli wait) when a request reaches a final state.
CREATE OR REPLACE FUNCTION task_runner_requests_notify_result() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('task_runner_results', NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS task_runner_requests_notify_result ON task_runner_requests;
CREATE TRIGGER task_runner_requests_notify_result
AFTER UPDATE OF result ON task_runner_requests
FOR EACH ROW
WHEN (NEW.result IS DISTINCT FROM OLD.result AND NEW.result IS DISTINCT FROM 'RUNNING')
EXECUTE FUNCTION task_runner_requests_notify_result();

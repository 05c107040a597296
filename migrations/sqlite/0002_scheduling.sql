-- Scheduling: queues, nodes, periodic rows, unique requests, cron slots.
-- Every new column has a default, so an INSERT naming only task_class_name works.
ALTER TABLE task_runner_requests ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
-- run only on the daemon of this node name / never there
ALTER TABLE task_runner_requests ADD COLUMN node TEXT;
ALTER TABLE task_runner_requests ADD COLUMN not_node TEXT;
-- seconds; when a try ends (success or exhausted) the next occurrence is inserted
ALTER TABLE task_runner_requests ADD COLUMN period INTEGER;
-- this occurrence's planned start; retries never rewrite it
ALTER TABLE task_runner_requests ADD COLUMN planned_at DATETIME;
-- at most one pending or running request per key
ALTER TABLE task_runner_requests ADD COLUMN unique_key TEXT;
-- the config schedule that enqueued it, if any
ALTER TABLE task_runner_requests ADD COLUMN schedule TEXT;

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
    slot       DATETIME NOT NULL,
    request_id INTEGER,
    PRIMARY KEY (schedule, slot)
);

DROP TRIGGER IF EXISTS task_runner_requests_normalise_update;
CREATE TRIGGER task_runner_requests_normalise_update
AFTER UPDATE OF delay_until, planned_at ON task_runner_requests
WHEN (NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NOT NULL
      AND NEW.delay_until IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until))
  OR (NEW.planned_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NOT NULL
      AND NEW.planned_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at))
BEGIN
    UPDATE task_runner_requests
       SET delay_until = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until), NEW.delay_until),
           planned_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at), NEW.planned_at)
     WHERE id = NEW.id;
END;

DROP TRIGGER IF EXISTS task_runner_requests_normalise_insert;
CREATE TRIGGER task_runner_requests_normalise_insert
AFTER INSERT ON task_runner_requests
WHEN (NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NOT NULL
      AND NEW.delay_until IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until))
  OR (strftime('%Y-%m-%d %H:%M:%f', NEW.created_at) IS NOT NULL
      AND NEW.created_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.created_at))
  OR (NEW.planned_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NOT NULL
      AND NEW.planned_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at))
BEGIN
    UPDATE task_runner_requests
       SET delay_until = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until), NEW.delay_until),
           created_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.created_at), NEW.created_at),
           planned_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at), NEW.planned_at)
     WHERE id = NEW.id;
END;

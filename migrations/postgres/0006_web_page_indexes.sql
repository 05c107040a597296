-- Indexes for the web page and the metrics, so that each of their queries
-- reads a bounded number of index entries at a million rows.

-- Requests by state, by type and by queue, newest first (the requests page).
CREATE INDEX IF NOT EXISTS task_runner_requests_by_result
    ON task_runner_requests (result, id);
CREATE INDEX IF NOT EXISTS task_runner_requests_by_type
    ON task_runner_requests (task_class_name, id);
CREATE INDEX IF NOT EXISTS task_runner_requests_by_queue
    ON task_runner_requests (queue, id);

-- Rows that are not final (waiting, running, failed, exhausted), per queue
-- and type, covering what the overview and the metrics count. Partial, so
-- that a million finished rows cost it nothing.
CREATE INDEX IF NOT EXISTS task_runner_requests_open
    ON task_runner_requests (queue, task_class_name, result, tries, try_limit)
    WHERE result IS NULL OR result NOT IN ('FINISHED', 'CANCELLED', 'REJECTED');

-- Runnable rows per queue in id order: the lag of a queue is the age of its
-- first one. The predicate is the runnable rule, written as in migration 0003.
CREATE INDEX IF NOT EXISTS task_runner_requests_runnable_by_queue
    ON task_runner_requests (queue, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit;

-- Runnable rows of one queue, and of one task type, in claim order, for the
-- claims that take only those: a daemon's `queues:` and a task type with a
-- concurrency limit. The runnable index (0003) passes over every runnable
-- row of the other queues or types ahead of them, and the web page's
-- `runnable_by_queue` (0006, in id order) sorts every runnable row of the
-- queue. The predicate is the runnable rule, written as in migration 0003.
CREATE INDEX IF NOT EXISTS task_runner_requests_runnable_of_queue
    ON task_runner_requests (queue, priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit;
CREATE INDEX IF NOT EXISTS task_runner_requests_runnable_of_type
    ON task_runner_requests (task_class_name, priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit;

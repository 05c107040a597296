-- The runnable index now leaves out exhausted rows (tries >= try_limit), so
-- that a table holding many of them costs the claim nothing. Its predicate is
-- the runnable rule minus the delay, written as the claim query writes it.
DROP INDEX IF EXISTS task_runner_requests_runnable;
CREATE INDEX task_runner_requests_runnable
    ON task_runner_requests (priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit;

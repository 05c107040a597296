-- Rows delayed into the future wait outside the claim's indexes. Before, the
-- claim walked the runnable index in claim order and skipped each row whose
-- delay had not passed: 200,000 rows delayed by a day, ahead of a due row,
-- made every claim read 200,000 index entries (docs/performance.md).
--
-- A delayed row is in the claim's indexes once a daemon has seen its delay
-- pass and written the time it did into `delay_passed_at` (the daemon's
-- release of due rows, `Store::release_delays`). A later `delay_until`
-- (a retry's backoff, an application postponing the row) is past
-- `delay_passed_at`, so the row waits again: nothing else has to clear it.
-- Rows waiting for their time are in `task_runner_requests_waiting`, by
-- `delay_until`: the release and the next delay read only its head.
ALTER TABLE task_runner_requests ADD COLUMN delay_passed_at TIMESTAMPTZ;

DROP INDEX IF EXISTS task_runner_requests_runnable;
CREATE INDEX task_runner_requests_runnable
    ON task_runner_requests (priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit
      AND (delay_until IS NULL OR delay_until <= delay_passed_at);

DROP INDEX IF EXISTS task_runner_requests_runnable_of_queue;
CREATE INDEX task_runner_requests_runnable_of_queue
    ON task_runner_requests (queue, priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit
      AND (delay_until IS NULL OR delay_until <= delay_passed_at);

DROP INDEX IF EXISTS task_runner_requests_runnable_of_type;
CREATE INDEX task_runner_requests_runnable_of_type
    ON task_runner_requests (task_class_name, priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit
      AND (delay_until IS NULL OR delay_until <= delay_passed_at);

CREATE INDEX IF NOT EXISTS task_runner_requests_waiting
    ON task_runner_requests (delay_until)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
      AND tries < try_limit
      AND delay_until IS NOT NULL AND (delay_passed_at IS NULL OR delay_until > delay_passed_at);

-- A release wakes the listening daemons, as a row made runnable does: the
-- daemon that released the rows may not have the slots for all of them.
DROP TRIGGER IF EXISTS task_runner_requests_notify ON task_runner_requests;
CREATE TRIGGER task_runner_requests_notify
AFTER INSERT OR UPDATE OF result, pid, delay_until, delay_passed_at ON task_runner_requests
FOR EACH ROW
WHEN (NEW.pid IS NULL AND (NEW.result IS NULL OR NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')))
EXECUTE FUNCTION task_runner_requests_notify();

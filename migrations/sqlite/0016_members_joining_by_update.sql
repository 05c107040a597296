-- A request given its batch by an UPDATE (an application that inserts the
-- row first and sets `batch_id` later) is counted as a member, as an
-- inserted member is. Before, only an INSERT counted one: the batch's
-- counts (its progress in `batch list`, `batch show` and the web page)
-- left the row out until the batch's end counted its members afresh, and
-- a row could join a batch that had already ended, unnoticed.
--
-- * A row may join a batch only while it is not final (waiting, running,
--   or failed with tries left), and only a batch that exists and is not
--   final (SQLite has one writer at a time: the check and the count cannot
--   race with the batch's end).
-- * A flow's step cannot join a batch: a batch's fail-fast end or its
--   cancel would cancel the step without its flow's lock, and the flow
--   would go on RUNNING with a step CANCELLED under it.
-- * A member stays in its batch: setting another `batch_id`, or NULL, is
--   refused (the batch's counts and its end already include the row).
CREATE TRIGGER IF NOT EXISTS task_runner_requests_batch_join
AFTER UPDATE OF batch_id ON task_runner_requests
WHEN NEW.batch_id IS NOT OLD.batch_id
BEGIN
    SELECT RAISE(ABORT, 'task_runner_requests.batch_id: a member of a batch stays in it (set batch_id only on a row of no batch)')
     WHERE OLD.batch_id IS NOT NULL;
    SELECT RAISE(ABORT, 'task_runner_requests.batch_id: a step of a flow cannot join a batch')
     WHERE NEW.flow_id IS NOT NULL;
    SELECT RAISE(ABORT, 'task_runner_requests.batch_id: a final request cannot join a batch')
     WHERE NOT (NEW.result IS NULL OR NEW.result = 'RUNNING'
                OR (NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND NEW.tries < NEW.try_limit));
    SELECT RAISE(ABORT, 'task_runner_requests.batch_id: the batch does not exist or is final')
     WHERE NOT EXISTS (SELECT 1 FROM task_runner_batches WHERE id = NEW.batch_id AND state IS NULL);
    UPDATE task_runner_batches SET total = total + 1, pending = pending + 1 WHERE id = NEW.batch_id;
END;

-- A request given its batch by an UPDATE (an application that inserts the
-- row first and sets `batch_id` later) is counted as a member, as an
-- inserted member is. Before, only an INSERT counted one: the batch's
-- counts (its progress in `batch list`, `batch show` and the web page)
-- left the row out until the batch's end counted its members afresh, and
-- a row could join a batch that had already ended, unnoticed.
--
-- * A row may join a batch only while it is not final (waiting, running,
--   or failed with tries left), and only a batch that exists and is not
--   final. As for an insert, the count takes the batch row's lock first,
--   so a row never joins a batch that has just become final.
-- * A flow's step cannot join a batch: a batch's fail-fast end or its
--   cancel would cancel the step without its flow's lock, and the flow
--   would go on RUNNING with a step CANCELLED under it.
-- * A member stays in its batch: setting another `batch_id`, or NULL, is
--   refused (the batch's counts and its end already include the row).
CREATE OR REPLACE FUNCTION task_runner_requests_batch_join() RETURNS trigger AS $$
BEGIN
    IF OLD.batch_id IS NOT NULL THEN
        RAISE EXCEPTION 'task_runner_requests.batch_id: request % is a member of batch % and stays in it (set batch_id only on a row of no batch)', OLD.id, OLD.batch_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.flow_id IS NOT NULL THEN
        RAISE EXCEPTION 'task_runner_requests.batch_id: request % is a step of flow % and cannot join a batch', NEW.id, NEW.flow_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (NEW.result IS NULL OR NEW.result = 'RUNNING'
            OR (NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND NEW.tries < NEW.try_limit)) THEN
        RAISE EXCEPTION 'task_runner_requests.batch_id: request % is final (%) and cannot join batch %', NEW.id, NEW.result, NEW.batch_id
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE task_runner_batches SET total = total + 1, pending = pending + 1
     WHERE id = NEW.batch_id AND state IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task_runner_requests.batch_id: batch % does not exist or is final', NEW.batch_id;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- As migration 0013 does for the insert's trigger: the batches are looked
-- for in the schema the function was made in.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION task_runner_requests_batch_join() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

DROP TRIGGER IF EXISTS task_runner_requests_batch_join ON task_runner_requests;
CREATE TRIGGER task_runner_requests_batch_join
AFTER UPDATE OF batch_id ON task_runner_requests
FOR EACH ROW
WHEN (NEW.batch_id IS DISTINCT FROM OLD.batch_id)
EXECUTE FUNCTION task_runner_requests_batch_join();

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
DROP TRIGGER IF EXISTS task_runner_requests_batch_join;
CREATE TRIGGER task_runner_requests_batch_join
AFTER UPDATE ON task_runner_requests
FOR EACH ROW
BEGIN
    DECLARE message VARCHAR(255);
    IF NOT (NEW.batch_id <=> OLD.batch_id) THEN
        IF OLD.batch_id IS NOT NULL THEN
            SET message = CONCAT('task_runner_requests.batch_id: request ', OLD.id, ' is a member of batch ',
                                 OLD.batch_id, ' and stays in it (set batch_id only on a row of no batch)');
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = message;
        ELSEIF NEW.flow_id IS NOT NULL THEN
            SET message = CONCAT('task_runner_requests.batch_id: request ', NEW.id, ' is a step of flow ',
                                 NEW.flow_id, ' and cannot join a batch');
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = message;
        ELSEIF NOT (NEW.result IS NULL OR NEW.result = 'RUNNING'
                    OR (NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND NEW.tries < NEW.try_limit)) THEN
            SET message = CONCAT('task_runner_requests.batch_id: request ', NEW.id, ' is final (', NEW.result,
                                 ') and cannot join batch ', NEW.batch_id);
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = message;
        END IF;
        UPDATE task_runner_batches SET total = total + 1, pending = pending + 1
         WHERE id = NEW.batch_id AND state IS NULL;
        IF ROW_COUNT() = 0 THEN
            SET message = CONCAT('task_runner_requests.batch_id: batch ', NEW.batch_id,
                                 ' does not exist or is final');
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = message;
        END IF;
    END IF;
END;

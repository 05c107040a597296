-- More values an application could write that the daemon would read
-- wrongly are refused with an error naming the rule, as migration 0004's
-- are (its two triggers are made again here with the new rules added):
--
-- * tries below 0: each one below gave the row one more try than its
--   try_limit;
-- * a period below 1 second: the row ran once and silently never again
--   (NULL, the default, is the row that is not periodic).
--
-- (Callback names are VARCHAR(255) columns here already.) As in 0004, an
-- UPDATE is judged only on what it changes, so rows written before this
-- migration can still be claimed, retried and cancelled.
DROP TRIGGER IF EXISTS task_runner_requests_check_insert;
CREATE TRIGGER task_runner_requests_check_insert
BEFORE INSERT ON task_runner_requests
FOR EACH ROW
BEGIN
    IF NEW.try_limit < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: try_limit must be at least 1';
    ELSEIF NEW.tries < 0 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: tries must be a whole number, at least 0';
    ELSEIF NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: a row never run (result NULL) needs tries < try_limit';
    ELSEIF NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED';
    ELSEIF NEW.period < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1';
    END IF;
END;

DROP TRIGGER IF EXISTS task_runner_requests_check_update;
CREATE TRIGGER task_runner_requests_check_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
BEGIN
    IF NOT (NEW.try_limit <=> OLD.try_limit) AND NEW.try_limit < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: try_limit must be at least 1';
    ELSEIF NOT (NEW.tries <=> OLD.tries) AND NEW.tries < 0 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: tries must be a whole number, at least 0';
    ELSEIF (NOT (NEW.result <=> OLD.result) OR NOT (NEW.tries <=> OLD.tries) OR NOT (NEW.try_limit <=> OLD.try_limit))
       AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: a row never run (result NULL) needs tries < try_limit';
    ELSEIF NOT (NEW.result <=> OLD.result)
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED';
    ELSEIF NOT (NEW.period <=> OLD.period) AND NEW.period < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1';
    END IF;
END;
